"""Short constructors for typed resources, for building synthetic catalogs in compiler tests and the
compile benchmark (no YAML round trip, so large inventories stay cheap to build)."""

from __future__ import annotations

from typing import Any

from omniwall.model.resources import (
    Group,
    GroupSpec,
    Host,
    Metadata,
    Policy,
    PolicySpec,
    Rule,
    Service,
    ServiceSpec,
    Tenant,
    TenantSpec,
    Vnic,
    Workload,
    WorkloadSpec,
)


def md(name: str, tenant: str = "infra", labels: dict[str, str] | None = None) -> Metadata:
    return Metadata(name=name, tenant=tenant, labels=labels or {})


def host(name: str) -> Host:
    return Host(metadata=md(name))


def tenant(name: str, **spec: Any) -> Tenant:
    return Tenant(metadata=md(name), spec=TenantSpec(**spec))


def workload(
    tenant: str, name: str, host: str, vnics: list[Vnic], labels: dict[str, str] | None = None, **spec: Any
) -> Workload:
    return Workload(metadata=md(name, tenant, labels), spec=WorkloadSpec(host=host, vnics=vnics, **spec))


def group(tenant: str, name: str, selector: str | None = None, **spec: Any) -> Group:
    return Group(metadata=md(name, tenant), spec=GroupSpec(selector=selector, **spec))


def policy(tenant: str, name: str, *rules: Rule, **spec: Any) -> Policy:
    return Policy(metadata=md(name, tenant), spec=PolicySpec(rules=list(rules), **spec))


def service(tenant: str, name: str, protocol: str, ports: list[int | str]) -> Service:
    return Service(metadata=md(name, tenant), spec=ServiceSpec(protocol=protocol, ports=ports))
