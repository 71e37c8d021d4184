"""Kubernetes NetworkPolicy import, tested against the upstream specification.

The strongest tests build small clusters (pods as Workloads on hosts, Namespace objects, policies),
import them, compile the result with the real compiler and judge every pod/external pair and port with
the sim, then compare with `k8s_allows`: an oracle written here, directly from the upstream text
(kubernetes.io "Network Policies" and the networking.k8s.io/v1 API reference), on the raw YAML, sharing
no code with the importer. A hypothesis fuzzer does the same on random policies.
"""

from __future__ import annotations

import ipaddress
import json
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from omniwall.k8s import K8sImportError, import_files, read_inputs
from omniwall.k8s.labels import (
    LabelSelector,
    NamespaceSet,
    Requirement,
    pod_selector_text,
    resolve_namespaces,
)
from omniwall.k8s.names import resource_name
from omniwall.k8s.objects import IPBlock
from omniwall.model.loader import load_files, load_text
from omniwall.model.resources import NAME_RE, Group, Policy, Tenant
from omniwall.model.validate import validate
from omniwall.selectors import facts_of, parse

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "k8s"
TENANT = "t"
NS_NAME = "kubernetes.io/metadata.name"

# ------------------------------------------------------------------------------------ the test cluster

# Namespace objects given to the importer; `tools` has pods but no object: only the implicit label.
NAMESPACES: dict[str, dict[str, str]] = {
    "prod": {"env": "prod", "team": "a"},
    "dev": {"env": "dev", "team": "b"},
}


@dataclass(frozen=True)
class Endpoint:
    name: str
    ip: str
    namespace: str | None = None  # None: not a pod (an external address, or a non-pod workload)
    labels: Mapping[str, str] | None = None
    ports: Mapping[str, str] | None = None  # named ports: name -> "tcp/80"
    host: str | None = None

    @property
    def is_pod(self) -> bool:
        return self.namespace is not None


PODS = [
    Endpoint(
        "web-1",
        "10.9.0.1",
        "prod",
        {"app": "web", "tier": "fe"},
        {"http": "tcp/80", "metrics": "tcp/9100"},
        "h1",
    ),
    Endpoint(
        "web-2", "10.9.0.2", "prod", {"app": "web", "tier": "fe", "canary": "yes"}, {"http": "tcp/8080"}, "h2"
    ),
    Endpoint(
        "db-1",
        "10.9.0.3",
        "prod",
        {"app": "db"},
        {"sql": "tcp/5432", "metrics": "tcp/9187", "dns": "udp/53"},
        "h2",
    ),
    Endpoint("dev-1", "10.9.1.1", "dev", {"app": "web"}, {"http": "tcp/80"}, "h1"),
    Endpoint("dev-2", "10.9.1.2", "dev", {"app": "client", "role": "scraper"}, {}, "h2"),
    Endpoint("tools-1", "10.9.2.1", "tools", {"app": "client"}, {"http": "udp/80"}, "h1"),
]
# A workload of the tenant that is no pod (no k8s.namespace): to Kubernetes, just an address.
VM = Endpoint("vm-1", "10.9.3.1", None, {"app": "web"}, {}, "h1")
EXTERNALS = [Endpoint(f"ext-{ip}", ip) for ip in ("8.8.8.8", "10.20.5.5", "10.20.1.1", "192.168.1.1")]
ENDPOINTS = [*PODS, VM, *EXTERNALS]
PORTS = [("tcp", p) for p in (53, 80, 443, 5432, 8080, 9100, 9187, 32000, 32769)] + [("udp", 53), ("udp", 80)]


def inventory_yaml(pods: Iterable[Endpoint] = PODS, vm: Endpoint | None = VM) -> str:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "omniwall.io/v1", "kind": "Host", "metadata": {"name": h}} for h in ("h1", "h2")
    ]
    for e in [*pods, *([vm] if vm else [])]:
        spec: dict[str, Any] = {
            "host": e.host,
            "vnics": [{"name": "eth0", "ips": [e.ip]}],
            "ports": dict(e.ports or {}),
        }
        if e.namespace:
            spec["attributes"] = {"k8s.namespace": e.namespace}
        docs.append(
            {
                "apiVersion": "omniwall.io/v1",
                "kind": "Workload",
                "metadata": {"name": e.name, "tenant": TENANT, "labels": dict(e.labels or {})},
                "spec": spec,
            }
        )
    return yaml.safe_dump_all(docs, sort_keys=False)


def namespaces_yaml(namespaces: Mapping[str, Mapping[str, str]] = NAMESPACES) -> str:
    return yaml.safe_dump_all(
        [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n, "labels": dict(labels)}}
            for n, labels in namespaces.items()
        ]
    )


