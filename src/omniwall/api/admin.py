"""Tokens, audit log, identity, and overall status."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Body, Depends, Query, Request

from omniwall.manager.audit import AuditQuery, query
from omniwall.manager.audit import verify as verify_chain
from omniwall.manager.objects import kind_of
from omniwall.manager.service import Manager
from omniwall.manager.tokens import TokenError, check_name, parse_duration

from .auth import Perm, Principal, agent_certificates, authenticate, manager_of, require
from .errors import ApiError, not_found
from .feed import stream_stats
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
            certs = agent_certificates(request.app.state)
            for h, st in hosts.items():
                if h in certs:
                    st["clientCertificate"] = certs[h]
            out["compileError"] = m.compile_error
            out["hosts"] = hosts
            streams = stream_stats(request.app.state)  # agents' status streams (api/feed.py)
            out["statusStreams"] = {"open": streams.open, "lines": streams.lines, "refused": streams.refused}
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
        m = manager_of(request)
        fields = _token_request(m, body)
        try:
            token, rec = m.tokens.create(
                fields["role"],
                name=fields["name"],
                tenant=fields["tenant"],
                host=fields["host"],
                created_by=p.name,
                actor=p.actor,
                lifetime=parse_duration(fields["expires"]) if fields["expires"] is not None else None,
            )
        except TokenError as err:
            raise _token_invalid(err) from None
        return {"token": token, **rec.public()}

    @r.get("/v1/tokens", tags=["tokens"], summary="list tokens (never their secrets)")
    def list_tokens(request: Request, p: Principal = Depends(authenticate)) -> dict[str, Any]:
        require(p, Perm.TOKENS)
        return {"items": [t.public() for t in manager_of(request).tokens.list()]}

    @r.post(
        "/v1/tokens/{token_id}/rotate",
        tags=["tokens"],
        summary="replace a token by a new one (same role, scope, name, lifetime); the old one stops working",
    )
    def rotate_token(request: Request, token_id: str, p: Principal = Depends(authenticate)) -> dict[str, Any]:
        require(p, Perm.TOKENS)
        try:
            out = manager_of(request).tokens.rotate(token_id, p.actor)
        except TokenError as err:
            raise ApiError(409, str(err)) from None
        if out is None:
            raise not_found(f"token {token_id}")
        token, rec = out
        return {"token": token, "replaced": token_id, **rec.public()}

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

    @r.get(
        "/v1/audit/verify",
        tags=["audit"],
        summary="check the audit log's hash chain: the first edited, deleted or inserted entry",
    )
    def audit_verify(request: Request, p: Principal = Depends(authenticate)) -> dict[str, Any]:
        require(p, Perm.AUDIT_VERIFY)
        return verify_chain(manager_of(request).store).to_json()

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
            k = _audit_kind(kind) if kind else None
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


def _audit_kind(kind: str) -> str:
    """Resource kinds, plus the two kinds only the audit log has: Token and Authentication (failures)."""
    word = kind.lower()
    if word in ("token", "tokens"):
        return "Token"
    if word in ("authentication", "auth"):
        return "Authentication"
    return kind_of(kind)


TOKEN_FIELDS = ("role", "tenant", "host", "name", "expires")


def _token_invalid(err: TokenError) -> ApiError:
    return ApiError(
        422, str(err), errors=[{"document": "request body", "path": err.field, "reason": str(err)}]
    )


def _token_request(m: Manager, body: Any) -> dict[str, Any]:
    """The fields of `POST /v1/tokens`, checked: types, bounds, and that the tenant / host exist. Every
    problem is a 422 naming its field; nothing is written."""
    if not isinstance(body, dict):
        raise ApiError(
            422,
            "invalid token request",
            errors=[{"document": "request body", "path": "", "reason": "expected a JSON object"}],
        )
    problems = [
        {"document": "request body", "path": str(k)[:64], "reason": "unknown field"}
        for k in sorted(map(str, body))
        if k not in TOKEN_FIELDS
    ]
    out: dict[str, Any] = {}
    for f in TOKEN_FIELDS:
        v = body.get(f)
        if f == "expires":
            ok = v is None or (isinstance(v, str | int) and not isinstance(v, bool))
        else:
            ok = v is None or isinstance(v, str)
        if not ok:
            problems.append(
                {
                    "document": "request body",
                    "path": f,
                    "reason": f"expected a string, got {type(v).__name__}",
                }
            )
        out[f] = v if ok else None
    if problems:
        raise ApiError(422, "invalid token request", errors=problems)
    out["role"] = out["role"] or ""
    try:
        out["name"] = check_name(out["name"] or "")
        for f in ("tenant", "host"):
            if out[f] is not None:
                check_name(out[f], f)
        if out["expires"] is not None:
            parse_duration(out["expires"])
    except TokenError as err:
        raise _token_invalid(err) from None
    catalog = m.catalog
    if out["tenant"] and out["tenant"] not in catalog.tenant_names():
        raise _token_invalid(TokenError(f"tenant {out['tenant']!r} does not exist", "tenant"))
    if out["host"] and not m.host_known(out["host"]):
        raise _token_invalid(TokenError(f"host {out['host']!r} does not exist", "host"))
    return out


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
