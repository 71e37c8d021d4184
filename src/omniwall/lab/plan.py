"""The lab's shape, computed (purely) from the inventory: namespace names, interface names, addresses.

Pure and JSON round-trippable: `topology.build` realizes a `LabPlan`, and the state file stores it, so
`lab down/exec/matrix` in a later process know exactly what was built without re-reading the YAML.

Layout (DESIGN.md §9):
- a fabric namespace `<prefix>fabric` with bridge `br0`;
- per Host a namespace `<prefix>h-<host>`, veth `fabric0` to the bridge, fabric address
  172.31.255.<n>/24 (and link-local fe80::ff:<n>/64 for IPv6 next hops);
- per Workload a namespace `<prefix>w-<tenant>-<name>`; per vNIC a veth named after the vNIC inside
  the workload and `vnic_ifname(workload, vnic)` on the host, so the compiler's IR interface names
  are the real ones. Workload addresses are /32 (/128), default route via 169.254.1.1 (fe80::1) onlink.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import asdict, dataclass
from typing import Any

from omniwall.lab.responder import ResponderError, parse_server
from omniwall.model.catalog import Catalog
from omniwall.model.resources import vnic_ifname

FABRIC_NET = ipaddress.ip_network("172.31.255.0/24")
FABRIC_BRIDGE = "br0"
FABRIC_IFNAME = "fabric0"  # host side of a host's fabric link
GATEWAY4 = "169.254.1.1"  # every workload's default gateway, answered by its host
GATEWAY6 = "fe80::1"
MAX_NETNS_NAME = 48  # netns names may be longer, but keep `ip netns list` readable
MAX_HOSTS = 250
IFNAME_RE = re.compile(r"[A-Za-z0-9._-]{1,15}")


class PlanError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class HostPlan:
    name: str
    netns: str
    fabric_peer: str  # the host's port on the fabric bridge (inside the fabric namespace)
    fabric_ip4: str
    fabric_ip6: str  # link-local, scope of fabric0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class VnicPlan:
    name: str  # interface name inside the workload (eth0)
    host_ifname: str  # interface name on the host (the IR's IRVnic.ifname)
    ips: tuple[str, ...]
    mac: str | None = None

    @property
    def ips4(self) -> tuple[str, ...]:
        return tuple(ip for ip in self.ips if ipaddress.ip_address(ip).version == 4)

    @property
    def ips6(self) -> tuple[str, ...]:
        return tuple(ip for ip in self.ips if ipaddress.ip_address(ip).version == 6)


@dataclass(frozen=True, slots=True)
class WorkloadPlan:
    tenant: str
    name: str
    host: str
    netns: str
    vnics: tuple[VnicPlan, ...]
    servers: tuple[str, ...]  # lab.servers: tcp/80, udp/53, ...
    kind: str = "netns"  # lab.kind: netns | vm (a QEMU guest, lab/vm.py; `netns` then names its run dir)

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.name}"

    @property
    def ips(self) -> tuple[str, ...]:
        return tuple(ip for v in self.vnics for ip in v.ips)

    def address(self, family: int = 4) -> str | None:
        """The workload's first address of that family (what the matrix probes)."""
        for ip in self.ips:
            if ipaddress.ip_address(ip).version == family:
                return ip
        return None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class LabPlan:
    prefix: str
    fabric_netns: str
    hosts: tuple[HostPlan, ...]
    workloads: tuple[WorkloadPlan, ...]

    def host(self, name: str) -> HostPlan:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(f"no host {name!r} in the lab (hosts: {', '.join(h.name for h in self.hosts)})")

    def workload(self, ref: str) -> WorkloadPlan:
        """`tenant/name`, or a bare `name` when only one tenant has a workload of that name."""
        if "/" in ref:
            for w in self.workloads:
                if w.key == ref:
                    return w
            raise KeyError(f"no workload {ref!r} in the lab")
        found = [w for w in self.workloads if w.name == ref]
        if len(found) == 1:
            return found[0]
        if not found:
            raise KeyError(f"no workload {ref!r} in the lab")
        raise KeyError(f"workload name {ref!r} is ambiguous: {', '.join(w.key for w in found)}")

    def namespaces(self) -> list[str]:
        return [self.fabric_netns, *(h.netns for h in self.hosts), *(w.netns for w in self.workloads)]

    def to_json(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "fabric_netns": self.fabric_netns,
            "hosts": [h.to_json() for h in self.hosts],
            "workloads": [w.to_json() for w in self.workloads],
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> LabPlan:
        return LabPlan(
            prefix=d["prefix"],
            fabric_netns=d["fabric_netns"],
            hosts=tuple(HostPlan(**h) for h in d["hosts"]),
            workloads=tuple(
                WorkloadPlan(
                    tenant=w["tenant"],
                    name=w["name"],
                    host=w["host"],
                    netns=w["netns"],
                    vnics=tuple(
                        VnicPlan(
                            name=v["name"], host_ifname=v["host_ifname"], ips=tuple(v["ips"]), mac=v["mac"]
                        )
                        for v in w["vnics"]
                    ),
                    servers=tuple(w["servers"]),
                    kind=w.get("kind", "netns"),
                )
                for w in d["workloads"]
            ),
        )


def netns_name(prefix: str, kind: str, *parts: str) -> str:
    """`<prefix><kind>-<parts...>`, or a stable hash of the parts when that would be too long."""
    name = f"{prefix}{kind}-{'-'.join(parts)}"
    if len(name) <= MAX_NETNS_NAME:
        return name
    digest = hashlib.sha1("/".join(parts).encode()).hexdigest()[:12]
    return f"{prefix}{kind}-{digest}"


def plan_lab(catalog: Catalog, prefix: str, *, ipv6: bool = True) -> LabPlan:
    """The lab for `catalog`'s hosts and workloads. `ipv6=False` drops IPv6 workload addresses."""
    hosts_sorted = sorted(catalog.hosts)
    if len(hosts_sorted) > MAX_HOSTS:
        raise PlanError(f"the lab supports at most {MAX_HOSTS} hosts, got {len(hosts_sorted)}")
    hosts = tuple(
        HostPlan(
            name=h,
            netns=netns_name(prefix, "h", h),
            fabric_peer=f"p{i + 1}",
            fabric_ip4=str(FABRIC_NET.network_address + i + 1),
            fabric_ip6=f"fe80::ff:{i + 1:x}",
        )
        for i, h in enumerate(hosts_sorted)
    )
    workloads = []
    seen_ips: dict[str, str] = {}
    seen_netns: dict[str, str] = {}
    seen_ifnames: dict[tuple[str, str], str] = {}
    for (tenant, name), wl in sorted(catalog.workloads.items()):
        key = f"{tenant}/{name}"
        if wl.spec.host not in catalog.hosts:
            raise PlanError(
                f"Workload {key}: spec.host {wl.spec.host!r} is not a Host in the lab's resources"
            )
        vnics = []
        for vnic in wl.spec.vnics:
            ips = tuple(ip for ip in vnic.ips if ipv6 or ipaddress.ip_address(ip).version == 4)
            for ip in ips:
                if ip in seen_ips:
                    raise PlanError(f"Workload {key}: address {ip} is also used by {seen_ips[ip]}")
                if ipaddress.ip_address(ip) in FABRIC_NET:
                    raise PlanError(f"Workload {key}: address {ip} is inside the lab fabric {FABRIC_NET}")
                seen_ips[ip] = key
            if not IFNAME_RE.fullmatch(vnic.name) or vnic.name == "lo":
                raise PlanError(f"Workload {key}: vNIC name {vnic.name!r} is not a usable interface name")
            host_if = vnic_ifname(wl, vnic)
            if (wl.spec.host, host_if) in seen_ifnames or host_if == FABRIC_IFNAME:
                other = seen_ifnames.get((wl.spec.host, host_if), "the fabric link")
                raise PlanError(f"Workload {key}: host interface {host_if} on {wl.spec.host} is also {other}")
            seen_ifnames[(wl.spec.host, host_if)] = key
            vnics.append(VnicPlan(vnic.name, host_if, ips, vnic.mac))
        netns = netns_name(prefix, "w", tenant, name)
        if netns in seen_netns:  # only possible with a hash collision or a pathological prefix
            raise PlanError(f"Workload {key}: namespace name {netns} collides with {seen_netns[netns]}")
        seen_netns[netns] = key
        servers = tuple(wl.spec.lab.servers) if wl.spec.lab else ()
        for i, entry in enumerate(servers):
            try:
                parse_server(entry)
            except ResponderError as e:
                raise PlanError(f"Workload {key}: spec.lab.servers[{i}]: {e}") from None
        kind = wl.spec.lab.kind if wl.spec.lab else "netns"
        if kind == "vm":
            _check_vm(key, vnics, servers)
        workloads.append(WorkloadPlan(tenant, name, wl.spec.host, netns, tuple(vnics), servers, kind))
    return LabPlan(prefix=prefix, fabric_netns=f"{prefix}fabric", hosts=hosts, workloads=tuple(workloads))


def _check_vm(key: str, vnics: list[VnicPlan], servers: tuple[str, ...]) -> None:
    """What a lab guest (lab/vm.py) can do: one vNIC; TCP and ICMP responders (busybox has no UDP server)."""
    if len(vnics) != 1:
        raise PlanError(f"Workload {key}: spec.vnics: a VM workload (lab.kind vm) has exactly one vNIC")
    for i, entry in enumerate(servers):
        if entry.strip().startswith("udp/"):
            raise PlanError(
                f"Workload {key}: spec.lab.servers[{i}]: {entry!r}: VM guests serve only tcp and icmp"
            )
