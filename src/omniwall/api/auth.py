"""Authentication (bearer tokens) and authorization (roles -> named permissions, tenant and host scope).

Rules:
- A role grants a fixed set of named permissions; a missing one answers 403 naming it.
- Tenant roles see their own tenant's objects, provider groups shared with them and provider services;
  anything else (other tenants' objects, Hosts) does not exist for them: 404, never 403.
- The agent role is scoped to one host: its own feed, desired state and status reports, nothing else.
- `identity-source` and `posture-source` are provider-wide and may only post identity events / posture
  reports (`identity.write` / `posture.write`, docs/identity-posture.md); the provider admin may too.
- A Workload created (or brought back by a rollback) with a `user` attribute claims an identity: that
  needs `identity.write` too (`check_created_identity`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from omniwall import PROVIDER_TENANT
from omniwall.manager.attributes import USER_ATTRIBUTE
from omniwall.manager.objects import CLUSTER_KINDS, key_of, resource_key, split_key, with_metadata
from omniwall.manager.service import Actor, Manager, Plan
from omniwall.manager.tokens import TENANT_ROLES, Role
from omniwall.model.catalog import Catalog
from omniwall.model.resources import PROVIDER_CATEGORIES, _Resource

from .errors import ApiError, not_found


class Perm(StrEnum):
    READ = "resources.read"
    WRITE = "resources.write"
    PROVIDER_WRITE = "provider.write"  # Tenant and Host objects
    PROVIDER_CATEGORY = "policy.provider-category"  # emergency / infrastructure policies
    AUDIT_READ = "audit.read"
    TOKENS = "tokens.admin"
    COMPACT = "store.compact"
    FEED_READ = "hosts.feed.read"
    STATUS_WRITE = "hosts.status.write"
    IDENTITY_WRITE = "identity.write"  # POST /v1/identity/events
    POSTURE_WRITE = "posture.write"  # POST /v1/posture/reports


ROLE_PERMS: dict[Role, frozenset[Perm]] = {
    Role.PROVIDER_ADMIN: frozenset(
        {
            Perm.READ,
            Perm.WRITE,
            Perm.PROVIDER_WRITE,
            Perm.PROVIDER_CATEGORY,
            Perm.AUDIT_READ,
            Perm.TOKENS,
            Perm.COMPACT,
            Perm.FEED_READ,
            Perm.IDENTITY_WRITE,
            Perm.POSTURE_WRITE,
        }
    ),
    Role.AUDITOR: frozenset({Perm.READ, Perm.AUDIT_READ, Perm.FEED_READ}),
    Role.TENANT_ADMIN: frozenset({Perm.READ, Perm.WRITE, Perm.AUDIT_READ}),
    Role.TENANT_VIEWER: frozenset({Perm.READ, Perm.AUDIT_READ}),
    Role.AGENT: frozenset({Perm.FEED_READ, Perm.STATUS_WRITE}),
    Role.IDENTITY_SOURCE: frozenset({Perm.IDENTITY_WRITE}),
    Role.POSTURE_SOURCE: frozenset({Perm.POSTURE_WRITE}),
}


@dataclass(frozen=True, slots=True)
class Principal:
    id: str
    name: str
    role: Role
    tenant: str | None = None
    host: str | None = None

    @property
    def tenant_scoped(self) -> bool:
        return self.role in TENANT_ROLES

    @property
    def actor(self) -> Actor:
        return Actor(self.id, self.name, self.role.value)

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role.value,
            "tenant": self.tenant,
            "host": self.host,
        }


def manager_of(request: Request) -> Manager:
    return request.app.state.manager  # type: ignore[no-any-return]


async def authenticate(request: Request) -> Principal:
    """FastAPI dependency: the caller's principal, or 401. Async: a cached token is checked on the event
    loop (no thread hop per request); otherwise the store read runs in the threadpool."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)")
    tokens = manager_of(request).tokens
    rec = tokens.verify_cached(token) or await run_in_threadpool(tokens.verify, token)
    if rec is None:
        raise ApiError(401, "invalid or revoked token")
    return Principal(rec.id, rec.name, Role(rec.role), rec.tenant, rec.host)