def policy(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


# ------------------------------------------------------------------------ the oracle (upstream spec)


def selector_matches(sel: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """LabelSelector: matchLabels AND matchExpressions; NotIn/DoesNotExist hold when the key is missing."""
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and not (key in labels and labels[key] in values):
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def namespace_labels(ns: str, namespaces: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    return {**namespaces.get(ns, {}), NS_NAME: ns}


def policy_types(spec: Mapping[str, Any]) -> list[str]:
    """Defaulting: Ingress always, Egress when the policy has egress rules."""
    return spec.get("policyTypes") or (["Ingress", "Egress"] if spec.get("egress") else ["Ingress"])


def peer_matches(peer: Mapping[str, Any], policy_ns: str, other: Endpoint, namespaces: Mapping) -> bool:
    if "ipBlock" in peer:
        ip = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"], strict=False) and not any(
            ip in ipaddress.ip_network(x) for x in block.get("except") or []
        )
    if not other.is_pod:
        return False
    ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
    if ns_sel is None:
        ns_ok = other.namespace == policy_ns  # podSelector alone: the policy's own namespace
    else:
        ns_ok = selector_matches(ns_sel, namespace_labels(other.namespace, namespaces))  # type: ignore[arg-type]
    return ns_ok and (pod_sel is None or selector_matches(pod_sel, other.labels or {}))


def port_matches(entry: Mapping[str, Any], proto: str, port: int, dst: Endpoint) -> bool:
    if entry.get("protocol", "TCP").lower() != proto:
        return False
    if entry.get("port") is None:
        return True  # every port of the protocol
    p = entry["port"]
    if isinstance(p, int):
        return p <= port <= entry.get("endPort", p)
    # A named port is a port of the destination pod.
    return dst.is_pod and (dst.ports or {}).get(p) == f"{proto}/{port}"


def direction_allows(
    pod: Endpoint, other: Endpoint, direction: str, proto: str, port: int, dst: Endpoint, policies, namespaces
) -> bool:
    applicable = [
        p
        for p in policies
        if p["metadata"].get("namespace", "default") == pod.namespace
        and selector_matches(p["spec"].get("podSelector") or {}, pod.labels or {})
        and direction in policy_types(p["spec"])
    ]
    if not applicable:
        return True  # not isolated in this direction
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for p in applicable:
        ns = p["metadata"].get("namespace", "default")
        for rule in p["spec"].get(rules_key) or []:
            peers, ports = rule.get(peers_key) or [], rule.get("ports") or []
            if (not peers or any(peer_matches(x, ns, other, namespaces) for x in peers)) and (
                not ports or any(port_matches(e, proto, port, dst) for e in ports)
            ):
                return True
    return False


def k8s_allows(src: Endpoint, dst: Endpoint, proto: str, port: int, policies, namespaces=NAMESPACES) -> bool:
    """Is a new connection src -> dst:port allowed? Source egress AND destination ingress."""
    if src.ip == dst.ip:
        return True  # a pod cannot block access to itself
    egress = not src.is_pod or direction_allows(src, dst, "Egress", proto, port, dst, policies, namespaces)
    ingress = not dst.is_pod or direction_allows(dst, src, "Ingress", proto, port, dst, policies, namespaces)
    return egress and ingress


# ----------------------------------------------------------------------- import, compile and compare


def write_inputs(tmp: Path, policies: list[dict], namespaces=NAMESPACES, pods=PODS) -> list[Path]:
    files = {
        "inventory.yaml": inventory_yaml(pods),
        "namespaces.yaml": namespaces_yaml(namespaces),
        "policies.yaml": yaml.safe_dump_all(policies, sort_keys=False) if policies else "",
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    return [tmp / n for n in files]


def compile_states(resources: list) -> dict:
    build = pytest.importorskip("omniwall.compiler.build", reason="compiler not available yet")
    return build.compile_catalog(validate(resources))


def mismatches(tmp: Path, policies: list[dict], namespaces=NAMESPACES, pods=PODS) -> list[str]:
    """Every (src, dst, port) where the compiled import and the oracle disagree."""
    from omniwall.sim import Packet, judge_path

    files = write_inputs(tmp, policies, namespaces, pods)
    result = import_files(files, TENANT)
    # What a user applies: the inventory plus the printed output, read back through the loader.
    printed = load_text(_yaml_of(result.resources), "<import>")
    states = compile_states([*load_files([files[0]]), *printed])
    bad = []
    endpoints = [*pods, VM, *EXTERNALS]
    for src in endpoints:
        for dst in endpoints:
            if not (src.host or dst.host):
                continue  # neither end in the inventory: not ours
            for proto, port in PORTS:
                want = k8s_allows(src, dst, proto, port, policies, namespaces)
                got = judge_path(states, Packet(src.ip, dst.ip, proto, sport=40000, dport=port)).allowed
                if got != want:
                    bad.append(f"{src.name} -> {dst.name} {proto}/{port}: omniwall {got}, upstream {want}")
    return bad


def _yaml_of(resources: list) -> str:
    from omniwall.k8s.output import to_yaml

    return to_yaml(resources)


def scenario(*docs: str) -> list[dict]:
    return [d for text in docs for d in yaml.safe_load_all(textwrap.dedent(text)) if d]


# One scenario per feature of the upstream specification.
SCENARIOS: dict[str, list[dict]] = {
    "no-policy-everything-allowed": [],
    "default-deny-ingress-only-selects-its-namespace": scenario(
        """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: default-deny-ingress, namespace: prod}
        spec: {podSelector: {}}
        """
    ),
    "default-deny-egress": scenario(
        """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: default-deny-egress, namespace: dev}
        spec: {podSelector: {}, policyTypes: [Egress]}
        """
    ),
    "default-deny-all-plus-allow-all-ingress-union": scenario(
        """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: deny-all, namespace: prod}
        spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: allow-all-ingress-db, namespace: prod}
        spec:
          podSelector: {matchLabels: {app: db}}
          ingress: [{}]
        """
    ),
    "namespace-isolation": scenario(
        """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: same-namespace-only, namespace: prod}
        spec:
          podSelector: {}
          ingress:
            - from: [{podSelector: {}}]
        """
    ),
    "and-vs-or-peers": scenario(
        """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: and-peer, namespace: prod}
        spec:
          podSelector: {matchLabels: {app: db}}
          ingress:
            - from:
                - namespaceSelector: {matchLabels: {team: b}}
                  podSelector: {matchLabels: {role: scraper}}
              ports: [{port: 5432}]
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: or-peers, namespace: prod}
        spec:
          podSelector: {matchLabels: {app: web}}
          ingress:
            - from:
                - namespaceSelector: {matchLabels: {team: b}}
                - podSelector: {matchLabels: {app: db}}
        """
    ),
    "match-expressions-and-implicit-namespace-label": scenario(
        """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: expressions, namespace: prod}
        spec:
          podSelector:
            matchExpressions:
              - {key: app, operator: In, values: [web, db]}
              - {key: canary, operator: DoesNotExist}
          ingress:
            - from:
                - namespaceSelector:
                    matchExpressions: [{key: env, operator: NotIn, values: [prod]}]
                  podSelector:
                    matchExpressions: [{key: role, operator: NotIn, values: [scraper]}]
            - from:
                - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: prod}}
                  podSelector:
                    matchExpressions: [{key: canary, operator: Exists}]
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: egress-all-namespaces, namespace: dev}
        spec:
          podSelector: {}
          egress:
            - to:
                - namespaceSelector: {}
                  podSelector: {matchLabels: {app: db}}
            - to:
                - namespaceSelector:
                    matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [tools]}]
        """
    ),
    "ipblock-with-except": scenario(
        """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: ipblocks, namespace: prod}
        spec:
          podSelector: {matchLabels: {app: web}}
          policyTypes: [Ingress, Egress]
          ingress:
            - from:
                - ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8, 192.168.0.0/16]}
                - ipBlock: {cidr: 10.9.1.0/24, except: [10.9.1.2/32]}
          egress:
            - to:
                - ipBlock: {cidr: 10.20.0.0/16, except: [10.20.5.0/24]}
              ports: [{protocol: TCP, port: 32000, endPort: 32768}]
        """
    ),
    "ports-protocols-ranges": scenario(
        """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: ports, namespace: prod}
        spec:
          podSelector: {matchLabels: {app: db}}
          ingress:
            - ports:
                - {port: 5432}
                - {protocol: UDP, port: 53}
                - {protocol: TCP, port: 9000, endPort: 9150}
            - from: [{namespaceSelector: {matchLabels: {env: dev}}}]
              ports: [{protocol: UDP}]
        """
    ),
    "named-ports": scenario(
        """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: named-ingress, namespace: prod}
        spec:
          podSelector: {matchLabels: {app: web}}
          ingress:
            - from: [{namespaceSelector: {}}]
              ports: [{port: http}, {port: metrics}]
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: named-egress, namespace: dev}
        spec:
          podSelector: {}
          policyTypes: [Egress]
          egress:
            - to:
                - namespaceSelector: {}
              ports: [{port: http}, {protocol: UDP, port: dns}]
            - to:
                - ipBlock: {cidr: 10.9.0.0/24}
              ports: [{port: sql}]
            - ports: [{protocol: UDP, port: http}]
        """
    ),
    "policy-types": scenario(
        """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: egress-only-ignores-ingress, namespace: prod}
        spec:
          podSelector: {matchLabels: {app: db}}
          policyTypes: [Egress]
          ingress: [{}]
          egress: [{ports: [{protocol: UDP, port: 53}]}]
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: deny-ingress-db, namespace: prod}
        spec:
          podSelector: {matchLabels: {app: db}}
          policyTypes: [Ingress]
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: empty-egress-list-is-not-egress, namespace: dev}
        spec:
          podSelector: {}
          egress: []
          ingress: [{from: [{ipBlock: {cidr: 8.8.8.8/32}}]}]
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: egress-rules-default-egress-type, namespace: tools}
        spec:
          podSelector: {}
          egress: [{to: [{podSelector: {}}]}]
        """
    ),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_matches_upstream(tmp_path: Path, name: str) -> None:
    policies = SCENARIOS[name]
    assert mismatches(tmp_path, policies) == []


def test_scenarios_are_not_trivial() -> None:
    """The oracle itself: each policy scenario denies something and allows something."""
    for name, policies in SCENARIOS.items():
        verdicts = {
            k8s_allows(s, d, proto, port, policies)
            for s in ENDPOINTS
            for d in ENDPOINTS
            if s.host or d.host
            for proto, port in PORTS
        }
        assert verdicts == ({True} if not policies else {True, False}), name


def test_oracle_on_the_upstream_examples() -> None:
    """Spot checks of the oracle, straight from the documentation's sentences."""
    web1, web2, db1, dev1, dev2, tools1 = PODS
    pols = SCENARIOS["and-vs-or-peers"]
    # One peer with namespaceSelector AND podSelector: role=scraper pods in team=b namespaces only.
    assert k8s_allows(dev2, db1, "tcp", 5432, pols)
    assert not k8s_allows(dev1, db1, "tcp", 5432, pols)
    # Two peers: any pod in a team=b namespace, OR app=db pods of the policy's namespace.
    assert k8s_allows(dev1, web1, "tcp", 1, pols) and k8s_allows(db1, web1, "tcp", 1, pols)
    assert not k8s_allows(web2, web1, "tcp", 1, pols) and not k8s_allows(tools1, web1, "tcp", 1, pols)


def test_examples_directory_matches_upstream(tmp_path: Path) -> None:
    """The shipped examples, imported through the CLI and judged pair by pair."""
    from omniwall.sim import Packet, judge_path

    inputs = read_inputs([EXAMPLES])
    raw = [
        d
        for f in sorted(EXAMPLES.glob("*.yaml"))
        for d in yaml.safe_load_all(f.read_text())
        if d and d.get("kind") in ("NetworkPolicy",)
    ]
    namespaces = {n.name: {k: v for k, v in n.labels.items() if k != NS_NAME} for n in inputs.namespaces}
    result = CliRunner().invoke(_app(), ["import", "k8s", "-f", str(EXAMPLES), "--tenant", "shop"])
    assert result.exit_code == 0, result.output
    printed = load_text(result.stdout, "<import>")
    inventory = load_files([EXAMPLES / "00-inventory.yaml"])
    states = compile_states([*inventory, *printed])
    pods = [
        Endpoint(
            w.name,
            w.spec.vnics[0].ips[0],
            str(w.spec.attributes["k8s.namespace"]),
            dict(w.metadata.labels),
            dict(w.spec.ports),
            w.spec.host,
        )
        for w in inventory
        if w.kind == "Workload"
    ]
    outside = [Endpoint(ip, ip) for ip in ("8.8.8.8", "10.2.0.1", "10.20.5.9", "10.20.9.9", "172.16.0.1")]
    ports = [("tcp", p) for p in (80, 443, 5432, 8080, 8081, 9090, 9187, 32000, 32768, 1)] + [("udp", 53)]
    bad, allowed = [], 0
    for src in [*pods, *outside]:
        for dst in [*pods, *outside]:
            if not (src.host or dst.host):
                continue
            for proto, port in ports:
                want = k8s_allows(src, dst, proto, port, raw, namespaces)
                got = judge_path(states, Packet(src.ip, dst.ip, proto, sport=40000, dport=port)).allowed
                allowed += want
                if got != want:
                    bad.append(f"{src.name} -> {dst.name} {proto}/{port}: omniwall {got}, upstream {want}")
    assert bad == []
    assert allowed > 0


# ------------------------------------------------------------------------------------------ fuzzing

_KEYS = ["app", "tier", "canary", "role"]
_VALUES = ["web", "db", "client", "fe", "yes", "scraper"]
_NS_KEYS = ["env", "team", NS_NAME]
_NS_VALUES = ["prod", "dev", "tools", "a", "b"]


def _selectors(keys: list[str], values: list[str]) -> st.SearchStrategy[dict]:
    expr = st.one_of(
        st.builds(
            lambda k, op, vs: {"key": k, "operator": op, "values": vs},
            st.sampled_from(keys),
            st.sampled_from(["In", "NotIn"]),
            st.lists(st.sampled_from(values), min_size=1, max_size=2, unique=True),
        ),
        st.builds(
            lambda k, op: {"key": k, "operator": op},
            st.sampled_from(keys),
            st.sampled_from(["Exists", "DoesNotExist"]),
        ),
    )
    return st.builds(
        lambda ml, me: {**({"matchLabels": ml} if ml else {}), **({"matchExpressions": me} if me else {})},
        st.dictionaries(st.sampled_from(keys), st.sampled_from(values), max_size=1),
        st.lists(expr, max_size=2),
    )


_IP_BLOCKS = st.sampled_from(
    [
        {"cidr": "10.9.0.0/16"},
        {"cidr": "10.9.0.0/16", "except": ["10.9.1.0/24"]},
        {"cidr": "0.0.0.0/0", "except": ["10.9.0.0/24", "192.168.0.0/16"]},
        {"cidr": "10.20.0.0/16", "except": ["10.20.5.0/24"]},
        {"cidr": "8.8.8.8/32"},
    ]
)
_PEERS = st.one_of(
    st.builds(lambda b: {"ipBlock": b}, _IP_BLOCKS),
    st.builds(lambda p: {"podSelector": p}, _selectors(_KEYS, _VALUES)),
    st.builds(lambda n: {"namespaceSelector": n}, _selectors(_NS_KEYS, _NS_VALUES)),
    st.builds(
        lambda n, p: {"namespaceSelector": n, "podSelector": p},
        _selectors(_NS_KEYS, _NS_VALUES),
        _selectors(_KEYS, _VALUES),
    ),
)
_PORTS = st.one_of(
    st.builds(lambda proto: {"protocol": proto}, st.sampled_from(["TCP", "UDP"])),
    st.builds(lambda p: {"port": p}, st.sampled_from([80, 443, 5432, 53])),
    st.builds(lambda p: {"port": p, "endPort": p + 100}, st.sampled_from([0 + 9000, 32000, 8000])),
    st.builds(
        lambda proto, name: {"protocol": proto, "port": name},
        st.sampled_from(["TCP", "UDP"]),
        st.sampled_from(["http", "metrics", "sql", "dns"]),
    ),
)


def _rules(peers_key: str) -> st.SearchStrategy[dict]:
    return st.builds(
        lambda peers, ports: {
            **({peers_key: peers} if peers is not None else {}),
            **({"ports": ports} if ports is not None else {}),
        },
        st.none() | st.lists(_PEERS, max_size=2),
        st.none() | st.lists(_PORTS, max_size=2),
    )


_POLICIES = st.lists(
    st.builds(
        lambda i, ns, sel, types, ing, eg: {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": f"p{i}", "namespace": ns},
            "spec": {
                "podSelector": sel,
                **({"policyTypes": types} if types else {}),
                **({"ingress": ing} if ing is not None else {}),
                **({"egress": eg} if eg is not None else {}),
            },
        },
        st.integers(0, 10**6),
        st.sampled_from(["prod", "dev", "tools"]),
        _selectors(_KEYS, _VALUES),
        st.sampled_from([None, ["Ingress"], ["Egress"], ["Ingress", "Egress"]]),
        st.none() | st.lists(_rules("from"), max_size=2),
        st.none() | st.lists(_rules("to"), max_size=2),
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda p: (p["metadata"]["namespace"], p["metadata"]["name"]),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policies=_POLICIES)
def test_random_policies_match_upstream(tmp_path: Path, policies: list[dict]) -> None:
    assert mismatches(tmp_path, policies) == []


# --------------------------------------------------------------- selectors and namespace resolution

_LABELS = st.dictionaries(st.sampled_from(_KEYS), st.sampled_from(_VALUES), max_size=4)


@settings(max_examples=300, deadline=None)
@given(sel=_selectors(_KEYS, _VALUES), labels=_LABELS, ns=st.sampled_from(["prod", "dev", "tools", "x"]))
def test_pod_selector_text_means_the_label_selector(sel: dict, labels: dict, ns: str) -> None:
    """The generated Omniwall selector, run by the selector language, agrees with upstream matching."""
    from omniwall.k8s.objects import _Problems, parse_label_selector

    p = _Problems("test")
    parsed = parse_label_selector(sel, "sel", p)
    assert p.items == []
    text = pod_selector_text(NamespaceSet.of({"prod", "tools"}), parsed)
    assert text is not None
    want = ns in ("prod", "tools") and selector_matches(sel, labels)
    assert parse(text).matches(facts_of(labels, {"k8s.namespace": ns})) == want
    assert parsed.matches(labels) == selector_matches(sel, labels)


@settings(max_examples=300, deadline=None)
@given(
    sel=_selectors(_NS_KEYS, _NS_VALUES),
    known=st.dictionaries(
        st.sampled_from(["prod", "dev", "a"]),
        st.dictionaries(st.sampled_from(["env", "team"]), st.sampled_from(_NS_VALUES), max_size=2),
        max_size=3,
    ),
    ns=st.sampled_from(["prod", "dev", "tools", "a", "b", "zzz"]),
)
def test_namespace_selector_resolution_is_exact(sel: dict, known: dict, ns: str) -> None:
    """Also for namespaces without an object (only the implicit name label), and for non-pods."""
    from omniwall.k8s.objects import _Problems, parse_label_selector

    p = _Problems("test")
    parsed = parse_label_selector(sel, "sel", p)
    with_name = {n: {**labels, NS_NAME: n} for n, labels in known.items()}
    nsset = resolve_namespaces(parsed, with_name)
    want = selector_matches(sel, namespace_labels(ns, known))
    assert nsset.contains(ns) == want
    text = pod_selector_text(nsset, LabelSelector())
    if text is None:
        assert not want
    else:
        assert parse(text).matches(facts_of({}, {"k8s.namespace": ns})) == want
        assert not parse(text).matches(facts_of({"app": "web"}, {}))  # a workload that is no pod


def test_label_selector_operators_follow_upstream_for_missing_keys() -> None:
    missing: dict[str, str] = {}
    assert not Requirement("a", "In", ("x",)).matches(missing)
    assert Requirement("a", "NotIn", ("x",)).matches(missing)
    assert not Requirement("a", "Exists").matches(missing)
    assert Requirement("a", "DoesNotExist").matches(missing)
    assert LabelSelector().matches({"any": "thing"})  # empty selector: everything
    for req in (Requirement("a", "NotIn", ("x",)), Requirement("a", "DoesNotExist")):
        assert parse(req.render()).matches({})


def test_odd_label_keys_are_quoted_and_parse() -> None:
    sel = LabelSelector((Requirement("app.kubernetes.io/name", "In", ("web",)), Requirement("in", "Exists")))
    text = pod_selector_text(NamespaceSet.of({"prod"}), sel)
    assert text == 'k8s.namespace == "prod" && app.kubernetes.io/name == "web" && has(label("in"))'
    assert parse(text).matches({"k8s.namespace": "prod", "app.kubernetes.io/name": "web", "in": "1"})
    sel2 = LabelSelector((Requirement("2fa", "In", ("on",)),))
    assert parse(pod_selector_text(NamespaceSet.everything(), sel2)).matches(
        {"k8s.namespace": "x", "2fa": "on"}
    )


# ---------------------------------------------------------------------------------------- ipBlock


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.integers(24, 28),
    excepts=st.lists(st.tuples(st.integers(0, 255), st.integers(25, 32)), max_size=4),
)
def test_ipblock_difference_is_exact(prefix: int, excepts: list[tuple[int, int]]) -> None:
    cidr = ipaddress.ip_network(f"10.0.0.0/{prefix}")
    ex = [ipaddress.ip_network(f"10.0.0.{host}/{plen}", strict=False) for host, plen in excepts]
    ex = [e for e in ex if e.subnet_of(cidr) and e != cidr]
    block = IPBlock(cidr, tuple(ex))
    nets = block.networks()
    for last in range(256):
        ip = ipaddress.ip_address(f"10.0.0.{last}")
        want = ip in cidr and not any(ip in e for e in ex)
        assert any(ip in n for n in nets) == want == block.contains(ip)
    for a in nets:  # disjoint
        assert sum(a.overlaps(b) for b in nets) == 1


def test_ipblock_difference_ipv6() -> None:
    block = IPBlock(ipaddress.ip_network("2001:db8::/32"), (ipaddress.ip_network("2001:db8:1::/48"),))
    nets = block.networks()
    assert len(nets) == 16 and all(n.version == 6 for n in nets)
    for ip, want in (
        ("2001:db8::1", True),
        ("2001:db8:1::1", False),
        ("2001:db8:2::1", True),
        ("2001:db9::1", False),
    ):
        addr = ipaddress.ip_address(ip)
        assert any(addr in n for n in nets) == want == block.contains(addr)


def test_ipblock_except_is_a_group_of_the_remaining_cidrs(tmp_path: Path) -> None:
    res = _import(tmp_path, SCENARIOS["ipblock-with-except"])
    groups = {g.name: g for g in res if isinstance(g, Group)}
    rule = _policy(res, "k8s.prod.ipblocks").spec.rules[0]
    cidrs = {c for ref in rule.sources for c in groups[ref].spec.cidrs}
    assert "10.9.1.0/31" in cidrs and "10.9.1.3/32" in cidrs and "10.9.1.2/32" not in cidrs
    ten, peer2 = ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("10.9.1.0/24")
    assert "11.0.0.0/8" in cidrs
    assert all(n.subnet_of(peer2) for n in map(ipaddress.ip_network, cidrs) if n.overlaps(ten))


# ------------------------------------------------------------------------- the shape of the output


def _import(tmp: Path, policies: list[dict], **kw: Any) -> list:
    return import_files(write_inputs(tmp, policies, **kw), TENANT).resources


def _policy(resources: list, name: str) -> Policy:
    return next(r for r in resources if isinstance(r, Policy) and r.name == name)


def test_tenant_default_allow_and_isolation_after_allows(tmp_path: Path) -> None:
    res = _import(tmp_path, SCENARIOS["default-deny-all-plus-allow-all-ingress-union"])
    tenant = next(r for r in res if isinstance(r, Tenant))
    assert tenant.name == TENANT and tenant.spec.defaultAction == "allow"
    isolation = _policy(res, "k8s_isolation")
    allows = [r for r in res if isinstance(r, Policy) and r is not isolation]
    assert allows and all(p.spec.priority < isolation.spec.priority for p in allows)
    assert all(r.action == "allow" for p in allows for r in p.spec.rules)
    assert [(r.action, r.direction) for r in isolation.spec.rules] == [("drop", "in"), ("drop", "out")]
    groups = {g.name: g for g in res if isinstance(g, Group)}
    assert groups["k8s_isolated-ingress"].spec.groups == [
        "k8s.prod.allow-all-ingress-db",
        "k8s.prod.deny-all",
    ]
    assert groups["k8s_isolated-egress"].spec.groups == ["k8s.prod.deny-all"]


def test_output_round_trips_and_validates(tmp_path: Path) -> None:
    from omniwall.k8s.output import to_json, to_yaml

    for policies in SCENARIOS.values():
        res = _import(tmp_path, policies)
        assert load_text(to_yaml(res)) == res
        assert [type(r).model_validate(d) for r, d in zip(res, json.loads(to_json(res)), strict=True)] == res
        validate([*load_files([tmp_path / "inventory.yaml"]), *res])
        assert all(NAME_RE.fullmatch(r.name) for r in res)


def test_named_port_ingress_splits_by_number_per_destination(tmp_path: Path) -> None:
    res = _import(tmp_path, SCENARIOS["named-ports"])
    rules = _policy(res, "k8s.prod.named-ingress").spec.rules
    groups = {g.name: g for g in res if isinstance(g, Group)}
    resolved = {tuple(r.services): groups[r.appliedTo[0]].spec.workloads for r in rules}
    # web-1 serves http on 80 and metrics on 9100, web-2 http on 8080: separate rules, narrowed.
    assert resolved == {("tcp/80", "tcp/9100"): ["web-1"], ("tcp/8080",): ["web-2"]}
    assert all(r.direction == "in" for r in rules)


def test_empty_from_vs_missing_and_ports(tmp_path: Path) -> None:
    pols = scenario(
        """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: p, namespace: prod}
        spec:
          podSelector: {}
          ingress:
            - from: []
              ports: []
            - {}
        """
    )
    rules = _policy(_import(tmp_path, pols), "k8s.prod.p").spec.rules
    assert [(r.sources, r.services) for r in rules] == [(["any"], []), (["any"], [])]


def test_long_names_are_hashed_valid_and_distinct() -> None:
    a = resource_name("k8s." + "n" * 63 + "." + "p" * 200 + "_in-0_peer-1")
    b = resource_name("k8s." + "n" * 63 + "." + "p" * 200 + "_in-0_peer-2")
    assert a != b and len(a) <= 63 and len(b) <= 63 and NAME_RE.fullmatch(a) and NAME_RE.fullmatch(b)
    assert resource_name("k8s.prod.web") == "k8s.prod.web"


def test_long_policy_names_import(tmp_path: Path) -> None:
    pols = [
        policy(
            "prod",
            "a-very-long-network-policy-name-" + "x" * 60,
            {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]},
        )
    ]
    res = _import(tmp_path, pols)
    assert all(NAME_RE.fullmatch(r.name) for r in res)
    validate([*load_files([tmp_path / "inventory.yaml"]), *res])


# --------------------------------------------------------------------------------- warnings and errors


def test_sctp_is_skipped_with_a_warning_never_widened(tmp_path: Path) -> None:
    pols = [
        policy(
            "prod",
            "sctp",
            {
                "podSelector": {},
                "ingress": [
                    {"ports": [{"protocol": "SCTP", "port": 9}]},
                    {"ports": [{"protocol": "SCTP", "port": 9}, {"port": 443}]},
                ],
            },
        )
    ]
    result = import_files(write_inputs(tmp_path, pols), TENANT)
    assert [r.services for r in _policy(result.resources, "k8s.prod.sctp").spec.rules] == [["tcp/443"]]
    assert sum("SCTP" in w for w in result.warnings) == 2


def test_ignored_rules_and_unresolved_named_ports_warn(tmp_path: Path) -> None:
    result = import_files(write_inputs(tmp_path, SCENARIOS["policy-types"]), TENANT)
    assert any("ingress rules are ignored" in w for w in result.warnings)
    pols = [policy("prod", "np", {"podSelector": {}, "ingress": [{"ports": [{"port": "nosuch"}]}]})]
    result = import_files(write_inputs(tmp_path, pols), TENANT)
    assert any("nosuch" in w and "resolve on no workload" in w for w in result.warnings)
    assert _policy(result.resources, "k8s.prod.np").spec.rules == []


BAD_SPECS = [
    (
        {"ingress": [{"ports": [{"endPort": 90}]}]},
        "spec.ingress[0].ports[0].endPort",
        "only be set together with port",
    ),
    (
        {"ingress": [{"ports": [{"port": 90, "endPort": 80}]}]},
        "spec.ingress[0].ports[0].endPort",
        "between port",
    ),
    ({"ingress": [{"ports": [{"port": "http", "endPort": 80}]}]}, "endPort", "named port"),
    ({"ingress": [{"ports": [{"port": "80"}]}]}, "spec.ingress[0].ports[0].port", "not a port name"),
    ({"ingress": [{"ports": [{"port": 70000}]}]}, "spec.ingress[0].ports[0].port", "outside 1..65535"),
    (
        {"ingress": [{"ports": [{"protocol": "tcp", "port": 80}]}]},
        "spec.ingress[0].ports[0].protocol",
        "not one of",
    ),
    ({"egress": [{"to": [{}]}]}, "spec.egress[0].to[0]", "must specify a peer"),
    (
        {"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
        "spec.egress[0].to[0]",
        "cannot be combined",
    ),
    (
        {"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]},
        "spec.ingress[0].from[0].ipBlock.except[0]",
        "strict subset",
    ),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}]}, "ipBlock.cidr", "not a CIDR"),
    (
        {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Has"}]}},
        "spec.podSelector.matchExpressions[0].operator",
        "not one of",
    ),
    (
        {"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
        "spec.podSelector.matchExpressions[0].values",
        "non-empty",
    ),
    (
        {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}},
        "spec.podSelector.matchExpressions[0].values",
        "must be empty",
    ),
    ({"podSelector": {"matchLabels": {"a": 1}}}, "spec.podSelector.matchLabels.a", "must be a string"),
    ({"podSelector": {"matchLabels": {"bad key!": "x"}}}, "matchLabels", "label key"),
    ({"policyTypes": ["Both"]}, "spec.policyTypes[0]", "not Ingress or Egress"),
    ({"ingres": []}, "spec.ingres", "unknown field"),
]


@pytest.mark.parametrize(("spec", "path", "reason"), BAD_SPECS)
def test_invalid_policies_are_refused_naming_field_and_reason(
    tmp_path: Path, spec: dict, path: str, reason: str
) -> None:
    doc = policy("prod", "bad", {"podSelector": {}, **spec})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(K8sImportError) as exc:
        read_inputs([tmp_path / "bad.yaml"])
    problems = exc.value.problems
    assert len(problems) == 1, problems
    assert "NetworkPolicy prod/bad" in problems[0] and path in problems[0] and reason in problems[0]


def test_all_problems_of_all_files_are_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        yaml.safe_dump_all(
            [
                policy("prod", "bad1", {"podSelector": {}, "policyTypes": ["X"]}),
                {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}},
                policy("prod", "bad1", {"podSelector": {}}),
            ]
        )
    )
    (tmp_path / "b.yaml").write_text("kind: [unclosed\n")
    with pytest.raises(K8sImportError) as exc:
        read_inputs([tmp_path])
    text = "\n".join(exc.value.problems)
    assert "a.yaml#1" in text and "policyTypes[0]" in text
    assert "a.yaml#2" in text and "Deployment" in text and "not supported" in text
    assert "b.yaml" in text and "YAML" in text


