"""`policy.networking.k8s.io/v1alpha1` AdminNetworkPolicy and BaselineAdminNetworkPolicy: parsed,
validated, defaulted (SIG Network network-policy-api, apis/v1alpha1).

Validation follows the CRD's (priority 0..1000, exactly one field per subject / peer / port, at least
one peer per rule, actions Allow/Deny/Pass for an ANP and Allow/Deny for a BANP, whose only allowed
name is `default`); a refused object is reported with the field and the reason, every problem at once.

What the CRD accepts but Omniwall cannot enforce (`domainNames` peers, `nodes` peers without Host
objects to map them to, SCTP ports) is *not* refused here: it is kept as an `Unmappable` part so the
translation can fail closed and warn (docs/k8s.md, "Fail closed").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omniwall.k8s.labels import LabelSelector
from omniwall.k8s.objects import (
    _PORT_NAME_RE,
    PROTOCOLS,
    IPNetwork,
    K8sImportError,
    _check_name,
    _list,
    _mapping,
    _Problems,
    parse_label_selector,
)

API_VERSION = "policy.networking.k8s.io/v1alpha1"
ANP_KIND = "AdminNetworkPolicy"
BANP_KIND = "BaselineAdminNetworkPolicy"
BANP_NAME = "default"  # the CRD allows no other name
ANP_ACTIONS = ("Allow", "Deny", "Pass")
BANP_ACTIONS = ("Allow", "Deny")
MAX_PRIORITY = 1000


@dataclass(frozen=True)
class Subject:
    """`namespaces` alone (every pod of them), or `pods` (namespaceSelector AND podSelector)."""

    namespaces: LabelSelector
    pods: LabelSelector | None = None  # None: every pod of the selected namespaces


@dataclass(frozen=True)
class AdminPeer:
    """One of: pods in namespaces (`namespaces` + `pods`), `networks`, `nodes`; or an unmappable peer."""

    namespaces: LabelSelector | None = None
    pods: LabelSelector | None = None  # with `namespaces`: the `pods` peer; alone: `namespaces` peer
    networks: tuple[IPNetwork, ...] = ()
    nodes: LabelSelector | None = None
    unmappable: str | None = None  # why it cannot be enforced (field named), e.g. domainNames


@dataclass(frozen=True)
class AdminPort:
    protocol: str = "TCP"
    start: int | None = None  # portNumber: start == end; portRange: start..end
    end: int | None = None
    named: str | None = None  # namedPort


@dataclass(frozen=True)
class AdminRule:
    index: int
    name: str  # the rule's `name` ("" when unset)
    action: str  # Allow | Deny | Pass
    peers: tuple[AdminPeer, ...]
    ports: tuple[AdminPort, ...] | None  # None: every port of every protocol


@dataclass(frozen=True)
class AdminPolicy:
    """An ANP (`baseline=False`, with `priority`) or the BANP (`baseline=True`)."""

    kind: str
    name: str
    priority: int
    subject: Subject
    ingress: tuple[AdminRule, ...] = ()
    egress: tuple[AdminRule, ...] = ()
    source: str = ""

    @property
    def baseline(self) -> bool:
        return self.kind == BANP_KIND

    @property
    def ref(self) -> str:
        return f"{self.kind} {self.name}"


def _one_of(raw: Mapping[str, Any], path: str, p: _Problems, fields: tuple[str, ...]) -> str | None:
    """The one field set among `fields` (the CRD's MinProperties=MaxProperties=1)."""
    present = [f for f in raw if raw.get(f) is not None]
    if len(present) != 1:
        p.add(path, f"exactly one of {', '.join(fields)} must be set (found {', '.join(present) or 'none'})")
        return None
    return present[0]


def _parse_subject(value: Any, path: str, p: _Problems) -> Subject | None:
    raw = _mapping(value, path, p, ("namespaces", "pods"))
    which = _one_of(raw, path, p, ("namespaces", "pods"))
    if which == "namespaces":
        return Subject(parse_label_selector(raw["namespaces"], f"{path}.namespaces", p))
    if which == "pods":
        pods = _mapping(raw["pods"], f"{path}.pods", p, ("namespaceSelector", "podSelector"))
        for f in ("namespaceSelector", "podSelector"):
            if f not in pods:
                p.add(f"{path}.pods.{f}", "is required")
        ns = parse_label_selector(pods.get("namespaceSelector"), f"{path}.pods.namespaceSelector", p)
        return Subject(ns, parse_label_selector(pods.get("podSelector"), f"{path}.pods.podSelector", p))
    return None


def _parse_peer(value: Any, path: str, p: _Problems, egress: bool) -> AdminPeer | None:
    known = ("namespaces", "pods", "networks", "nodes", "domainNames") if egress else ("namespaces", "pods")
    raw = value if isinstance(value, dict) else _mapping(value, path, p)
    set_fields = [f for f in raw if raw.get(f) is not None]
    egress_only = [f for f in set_fields if not egress and f in ("networks", "nodes", "domainNames")]
    if egress_only:
        p.add(f"{path}.{egress_only[0]}", "only egress peers (spec.egress[].to) may use it")
        return None
    unknown = [f for f in set_fields if f not in known]
    if unknown or not set_fields:
        # The API's own rule: a peer with no field we know is from a newer CRD: fail closed.
        what = f"unknown field {unknown[0]}" if unknown else "no peer field set"
        return AdminPeer(unmappable=f"{path}: {what}")
    which = _one_of(raw, path, p, known)
    if which == "namespaces":
        return AdminPeer(namespaces=parse_label_selector(raw["namespaces"], f"{path}.namespaces", p))
    if which == "pods":
        pods = _mapping(raw["pods"], f"{path}.pods", p, ("namespaceSelector", "podSelector"))
        for f in ("namespaceSelector", "podSelector"):
            if f not in pods:
                p.add(f"{path}.pods.{f}", "is required")
        return AdminPeer(
            namespaces=parse_label_selector(
                pods.get("namespaceSelector"), f"{path}.pods.namespaceSelector", p
            ),
            pods=parse_label_selector(pods.get("podSelector"), f"{path}.pods.podSelector", p),
        )
    if which == "networks":
        nets = []
        items = _list(raw["networks"], f"{path}.networks", p)
        if not items:
            p.add(f"{path}.networks", "must list at least one CIDR")
        for i, text in enumerate(items):
            try:
                nets.append(ipaddress.ip_network(str(text), strict=False))
                if "/" not in str(text):
                    raise ValueError
            except ValueError:
                p.add(f"{path}.networks[{i}]", f"{text!r} is not a CIDR like 10.0.0.0/8 or fd00::/8")
        return AdminPeer(networks=tuple(nets))
    if which == "nodes":
        return AdminPeer(nodes=parse_label_selector(raw["nodes"], f"{path}.nodes", p))
    if which == "domainNames":
        return AdminPeer(
            unmappable=f"{path}.domainNames: domain names are not supported (Omniwall matches addresses)"
        )
    return None


def _parse_port_number(raw: Any, path: str, p: _Problems, field: str) -> int | None:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 65535:
        p.add(f"{path}.{field}", f"{raw!r} must be a port number 1..65535")
        return None
    return raw


def _parse_protocol(raw: Mapping[str, Any], path: str, p: _Problems) -> str | None:
    protocol = raw.get("protocol") or "TCP"
    if protocol not in PROTOCOLS:
        p.add(f"{path}.protocol", f"{protocol!r} is not one of {', '.join(PROTOCOLS)}")
        return None
    return str(protocol)


def _parse_port(value: Any, path: str, p: _Problems) -> AdminPort | None:
    raw = _mapping(value, path, p, ("portNumber", "namedPort", "portRange"))
    which = _one_of(raw, path, p, ("portNumber", "namedPort", "portRange"))
    if which == "namedPort":
        name = raw["namedPort"]
        if not isinstance(name, str) or not _PORT_NAME_RE.fullmatch(name):
            p.add(f"{path}.namedPort", f"{name!r} is not a port name (IANA service name, e.g. http)")
            return None
        return AdminPort(named=name)
    if which == "portNumber":
        where = f"{path}.portNumber"
        num = _mapping(raw["portNumber"], where, p, ("protocol", "port"))
        protocol = _parse_protocol(num, where, p)
        port = _parse_port_number(num.get("port"), where, p, "port")
        return AdminPort(protocol, port, port) if protocol and port else None
    if which == "portRange":
        where = f"{path}.portRange"
        rng = _mapping(raw["portRange"], where, p, ("protocol", "start", "end"))
        protocol = _parse_protocol(rng, where, p)
        start = _parse_port_number(rng.get("start"), where, p, "start")
        end = _parse_port_number(rng.get("end"), where, p, "end")
        if start and end and start >= end:
            p.add(f"{where}.end", f"{end} must be greater than start ({start})")
            return None
        return AdminPort(protocol, start, end) if protocol and start and end else None
    return None


def _parse_rule(
    value: Any, path: str, p: _Problems, index: int, egress: bool, actions: tuple[str, ...]
) -> AdminRule | None:
    peers_key = "to" if egress else "from"
    raw = _mapping(value, path, p, ("name", "action", peers_key, "ports"))
    name = raw.get("name") or ""
    if not isinstance(name, str) or len(name) > 100:
        p.add(f"{path}.name", "must be a string of at most 100 characters")
    action = raw.get("action")
    if action not in actions:
        p.add(f"{path}.action", f"{action!r} is not one of {', '.join(actions)}")
    peer_items = _list(raw.get(peers_key), f"{path}.{peers_key}", p)
    if not peer_items:
        p.add(f"{path}.{peers_key}", "must list at least one peer")
    peers = [_parse_peer(v, f"{path}.{peers_key}[{i}]", p, egress) for i, v in enumerate(peer_items)]
    ports: tuple[AdminPort, ...] | None = None
    if raw.get("ports") is not None:
        items = _list(raw["ports"], f"{path}.ports", p)
        if not items:
            p.add(f"{path}.ports", "must list at least one port when set")
        parsed = [_parse_port(v, f"{path}.ports[{i}]", p) for i, v in enumerate(items)]
        ports = tuple(x for x in parsed if x)
        if egress and any(x.named for x in ports) and any(x.networks or x.nodes for x in peers if x):
            p.add(f"{path}.ports", "networks/nodes peers cannot be combined with namedPort")
    return AdminRule(index, str(name), str(action), tuple(x for x in peers if x), ports)


def parse_admin_policy(doc: Mapping[str, Any], source: str) -> AdminPolicy:
    kind = str(doc.get("kind"))
    baseline = kind == BANP_KIND
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    p = _Problems(f"{source}: {kind} {meta.get('name', '?')}")
    for k in doc:
        if k not in ("apiVersion", "kind", "metadata", "spec", "status"):
            p.add(str(k), "unknown field")
    if meta.get("namespace"):
        p.add("metadata.namespace", f"{kind} is cluster-scoped: it has no namespace")
    name = _check_name(meta.get("name"), "metadata.name", p, label=False)
    if baseline and name is not None and name != BANP_NAME:
        p.add("metadata.name", f"must be {BANP_NAME!r}: a cluster has one BaselineAdminNetworkPolicy")
    allowed = ("subject", "ingress", "egress") if baseline else ("priority", "subject", "ingress", "egress")
    spec = _mapping(doc.get("spec"), "spec", p, allowed)
    priority = 0
    if not baseline:
        raw_priority = spec.get("priority")
        if isinstance(raw_priority, bool) or not isinstance(raw_priority, int):
            p.add("spec.priority", f"{raw_priority!r} must be an integer 0..{MAX_PRIORITY}")
        elif not 0 <= raw_priority <= MAX_PRIORITY:
            p.add("spec.priority", f"{raw_priority} is outside 0..{MAX_PRIORITY}")
        else:
            priority = raw_priority
    if "subject" not in spec:
        p.add("spec.subject", "is required")
    subject = _parse_subject(spec.get("subject"), "spec.subject", p)
    actions = BANP_ACTIONS if baseline else ANP_ACTIONS
    rules = {}
    for key in ("ingress", "egress"):
        items = _list(spec.get(key), f"spec.{key}", p)
        if len(items) > 100:
            p.add(f"spec.{key}", "at most 100 rules")
        rules[key] = tuple(
            r
            for i, v in enumerate(items)
            if (r := _parse_rule(v, f"spec.{key}[{i}]", p, i, key == "egress", actions)) is not None
        )
    if p.items:
        raise K8sImportError(p.items)
    assert name is not None and subject is not None
    return AdminPolicy(kind, name, priority, subject, rules["ingress"], rules["egress"], source)
