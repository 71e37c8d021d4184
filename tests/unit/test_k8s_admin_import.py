"""AdminNetworkPolicy / BaselineAdminNetworkPolicy import, against the upstream specification.

`admin_allows` is an oracle written here from the network-policy-api text (apis/v1alpha1 docs and the
conformance suite's intent), on the raw YAML, sharing no code with the importer: at each end of a
connection, the ANPs selecting that pod decide first (by priority, then rule order; Allow and Deny are
final, Pass skips the remaining ANP rules); then the NetworkPolicies, if any selects the pod for that
direction (the NetworkPolicy oracle of test_k8s_import); then the BANP; then allow. Each cluster is
imported, compiled with the real compiler and judged by the sim for every pair and port.
"""

from __future__ import annotations

import ipaddress
import os
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_k8s_import import (  # the NetworkPolicy oracle, the test cluster, its random strategies
    _KEYS,
    _NS_KEYS,
    _NS_VALUES,
    _VALUES,
    EXTERNALS,
    NAMESPACES,
    NS_NAME,
    PODS,
    PORTS,
    TENANT,
    VM,
    Endpoint,
    _selectors,
    direction_allows,
    inventory_yaml,
    namespace_labels,
    namespaces_yaml,
    policy_types,
    selector_matches,
)
from test_k8s_import import (
    _POLICIES as _NP_POLICIES,
)

from omniwall.compiler.build import compile_catalog
from omniwall.k8s import K8sImportError, import_files
from omniwall.k8s.labels import dynamic_namespace_clauses, namespace_label_attributes
from omniwall.k8s.objects import _Problems, parse_label_selector
from omniwall.k8s.output import to_yaml
from omniwall.model.loader import load_text
from omniwall.model.resources import Host, Workload
from omniwall.model.validate import validate
from omniwall.selectors import facts_of, parse
from omniwall.sim import Packet, judge_path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "k8s-anp"
ENDPOINTS = [*PODS, VM, *EXTERNALS]

# ------------------------------------------------------------------------ the oracle (upstream spec)


def _subject_matches(subject: Mapping[str, Any], pod: Endpoint, namespaces: Mapping) -> bool:
    if not pod.is_pod:
        return False
    ns_labels = namespace_labels(pod.namespace, namespaces)  # type: ignore[arg-type]
    if "namespaces" in subject:
        return selector_matches(subject["namespaces"], ns_labels)
    pods = subject["pods"]
    return selector_matches(pods["namespaceSelector"], ns_labels) and selector_matches(
        pods["podSelector"], pod.labels or {}
    )


def _peer_matches(peer: Mapping[str, Any], other: Endpoint, namespaces: Mapping) -> bool:
    if "networks" in peer:
        ip = ipaddress.ip_address(other.ip)
        return any(ip in ipaddress.ip_network(n) for n in peer["networks"])
    if not other.is_pod:
        return False  # namespaces / pods peers are pods only
    return _subject_matches(peer, other, namespaces)


def _port_matches(entry: Mapping[str, Any], proto: str, port: int, dst: Endpoint) -> bool:
    if "portNumber" in entry:
        e = entry["portNumber"]
        return e.get("protocol", "TCP").lower() == proto and e["port"] == port
    if "portRange" in entry:
        e = entry["portRange"]
        return e.get("protocol", "TCP").lower() == proto and e["start"] <= port <= e["end"]
    # namedPort: a port of the destination pod (the subject on ingress, the peer on egress).
    return dst.is_pod and (dst.ports or {}).get(entry["namedPort"]) == f"{proto}/{port}"


def _first_action(
    policies: list[dict],
    pod: Endpoint,
    other: Endpoint,
    direction: str,
    proto: str,
    port: int,
    dst: Endpoint,
    namespaces: Mapping,
) -> str | None:
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for pol in policies:
        spec = pol["spec"]
        if not _subject_matches(spec["subject"], pod, namespaces):
            continue
        for rule in spec.get(rules_key) or []:
            ports = rule.get("ports")
            if any(_peer_matches(x, other, namespaces) for x in rule[peers_key]) and (
                ports is None or any(_port_matches(e, proto, port, dst) for e in ports)
            ):
                return rule["action"]
    return None