def test_duplicate_policies_and_defaults(tmp_path: Path) -> None:
    doc = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "p"},
        "spec": {},
    }
    (tmp_path / "a.yaml").write_text(yaml.safe_dump_all([doc, doc]))
    with pytest.raises(K8sImportError, match="NetworkPolicy default/p is also defined"):
        read_inputs([tmp_path / "a.yaml"])
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(doc))
    (pol,) = read_inputs([tmp_path / "a.yaml"]).policies
    # No namespace: kubectl's default; no podSelector: every pod; no policyTypes, no egress: Ingress.
    assert (pol.namespace, pol.pod_selector.is_empty, pol.policy_types) == ("default", True, {"Ingress"})


def test_namespace_lists_and_implicit_label(tmp_path: Path) -> None:
    (tmp_path / "ns.json").write_text(
        json.dumps({"apiVersion": "v1", "kind": "NamespaceList", "items": [{"metadata": {"name": "a"}}]})
    )
    with pytest.raises(K8sImportError, match="items"):
        read_inputs([tmp_path / "ns.json"])
    item = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a", "labels": {"x": "y"}}}
    (tmp_path / "ns.json").write_text(
        json.dumps({"apiVersion": "v1", "kind": "NamespaceList", "items": [item]})
    )
    (ns,) = read_inputs([tmp_path / "ns.json"]).namespaces
    assert dict(ns.labels) == {"x": "y", NS_NAME: "a"}