def require(p: Principal, perm: Perm) -> None:
    if perm not in ROLE_PERMS[p.role]:
        raise ApiError(403, f"role {p.role.value} lacks permission {perm.value}", permission=perm.value)


def read_tenant(p: Principal, tenant: str | None) -> str:
    """The tenant a single-object read or write addresses: explicit, else the caller's, else the provider."""
    if tenant:
        return tenant
    return p.tenant if p.tenant_scoped and p.tenant else PROVIDER_TENANT


def visible(p: Principal, r: _Resource, catalog: Catalog) -> bool:
    if not p.tenant_scoped:
        return True
    kind, tenant, name = split_key(resource_key(r))
    if kind == "Host":
        return False
    if tenant == p.tenant:
        return True
    if tenant == PROVIDER_TENANT and p.tenant is not None:
        if kind == "Service":
            return True
        if kind == "Group":
            return catalog.group_visible(p.tenant, (tenant, name))
    return False


def check_visible(p: Principal, r: _Resource | None, catalog: Catalog, what: str) -> _Resource:
    require(p, Perm.READ)
    if r is None or not visible(p, r, catalog):
        raise not_found(what)
    return r


def owns_key(p: Principal, kind: str, tenant: str, name: str) -> bool:
    """May the caller address this object by key at all (history, rollback, delete)?"""
    if not p.tenant_scoped:
        return True
    k, t, _ = split_key(key_of(kind, tenant, name))
    return k != "Host" and t == p.tenant


def scope_document(p: Principal, r: _Resource) -> _Resource:
    """A tenant token's documents land in its tenant when they name no tenant (the schema's default is the
    provider tenant, which a tenant may never write anyway)."""
    if p.tenant_scoped and r.metadata.tenant == PROVIDER_TENANT and r.kind not in CLUSTER_KINDS:  # type: ignore[attr-defined]
        return with_metadata(r, tenant=p.tenant)
    return r


def check_write(p: Principal, kind: str, tenant: str, name: str, r: _Resource | None = None) -> None:
    """Raises 403 (missing permission) or 404 (foreign tenant) unless the caller may write this object."""
    require(p, Perm.WRITE)
    if kind in CLUSTER_KINDS:
        require(p, Perm.PROVIDER_WRITE)
    if not owns_key(p, kind, tenant, name):
        raise not_found(f"{kind}/{tenant}/{name}")
    spec = getattr(r, "spec", None)
    provider_category = kind == "Policy" and spec is not None and spec.category in PROVIDER_CATEGORIES
    if provider_category and Perm.PROVIDER_CATEGORY not in ROLE_PERMS[p.role]:
        raise ApiError(
            403,
            f"role {p.role.value} lacks permission {Perm.PROVIDER_CATEGORY.value}: "
            f"category {spec.category.value} is reserved to the provider",
            permission=Perm.PROVIDER_CATEGORY.value,
            document=f"Policy/{tenant}/{name}",
        )


def check_created_identity(p: Principal, plan: Plan) -> None:
    """403 `identity.write` when the plan creates a Workload with a `user` attribute and the caller may not
    post identity events. A create takes source-owned attributes as given (updates keep the stored ones),
    so without this a tenant admin could create, or delete and roll back, a workload as someone's and
    enter the groups that select on `user`."""
    if Perm.IDENTITY_WRITE in ROLE_PERMS[p.role]:
        return
    for c in plan.writes:
        attrs = getattr(getattr(c.new, "spec", None), "attributes", None) or {}
        if c.action == "create" and c.kind == "Workload" and USER_ATTRIBUTE in attrs:
            raise ApiError(
                403,
                f"role {p.role.value} lacks permission {Perm.IDENTITY_WRITE.value}: "
                f"Workload/{c.tenant}/{c.name} would be created with attribute '{USER_ATTRIBUTE}', "
                "which only the identity source sets "
                "(POST /v1/identity/events)",
                permission=Perm.IDENTITY_WRITE.value,
                document=f"Workload/{c.tenant}/{c.name}",
            )