def _direction(
    pod: Endpoint,
    other: Endpoint,
    direction: str,
    proto: str,
    port: int,
    dst: Endpoint,
    docs: list[dict],
    namespaces: Mapping,
) -> bool:
    anps = sorted((d for d in docs if d["kind"] == "AdminNetworkPolicy"), key=lambda d: d["spec"]["priority"])
    banps = [d for d in docs if d["kind"] == "BaselineAdminNetworkPolicy"]
    nps = [d for d in docs if d["kind"] == "NetworkPolicy"]
    action = _first_action(anps, pod, other, direction, proto, port, dst, namespaces)
    if action in ("Allow", "Deny"):
        return action == "Allow"
    # Nothing decided or Pass: the NetworkPolicies, when one selects the pod for this direction.
    isolated = any(
        p["metadata"].get("namespace", "default") == pod.namespace
        and selector_matches(p["spec"].get("podSelector") or {}, pod.labels or {})
        and direction in policy_types(p["spec"])
        for p in nps
    )
    if isolated:
        return direction_allows(pod, other, direction, proto, port, dst, nps, namespaces)
    return _first_action(banps, pod, other, direction, proto, port, dst, namespaces) != "Deny"


def admin_allows(
    src: Endpoint, dst: Endpoint, proto: str, port: int, docs: list[dict], namespaces=NAMESPACES
) -> bool:
    if src.ip == dst.ip:
        return True
    egress = not src.is_pod or _direction(src, dst, "Egress", proto, port, dst, docs, namespaces)
    ingress = not dst.is_pod or _direction(dst, src, "Ingress", proto, port, dst, docs, namespaces)
    return egress and ingress


# ----------------------------------------------------------------------- import, compile and compare


