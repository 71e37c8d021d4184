"""A whole, validated set of resources, indexed the way the compiler and the API look things up.

Reference syntax (sources, destinations, appliedTo, group members, services) — docs/semantics.md §refs:
- `any`                      every address (peers only)
- `web`                      a group (or service) of the referring object's own tenant
- `infra/dns`                a provider group shared with the referring tenant (or any provider service)
- `10.0.0.0/8`, `10.1.2.3`   an address literal (peers only)
- `tcp/80`, `udp/1000-2000`, `icmp/8`  an inline service (services only)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from omniwall import PROVIDER_TENANT
from omniwall.model.inet import looks_like_address
from omniwall.model.resources import (
    Application,
    Group,
    Host,
    Policy,
    Service,
    Tenant,
    TenantSpec,
    Workload,
    _Resource,
)

Key = tuple[str, str]  # (tenant, name)


def is_address_literal(ref: str) -> bool:
    """An address or CIDR peer (never a group name); the schema refuses the ones nftables cannot load."""
    return looks_like_address(ref)


def split_ref(ref: str, tenant: str) -> Key:
    """`name` -> (tenant, name); `other/name` -> (other, name)."""
    if "/" in ref:
        t, n = ref.split("/", 1)
        return (t, n)
    return (tenant, ref)


@dataclass
class Catalog:
    tenants: dict[str, Tenant] = field(default_factory=dict)
    hosts: dict[str, Host] = field(default_factory=dict)
    workloads: dict[Key, Workload] = field(default_factory=dict)
    groups: dict[Key, Group] = field(default_factory=dict)
    services: dict[Key, Service] = field(default_factory=dict)
    applications: dict[Key, Application] = field(default_factory=dict)
    policies: dict[Key, Policy] = field(default_factory=dict)

    @staticmethod
    def of(resources: Iterable[_Resource]) -> Catalog:
        """Index without cross-checking (use `model.validate.validate` for that). Last one wins."""
        c = Catalog()
        for r in resources:
            c.add(r)
        return c

    def add(self, r: _Resource) -> None:
        key = (r.metadata.tenant, r.metadata.name)
        match r:
            case Tenant():
                self.tenants[r.metadata.name] = r
            case Host():
                self.hosts[r.metadata.name] = r
            case Workload():
                self.workloads[key] = r
            case Group():
                self.groups[key] = r
            case Service():
                self.services[key] = r
            case Application():
                self.applications[key] = r
            case Policy():
                self.policies[key] = r
            case _:
                raise TypeError(f"not a resource: {r!r}")

    def remove(self, kind: str, tenant: str, name: str) -> _Resource | None:
        table = self.table(kind)
        key: str | Key = name if kind in ("Tenant", "Host") else (tenant, name)
        return table.pop(key, None)  # type: ignore[arg-type]

    def table(self, kind: str) -> dict:  # type: ignore[type-arg]
        return {
            "Tenant": self.tenants,
            "Host": self.hosts,
            "Workload": self.workloads,
            "Group": self.groups,
            "Service": self.services,
            "Application": self.applications,
            "Policy": self.policies,
        }[kind]

    def __iter__(self) -> Iterator[_Resource]:
        for t in (
            self.tenants,
            self.hosts,
            self.workloads,
            self.groups,
            self.services,
            self.applications,
            self.policies,
        ):
            yield from t.values()

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def tenant_spec(self, tenant: str) -> TenantSpec:
        """Tenants not declared explicitly get the defaults (drop, enforce)."""
        t = self.tenants.get(tenant)
        return t.spec if t else TenantSpec()

    def tenant_names(self) -> set[str]:
        names = set(self.tenants) | {PROVIDER_TENANT}
        for table in (self.workloads, self.groups, self.services, self.applications, self.policies):
            names.update(t for t, _ in table)
        return names

    def group_visible(self, referrer_tenant: str, key: Key) -> bool:
        """May `referrer_tenant` reference group `key`? Own groups always; provider groups if shared."""
        tenant, _ = key
        if tenant == referrer_tenant or referrer_tenant == PROVIDER_TENANT:
            return True
        if tenant != PROVIDER_TENANT:
            return False
        g = self.groups.get(key)
        return g is not None and ("*" in g.spec.shareWith or referrer_tenant in g.spec.shareWith)
