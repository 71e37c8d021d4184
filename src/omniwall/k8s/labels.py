"""Kubernetes label selectors and namespace sets: evaluation (upstream semantics) and selector text.

A `LabelSelector` is the conjunction of its requirements (`matchLabels` entries become `In` with one
value). `NamespaceSet` is a finite or co-finite set of namespace names: what a `namespaceSelector`
denotes once resolved against the Namespace objects we were given (see `resolve_namespaces`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# The label the control plane puts on every namespace; its value is the namespace's name.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
# The workload attribute that carries a pod's namespace.
NAMESPACE_ATTRIBUTE = "k8s.namespace"

# Workload attributes carrying the labels of the pod's namespace, read by selectors at evaluation time
# (AdminNetworkPolicy / BaselineAdminNetworkPolicy namespace selectors): `k8s.namespace.labels.<key>`.
NAMESPACE_LABEL_PREFIX = "k8s.namespace.labels."

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

# Keys the Omniwall selector language accepts bare; anything else is written label("...").
_BARE_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
_RESERVED = frozenset({"has", "all", "label", "in", "not", "true", "false"})


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # one of OPERATORS
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Upstream semantics: NotIn and DoesNotExist are true when the key is missing."""
        present = self.key in labels
        match self.operator:
            case "In":
                return present and labels[self.key] in self.values
            case "NotIn":
                return not present or labels[self.key] not in self.values
            case "Exists":
                return present
            case "DoesNotExist":
                return not present
        raise ValueError(f"unknown operator {self.operator!r}")

    def render(self, key_prefix: str = "") -> str:
        key = render_key(key_prefix + self.key)
        match self.operator:
            case "In" if len(self.values) == 1:
                return f"{key} == {quote(self.values[0])}"
            case "In":
                return f"{key} in {render_set(self.values)}"
            case "NotIn":
                # `not in` is the exact negation of `in`: true when the key is missing, as upstream.
                return f"{key} not in {render_set(self.values)}"
            case "Exists":
                return f"has({key})"
            case "DoesNotExist":
                return f"!has({key})"
        raise ValueError(f"unknown operator {self.operator!r}")


@dataclass(frozen=True)
class LabelSelector:
    """matchLabels AND matchExpressions. No requirements (`{}`) selects everything."""

    requirements: tuple[Requirement, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.requirements

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def clauses(self) -> list[str]:
        """Selector-language clauses, to be joined with `&&` (none for the empty selector)."""
        return [r.render() for r in self.requirements]


@dataclass(frozen=True)
class NamespaceSet:
    """`finite`: exactly `names`; otherwise every namespace except `names`."""

    finite: bool
    names: frozenset[str]

    @staticmethod
    def of(names: Iterable[str]) -> NamespaceSet:
        return NamespaceSet(True, frozenset(names))

    @staticmethod
    def everything() -> NamespaceSet:
        return NamespaceSet(False, frozenset())

    def contains(self, namespace: str) -> bool:
        return (namespace in self.names) == self.finite

    @property
    def is_nothing(self) -> bool:
        return self.finite and not self.names

    def complement(self) -> NamespaceSet:
        return NamespaceSet(not self.finite, self.names)

    def __and__(self, other: NamespaceSet) -> NamespaceSet:
        if self.finite and other.finite:
            return NamespaceSet(True, self.names & other.names)
        if self.finite:
            return NamespaceSet(True, self.names - other.names)
        if other.finite:
            return NamespaceSet(True, other.names - self.names)
        return NamespaceSet(False, self.names | other.names)

    def __or__(self, other: NamespaceSet) -> NamespaceSet:
        return (self.complement() & other.complement()).complement()

    def __sub__(self, other: NamespaceSet) -> NamespaceSet:
        return self & other.complement()

    def clause(self) -> str | None:
        """Selector-language clause over the pod's namespace attribute; None when the set is empty."""
        key = render_key(NAMESPACE_ATTRIBUTE)
        names = sorted(self.names)
        if self.finite:
            if not names:
                return None
            if len(names) == 1:
                return f"{key} == {quote(names[0])}"
            return f"{key} in {render_set(names)}"
        # Only workloads that carry a namespace are pods; `not in` alone would also match the others.
        if not names:
            return f"has({key})"
        return f"has({key}) && {key} not in {render_set(names)}"


def _name_requirement_set(req: Requirement) -> NamespaceSet:
    """The namespaces a requirement on the implicit name label admits."""
    match req.operator:
        case "In":
            return NamespaceSet.of(req.values)
        case "NotIn":
            return NamespaceSet(False, frozenset(req.values))
        case "Exists":
            return NamespaceSet.everything()
        case _:  # DoesNotExist: every namespace has the label
            return NamespaceSet.of(())


def resolve_namespaces(selector: LabelSelector, known: Mapping[str, Mapping[str, str]]) -> NamespaceSet:
    """The namespaces a namespaceSelector selects.

    `known` maps each namespace given as an object to its labels (the implicit name label included).
    Any other namespace carries only the implicit name label, so a requirement on another key is decided
    for it by the key being missing, and requirements on the name label constrain its name directly.
    The result is exact for every namespace, also for those that get pods only later.
    """
    if selector.is_empty:
        return NamespaceSet.everything()
    matched = NamespaceSet.of(n for n, labels in known.items() if selector.matches(labels))
    others = NamespaceSet.everything() - NamespaceSet.of(known)
    for req in selector.requirements:
        if req.key == NAMESPACE_NAME_LABEL:
            others = others & _name_requirement_set(req)
        elif not req.matches({}):
            others = NamespaceSet.of(())
            break
    return matched | others


def quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def render_key(key: str) -> str:
    if _BARE_KEY_RE.fullmatch(key) and key not in _RESERVED:
        return key
    return f"label({quote(key)})"


def render_set(values: Iterable[str]) -> str:
    return "{" + ", ".join(quote(v) for v in values) + "}"


def pod_selector_text(namespaces: NamespaceSet, pods: LabelSelector) -> str | None:
    """Selector for the pods in `namespaces` matching `pods`; None when it can match nothing."""
    ns_clause = namespaces.clause()
    if ns_clause is None:
        return None
    return " && ".join([ns_clause, *pods.clauses()])


def namespace_label_attributes(labels: Mapping[str, str]) -> dict[str, str]:
    """The workload attributes a pod gets from its namespace's labels (the implicit name label included)."""
    return {NAMESPACE_LABEL_PREFIX + k: v for k, v in sorted(labels.items())}


def dynamic_namespace_clauses(selector: LabelSelector) -> list[str]:
    """Clauses selecting pods whose namespace matches `selector`, read from the pod's attributes at
    evaluation time (not resolved at import): `has(k8s.namespace)` (pods only), requirements on the
    implicit name label as conditions on `k8s.namespace` itself (always present on a pod), the others on
    `k8s.namespace.labels.<key>`. A namespace whose labels were never put on its pods has only its name:
    a requirement on another key is then decided by the key being missing, exactly as upstream for a
    namespace without that label."""
    clauses = [f"has({render_key(NAMESPACE_ATTRIBUTE)})"]
    for req in selector.requirements:
        if req.key == NAMESPACE_NAME_LABEL:
            clauses.append(Requirement(NAMESPACE_ATTRIBUTE, req.operator, req.values).render())
        else:
            clauses.append(req.render(NAMESPACE_LABEL_PREFIX))
    return clauses