def write_inputs(tmp: Path, docs: list[dict], namespaces=NAMESPACES) -> list[Path]:
    files = {
        "inventory.yaml": inventory_yaml(PODS),
        "namespaces.yaml": namespaces_yaml(namespaces),
        "policies.yaml": yaml.safe_dump_all(docs, sort_keys=False) if docs else "",
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    return [tmp / n for n in files]


def imported(tmp: Path, docs: list[dict], namespaces=NAMESPACES) -> tuple[list, list[str]]:
    """What a user applies: the Hosts, the VM, and the printed output (which carries the pods)."""
    files = write_inputs(tmp, docs, namespaces)
    result = import_files(files, TENANT)
    printed = load_text(to_yaml(result.resources), "<import>")
    inventory = load_text(files[0].read_text(), "inventory.yaml")
    printed_workloads = {r.name for r in printed if isinstance(r, Workload)}
    keep = [
        r
        for r in inventory
        if isinstance(r, Host) or (isinstance(r, Workload) and r.name not in printed_workloads)
    ]
    return [*keep, *printed], result.warnings


def mismatches(resources: list, docs: list[dict], namespaces=NAMESPACES) -> list[str]:
    states = compile_catalog(validate(resources))
    bad = []
    for src in ENDPOINTS:
        for dst in ENDPOINTS:
            if not (src.host or dst.host):
                continue
            for proto, port in PORTS:
                want = admin_allows(src, dst, proto, port, docs, namespaces)
                got = judge_path(states, Packet(src.ip, dst.ip, proto, sport=40000, dport=port)).allowed
                if got != want:
                    bad.append(f"{src.name} -> {dst.name} {proto}/{port}: omniwall {got}, upstream {want}")
    return bad


def docs_of(text: str) -> list[dict]:
    text = textwrap.dedent(text).replace("@BANP", BANP).replace("@ANP", ANP).replace("@NP", NP)
    return [d for d in yaml.safe_load_all(text) if d]


ANP = "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy"
BANP = "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy"
NP = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy"

SCENARIOS: dict[str, str] = {
    # A lower priority value wins: prod's web pods accept dev web pods (priority 5) though priority 10
    # denies everything from dev.
    "priority-order": """
        @ANP
        metadata: {name: deny-from-dev}
        spec:
          priority: 10
          subject: {namespaces: {matchLabels: {env: prod}}}
          ingress:
            - {name: deny-dev, action: Deny, from: [{namespaces: {matchLabels: {env: dev}}}]}
        ---
        @ANP
        metadata: {name: allow-dev-web}
        spec:
          priority: 5
          subject:
            pods: {namespaceSelector: {matchLabels: {env: prod}}, podSelector: {matchLabels: {app: web}}}
          ingress:
            - action: Allow
              from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}]
        """,
    # Pass skips the remaining ANP rules (the later Deny) and hands over to the NetworkPolicies: db is
    # isolated by one and only admits dev's scraper; web-1 is not isolated: the BANP decides.
    "pass-falls-through-to-networkpolicy-then-banp": """
        @ANP
        metadata: {name: pass-dev}
        spec:
          priority: 1
          subject: {namespaces: {matchLabels: {env: prod}}}
          ingress:
            - {name: hand-down, action: Pass, from: [{namespaces: {matchLabels: {env: dev}}}]}
            - {name: deny-dev, action: Deny, from: [{namespaces: {matchLabels: {env: dev}}}]}
        ---
        @NP
        metadata: {name: db-from-scraper, namespace: prod}
        spec:
          podSelector: {matchLabels: {app: db}}
          ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: scraper}}}]}]
        ---
        @BANP
        metadata: {name: default}
        spec:
          subject: {namespaces: {}}
          ingress:
            - {action: Deny, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}]}
        """,
    # The BANP only decides what nothing earlier did: an ANP Allow beats it, a NetworkPolicy-isolated
    # pod never reaches it, and what it does not match falls to the default allow.
    "banp-only-when-nothing-earlier-decided": """
        @ANP
        metadata: {name: tools-in}
        spec:
          priority: 100
          subject: {namespaces: {}}
          ingress:
            - action: Allow
              from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: tools}}}]
              ports: [{portNumber: {port: 80}}, {portNumber: {protocol: UDP, port: 80}}]
        ---
        @NP
        metadata: {name: dev-web, namespace: dev}
        spec:
          podSelector: {matchLabels: {app: web}}
          ingress: [{from: [{namespaceSelector: {matchLabels: {env: prod}}}]}]
        ---
        @BANP
        metadata: {name: default}
        spec:
          subject: {namespaces: {}}
          ingress:
            - action: Deny
              from: [{namespaces: {}}]
              ports: [{portRange: {start: 1, end: 9000}}]
            - action: Allow
              from: [{namespaces: {}}]
          egress:
            - {action: Deny, to: [{networks: [8.8.8.8/32]}]}
        """,
    # Named ports belong to the destination: the subject on ingress, the peer on egress.
    "named-ports": """
        @ANP
        metadata: {name: named}
        spec:
          priority: 20
          subject: {namespaces: {}}
          ingress:
            - action: Allow
              from: [{namespaces: {}}]
              ports: [{namedPort: http}]
            - {action: Deny, from: [{namespaces: {}}]}
          egress:
            - action: Deny
              to: [{pods: {namespaceSelector: {matchLabels: {env: prod}}, podSelector: {}}}]
              ports: [{namedPort: metrics}]
        """,
    # Port ranges per protocol, and egress to networks (which cover pod addresses too).
    "port-ranges-and-networks": """
        @ANP
        metadata: {name: egress}
        spec:
          priority: 3
          subject:
            pods:
              namespaceSelector: {}
              podSelector: {matchExpressions: [{key: app, operator: In, values: [web, client]}]}
          egress:
            - action: Allow
              to: [{networks: [10.20.5.0/24, 8.8.8.8/32]}]
              ports: [{portRange: {protocol: TCP, start: 32000, end: 32768}}]
            - {action: Deny, to: [{networks: [10.20.0.0/16, 10.9.0.0/24]}]}
            - action: Pass
              to: [{networks: [0.0.0.0/0]}]
              ports: [{portRange: {protocol: UDP, start: 50, end: 60}}]
            - {action: Deny, to: [{networks: [0.0.0.0/0]}], ports: [{portNumber: {protocol: UDP, port: 53}}]}
        ---
        @BANP
        metadata: {name: default}
        spec:
          subject: {namespaces: {matchExpressions: [{key: env, operator: NotIn, values: [prod]}]}}
          egress:
            - action: Deny
              to: [{networks: [0.0.0.0/0]}]
              ports: [{portRange: {protocol: UDP, start: 1, end: 100}}]
        """,
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_matches_upstream(tmp_path: Path, name: str) -> None:
    docs = docs_of(SCENARIOS[name])
    resources, _ = imported(tmp_path, docs)
    assert mismatches(resources, docs) == []


def test_scenarios_are_not_trivial() -> None:
    """Each scenario both allows and denies something the default would allow."""
    for name, text in SCENARIOS.items():
        docs = docs_of(text)
        verdicts = {
            admin_allows(s, d, proto, port, docs)
            for s in ENDPOINTS
            for d in ENDPOINTS
            for proto, port in PORTS
        }
        assert verdicts == {True, False}, name


def test_relabelled_namespace_changes_enforcement_without_reimport(tmp_path: Path) -> None:
    docs = docs_of(SCENARIOS["priority-order"])
    resources, _ = imported(tmp_path, docs)
    # `dev` becomes env=prod: only its pods' attributes change, the policies and groups stay.
    relabelled = {**NAMESPACES, "dev": {"env": "prod", "team": "b"}}
    changed = []
    for r in resources:
        if isinstance(r, Workload) and r.spec.attributes.get("k8s.namespace") == "dev":
            attrs = {**r.spec.attributes, "k8s.namespace.labels.env": "prod"}
            r = r.model_copy(update={"spec": r.spec.model_copy(update={"attributes": attrs})})
        changed.append(r)
    assert mismatches(changed, docs, relabelled) == []
    dev1, web1 = (next(p for p in PODS if p.name == n) for n in ("dev-2", "web-1"))
    assert not admin_allows(dev1, web1, "tcp", 80, docs) and admin_allows(
        dev1, web1, "tcp", 80, docs, relabelled
    )


def test_networkpolicy_isolation_comes_before_the_banp_and_the_order_is_anp_np_banp(tmp_path: Path) -> None:
    docs = docs_of(SCENARIOS["pass-falls-through-to-networkpolicy-then-banp"])
    resources, _ = imported(tmp_path, docs)
    states = compile_catalog(validate(resources))
    rules = {r.id: r for s in states.values() for r in s.rules}
    db = next(v for s in states.values() for v in s.vnics if v.workload == f"{TENANT}/db-1")
    categories = [rules[i].category for i in db.ingress]
    assert categories == sorted(categories, key=["infrastructure", "application", "baseline"].index)
    assert {"infrastructure", "application", "baseline"} <= set(categories)


def test_explain_names_the_anp_rule(tmp_path: Path) -> None:
    docs = docs_of(SCENARIOS["priority-order"])
    resources, _ = imported(tmp_path, docs)
    states = compile_catalog(validate(resources))
    dev2, web1 = (next(p for p in PODS if p.name == n) for n in ("dev-2", "web-1"))
    path = judge_path(states, Packet(dev2.ip, web1.ip, "tcp", sport=40000, dport=80))
    assert path.denied_at is not None and path.denied_at.rule is not None
    assert path.denied_at.rule.label == "infra/k8s-anp.deny-from-dev/in-0.deny-dev"


# ------------------------------------------------------------------------------------ fail closed


def test_unmappable_peers_fail_closed_with_warnings(tmp_path: Path) -> None:
    docs = docs_of(
        """
        @ANP
        metadata: {name: odd}
        spec:
          priority: 1
          subject: {namespaces: {matchLabels: {env: prod}}}
          ingress:
            - {action: Deny, from: [{futurePeer: {x: 1}}]}
          egress:
            - action: Allow
              to: [{domainNames: [example.com]}, {networks: [8.8.8.8/32]}]
            - action: Deny
              to: [{networks: [10.20.0.0/16]}]
              ports: [{portNumber: {protocol: SCTP, port: 9}}]
        """
    )
    resources, warnings = imported(tmp_path, docs)
    text = "\n".join(warnings)
    assert "AdminNetworkPolicy odd: spec.ingress[0].from[0]: unknown field futurePeer" in text
    assert "spec.egress[0].to[0].domainNames" in text and "dropped (fails closed)" in text
    assert "SCTP" in text and "denies all egress traffic" in text
    states = compile_catalog(validate(resources))
    web1, dev1 = (next(p for p in PODS if p.name == n) for n in ("web-1", "dev-1"))
    ext = next(e for e in EXTERNALS if e.ip == "8.8.8.8")
    for proto, port in PORTS:
        # Deny with an unknown peer: every ingress to prod denied; the Allow never allows; the SCTP Deny
        # denies all egress.
        assert not judge_path(states, Packet(dev1.ip, web1.ip, proto, sport=40000, dport=port)).allowed
        assert not judge_path(states, Packet(web1.ip, ext.ip, proto, sport=40000, dport=port)).allowed
        assert judge_path(states, Packet(dev1.ip, ext.ip, proto, sport=40000, dport=port)).allowed


def test_nodes_peers_map_to_host_addresses(tmp_path: Path) -> None:
    docs = docs_of(
        """
        @ANP
        metadata: {name: nodes}
        spec:
          priority: 1
          subject: {namespaces: {}}
          egress:
            - {action: Deny, to: [{nodes: {matchLabels: {role: worker}}}]}
        """
    )
    files = write_inputs(tmp_path, docs)
    hosts = "---\n".join(
        f"kind: Host\nmetadata: {{name: n{i}, labels: {{role: {r}}}}}\nspec: {{address: 10.20.1.{i}}}\n"
        for i, r in ((1, "worker"), (2, "control"))
    )
    (tmp_path / "nodes.yaml").write_text(hosts)
    result = import_files([*files, tmp_path / "nodes.yaml"], TENANT)
    policy = next(r for r in result.resources if r.kind == "Policy" and r.name == "k8s-anp.nodes")
    assert policy.spec.rules[0].destinations == ["10.20.1.1/32"]
    assert any("resolved at import to 10.20.1.1/32" in w for w in result.warnings)


S = "spec: {priority: 1, subject: {namespaces: {}}, "
BAD = [
    ("spec: {priority: 1001, subject: {namespaces: {}}}", "spec.priority", "outside 0..1000"),
    ("spec: {priority: 1, subject: {}}", "spec.subject", "exactly one of namespaces, pods"),
    (
        "spec: {priority: 1, subject: {namespaces: {}}, ingress: [{action: Drop, from: [{namespaces: {}}]}]}",
        "spec.ingress[0].action",
        "not one of Allow, Deny, Pass",
    ),
    (
        "spec: {priority: 1, subject: {namespaces: {}}, ingress: [{action: Allow, from: []}]}",
        "spec.ingress[0].from",
        "at least one peer",
    ),
    (
        S + "ingress: [{action: Allow, from: [{networks: [10.0.0.0/8]}]}]}",
        "spec.ingress[0].from[0].networks",
        "only egress peers",
    ),
    (
        S + "egress: [{action: Allow, to: [{networks: [10.0.0.0/8]}], "
        "ports: [{portRange: {start: 9, end: 9}}]}]}",
        "spec.egress[0].ports[0].portRange.end",
        "greater than start",
    ),
    (
        S + "egress: [{action: Allow, to: [{networks: [10.0.0.0/8]}], ports: [{namedPort: http}]}]}",
        "spec.egress[0].ports",
        "namedPort",
    ),
]


@pytest.mark.parametrize(("spec", "path", "reason"), BAD)
def test_invalid_admin_policies_are_refused_naming_field_and_reason(
    tmp_path: Path, spec: str, path: str, reason: str
) -> None:
    (tmp_path / "bad.yaml").write_text(f"{ANP}\nmetadata: {{name: bad}}\n{spec}\n")
    with pytest.raises(K8sImportError) as exc:
        import_files([tmp_path / "bad.yaml"], TENANT)
    assert any(f"AdminNetworkPolicy bad: {path}:" in p and reason in p for p in exc.value.problems), (
        exc.value.problems
    )


def test_banp_must_be_named_default_and_cannot_pass(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(
        f"{BANP}\nmetadata: {{name: other}}\n"
        "spec: {subject: {namespaces: {}}, ingress: [{action: Pass, from: [{namespaces: {}}]}]}\n"
    )
    with pytest.raises(K8sImportError) as exc:
        import_files([tmp_path / "b.yaml"], TENANT)
    problems = "\n".join(exc.value.problems)
    assert "metadata.name: must be 'default'" in problems and "spec.ingress[0].action" in problems


# ------------------------------------------------------------------------------------------ example


def test_example_directory_matches_upstream() -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    result = import_files([EXAMPLES], "shop")
    printed = load_text(to_yaml(result.resources), "<import>")
    inventory = load_text((EXAMPLES / "00-hosts.yaml").read_text(), "00-hosts.yaml")
    states = compile_catalog(validate([*inventory, *printed]))
    docs = [
        d
        for f in files
        for d in yaml.safe_load_all(f.read_text())
        if d and ("k8s.io" in str(d.get("apiVersion", "")) or d.get("kind") == "Namespace")
    ]
    namespaces = {
        d["metadata"]["name"]: d["metadata"].get("labels") or {} for d in docs if d["kind"] == "Namespace"
    }
    policies = [d for d in docs if d["kind"] != "Namespace"]
    pods = []
    for w in printed:
        if isinstance(w, Workload):
            ports = dict(w.spec.ports)
            pods.append(
                Endpoint(
                    w.name,
                    w.spec.vnics[0].ips[0],
                    w.spec.attributes["k8s.namespace"],
                    dict(w.metadata.labels),
                    ports,
                    w.spec.host,
                )
            )
    assert len(pods) >= 4 and {d["kind"] for d in policies} >= {
        "AdminNetworkPolicy",
        "BaselineAdminNetworkPolicy",
        "NetworkPolicy",
    }
    ext = Endpoint("ext", "8.8.8.8")
    bad = []
    for src in [*pods, ext]:
        for dst in [*pods, ext]:
            for proto, port in [
                ("tcp", 80),
                ("tcp", 8080),
                ("tcp", 5432),
                ("tcp", 9100),
                ("udp", 53),
                ("tcp", 443),
            ]:
                want = admin_allows(src, dst, proto, port, policies, namespaces)
                got = judge_path(states, Packet(src.ip, dst.ip, proto, sport=40000, dport=port)).allowed
                if got != want:
                    bad.append(f"{src.name} -> {dst.name} {proto}/{port}: omniwall {got}, upstream {want}")
    assert bad == []


# ------------------------------------------------------------------------------ random admin policies

_NS_SEL = _selectors(_NS_KEYS, _NS_VALUES)
_POD_SEL = _selectors(_KEYS, _VALUES)
_SUBJECTS = st.one_of(
    st.builds(lambda n: {"namespaces": n}, _NS_SEL),
    st.builds(lambda n, p: {"pods": {"namespaceSelector": n, "podSelector": p}}, _NS_SEL, _POD_SEL),
)
_ADMIN_PEERS = st.one_of(
    _SUBJECTS,
    st.builds(
        lambda nets: {"networks": nets},
        st.lists(
            st.sampled_from(["10.9.0.0/24", "10.9.1.1/32", "8.8.8.8/32", "10.20.0.0/16", "0.0.0.0/0"]),
            min_size=1,
            max_size=2,
            unique=True,
        ),
    ),
)
_ADMIN_PORTS = st.one_of(
    st.builds(
        lambda proto, p: {"portNumber": {"protocol": proto, "port": p}},
        st.sampled_from(["TCP", "UDP"]),
        st.sampled_from([80, 53, 5432, 8080]),
    ),
    st.builds(
        lambda proto, p: {"portRange": {"protocol": proto, "start": p, "end": p + 500}},
        st.sampled_from(["TCP", "UDP"]),
        st.sampled_from([1, 5000, 9000, 32000]),
    ),
    st.builds(lambda n: {"namedPort": n}, st.sampled_from(["http", "metrics", "sql", "dns"])),
)


def _admin_rules(peers_key: str, actions: list[str]) -> st.SearchStrategy[dict]:
    def build(action: str, peers: list[dict], ports: list[dict] | None) -> dict:
        if peers_key == "from":
            peers = [p for p in peers if "networks" not in p] or [{"namespaces": {}}]
        if ports and any("namedPort" in p for p in ports):
            peers = [p for p in peers if "networks" not in p] or [{"namespaces": {}}]
        return {"action": action, peers_key: peers, **({"ports": ports} if ports else {})}

    return st.builds(
        build,
        st.sampled_from(actions),
        st.lists(_ADMIN_PEERS, min_size=1, max_size=2),
        st.none() | st.lists(_ADMIN_PORTS, min_size=1, max_size=2),
    )


def _admin(kind: str, actions: list[str]) -> st.SearchStrategy[dict]:
    return st.builds(
        lambda name, priority, subject, ing, eg: {
            "apiVersion": "policy.networking.k8s.io/v1alpha1",
            "kind": kind,
            "metadata": {"name": name},
            "spec": {
                **({"priority": priority} if kind == "AdminNetworkPolicy" else {}),
                "subject": subject,
                "ingress": ing,
                "egress": eg,
            },
        },
        st.just("default") if kind != "AdminNetworkPolicy" else st.sampled_from(["a", "b", "c"]),
        st.integers(0, 1000),
        _SUBJECTS,
        st.lists(_admin_rules("from", actions), max_size=2),
        st.lists(_admin_rules("to", actions), max_size=2),
    )


_CLUSTERS = st.builds(
    lambda anps, banp, nps: [*anps, *([banp] if banp else []), *(nps or [])],
    st.lists(
        _admin("AdminNetworkPolicy", ["Allow", "Deny", "Pass"]),
        max_size=2,
        unique_by=(lambda p: p["metadata"]["name"], lambda p: p["spec"]["priority"]),
    ),
    st.none() | _admin("BaselineAdminNetworkPolicy", ["Allow", "Deny"]),
    st.none() | _NP_POLICIES,
)


@settings(
    max_examples=int(os.environ.get("OMNIWALL_K8S_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(docs=_CLUSTERS)
def test_random_admin_policies_match_upstream(tmp_path: Path, docs: list[dict]) -> None:
    resources, _ = imported(tmp_path, docs)
    assert mismatches(resources, docs) == []


@settings(max_examples=300, deadline=None)
@given(
    sel=_NS_SEL,
    ns_labels=st.dictionaries(st.sampled_from(["env", "team"]), st.sampled_from(_NS_VALUES), max_size=2),
    ns=st.sampled_from(["prod", "dev", "tools", "a"]),
    given_labels=st.booleans(),
)
def test_dynamic_namespace_clauses_mean_the_namespace_selector(
    sel: dict, ns_labels: dict, ns: str, given_labels: bool
) -> None:
    """The clauses over `k8s.namespace.labels.*`, run by the selector language on a pod's attributes,
    agree with upstream matching of the namespace's labels; a pod without the label attributes (no
    Namespace object) is a namespace with only its name label; a non-pod never matches."""
    p = _Problems("test")
    parsed = parse_label_selector(sel, "sel", p)
    assert p.items == []
    selector = parse(" && ".join(dynamic_namespace_clauses(parsed)))
    labels = ns_labels if given_labels else {}
    attributes: dict[str, object] = {"k8s.namespace": ns}
    if given_labels:
        attributes |= namespace_label_attributes({**labels, NS_NAME: ns})
    assert selector.matches(facts_of({}, attributes)) == selector_matches(sel, {**labels, NS_NAME: ns})
    assert not selector.matches(facts_of({}, {}))
