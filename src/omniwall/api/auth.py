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

Transport binding (docs/security.md): over TLS with client certificates, a host certificate (URI SAN
`urn:omniwall:host:<host>`, omniwall.pki) binds the connection to its host: an agent token of another
host is refused (403), so a stolen token is useless without that host's key. When the manager verifies
client certificates (`--client-ca`), agent tokens are accepted only with their host's certificate.

Failed authentication is rate-limited per client address (`AuthGuard`: 429 + Retry-After) and audited
in aggregate: at most one audit entry per window, however many failures.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from omniwall import PROVIDER_TENANT
from omniwall.manager.attributes import USER_ATTRIBUTE
from omniwall.manager.objects import CLUSTER_KINDS, key_of, resource_key, split_key, with_metadata
from omniwall.manager.service import Actor, Manager, Plan
from omniwall.manager.tokens import TENANT_ROLES, Role
from omniwall.model.catalog import Catalog
from omniwall.model.resources import PROVIDER_CATEGORIES, _Resource
from omniwall.pki import host_of_peercert

from .auth_guard import AuthGuard, guard_of
from .errors import ApiError, not_found


class Perm(StrEnum):
    READ = "resources.read"
    WRITE = "resources.write"
    PROVIDER_WRITE = "provider.write"  # Tenant and Host objects
    PROVIDER_CATEGORY = "policy.provider-category"  # emergency / infrastructure policies
    AUDIT_READ = "audit.read"
    AUDIT_VERIFY = "audit.verify"  # GET /v1/audit/verify: the whole log's hash chain
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
            Perm.AUDIT_VERIFY,
            Perm.TOKENS,
            Perm.COMPACT,
            Perm.FEED_READ,
            Perm.IDENTITY_WRITE,
            Perm.POSTURE_WRITE,
        }
    ),
    Role.AUDITOR: frozenset({Perm.READ, Perm.AUDIT_READ, Perm.AUDIT_VERIFY, Perm.FEED_READ}),
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


log = logging.getLogger(__name__)


async def _flush_if_due(request: Request, guard: AuthGuard) -> None:
    if guard.audit and guard.due():
        try:
            await run_in_threadpool(guard.flush, manager_of(request).store)
        except Exception as e:  # auditing a failure must never fail the request
            log.warning("audit of authentication failures not written: %s", e)


async def _refuse(request: Request, guard: AuthGuard, address: str, message: str) -> ApiError:
    guard.failed(address)
    await _flush_if_due(request, guard)
    return ApiError(401, message)


def _peercert(request: Request) -> dict[str, Any] | None:
    tls = request.scope.get("extensions", {}).get("tls") or {}
    return tls.get("peercert")  # type: ignore[no-any-return]


def peer_host(request: Request) -> tuple[bool, str | None]:
    """(a verified client certificate came with the request, the host it names or None)."""
    peer = _peercert(request)
    return bool(peer), host_of_peercert(peer)


def agent_certificates(state: Any) -> dict[str, dict[str, str]]:
    """host -> the serial and expiry of the certificate its agent last authenticated with (shown by
    GET /v1/status: which certificate each agent uses, when it expires, whether a rotation took)."""
    seen = getattr(state, "agent_certificates", None)
    if seen is None:
        seen = state.agent_certificates = {}
    return seen  # type: ignore[no-any-return]


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The token of the request's first `Authorization: Bearer <token>` header (ASGI's raw headers);
    None without one, with another scheme, or an empty token."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token if scheme.lower() == "bearer" and token.strip() else None
    return None


