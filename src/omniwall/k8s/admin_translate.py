"""AdminNetworkPolicy / BaselineAdminNetworkPolicy -> provider policies (docs/k8s.md, "Admin policies").

- each ANP becomes one provider Policy `k8s-anp.<name>` in the `infrastructure` category with
  `priority` = the ANP's priority (first match wins across ANPs by priority, then rule order, as
  upstream); Allow/Deny/Pass become allow/drop/pass, so a Pass hands the connection down to the
  NetworkPolicies (the tenant's `application` rules) and then to the baseline;
- the BANP becomes `k8s-banp.default` in the `baseline` category: after the NetworkPolicies (allows and
  isolation drops alike), before the tenant's default (allow), the Kubernetes order ANP -> NP -> BANP ->
  allow;
- subjects and peers are Groups of the cluster's tenant (so they only ever match that tenant's pods),
  referenced from the provider policies as `<tenant>/<group>`; their namespace selectors read the pod's
  `k8s.namespace.labels.<key>` attributes at evaluation time (`labels.dynamic_namespace_clauses`).

Fail closed, as the API asks of an implementation that meets a peer it cannot honour: an Allow rule
with something unmappable matches nothing (dropped); a Deny or Pass rule becomes "deny all" for its
subject and direction. Each case is a warning naming the object and the field.
"""

from __future__ import annotations

import ipaddress
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from omniwall import PROVIDER_TENANT
from omniwall.k8s.admin_objects import AdminPeer, AdminPolicy, AdminPort, AdminRule, Subject
from omniwall.k8s.labels import (
    NAMESPACE_ATTRIBUTE,
    NAMESPACE_LABEL_PREFIX,
    NAMESPACE_NAME_LABEL,
    LabelSelector,
    dynamic_namespace_clauses,
    namespace_label_attributes,
)
from omniwall.k8s.names import resource_name
from omniwall.k8s.objects import Namespace
from omniwall.k8s.translate import Pod, pods_of
from omniwall.model.resources import (
    Action,
    Category,
    Direction,
    Group,
    GroupSpec,
    Host,
    Metadata,
    Policy,
    PolicySpec,
    Rule,
    Workload,
    _Resource,
)

ANP_PREFIX = "k8s-anp"
BANP_PREFIX = "k8s-banp"
BANP_PRIORITY = 1000
_ACTIONS = {"Allow": Action.ALLOW, "Deny": Action.DROP, "Pass": Action.PASS}


@dataclass
class AdminResult:
    resources: list[_Resource]
    warnings: list[str] = field(default_factory=list)


def _service(port: AdminPort) -> str:
    proto = port.protocol.lower()
    if port.start == port.end:
        return f"{proto}/{port.start}"
    return f"{proto}/{port.start}-{port.end}"


def _rule_name(tag: str, name: str) -> str:
    """`in-0` plus the ANP rule's own name when it has one, so explain names the upstream rule."""
    readable = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("._-")
    return resource_name(f"{tag}.{readable}") if readable else tag


