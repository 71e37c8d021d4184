"""NetworkPolicy -> Omniwall resources (the mapping is documented in docs/k8s.md).

A pod is a Workload of the tenant whose attribute `k8s.namespace` is its namespace and whose labels
are the pod's labels. The output:

- the Tenant with `defaultAction: allow`: a pod no policy selects is not isolated;
- per NetworkPolicy, a Group of the pods it selects, and a Policy (category application, priority
  `ALLOW_PRIORITY`) whose rules allow, per ingress/egress rule, its peers x ports, `direction: in` /
  `out`, applied to that group;
- one isolation Policy (`ISOLATION_PRIORITY`, after every allow, so the allows form a union) that drops
  ingress at every pod selected by a policy with Ingress in its policyTypes, and egress likewise.

Omniwall judges egress at the source vNIC and ingress at the destination vNIC and delivers only when
both allow: exactly the upstream rule that the source's egress policy and the destination's ingress
policy must both allow a connection.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from omniwall.k8s.labels import (
    NAMESPACE_ATTRIBUTE,
    LabelSelector,
    NamespaceSet,
    pod_selector_text,
    resolve_namespaces,
)
from omniwall.k8s.names import policy_base, resource_name
from omniwall.k8s.objects import Namespace, NetworkPolicy, PolicyPort, PolicyRule
from omniwall.model.resources import (
    Action,
    Category,
    Direction,
    Group,
    GroupSpec,
    Metadata,
    Policy,
    PolicySpec,
    Rule,
    Tenant,
    TenantSpec,
    Workload,
    _Resource,
)

ALLOW_PRIORITY = 100
ISOLATION_PRIORITY = 200
ISOLATION_POLICY = "k8s_isolation"
ISOLATED_INGRESS_GROUP = "k8s_isolated-ingress"
ISOLATED_EGRESS_GROUP = "k8s_isolated-egress"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Pod:
    """A Workload seen as a Kubernetes pod."""

    name: str  # the Workload's name
    namespace: str
    labels: Mapping[str, str]
    ips: tuple[IPAddress, ...]
    ports: Mapping[str, tuple[str, int]]  # declared named ports: name -> (protocol, number)

    @staticmethod
    def of(workload: Workload) -> Pod | None:
        namespace = workload.spec.attributes.get(NAMESPACE_ATTRIBUTE)
        if not isinstance(namespace, str):
            return None
        ports = {}
        for port_name, svc in workload.spec.ports.items():
            proto, _, number = svc.partition("/")
            ports[port_name] = (proto.upper(), int(number))
        ips = tuple(ipaddress.ip_address(ip) for v in workload.spec.vnics for ip in v.ips)
        return Pod(workload.name, namespace, dict(workload.metadata.labels), ips, ports)

    def resolve(self, port: PolicyPort) -> str | None:
        """The service a named port means on this pod, or None when the pod does not declare it."""
        declared = self.ports.get(str(port.port))
        if declared is None or declared[0] != port.protocol:
            return None
        return f"{port.protocol.lower()}/{declared[1]}"


@dataclass
class ImportResult:
    resources: list[_Resource]
    warnings: list[str] = field(default_factory=list)


# A peer as seen for named-port resolution: the addresses of a pod it covers (all: the whole pod).
_PodMatcher = Callable[[Pod], "tuple[IPAddress, ...] | None"]


@dataclass
class _Peers:
    refs: list[str]  # Omniwall peer references: group names, CIDRs, or ["any"]
    matchers: list[_PodMatcher]


def _port_service(port: PolicyPort) -> str:
    proto = port.protocol.lower()
    if port.port is None:
        return proto
    if port.end_port is not None and port.end_port != port.port:
        return f"{proto}/{port.port}-{port.end_port}"
    return f"{proto}/{port.port}"


class _Translator:
    def __init__(
        self,
        tenant: str,
        namespaces: Sequence[Namespace],
        pods: Sequence[Pod],
    ) -> None:
        self.tenant = tenant
        self.known = {ns.name: ns.labels for ns in namespaces}
        self.pods = sorted(pods, key=lambda p: p.name)
        self.groups: dict[str, Group] = {}
        self.policies: list[Policy] = []
        self.isolated: dict[str, list[str]] = {"Ingress": [], "Egress": []}
        self.warnings: list[str] = []

    # ------------------------------------------------------------------------------------- helpers

    def _meta(self, name: str) -> Metadata:
        return Metadata(name=name, tenant=self.tenant)

    def _group(self, name: str, spec: GroupSpec) -> str:
        self.groups[name] = Group(metadata=self._meta(name), spec=spec)
        return name

    def _peers(self, pol: NetworkPolicy, rule: PolicyRule, tag: str) -> _Peers:
        if not rule.peers:
            return _Peers(["any"], [lambda pod: pod.ips])
        refs: list[str] = []
        matchers: list[_PodMatcher] = []
        base = policy_base(pol.namespace, pol.name)
        for j, peer in enumerate(rule.peers):
            if peer.ip_block is not None:
                block = peer.ip_block
                cidrs = [str(n) for n in block.networks()]
                if not block.excepts:
                    refs.extend(cidrs)
                elif cidrs:
                    # cidr minus except is many CIDRs: a group keeps the rule readable.
                    refs.append(self._group(resource_name(f"{base}_{tag}_peer-{j}"), GroupSpec(cidrs=cidrs)))
                matchers.append(lambda pod, b=block: tuple(ip for ip in pod.ips if b.contains(ip)) or None)
                continue
            nsset = (
                NamespaceSet.of({pol.namespace})
                if peer.namespace_selector is None
                else resolve_namespaces(peer.namespace_selector, self.known)
            )
            pod_sel = peer.pod_selector or LabelSelector()
            text = pod_selector_text(nsset, pod_sel)
            if text is None:
                self.warnings.append(
                    f"{pol.source}: NetworkPolicy {pol.ref}: {tag} peer {j}: its namespaceSelector matches "
                    "no namespace (namespaces given without a Namespace object carry only the "
                    "kubernetes.io/metadata.name label)"
                )
                continue
            refs.append(self._group(resource_name(f"{base}_{tag}_peer-{j}"), GroupSpec(selector=text)))
            matchers.append(
                lambda pod, n=nsset, s=pod_sel: (
                    pod.ips if n.contains(pod.namespace) and s.matches(pod.labels) else None
                )
            )
        return _Peers(refs, matchers)

    # --------------------------------------------------------------------------------------- rules

    def _rules(
        self, pol: NetworkPolicy, selected: list[Pod], rule: PolicyRule, index: int, ingress: bool
    ) -> list[Rule]:
        tag = f"{'in' if ingress else 'out'}-{index}"
        where = f"{pol.source}: NetworkPolicy {pol.ref}: spec.{'ingress' if ingress else 'egress'}[{index}]"
        peers = self._peers(pol, rule, tag)
        if not peers.refs:
            return []  # every peer is empty: the rule allows nothing
        numeric: list[str] = []
        named: list[PolicyPort] = []
        for port in rule.ports:
            if port.protocol == "SCTP":
                self.warnings.append(f"{where}: SCTP is not supported by Omniwall; port entry skipped")
            elif isinstance(port.port, str):
                named.append(port)
            else:
                numeric.append(_port_service(port))
        direction = Direction.IN if ingress else Direction.OUT

        def make(name: str, services: list[str], peer_refs: list[str], applied: list[str]) -> Rule:
            """Ingress: the peers are sources (destination: the pod); egress: the other way round."""
            return Rule(
                name=name,
                sources=peer_refs if ingress else ["any"],
                destinations=["any"] if ingress else peer_refs,
                services=services,
                action=Action.ALLOW,
                direction=direction,
                appliedTo=applied,
            )

        out: list[Rule] = []
        if not rule.ports or numeric:
            out.append(make(tag, numeric, peers.refs, []))
        if not named:
            return out
        base = policy_base(pol.namespace, pol.name)
        if ingress:
            # A named port on an ingress rule is a port of the destination: the selected pod itself.
            by_services: dict[tuple[str, ...], list[str]] = defaultdict(list)
            for pod in selected:
                services = tuple(sorted({s for p in named if (s := pod.resolve(p))}))
                if services:
                    by_services[services].append(pod.name)
            for k, (services, members) in enumerate(sorted(by_services.items())):
                group = self._group(resource_name(f"{base}_{tag}_named-{k}"), GroupSpec(workloads=members))
                out.append(make(f"{tag}-named-{k}", list(services), peers.refs, [group]))
        else:
            # On an egress rule it is a port of the destination: each peer pod.
            by_services_eg: dict[tuple[str, ...], tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
            for pod in self.pods:
                hits = [m(pod) for m in peers.matchers]
                if not any(hits):
                    continue
                services = tuple(sorted({s for p in named if (s := pod.resolve(p))}))
                if not services:
                    continue
                workloads, cidrs = by_services_eg[services]
                if any(h == pod.ips for h in hits if h):
                    workloads.append(pod.name)
                else:
                    addresses = sorted({ip for h in hits if h for ip in h}, key=lambda a: (a.version, a))
                    cidrs.extend(str(ipaddress.ip_network(a)) for a in addresses)
            for k, (services, (workloads, cidrs)) in enumerate(sorted(by_services_eg.items())):
                group = self._group(
                    resource_name(f"{base}_{tag}_named-{k}"), GroupSpec(workloads=workloads, cidrs=cidrs)
                )
                out.append(make(f"{tag}-named-{k}", list(services), [group], []))
        if not any(r.name.startswith(f"{tag}-named-") for r in out):
            names = ", ".join(sorted({str(p.port) for p in named}))
            self.warnings.append(
                f"{where}: named port(s) {names} resolve on no workload given "
                "(declare them in the Workloads' spec.ports); they allow nothing"
            )
        return out

    # ------------------------------------------------------------------------------------- policies

    def add(self, pol: NetworkPolicy) -> None:
        base = policy_base(pol.namespace, pol.name)
        for d in pol.ignored_directions:
            self.warnings.append(
                f"{pol.source}: NetworkPolicy {pol.ref}: {d.lower()} rules are ignored: "
                f"policyTypes does not list {d}"
            )
        text = pod_selector_text(NamespaceSet.of({pol.namespace}), pol.pod_selector)
        assert text is not None
        selected_group = self._group(resource_name(base), GroupSpec(selector=text))
        selected = [
            p for p in self.pods if p.namespace == pol.namespace and pol.pod_selector.matches(p.labels)
        ]
        rules: list[Rule] = []
        for i, r in enumerate(pol.ingress):
            rules.extend(self._rules(pol, selected, r, i, ingress=True))
        for i, r in enumerate(pol.egress):
            rules.extend(self._rules(pol, selected, r, i, ingress=False))
        for t in sorted(pol.policy_types):
            self.isolated[t].append(selected_group)
        self.policies.append(
            Policy(
                metadata=self._meta(resource_name(base)),
                spec=PolicySpec(
                    category=Category.APPLICATION,
                    priority=ALLOW_PRIORITY,
                    appliedTo=[selected_group],
                    rules=rules,
                ),
            )
        )

    def isolation(self) -> Policy | None:
        rules = []
        for policy_type, group_name, direction in (
            ("Ingress", ISOLATED_INGRESS_GROUP, Direction.IN),
            ("Egress", ISOLATED_EGRESS_GROUP, Direction.OUT),
        ):
            members = sorted(set(self.isolated[policy_type]))
            if not members:
                continue
            self._group(group_name, GroupSpec(groups=members))
            rules.append(
                Rule(
                    name=f"isolate-{policy_type.lower()}",
                    action=Action.DROP,
                    direction=direction,
                    appliedTo=[group_name],
                )
            )
        if not rules:
            return None
        return Policy(
            metadata=self._meta(ISOLATION_POLICY),
            spec=PolicySpec(category=Category.APPLICATION, priority=ISOLATION_PRIORITY, rules=rules),
        )


def pods_of(workloads: Iterable[Workload], tenant: str) -> list[Pod]:
    """The tenant's workloads that are pods (carry the `k8s.namespace` attribute)."""
    pods = []
    for w in workloads:
        if w.tenant == tenant and (pod := Pod.of(w)) is not None:
            pods.append(pod)
    return pods


