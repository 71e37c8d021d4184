"""Live views for the console: `GET /v1/audit/watch`, new audit entries as Server-Sent Events.

Same permission and visibility as `GET /v1/audit` (`audit.read`; a tenant role sees its own tenant's
entries only, and another tenant's filter yields nothing). Entries are read from the store by key (their
keys sort by commit time), polled when the store's revision moves, so a watcher costs nothing while no
one writes. `since` (RFC 3339 or relative like 5m) replays entries from then on; without it the stream
starts a few seconds back, so an entry committed while the request was on its way is not missed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from omniwall.manager.audit import AuditQuery
from omniwall.manager.audit import _from_json as entry_of
from omniwall.manager.objects import AUDIT_PREFIX
from omniwall.manager.service import Manager

from .auth import Perm, Principal, authenticate, manager_of, require
from .flows import SSE, only, parse_time

LOOKBACK = 5.0  # seconds replayed when no `since` is given
POLL = 0.5  # seconds between revision checks


def router() -> APIRouter:
    r = APIRouter(tags=["audit"])

    @r.get(
        "/v1/audit/watch",
        summary="Server-Sent Events: `audit` events as entries are committed (visibility of GET /v1/audit)",
        response_class=StreamingResponse,
        responses={
            200: {"content": {SSE: {}}},
            401: {"description": "no valid token"},
            403: {"description": "the role lacks audit.read"},
            422: {"description": "an unknown or invalid query field"},
        },
        dependencies=[Depends(only("tenant", "kind", "since", "limit", "heartbeat"))],
    )
    async def audit_watch(
        request: Request,
        tenant: str | None = Query(None),
        kind: str | None = Query(None, description="Workload, Policy, Token, ..."),
        since: str | None = Query(None, description="RFC 3339 or relative (5m): replay from then"),
        limit: int | None = Query(None, ge=1, description="end the stream after this many entries"),
        heartbeat: float = Query(15.0, ge=0.1, le=300),
        p: Principal = Depends(authenticate),
    ) -> StreamingResponse:
        require(p, Perm.AUDIT_READ)
        m = manager_of(request)
        now = time.time()
        start = parse_time(since, "since", now)
        empty = False
        if p.tenant_scoped:
            empty = tenant not in (None, p.tenant)
            tenant = p.tenant
        q = AuditQuery(tenant=tenant, kind=kind)
        cursor = f"{AUDIT_PREFIX}{int((start if start is not None else now - LOOKBACK) * 1e9):020d}"
        return StreamingResponse(
            _entries(request, m, q, cursor, limit=limit, heartbeat=heartbeat, empty=empty),
            media_type=SSE,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return r


async def _entries(
    request: Request,
    m: Manager,
    q: AuditQuery,
    cursor: str,
    *,
    limit: int | None,
    heartbeat: float,
    empty: bool,
) -> AsyncIterator[bytes]:
    yield b": omniwall audit\n\n"
    if empty:  # another tenant's entries: nothing will ever match, say so by ending the stream
        return
    sent = 0
    seen_rev = -1
    last_out = time.monotonic()
    while True:
        rev = m.store.revision()
        if rev != seen_rev:
            seen_rev = rev
            while True:
                entries, more = await run_in_threadpool(_page, m, q, cursor)
                for key, e in entries:
                    cursor = key
                    if not e:  # not for this reader
                        continue
                    yield _event(e)
                    last_out = time.monotonic()
                    sent += 1
                    if limit is not None and sent >= limit:
                        return
                if not more:
                    break
        if time.monotonic() - last_out >= heartbeat:
            yield b": keep-alive\n\n"
            last_out = time.monotonic()
        if await request.is_disconnected():
            return
        await asyncio.sleep(POLL)


def _page(m: Manager, q: AuditQuery, cursor: str) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
    """Matching entries after `cursor`, oldest first, with their keys; and whether more may follow.
    Reads the keys itself (not `audit.query`): the stream must advance its cursor past entries that do
    not match too."""
    page, _ = m.store.range(AUDIT_PREFIX, start_after=cursor, limit=500)
    out: list[tuple[str, dict[str, Any]]] = []
    for kv in page:
        e = entry_of(json.loads(kv.value), kv.mod_revision)
        out.append((kv.key, e.to_json() if q.matches(e) else {}))
    return out, len(page) == 500


def _event(entry: dict[str, Any]) -> bytes:
    return f"event: audit\ndata: {json.dumps(entry, separators=(',', ':'), sort_keys=True)}\n\n".encode()


__all__ = ["router"]