# ----------------------------------------------------------------------------------------------- CLI


def _app():  # type: ignore[no-untyped-def]
    from omniwall.cli.main import app

    return app


def test_cli_prints_yaml_and_json() -> None:
    runner = CliRunner()
    out = runner.invoke(_app(), ["import", "k8s", "-f", str(EXAMPLES), "--tenant", "shop", "-o", "json"])
    assert out.exit_code == 0, out.output
    docs = json.loads(out.stdout)
    assert docs[0] == {
        "apiVersion": "omniwall.io/v1",
        "kind": "Tenant",
        "metadata": {"name": "shop"},
        "spec": {"defaultAction": "allow"},
    }
    yml = runner.invoke(_app(), ["import", "k8s", "-f", str(EXAMPLES), "--tenant", "shop"])
    assert yml.exit_code == 0
    from_yaml = load_text(yml.stdout)
    assert from_yaml == [type(r).model_validate(d) for r, d in zip(from_yaml, docs, strict=True)]
    resources = [*load_files([EXAMPLES / "00-inventory.yaml"]), *load_text(yml.stdout)]
    validate(resources)


def test_cli_bad_input_is_an_error_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(policy("prod", "bad", {"podSelector": {}, "ingress": [{"ports": [{"endPort": 3}]}]}))
    )
    out = CliRunner().invoke(_app(), ["import", "k8s", "-f", str(bad), "--tenant", "shop"])
    assert out.exit_code == 1
    assert "endPort" in out.stderr and "Traceback" not in out.output and out.stdout == ""
    stdin = CliRunner().invoke(
        _app(),
        ["import", "k8s", "-f", "-", "--tenant", "shop"],
        input=(EXAMPLES / "10-default-deny.yaml").read_text(),
    )
    assert stdin.exit_code == 0 and "k8s.db.default-deny-all" in stdin.stdout
    missing = CliRunner().invoke(
        _app(), ["import", "k8s", "-f", str(tmp_path / "nope.yaml"), "--tenant", "shop"]
    )
    assert missing.exit_code == 1 and "no such file" in missing.stderr
    bad_tenant = CliRunner().invoke(_app(), ["import", "k8s", "-f", str(bad), "--tenant", "Shop!"])
    assert bad_tenant.exit_code == 2 and "tenant" in bad_tenant.stderr