def translate(
    policies: Sequence[NetworkPolicy],
    tenant: str,
    namespaces: Sequence[Namespace] = (),
    workloads: Sequence[Workload] = (),
    tenant_resource: Tenant | None = None,
) -> ImportResult:
    """Omniwall resources equivalent to `policies` for the pods of `tenant`.

    `namespaces` give namespace labels (for namespaceSelectors); `workloads` give the pods' declared
    named ports (and only those: pod membership itself stays dynamic, by selector). `tenant_resource`,
    when given, is kept (display name, mode) with its default action set to allow.
    """
    pods = pods_of(workloads, tenant)
    t = _Translator(tenant, namespaces, pods)
    for w in workloads:
        if w.tenant == tenant and NAMESPACE_ATTRIBUTE in w.metadata.labels:
            # Labels win over attributes in selector facts: the pod would seem to be in another namespace.
            t.warnings.append(
                f"Workload {w.name}: a label named {NAMESPACE_ATTRIBUTE} hides its namespace attribute"
            )
    for pol in sorted(policies, key=lambda p: (p.namespace, p.name)):
        t.add(pol)
    isolation = t.isolation()
    if tenant_resource is not None:
        explicit = "defaultAction" in tenant_resource.spec.model_fields_set
        if explicit and tenant_resource.spec.defaultAction != "allow":
            t.warnings.append(
                f"Tenant {tenant}: defaultAction {tenant_resource.spec.defaultAction} becomes allow "
                "(pods no NetworkPolicy selects are not isolated)"
            )
        tenant_obj = tenant_resource.model_copy(
            update={"spec": tenant_resource.spec.model_copy(update={"defaultAction": "allow"})}
        )
    else:
        tenant_obj = Tenant(metadata=Metadata(name=tenant), spec=TenantSpec(defaultAction="allow"))
    resources: list[_Resource] = [tenant_obj]
    resources.extend(t.groups[k] for k in sorted(t.groups))
    resources.extend(sorted(t.policies, key=lambda p: p.name))
    if isolation is not None:
        resources.append(isolation)
    return ImportResult(resources, t.warnings)
