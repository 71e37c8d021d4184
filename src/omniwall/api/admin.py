"""Tokens, audit log, identity, and overall status."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Body, Depends, Query, Request

from omniwall.manager.audit import AuditQuery, query
from omniwall.manager.objects import kind_of
from omniwall.manager.tokens import TokenError

from .auth import Perm, Principal, authenticate, manager_of, require
from .errors import ApiError, not_found
from .filters import decode_continue, encode_continue


def router() -> APIRouter:
    r = APIRouter()

    @r.get("/healthz", tags=["status"], summary="liveness (no token needed)")
    def healthz(request: Request) -> dict[str, Any]:
        return {"ok": True, "revision": manager_of(request).revision}

    @r.get("/v1/whoami", tags=["status"], summary="the caller's token: role and scope")
    def whoami(p: Principal = Depends(authenticate)) -> dict[str, Any]:
        return p.to_json()

    @r.get("/v1/status", tags=["status"], summary="model revision and host summary")
    def status(request: Request, p: Principal = Depends(authenticate)) -> dict[str, Any]:
        require(p, Perm.READ)
        m = manager_of(request)
        out: dict[str, Any] = {"revision": m.revision}
        if not p.tenant_scoped:
            hosts = m.host_statuses()
            out["compileError"] = m.compile_error
            out["hosts"] = hosts
            out["summary"] = {
                "hosts": len(hosts),
                "connected": sum(1 for s in hosts.values() if s["connected"]),
                "inSync": sum(1 for s in hosts.values() if s["inSync"]),
                # hosts whose conntrack table is at 80% (warning) or 95% (critical) of its maximum
                "conntrackAlarms": sum(
                    1 for s in hosts.values() if s["conntrack"] and s["conntrack"]["alarm"] != "ok"
                ),
            }
        return out

    @r.post("/v1/tokens", tags=["tokens"], summary="create a token (the secret is shown once)")
    def create_token(
        request: Request,
        body: dict[str, Any] = Body(..., examples=[{"role": "tenant-admin", "tenant": "acme", "name": "ci"}]),
        p: Principal = Depends(authenticate),
    ) -> dict[str, Any]:
        require(p, Perm.TOKENS)
        unknown = set(body) - {"role", "tenant", "host", "name"}
        if unknown:
            raise ApiError(
                422,
                "invalid token request",
                errors=[
                    {"document": "request body", "path": k, "reason": "unknown field"}
                    for k in sorted(unknown)
                ],
            )
        try:
            token, rec = manager_of(request).tokens.create(
                str(body.get("role", "")),
                name=str(body.get("name") or ""),
                tenant=body.get("tenant"),
                host=body.get("host"),
                created_by=p.name,
                actor=p.actor,
            )
        except TokenError as err:
            raise ApiError(
                422, str(err), errors=[{"document": "request body", "path": "role", "reason": str(err)}]
            ) from None
        return {"token": token, **rec.public()}

    @r.get("/v1/tokens", tags=["tokens"], summary="list tokens (never their secrets)")
    def list_tokens(request: Request, p: Principal = Depends(authenticate)) -> dict[str, Any]:
        require(p, Perm.TOKENS)
        return {"items": [t.public() for t in manager_of(request).tokens.list()]}

    @r.delete("/v1/tokens/{token_id}", tags=["tokens"], summary="revoke a token")
    def revoke_token(request: Request, token_id: str, p: Principal = Depends(authenticate)) -> dict[str, Any]:
        require(p, Perm.TOKENS)
        if not manager_of(request).tokens.revoke(token_id, p.actor):
            raise not_found(f"token {token_id}")
        return {"revoked": token_id}

    @r.post("/v1/compact", tags=["status"], summary="drop store history older than a revision")
    def compact(
        request: Request,
        body: dict[str, int] = Body(..., examples=[{"revision": 1000}]),
        p: Principal = Depends(authenticate),
    ) -> dict[str, Any]:
        require(p, Perm.COMPACT)
        m = manager_of(request)
        rev = body.get("revision")
        current = m.store.revision()
        if not isinstance(rev, int) or not 1 <= rev <= current:
            reason = f"must be a revision between 1 and the current revision {current}"
            raise ApiError(
                422,
                f"revision {reason}",
                errors=[{"document": "request body", "path": "revision", "reason": reason}],
            )
        m.store.compact(rev)
        return {"compacted": m.store.compacted_revision(), "revision": current}

    @r.get("/v1/audit", tags=["audit"], summary="the audit log, oldest first, filtered")
    def audit(
        request: Request,
        p: Principal = Depends(authenticate),
        tenant: str | None = Query(None),
        actor: str | None = Query(None, description="token name or id"),
        kind: str | None = Query(None),
        name: str | None = Query(None),
        since: str | None = Query(None, description="ISO 8601 time, inclusive"),
        until: str | None = Query(None, description="ISO 8601 time, exclusive"),
        limit: int = Query(100, ge=1, le=1000),
        continue_: str | None = Query(None, alias="continue"),
    ) -> dict[str, Any]:
        require(p, Perm.AUDIT_READ)
        if p.tenant_scoped:
            if tenant not in (None, p.tenant):
                return {"items": [], "continue": None}
            tenant = p.tenant
        try:
            k = "Token" if kind and kind.lower() in ("token", "tokens") else kind_of(kind) if kind else None
        except ValueError as err:
            raise ApiError(
                422, str(err), errors=[{"document": "request", "path": "query.kind", "reason": str(err)}]
            ) from None
        q = AuditQuery(
            tenant=tenant,
            actor=actor,
            kind=k,
            name=name,
            since=_time(since, "since"),
            until=_time(until, "until"),
        )
        entries, more = query(manager_of(request).store, q, limit=limit, after=decode_continue(continue_))
        return {"items": [e.to_json() for e in entries], "continue": encode_continue(more) if more else None}

    return r


def _time(text: str | None, field: str) -> str | None:
    """Normalise to the audit log's own format (UTC, milliseconds, Z) so string order is time order."""
    if text is None:
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise ApiError(
            422,
            f"{field}: not an ISO 8601 time",
            errors=[
                {
                    "document": "request",
                    "path": f"query.{field}",
                    "reason": f"{text!r} is not an ISO 8601 time",
                }
            ],
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
