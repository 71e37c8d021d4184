"""Random but valid resource sets for the differential test (kernel vs sim), reproducible from a seed.

A scenario has two halves:
- the **inventory** (`generate_inventory(seed)`): 2-3 Hosts and 4-8 Workloads (some owned by the
  provider) with labels and attributes, a vNIC with an IPv4 and an IPv6 address (some workloads: a
  second vNIC, or a second address pair), and responders on every fuzz port. A lab is built from it,
  so it stays fixed while policies change. The lab also gets an *outside* host and workload that the
  compiler never sees (`outside_resources`), to probe addresses outside the inventory;
- the **policy** (`generate_policy(inventory, seed)`): Tenants (default drop/allow/reject, some in
  monitor mode), Groups (selectors, static workloads, nested groups, CIDRs, shared provider groups),
  Services (tcp/udp ports, lists and ranges, icmp types/codes, any) and Policies in every category, with
  every action, directions, appliedTo (policy and rule), stateless policies, disabled and logged rules.

`generate(seed)` is both halves with the same seed. Every set passes `omniwall.model.validate.validate`
(references only point at objects that exist and are visible; nested groups only point at groups made
earlier, so there are no cycles).

Ports: every service range either avoids the kernel's ephemeral range (32768-60999) or covers all of
it, so the sim's fixed source port (`EPHEMERAL_SPORT`) and the kernel's random one always give the same
verdict, also for stateless reply rules.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter

from omniwall import PROVIDER_TENANT
from omniwall.model.resources import Resource

TCP_PORTS: tuple[int, ...] = (80, 443, 8080, 8081)
UDP_PORTS: tuple[int, ...] = (53, 5000, 5001)
SERVERS: tuple[str, ...] = ("tcp/80", "tcp/443", "tcp/8080-8081", "udp/53", "udp/5000-5001")
EPHEMERAL_SPORT = 40000  # inside the kernel's ephemeral range; see the module docstring

V4_NET = ipaddress.ip_network("10.88.0.0/16")
V6_NET = ipaddress.ip_network("fd00:88::/32")
TENANTS = ("t1", "t2", "t3")
OUTSIDE_LABEL = "fuzz.omniwall.io/outside"
OUTSIDE_IPS = ("10.88.9.10", "fd00:88:9::a")

# Inline services: probes hit some and miss others (range edges around the fuzz ports).
TCP_SERVICES = (
    "tcp/80",
    "tcp/443",
    "tcp/8080",
    "tcp/8081",
    "tcp/80,443",
    "tcp/79-80",
    "tcp/81-442",
    "tcp/8000-8080",
    "tcp/8081-8090",
    "tcp/1-65535",
    "tcp/1024-65535",  # covers the whole ephemeral range: a stateless reply rule
    "tcp/22",
)
UDP_SERVICES = (
    "udp/53",
    "udp/5000",
    "udp/5001",
    "udp/53,5001",
    "udp/4999-5000",
    "udp/5001-5100",
    "udp/1-65535",
    "udp/1024-65535",
    "udp/123",
)
ICMP_SERVICES = (
    "icmp",
    "icmp/8",
    "icmp/0",  # echo reply: a stateless reply rule
    "icmp/8/0",
    "icmp/8/1",  # never an echo request (code 0)
    "icmp/3/4",
    "icmpv6",
    "icmpv6/128",
    "icmpv6/129",
    "icmpv6/1/3",
)
ANY_SERVICE = ("any",)

ROLES = ("web", "app", "db", "cache")
ENVS = ("prod", "dev")
ZONES = ("a", "b")
USERS = ("alice", "bob", "carol")

_ADAPTER: TypeAdapter[Any] = TypeAdapter(Resource)


def resource(data: dict[str, Any]) -> Any:
    return _ADAPTER.validate_python(data)


@dataclass(frozen=True)
class WorkloadInfo:
    tenant: str
    name: str
    host: str
    ip4: str
    ip6: str
    labels: dict[str, str] = field(default_factory=dict)
    ips: tuple[str, ...] = ()  # every address of every vNIC

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.name}"


@dataclass(frozen=True)
class Inventory:
    seed: int
    hosts: tuple[str, ...]
    workloads: tuple[WorkloadInfo, ...]
    tenants: tuple[str, ...]  # tenants other than the provider (some may have no workloads)
    resources: tuple[Any, ...]  # Hosts and Workloads
    # Lab-only: a Host and a Workload outside the inventory (labelled OUTSIDE_LABEL). The lab builds
    # them, the compiler never sees them: traffic to and from `outside_ips` is judged at the inventory
    # side only, and crosses the outside host unfiltered, as from a machine Omniwall does not manage.
    outside_resources: tuple[Any, ...] = ()
    outside_ips: tuple[str, ...] = ()

    @property
    def lab_resources(self) -> tuple[Any, ...]:
        return (*self.resources, *self.outside_resources)

    def workloads_of(self, tenant: str) -> list[WorkloadInfo]:
        return [w for w in self.workloads if w.tenant == tenant]


def _ips(i: int) -> tuple[str, str]:
    """Two subnets (10.88.1.0/24 and 10.88.2.0/24, same for v6), so CIDRs can pick out a part."""
    subnet = 1 + i % 2
    return f"10.88.{subnet}.{10 + i}", f"fd00:88:{subnet}::{10 + i:x}"


def outside_resources(ip4: str = OUTSIDE_IPS[0], ip6: str = OUTSIDE_IPS[1]) -> tuple[Any, ...]:
    """A Host and a Workload for the lab only (see `Inventory.outside_resources`)."""
    labels = {OUTSIDE_LABEL: "true"}
    return (
        resource({"kind": "Host", "metadata": {"name": "outside", "labels": labels}}),
        resource(
            {
                "kind": "Workload",
                "metadata": {"name": "ext", "tenant": "outside", "labels": labels},
                "spec": {
                    "host": "outside",
                    "vnics": [{"name": "eth0", "ips": [ip4, ip6]}],
                    "lab": {"servers": list(SERVERS)},
                },
            }
        ),
    )


def is_outside(r: Any) -> bool:
    return r.metadata.labels.get(OUTSIDE_LABEL) == "true"


def generate_inventory(
    seed: int,
    *,
    workloads: int | tuple[int, int] = (4, 8),
    hosts: int | tuple[int, int] = (2, 3),
    outside: bool = True,
) -> Inventory:
    rng = random.Random(f"inventory/{seed}")
    n_hosts = hosts if isinstance(hosts, int) else rng.randint(*hosts)
    n_wl = workloads if isinstance(workloads, int) else rng.randint(*workloads)
    host_names = tuple(f"h{i + 1}" for i in range(n_hosts))
    tenants = tuple(TENANTS[: rng.randint(1, len(TENANTS))])
    out: list[Any] = [resource({"kind": "Host", "metadata": {"name": h}}) for h in host_names]
    infos = []
    for i in range(n_wl):
        # At least one workload per tenant for the first tenants; some provider workloads.
        tenant = tenants[i] if i < len(tenants) else rng.choice([*tenants, *tenants, PROVIDER_TENANT])
        name = f"w{i + 1}"
        host = host_names[i % n_hosts] if i < n_hosts else rng.choice(host_names)
        ip4, ip6 = _ips(i)
        labels = {"role": rng.choice(ROLES)}
        if rng.random() < 0.8:
            labels["env"] = rng.choice(ENVS)
        attributes: dict[str, Any] = {}
        if rng.random() < 0.7:
            attributes["zone"] = rng.choice(ZONES)
        if rng.random() < 0.6:
            attributes["level"] = rng.randint(1, 3)
        if rng.random() < 0.6:
            attributes["users"] = sorted(rng.sample(USERS, rng.randint(1, 2)))
        if rng.random() < 0.5:
            attributes["pci"] = rng.random() < 0.5
        vnics: list[dict[str, Any]] = [{"name": "eth0", "ips": [ip4, ip6]}]
        extra = rng.random()
        if extra < 0.2:  # a second vNIC (its own host interface, chains and anti-spoofing)
            vnics.append({"name": "eth1", "ips": [f"10.88.3.{10 + i}", f"fd00:88:3::{10 + i:x}"]})
        elif extra < 0.35:  # a second address pair on the first vNIC
            vnics[0]["ips"] += [f"10.88.4.{10 + i}", f"fd00:88:4::{10 + i:x}"]
        ips = tuple(ip for v in vnics for ip in v["ips"])
        infos.append(WorkloadInfo(tenant, name, host, ip4, ip6, labels, ips))
        out.append(
            resource(
                {
                    "kind": "Workload",
                    "metadata": {"name": name, "tenant": tenant, "labels": labels},
                    "spec": {
                        "host": host,
                        "vnics": vnics,
                        "attributes": attributes,
                        "lab": {"servers": list(SERVERS)},
                    },
                }
            )
        )
    extra = outside_resources() if outside else ()
    return Inventory(
        seed, host_names, tuple(infos), tenants, tuple(out), extra, OUTSIDE_IPS if outside else ()
    )


# ------------------------------------------------------------------------------------------- policy


def _atom(rng: random.Random) -> str:
    kind = rng.randrange(10)
    if kind == 0:
        return f'role == "{rng.choice(ROLES)}"'
    if kind == 1:
        return f'role != "{rng.choice(ROLES)}"'
    if kind == 2:
        vals = ", ".join(f'"{v}"' for v in rng.sample(ROLES, 2))
        return f"role {'in' if rng.random() < 0.6 else 'not in'} {{{vals}}}"
    if kind == 3:
        return f'env == "{rng.choice(ENVS)}"'
    if kind == 4:
        return f"has({rng.choice(('env', 'zone', 'users', 'pci', 'level'))})"
    if kind == 5:
        return f'zone == "{rng.choice(ZONES)}"'
    if kind == 6:
        return f"level == {rng.randint(1, 3)}"
    if kind == 7:
        return f'users in {{"{rng.choice(USERS)}"}}'
    if kind == 8:
        return f"pci == {rng.choice(('true', 'false'))}"
    return f'label("role") == "{rng.choice(ROLES)}"'


def _selector(rng: random.Random, depth: int = 0) -> str:
    r = rng.random()
    if depth >= 2 or r < 0.45:
        return "all()" if rng.random() < 0.05 else _atom(rng)
    if r < 0.55:
        return f"!({_selector(rng, depth + 1)})"
    op = " && " if rng.random() < 0.5 else " || "
    return f"({_selector(rng, depth + 1)}{op}{_selector(rng, depth + 1)})"


def _cidr(rng: random.Random, inv: Inventory, literal: bool = False) -> str:
    """A CIDR (or address) that covers one workload (or the outside one) and maybe more, or nothing."""
    if rng.random() < 0.1:
        return rng.choice(("192.0.2.0/24", "2001:db8::/32", "10.99.0.0/16"))
    if inv.outside_ips and rng.random() < 0.15:
        ip = ipaddress.ip_address(rng.choice(inv.outside_ips))
    else:
        ip = ipaddress.ip_address(rng.choice(rng.choice(inv.workloads).ips))
    if literal and rng.random() < 0.5:
        return str(ip)
    lengths = (32, 31, 30, 28, 24, 16, 8, 0) if ip.version == 4 else (128, 127, 124, 64, 48, 32, 0)
    return str(ipaddress.ip_network(f"{ip}/{rng.choice(lengths)}", strict=False))


@dataclass
class _Names:
    """What exists so far and who may reference it."""

    groups: list[tuple[str, str]] = field(default_factory=list)  # (tenant, name), in creation order
    shared: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # provider group -> shareWith
    services: list[tuple[str, str]] = field(default_factory=list)

    def group_refs(self, tenant: str) -> list[str]:
        """References `tenant` may make to the groups made so far."""
        out = []
        for owner, name in self.groups:
            if owner == tenant:
                out.append(name)
            elif tenant == PROVIDER_TENANT:
                out.append(f"{owner}/{name}")
            elif owner == PROVIDER_TENANT:
                share = self.shared.get((owner, name), [])
                if "*" in share or tenant in share:
                    out.append(f"{PROVIDER_TENANT}/{name}")
        return out

    def service_refs(self, tenant: str) -> list[str]:
        out = []
        for owner, name in self.services:
            if owner == tenant:
                out.append(name)
            elif owner == PROVIDER_TENANT:
                out.append(f"{PROVIDER_TENANT}/{name}")
        return out


def _group(rng: random.Random, inv: Inventory, names: _Names, tenant: str, name: str) -> Any:
    spec: dict[str, Any] = {}
    parts = rng.sample(("selector", "workloads", "groups", "cidrs"), rng.choice((1, 1, 1, 2, 2, 3)))
    if "selector" in parts:
        spec["selector"] = _selector(rng)
    own = [w.name for w in inv.workloads_of(tenant)]
    if "workloads" in parts and own:
        spec["workloads"] = sorted(rng.sample(own, rng.randint(1, min(2, len(own)))))
    refs = names.group_refs(tenant)
    if "groups" in parts and refs:
        spec["groups"] = sorted(rng.sample(refs, rng.randint(1, min(2, len(refs)))))
    if "cidrs" in parts or not spec:
        spec["cidrs"] = sorted({_cidr(rng, inv) for _ in range(rng.randint(1, 2))})
    if tenant == PROVIDER_TENANT:
        share = rng.choice((["*"], ["*"], [], [rng.choice(inv.tenants)]))
        if share:
            spec["shareWith"] = share
        names.shared[(tenant, name)] = share
    names.groups.append((tenant, name))
    return resource({"kind": "Group", "metadata": {"name": name, "tenant": tenant}, "spec": spec})


def _service(rng: random.Random, names: _Names, tenant: str, name: str) -> Any:
    kind = rng.randrange(6)
    if kind == 0:
        spec: dict[str, Any] = {"protocol": "tcp", "ports": rng.sample([80, 443, 8080, "8000-8080", 22], 2)}
    elif kind == 1:
        spec = {"protocol": "udp", "ports": [rng.choice([53, 5000, "5000-5001", "1024-65535"])]}
    elif kind == 2:
        spec = {"protocol": rng.choice(("tcp", "udp"))}  # every port
    elif kind == 3:
        spec = {"protocol": "icmp", "icmpType": rng.choice((8, 0, 3))}
        if rng.random() < 0.3:
            spec["icmpCode"] = rng.choice((0, 1))
    elif kind == 4:
        spec = {"protocol": "icmpv6", "icmpType": rng.choice((128, 129))}
    else:
        spec = {"protocol": "any"}
    names.services.append((tenant, name))
    return resource({"kind": "Service", "metadata": {"name": name, "tenant": tenant}, "spec": spec})


def _peers(rng: random.Random, inv: Inventory, names: _Names, tenant: str) -> list[str]:
    if rng.random() < 0.4:
        return ["any"]
    refs = names.group_refs(tenant)
    out: list[str] = []
    for _ in range(rng.choice((1, 1, 2))):
        if refs and rng.random() < 0.75:
            out.append(rng.choice(refs))
        else:
            out.append(_cidr(rng, inv, literal=True))
    return sorted(set(out))


def _services(rng: random.Random, names: _Names, tenant: str) -> list[str]:
    if rng.random() < 0.3:
        return []
    out = []
    named = names.service_refs(tenant)
    for _ in range(rng.choice((1, 1, 2, 3))):
        r = rng.random()
        if named and r < 0.2:
            out.append(rng.choice(named))
        elif r < 0.5:
            out.append(rng.choice(TCP_SERVICES))
        elif r < 0.7:
            out.append(rng.choice(UDP_SERVICES))
        elif r < 0.95:
            out.append(rng.choice(ICMP_SERVICES))
        else:
            out.append("any")
    return list(dict.fromkeys(out))


def _applied_to(rng: random.Random, names: _Names, tenant: str, n: int) -> list[str]:
    refs = names.group_refs(tenant)
    return sorted(rng.sample(refs, min(n, len(refs)))) if refs else []


def _policy(
    rng: random.Random, inv: Inventory, names: _Names, tenant: str, name: str, stateless: bool = True
) -> Any:
    if tenant == PROVIDER_TENANT:
        category = rng.choice(
            ("emergency", "infrastructure", "infrastructure", "environment", "application", "baseline")
        )
    else:
        category = rng.choice(("environment", "application", "application"))
    spec: dict[str, Any] = {
        "category": category,
        "priority": rng.choice((100, 500, 1000, 1000, 2000)),
        "stateful": rng.random() >= 0.2 or not stateless,
    }
    if rng.random() < 0.25:
        spec["appliedTo"] = _applied_to(rng, names, tenant, rng.randint(1, 2))
    rules = []
    for j in range(rng.randint(1, 5)):
        rule: dict[str, Any] = {
            "name": f"r{j + 1}",
            "sources": _peers(rng, inv, names, tenant),
            "destinations": _peers(rng, inv, names, tenant),
            # A baseline rule cannot pass (nothing follows it but the default).
            "action": rng.choices(
                ("allow", "drop", "reject", "pass"), (50, 20, 15, 0 if category == "baseline" else 15)
            )[0],
        }
        services = _services(rng, names, tenant)
        if services:
            rule["services"] = services
        direction = rng.choices(("both", "in", "out"), (60, 20, 20))[0]
        if direction != "both":
            rule["direction"] = direction
        if rng.random() < 0.15:
            rule["appliedTo"] = _applied_to(rng, names, tenant, 1)
        if rng.random() < 0.2:
            rule["log"] = True
        if rng.random() < 0.1:
            rule["disabled"] = True
        rules.append(rule)
    spec["rules"] = rules
    return resource({"kind": "Policy", "metadata": {"name": name, "tenant": tenant}, "spec": spec})


def generate_policy(inv: Inventory, seed: int | str) -> list[Any]:
    """Tenants, Groups, Services and Policies over `inv` (which they never change)."""
    rng = random.Random(f"policy/{inv.seed}/{seed}")
    out: list[Any] = []
    tenants = [PROVIDER_TENANT, *inv.tenants]
    for t in tenants:
        spec: dict[str, Any] = {
            "defaultAction": rng.choices(("drop", "allow", "reject"), (35, 45, 20))[0],
        }
        if rng.random() < (0.1 if t == PROVIDER_TENANT else 0.2):
            spec["mode"] = "monitor"
        if rng.random() < 0.9:  # an undeclared tenant gets the defaults (drop, enforce)
            out.append(resource({"kind": "Tenant", "metadata": {"name": t}, "spec": spec}))
    names = _Names()
    for i in range(rng.randint(0, 2)):
        out.append(_service(rng, names, rng.choice(tenants), f"s{i + 1}"))
    # One sequence across tenants, so a tenant group can nest a provider group made before it, and back.
    for i in range(rng.randint(3, 8)):
        out.append(_group(rng, inv, names, rng.choice(tenants), f"g{i + 1}"))
    # Half the rounds have no stateless policy at all: only then do the hosts take their ingress allowed
    # flow records from conntrack NEW events (render.allowed_from_conntrack), which attribution checks.
    # A coin of its own, so the other draws (and every other case of a seed) stay as they were.
    stateless = random.Random(f"stateless/{inv.seed}/{seed}").random() < 0.5
    for i in range(rng.randint(2, 7)):
        out.append(_policy(rng, inv, names, rng.choice(tenants), f"p{i + 1}", stateless))
    return out


def generate(seed: int, **inventory_args: Any) -> list[Any]:
    """A whole scenario: inventory and policy from one seed."""
    inv = generate_inventory(seed, **inventory_args)
    return [*inv.resources, *generate_policy(inv, 0)]


__all__ = [
    "EPHEMERAL_SPORT",
    "OUTSIDE_LABEL",
    "SERVERS",
    "TCP_PORTS",
    "UDP_PORTS",
    "Inventory",
    "WorkloadInfo",
    "generate",
    "generate_inventory",
    "generate_policy",
    "is_outside",
    "outside_resources",
]