class _AdminTranslator:
    def __init__(
        self,
        tenant: str,
        pods: Sequence[Pod],
        namespaces: Mapping[str, Mapping[str, str]],
        hosts: Sequence[Host],
    ) -> None:
        self.tenant = tenant
        self.pods = sorted(pods, key=lambda p: p.name)
        self.namespaces = namespaces
        self.hosts = hosts
        self.groups: dict[str, Group] = {}
        self.policies: list[Policy] = []
        self.warnings: list[str] = []

    # ------------------------------------------------------------------------------------- helpers

    def _group(self, name: str, spec: GroupSpec) -> str:
        """A group of the cluster's tenant; the reference a provider policy uses for it."""
        self.groups[name] = Group(metadata=Metadata(name=name, tenant=self.tenant), spec=spec)
        return f"{self.tenant}/{name}"

    def _ns_labels(self, pod: Pod) -> Mapping[str, str]:
        return {**self.namespaces.get(pod.namespace, {}), NAMESPACE_NAME_LABEL: pod.namespace}

    def _selects(self, namespaces: LabelSelector, pods: LabelSelector | None) -> Callable[[Pod], bool]:
        """The same set as the group selector, evaluated at import (for named ports only)."""
        return lambda pod: (
            namespaces.matches(self._ns_labels(pod)) and (pods is None or pods.matches(pod.labels))
        )

    @staticmethod
    def _selector(namespaces: LabelSelector, pods: LabelSelector | None) -> str:
        return " && ".join([*dynamic_namespace_clauses(namespaces), *(pods.clauses() if pods else [])])

    def _node_cidrs(self, nodes: LabelSelector) -> list[str] | str:
        """Addresses of the Hosts whose labels match, or why the peer cannot be mapped."""
        if not self.hosts:
            return "no Host objects were given to map nodes to"
        cidrs = []
        for h in self.hosts:
            if nodes.matches(h.metadata.labels):
                if not h.spec.address:
                    return f"Host {h.name} has no spec.address"
                cidrs.append(str(ipaddress.ip_network(h.spec.address)))
        return sorted(set(cidrs))

    # --------------------------------------------------------------------------------------- rules

    def _rules(
        self, pol: AdminPolicy, base: str, subject: Callable[[Pod], bool], r: AdminRule, ingress: bool
    ) -> list[Rule]:
        tag = f"{'in' if ingress else 'out'}-{r.index}"
        field_path = f"spec.{'ingress' if ingress else 'egress'}[{r.index}]"
        head = f"{pol.source}: {pol.ref}"
        where = f"{head}: {field_path}"
        direction = Direction.IN if ingress else Direction.OUT
        name = _rule_name(tag, r.name)
        refs: list[str] = []
        peer_pods: list[Callable[[Pod], bool]] = []
        unmappable: list[str] = []
        peers_key = "from" if ingress else "to"
        for j, peer in enumerate(r.peers):
            refs_or_reason = self._peer(pol, base, tag, f"{field_path}.{peers_key}[{j}]", j, peer, peer_pods)
            if isinstance(refs_or_reason, str):
                unmappable.append(refs_or_reason)
            else:
                refs.extend(refs_or_reason)
        numeric: list[str] = []
        named: list[str] = []
        sctp = False
        for port in r.ports or ():
            if port.named is not None:
                named.append(port.named)
            elif port.protocol == "SCTP":
                sctp = True
            else:
                numeric.append(_service(port))
        peer_problems = bool(unmappable)
        if sctp:
            unmappable.append(f"{field_path}.ports: SCTP is not supported by Omniwall")
        if unmappable:
            reasons = "; ".join(unmappable)
            if r.action == "Allow":
                # An Allow that matches less is closed: drop the SCTP entries, or the whole rule when a
                # peer is unmappable or no port entry is left.
                if peer_problems or not (numeric or named):
                    self.warnings.append(f"{head}: {reasons}: Allow rule {field_path} dropped (fails closed)")
                    return []
                self.warnings.append(f"{head}: {reasons}: those port entries of {field_path} allow nothing")
            else:
                self.warnings.append(
                    f"{head}: {reasons}: {r.action} rule {field_path} denies all "
                    f"{'ingress' if ingress else 'egress'} traffic of its subject instead (fails closed)"
                )
                return [
                    Rule(
                        name=name,
                        action=Action.DROP,
                        direction=direction,
                        sources=["any"],
                        destinations=["any"],
                    )
                ]
        action = _ACTIONS[r.action]

        def make(rule_name: str, services: list[str], peers: list[str], applied: list[str]) -> Rule:
            return Rule(
                name=rule_name,
                sources=peers if ingress else ["any"],
                destinations=["any"] if ingress else peers,
                services=services,
                action=action,
                direction=direction,
                appliedTo=applied,
            )

        out: list[Rule] = []
        if not refs:
            return out
        if r.ports is None or numeric:
            out.append(make(name, numeric, refs, []))
        if not named:
            return out
        # Named ports are resolved on the pods given (a snapshot, as for NetworkPolicies): on ingress a
        # port of the subject pod, on egress of the destination pod.
        by_services: dict[tuple[str, ...], list[str]] = defaultdict(list)
        candidates = [p for p in self.pods if (subject(p) if ingress else any(m(p) for m in peer_pods))]
        for pod in candidates:
            services = tuple(sorted({s for n in named if (s := self._resolve(pod, n))}))
            if services:
                by_services[services].append(pod.name)
        for k, (services, members) in enumerate(sorted(by_services.items())):
            group = self._group(resource_name(f"{base}_{tag}_named-{k}"), GroupSpec(workloads=members))
            rule_name = resource_name(f"{name}-named-{k}")
            if ingress:
                out.append(make(rule_name, list(services), refs, [group]))
            else:
                out.append(make(rule_name, list(services), [group], []))
        if not by_services:
            self.warnings.append(
                f"{where}: named port(s) {', '.join(sorted(set(named)))} resolve on no workload given "
                "(declare them in the Workloads' spec.ports); they match nothing"
            )
        return out

    @staticmethod
    def _resolve(pod: Pod, name: str) -> str | None:
        declared = pod.ports.get(name)
        if declared is None or declared[0] == "SCTP":
            return None
        return f"{declared[0].lower()}/{declared[1]}"

    def _peer(
        self, pol: AdminPolicy, base: str, tag: str, path: str, j: int, peer: AdminPeer, peer_pods: list
    ) -> list[str] | str:
        """Omniwall references for one peer, or the reason it cannot be mapped."""
        if peer.unmappable is not None:
            return peer.unmappable
        if peer.networks:
            return [str(n) for n in peer.networks]
        if peer.nodes is not None:
            cidrs = self._node_cidrs(peer.nodes)
            if isinstance(cidrs, str):
                return f"{path}.nodes: {cidrs}"
            if not cidrs:
                return []
            self.warnings.append(
                f"{pol.source}: {pol.ref}: {path}.nodes: resolved at import to {', '.join(cidrs)} "
                "(re-run the import when nodes change)"
            )
            return cidrs
        assert peer.namespaces is not None
        peer_pods.append(self._selects(peer.namespaces, peer.pods))
        text = self._selector(peer.namespaces, peer.pods)
        return [self._group(resource_name(f"{base}_{tag}_peer-{j}"), GroupSpec(selector=text))]

    # ------------------------------------------------------------------------------------- policies

    def add(self, pol: AdminPolicy) -> None:
        base = resource_name(f"{BANP_PREFIX if pol.baseline else ANP_PREFIX}.{pol.name}")
        subject: Subject = pol.subject
        subject_group = self._group(
            base, GroupSpec(selector=self._selector(subject.namespaces, subject.pods))
        )
        selects = self._selects(subject.namespaces, subject.pods)
        rules: list[Rule] = []
        for r in pol.ingress:
            rules.extend(self._rules(pol, base, selects, r, ingress=True))
        for r in pol.egress:
            rules.extend(self._rules(pol, base, selects, r, ingress=False))
        self.policies.append(
            Policy(
                metadata=Metadata(name=base, tenant=PROVIDER_TENANT),
                spec=PolicySpec(
                    category=Category.BASELINE if pol.baseline else Category.INFRASTRUCTURE,
                    priority=BANP_PRIORITY if pol.baseline else pol.priority,
                    appliedTo=[subject_group],
                    rules=rules,
                ),
            )
        )


