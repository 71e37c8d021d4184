"""`networking.k8s.io/v1` NetworkPolicy and `v1` Namespace objects: parsed, validated, defaulted.

Validation follows the API server's (so a policy it would refuse is refused here, with the field path
and the reason) and defaulting follows it too: a port's protocol defaults to TCP, and `policyTypes`
defaults to `[Ingress]` plus `Egress` when the `egress` list is non-empty. All problems of a document
are collected before raising.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omniwall.k8s.labels import NAMESPACE_NAME_LABEL, OPERATORS, LabelSelector, Requirement

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_NAMESPACE = "default"  # where kubectl puts an object without metadata.namespace
PROTOCOLS = ("TCP", "UDP", "SCTP")
POLICY_TYPES = ("Ingress", "Egress")

_DNS_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME_RE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)")
_LABEL_VALUE_RE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
# IANA_SVC_NAME: at most 15 characters, lower-case letters, digits and '-', at least one letter,
# no leading, trailing or double '-'.
_PORT_NAME_RE = re.compile(r"(?=.*[a-z])[a-z0-9]([a-z0-9]|-(?=[a-z0-9])){0,14}")


class K8sImportError(ValueError):
    """Bad Kubernetes input: every problem found, each naming the object, the field and the reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class IPBlock:
    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()

    def networks(self) -> list[IPNetwork]:
        """`cidr` minus every `except`, as a sorted list of disjoint CIDRs (empty: nothing left)."""
        remaining: list[IPNetwork] = [self.cidr]
        for ex in ipaddress.collapse_addresses(self.excepts):  # type: ignore[type-var]
            nxt: list[IPNetwork] = []
            for net in remaining:
                if ex.subnet_of(net):  # type: ignore[arg-type]
                    nxt.extend(net.address_exclude(ex))  # type: ignore[arg-type]
                elif not net.subnet_of(ex):  # type: ignore[arg-type]
                    nxt.append(net)
            remaining = nxt
        return sorted(ipaddress.collapse_addresses(remaining))  # type: ignore[type-var]

    def contains(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if address.version != self.cidr.version or address not in self.cidr:
            return False
        return not any(address in ex for ex in self.excepts)


@dataclass(frozen=True)
class Peer:
    """Exactly one of: a selector peer (pod and/or namespace selector) or an ipBlock."""

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None


@dataclass(frozen=True)
class PolicyPort:
    protocol: str = "TCP"
    port: int | str | None = None  # None: every port of the protocol; str: a named port
    end_port: int | None = None


@dataclass(frozen=True)
class PolicyRule:
    """Traffic matching one of `peers` (none: every peer) AND one of `ports` (none: every port)."""

    peers: tuple[Peer, ...] = ()
    ports: tuple[PolicyPort, ...] = ()


@dataclass(frozen=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector
    policy_types: frozenset[str]
    ingress: tuple[PolicyRule, ...] = ()
    egress: tuple[PolicyRule, ...] = ()
    # Rules present but not in effect because policyTypes leaves their direction out.
    ignored_directions: tuple[str, ...] = ()
    source: str = ""

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)  # includes the implicit name label
    source: str = ""


# ------------------------------------------------------------------------------------------ parsing


class _Problems:
    """Collects problems under a prefix naming the document and object."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{self.prefix}: {path}: {message}" if path else f"{self.prefix}: {message}")


def _mapping(value: Any, path: str, p: _Problems, allowed: tuple[str, ...] | None = None) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        p.add(path, f"must be a mapping, not {type(value).__name__}")
        return {}
    if allowed is not None:
        for k in value:
            if k not in allowed:
                p.add(
                    f"{path}.{k}" if path else str(k),
                    f"unknown field (expected one of: {', '.join(allowed)})",
                )
    return value


def _list(value: Any, path: str, p: _Problems) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        p.add(path, f"must be a list, not {type(value).__name__}")
        return []
    return value


# Label key names and label values share one syntax (the regexes differ only in allowing "" for values).
_LABEL_SYNTAX = "at most 63 letters, digits, '-', '_', '.', starting and ending with a letter or digit"


def _fits_label_syntax(text: str, pattern: re.Pattern[str]) -> bool:
    return len(text) <= 63 and pattern.fullmatch(text) is not None


def _check_label_key(key: Any, path: str, p: _Problems) -> bool:
    if not isinstance(key, str) or not key:
        p.add(path, f"label key {key!r} must be a non-empty string")
        return False
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.fullmatch(prefix)):
        p.add(path, f"label key {key!r}: the prefix must be a DNS subdomain like example.com")
        return False
    if not _fits_label_syntax(name, _LABEL_NAME_RE):
        p.add(path, f"label key {key!r}: the name must be {_LABEL_SYNTAX}")
        return False
    return True


def _check_label_value(value: Any, path: str, p: _Problems) -> bool:
    if not isinstance(value, str):
        p.add(path, f"label value {value!r} must be a string (quote it in YAML)")
        return False
    if not _fits_label_syntax(value, _LABEL_VALUE_RE):
        p.add(path, f"label value {value!r} must be {_LABEL_SYNTAX}")
        return False
    return True


def parse_label_selector(value: Any, path: str, p: _Problems) -> LabelSelector:
    raw = _mapping(value, path, p, ("matchLabels", "matchExpressions"))
    reqs: list[Requirement] = []
    labels = _mapping(raw.get("matchLabels"), f"{path}.matchLabels", p)
    for k, v in labels.items():
        where = f"{path}.matchLabels.{k}"
        if _check_label_key(k, where, p) and _check_label_value(v, where, p):
            reqs.append(Requirement(k, "In", (v,)))
    for i, expr in enumerate(_list(raw.get("matchExpressions"), f"{path}.matchExpressions", p)):
        where = f"{path}.matchExpressions[{i}]"
        e = _mapping(expr, where, p, ("key", "operator", "values"))
        key, op = e.get("key"), e.get("operator")
        values = _list(e.get("values"), f"{where}.values", p)
        ok = _check_label_key(key, f"{where}.key", p)
        if op not in OPERATORS:
            p.add(f"{where}.operator", f"{op!r} is not one of {', '.join(OPERATORS)}")
            ok = False
        elif op in ("In", "NotIn") and not values:
            p.add(f"{where}.values", f"must be non-empty for operator {op}")
            ok = False
        elif op in ("Exists", "DoesNotExist") and values:
            p.add(f"{where}.values", f"must be empty for operator {op}")
            ok = False
        for j, v in enumerate(values):
            ok = _check_label_value(v, f"{where}.values[{j}]", p) and ok
        if ok:
            reqs.append(Requirement(key, op, tuple(sorted(set(values)))))
    return LabelSelector(tuple(reqs))


def _parse_network(value: Any, path: str, p: _Problems) -> IPNetwork | None:
    if not isinstance(value, str):
        p.add(path, f"{value!r} is not a CIDR like 10.0.0.0/8")
        return None
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        p.add(path, f"{value!r} is not a CIDR like 10.0.0.0/8")
        return None


def _parse_ip_block(value: Any, path: str, p: _Problems) -> IPBlock | None:
    raw = _mapping(value, path, p, ("cidr", "except"))
    if "cidr" not in raw:
        p.add(f"{path}.cidr", "is required")
        return None
    cidr = _parse_network(raw["cidr"], f"{path}.cidr", p)
    excepts: list[IPNetwork] = []
    for i, ex in enumerate(_list(raw.get("except"), f"{path}.except", p)):
        where = f"{path}.except[{i}]"
        net = _parse_network(ex, where, p)
        if net is None or cidr is None:
            continue
        if net.version != cidr.version or not net.subnet_of(cidr) or net == cidr:  # type: ignore[arg-type]
            p.add(where, f"{ex} must be a strict subset of cidr {cidr}")
            continue
        excepts.append(net)
    return IPBlock(cidr, tuple(excepts)) if cidr is not None else None


def _parse_peer(value: Any, path: str, p: _Problems) -> Peer | None:
    raw = _mapping(value, path, p, ("podSelector", "namespaceSelector", "ipBlock"))
    has_pod = raw.get("podSelector") is not None
    has_ns = raw.get("namespaceSelector") is not None
    has_ip = raw.get("ipBlock") is not None
    if has_ip and (has_pod or has_ns):
        p.add(path, "ipBlock cannot be combined with podSelector or namespaceSelector")
        return None
    if not (has_ip or has_pod or has_ns):
        p.add(path, "must specify a peer: podSelector, namespaceSelector or ipBlock")
        return None
    if has_ip:
        block = _parse_ip_block(raw["ipBlock"], f"{path}.ipBlock", p)
        return Peer(ip_block=block) if block else None
    pods = parse_label_selector(raw["podSelector"], f"{path}.podSelector", p) if has_pod else None
    nss = parse_label_selector(raw["namespaceSelector"], f"{path}.namespaceSelector", p) if has_ns else None
    return Peer(pod_selector=pods, namespace_selector=nss)


def _parse_port(value: Any, path: str, p: _Problems) -> PolicyPort | None:
    raw = _mapping(value, path, p, ("protocol", "port", "endPort"))
    protocol = raw.get("protocol") or "TCP"
    if protocol not in PROTOCOLS:
        p.add(f"{path}.protocol", f"{protocol!r} is not one of {', '.join(PROTOCOLS)}")
        return None
    port = raw.get("port")
    end_port = raw.get("endPort")
    if isinstance(port, bool) or (port is not None and not isinstance(port, int | str)):
        p.add(f"{path}.port", f"{port!r} must be a port number or a port name")
        return None
    if isinstance(port, int) and not 1 <= port <= 65535:
        p.add(f"{path}.port", f"{port} is outside 1..65535")
        return None
    if isinstance(port, str) and not _PORT_NAME_RE.fullmatch(port):
        p.add(
            f"{path}.port",
            f"{port!r} is not a port name (at most 15 lower-case letters, digits and '-', with a letter); "
            "write a number without quotes",
        )
        return None
    if end_port is not None:
        if isinstance(end_port, bool) or not isinstance(end_port, int):
            p.add(f"{path}.endPort", f"{end_port!r} must be a port number")
            return None
        if port is None:
            p.add(f"{path}.endPort", "may only be set together with port")
            return None
        if isinstance(port, str):
            p.add(f"{path}.endPort", "may not be set with a named port")
            return None
        if not port <= end_port <= 65535:
            p.add(f"{path}.endPort", f"{end_port} must be between port ({port}) and 65535")
            return None
    return PolicyPort(protocol, port, end_port)


def _parse_rule(value: Any, path: str, peers_key: str, p: _Problems) -> PolicyRule:
    raw = _mapping(value, path, p, (peers_key, "ports"))
    peers = [
        _parse_peer(v, f"{path}.{peers_key}[{i}]", p)
        for i, v in enumerate(_list(raw.get(peers_key), f"{path}.{peers_key}", p))
    ]
    ports = [
        _parse_port(v, f"{path}.ports[{i}]", p)
        for i, v in enumerate(_list(raw.get("ports"), f"{path}.ports", p))
    ]
    return PolicyRule(tuple(x for x in peers if x), tuple(x for x in ports if x))


def _check_name(value: Any, path: str, p: _Problems, *, label: bool) -> str | None:
    regex, what = (_DNS_LABEL_RE, "a DNS label") if label else (_DNS_SUBDOMAIN_RE, "a DNS subdomain")
    limit = 63 if label else 253
    if not isinstance(value, str) or len(value) > limit or not regex.fullmatch(value):
        p.add(path, f"{value!r} is not {what} (lower-case letters, digits, '-'; at most {limit} characters)")
        return None
    return value


def parse_network_policy(doc: Mapping[str, Any], source: str) -> NetworkPolicy:
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    ns_raw = meta.get("namespace") or DEFAULT_NAMESPACE
    p = _Problems(f"{source}: NetworkPolicy {ns_raw}/{meta.get('name', '?')}")
    for k in doc:
        if k not in ("apiVersion", "kind", "metadata", "spec", "status"):
            p.add(str(k), "unknown field")
    name = _check_name(meta.get("name"), "metadata.name", p, label=False)
    namespace = _check_name(ns_raw, "metadata.namespace", p, label=True)
    spec = _mapping(doc.get("spec"), "spec", p, ("podSelector", "policyTypes", "ingress", "egress"))
    pod_selector = parse_label_selector(spec.get("podSelector"), "spec.podSelector", p)
    ingress = tuple(
        _parse_rule(v, f"spec.ingress[{i}]", "from", p)
        for i, v in enumerate(_list(spec.get("ingress"), "spec.ingress", p))
    )
    egress = tuple(
        _parse_rule(v, f"spec.egress[{i}]", "to", p)
        for i, v in enumerate(_list(spec.get("egress"), "spec.egress", p))
    )
    types_raw = _list(spec.get("policyTypes"), "spec.policyTypes", p)
    for i, t in enumerate(types_raw):
        if t not in POLICY_TYPES:
            p.add(f"spec.policyTypes[{i}]", f"{t!r} is not Ingress or Egress")
    if types_raw:
        types = frozenset(t for t in types_raw if t in POLICY_TYPES)
    else:
        # API server defaulting: Ingress always, Egress when there are egress rules.
        types = frozenset({"Ingress", "Egress"} if egress else {"Ingress"})
    if p.items:
        raise K8sImportError(p.items)
    assert name is not None and namespace is not None
    ignored = tuple(d for d, rules in (("Ingress", ingress), ("Egress", egress)) if rules and d not in types)
    return NetworkPolicy(
        namespace=namespace,
        name=name,
        pod_selector=pod_selector,
        policy_types=types,
        ingress=ingress if "Ingress" in types else (),
        egress=egress if "Egress" in types else (),
        ignored_directions=ignored,
        source=source,
    )


def parse_namespace(doc: Mapping[str, Any], source: str) -> Namespace:
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    p = _Problems(f"{source}: Namespace {meta.get('name', '?')}")
    name = _check_name(meta.get("name"), "metadata.name", p, label=True)
    labels: dict[str, str] = {}
    for k, v in _mapping(meta.get("labels"), "metadata.labels", p).items():
        where = f"metadata.labels.{k}"
        if _check_label_key(k, where, p) and _check_label_value(v, where, p):
            labels[k] = v
    if name is not None and labels.get(NAMESPACE_NAME_LABEL, name) != name:
        p.add(f"metadata.labels.{NAMESPACE_NAME_LABEL}", f"must equal the namespace name {name!r}")
    if p.items:
        raise K8sImportError(p.items)
    assert name is not None
    labels[NAMESPACE_NAME_LABEL] = name
    return Namespace(name=name, labels=labels, source=source)