async def authenticate(request: Request) -> Principal:
    """FastAPI dependency: the caller's principal, or 401 / 403 / 429. Async: a cached token is checked
    on the event loop (no thread hop per request); otherwise the store read runs in the threadpool."""
    guard = guard_of(request)
    address = request.client.host if request.client else "unknown"
    wait = guard.retry_after(address)
    if wait is not None:
        raise ApiError(
            429,
            f"too many failed authentications from {address}; retry in {wait} s",
            headers={"Retry-After": str(wait)},
            retryAfter=wait,
        )
    token = bearer_token(request.scope["headers"])
    if token is None:
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)")
    tokens = manager_of(request).tokens
    rec = tokens.verify_cached(token) or await run_in_threadpool(tokens.verify, token)
    if rec is None:
        raise await _refuse(request, guard, address, "invalid, expired or revoked token")
    await _flush_if_due(request, guard)  # failures of the last window, also when no failure follows
    p = Principal(rec.id, rec.name, Role(rec.role), rec.tenant, rec.host)
    has_cert, cert_host = peer_host(request)
    if cert_host is not None and p.role == Role.AGENT and cert_host != p.host:
        raise ApiError(
            403,
            f"this connection's certificate is host {cert_host}'s; the token is host {p.host}'s",
            permission=Perm.FEED_READ.value,
        )
    if (
        p.role == Role.AGENT
        and cert_host is None
        and getattr(request.app.state, "agent_cert_required", False)
    ):
        raise ApiError(
            403,
            f"agent tokens need the client certificate of their host ({p.host})"
            + (": this certificate names no host" if has_cert else ": none was presented"),
            permission=Perm.FEED_READ.value,
        )
    if cert_host is not None and p.role == Role.AGENT:
        _record_certificate(request.app.state, cert_host, _peercert(request) or {})
    return p


def _record_certificate(state: Any, cert_host: str, peer: dict[str, Any]) -> None:
    seen = {"serial": str(peer.get("serialNumber", "")).lower(), "notAfter": str(peer.get("notAfter", ""))}
    certs = agent_certificates(state)
    if certs.get(cert_host) != seen:
        certs[cert_host] = seen


def cached_principal(state: Any, scope: Any) -> Principal | None:
    """`authenticate` for the agents' lean routes (api/feed.py `AgentPath`), decided on the event loop from
    the token cache alone: the principal when the request passes every check of `authenticate` with
    nothing to record (no failure, no audit due, no rate limit); None when it does not or cannot be
    decided so: the caller then takes the full route, which answers exactly as before."""
    guard = getattr(state, "auth_guard", None)
    if guard is not None:
        client = scope.get("client")
        if guard.retry_after(client[0] if client else "unknown") is not None or (guard.audit and guard.due()):
            return None
    token = bearer_token(scope["headers"])
    if token is None:
        return None
    rec = state.manager.tokens.verify_cached(token)
    if rec is None:
        return None
    p = Principal(rec.id, rec.name, Role(rec.role), rec.tenant, rec.host)
    peer = ((scope.get("extensions") or {}).get("tls") or {}).get("peercert")
    cert_host = host_of_peercert(peer)
    if p.role == Role.AGENT:
        if cert_host is not None and cert_host != p.host:
            return None
        if cert_host is None and getattr(state, "agent_cert_required", False):
            return None
        if cert_host is not None:
            _record_certificate(state, cert_host, peer)
    return p


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


# Attributes the platform sets, never the tenant: a pod's Kubernetes namespace and that namespace's
# labels (k8s/admin_translate.py). Provider AdminNetworkPolicies select pods by them; a tenant that could
# write them would move its pods out of a provider Deny's subject, as no Kubernetes user can.
PLATFORM_ATTRIBUTE_PREFIX = "k8s."


def check_platform_attributes(p: Principal, plan: Plan) -> None:
    """403 `provider.write` when a caller without it creates a Workload with `k8s.*` attributes, or
    changes (sets, alters or removes) them on an update or a rollback."""
    if Perm.PROVIDER_WRITE in ROLE_PERMS[p.role]:
        return
    for c in plan.writes:
        if c.kind != "Workload":
            continue
        new = getattr(getattr(c.new, "spec", None), "attributes", None) or {}
        old = getattr(getattr(c.old, "spec", None), "attributes", None) or {}
        mine = {k: v for k, v in new.items() if k.startswith(PLATFORM_ATTRIBUTE_PREFIX)}
        stored = {k: v for k, v in old.items() if k.startswith(PLATFORM_ATTRIBUTE_PREFIX)}
        if c.action == "delete" or mine == stored:
            continue
        key = sorted(set(mine) ^ set(stored) | {k for k in mine if mine[k] != stored.get(k)})[0]
        raise ApiError(
            403,
            f"role {p.role.value} lacks permission {Perm.PROVIDER_WRITE.value}: "
            f"Workload/{c.tenant}/{c.name}: attribute {key!r} is set by the platform (the provider), "
            "not by the tenant",
            permission=Perm.PROVIDER_WRITE.value,
            document=f"Workload/{c.tenant}/{c.name}",
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