def with_namespace_labels(
    workloads: Sequence[Workload], tenant: str, namespaces: Mapping[str, Mapping[str, str]]
) -> list[Workload]:
    """Every Workload given, the tenant's pods among them with their namespace's labels as
    `k8s.namespace.labels.<key>` attributes (earlier such attributes replaced; a namespace without an
    object gets its implicit name label): the output stands in for the Workloads file."""
    out = []
    for w in workloads:
        ns = w.spec.attributes.get(NAMESPACE_ATTRIBUTE)
        if w.tenant != tenant or not isinstance(ns, str):
            out.append(w)
            continue
        attributes = {k: v for k, v in w.spec.attributes.items() if not k.startswith(NAMESPACE_LABEL_PREFIX)}
        attributes |= namespace_label_attributes({**namespaces.get(ns, {}), NAMESPACE_NAME_LABEL: ns})
        out.append(w.model_copy(update={"spec": w.spec.model_copy(update={"attributes": attributes})}))
    return out


def translate_admin(
    policies: Sequence[AdminPolicy],
    tenant: str,
    namespaces: Sequence[Namespace] = (),
    workloads: Sequence[Workload] = (),
    hosts: Sequence[Host] = (),
) -> AdminResult:
    """Provider resources for the ANPs and the BANP of the cluster whose pods are `tenant`'s workloads,
    plus those Workloads carrying their namespace labels (the selectors read them)."""
    known = {ns.name: ns.labels for ns in namespaces}
    t = _AdminTranslator(tenant, pods_of(workloads, tenant), known, hosts)
    banps = [p for p in policies if p.baseline]
    anps = sorted((p for p in policies if not p.baseline), key=lambda p: (p.priority, p.name))
    seen: dict[int, str] = {}
    for pol in anps:
        if pol.priority in seen:
            t.warnings.append(
                f"{pol.source}: {pol.ref}: spec.priority {pol.priority} is also {seen[pol.priority]}'s; "
                "upstream leaves their order undefined, Omniwall orders them by name"
            )
        seen.setdefault(pol.priority, pol.name)
        t.add(pol)
    for pol in banps:
        t.add(pol)
    resources: list[_Resource] = [t.groups[k] for k in sorted(t.groups)]
    resources.extend(t.policies)
    if policies:
        resources.extend(with_namespace_labels(workloads, tenant, known))
    return AdminResult(resources, t.warnings)
