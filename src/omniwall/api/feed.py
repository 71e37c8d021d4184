"""Per-host feed and status endpoints (the wire format they speak is `omniwall.stream.wire`).

- `GET /v1/hosts/{host}/feed?from=R`: a snapshot (from=0, unknown, or older than the delta log), else
  the deltas since R; then, while the connection lives, each new delta as the host's state changes, and a
  heartbeat every `heartbeat` seconds of silence. `follow=false` ends the response after the catch-up.
  An R newer than this manager's state (the agent came from a manager that was ahead) first waits for
  this manager to catch up, or gets 503 (`catch_up`).
- `GET /v1/hosts/{host}/desired`: the current desired state (one JSON object).
- `POST /v1/hosts/{host}/status`: the agent's ack (realized revision, error, counters, addresses).
- `GET /v1/policies/{name}/stats`: per-rule counters summed over every host's last report.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from omniwall.compiler.ir import empty_state
from omniwall.manager.service import Manager
from omniwall.stream.wire import StatusReport, command_line, delta_line, heartbeat_line, snapshot_line

from .auth import Perm, Principal, authenticate, check_visible, manager_of, read_tenant, require
from .errors import ApiError, not_found

NDJSON = "application/x-ndjson"
# How long a feed request waits for this manager to catch up with a revision the agent realized through
# another manager, before refusing (the agent keeps its rules and tries the next manager).
CATCH_UP_BOUND = 5.0


def _check_host(p: Principal, host: str, perm: Perm, m: Manager) -> None:
    require(p, perm)
    if p.host is not None and p.host != host:
        raise ApiError(403, f"this token is scoped to host {p.host}, not {host}", permission=perm.value)
    if not m.host_known(host):
        raise not_found(f"host {host}")
    if m.desired.snapshot(host) is None:
        # Never send an empty state for a host we could not compile: the agent would wipe its rules.
        raise ApiError(
            503, f"desired state of host {host} is not computed yet: {m.compile_error or 'starting'}"
        )


async def catch_up(m: Manager, host: str, from_revision: int) -> None:
    """An agent that realized `from_revision` through another manager must never be sent this manager's
    older state (it would roll its rules back until the next change). When the agent is ahead of this
    manager's state for the host, sync the model now (which also waits for a sync in flight to finish
    compiling); a manager that cannot catch up within the bound answers 503 instead. After the sync, an
    agent still ahead holds a revision this store never had (another history): the snapshot is the truth."""
    if from_revision <= m.desired.revision(host):
        return
    try:
        await asyncio.wait_for(run_in_threadpool(m.model.sync), timeout=CATCH_UP_BOUND)
    except Exception as e:  # a slow sync goes on in its thread; the next feed request finds it done
        reason = "timed out" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
        raise ApiError(
            503,
            f"this manager is at revision {m.revision}, behind revision {from_revision} that host {host} "
            f"realized, and could not catch up ({reason}); try another manager",
            headers={"Retry-After": "1"},
        ) from e


async def feed_lines(
    m: Manager, host: str, from_revision: int, *, follow: bool, heartbeat: float
) -> AsyncIterator[bytes]:
    changed = m.desired.changed.subscribe()  # before reading, so no change slips between read and wait
    m.hosts.connect(host, m.now_iso())
    try:
        sent = from_revision
        deltas = m.desired.deltas_since(host, from_revision)
        if deltas is None:
            state = m.desired.snapshot(host) or empty_state(host, 0)  # present: checked before the stream
            yield snapshot_line(state)
            sent = state.revision
        else:
            for d in deltas:
                yield delta_line(d)
                sent = d.to_revision
        while follow:
            for cmd in m.migrations.commands.take(host):  # after the deltas they may depend on
                yield command_line(cmd)
            try:
                await asyncio.wait_for(changed.wait(), timeout=heartbeat)
            except TimeoutError:
                m.hosts.seen(host, m.now_iso())
                yield heartbeat_line(sent)
                continue
            changed.clear()
            deltas = m.desired.deltas_since(host, sent)
            if deltas is None:  # fell behind the delta log: start over from a snapshot
                state = m.desired.snapshot(host) or empty_state(host, 0)
                yield snapshot_line(state)
                sent = state.revision
                continue
            for d in deltas:
                yield delta_line(d)
                sent = d.to_revision
    finally:
        m.desired.changed.unsubscribe(changed)
        m.hosts.disconnect(host, m.now_iso())


def router() -> APIRouter:
    r = APIRouter(tags=["hosts"])

    @r.get(
        "/v1/hosts/{host}/feed",
        summary="NDJSON stream: snapshot or deltas since `from`, then deltas as they come, and heartbeats",
        response_class=StreamingResponse,
        responses={200: {"content": {NDJSON: {}}}},
    )
    async def feed(
        request: Request,
        host: str,
        from_: int = Query(0, alias="from", ge=0, description="last revision the agent realized (0: none)"),
        follow: bool = Query(True, description="keep the stream open for new deltas"),
        heartbeat: float = Query(15.0, ge=0.05, le=300, description="seconds of silence between heartbeats"),
        p: Principal = Depends(authenticate),
    ) -> StreamingResponse:
        m = manager_of(request)
        _check_host(p, host, Perm.FEED_READ, m)
        await catch_up(m, host, from_)
        return StreamingResponse(
            feed_lines(m, host, from_, follow=follow, heartbeat=heartbeat),
            media_type=NDJSON,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @r.get("/v1/hosts/{host}/desired", summary="the host's current desired state (HostDesiredState JSON)")
    def desired(request: Request, host: str, p: Principal = Depends(authenticate)) -> dict[str, Any]:
        m = manager_of(request)
        _check_host(p, host, Perm.FEED_READ, m)
        return (m.desired.snapshot(host) or empty_state(host, 0)).to_json()

    # Async, like `feed`: both only touch in-memory state, and a thousand agents acking one change should
    # not each cost two thread hops. Addresses may write the store (fsync): that part goes to the pool.
    @r.post("/v1/hosts/{host}/status", summary="agent ack: realized revision, last error, counters")
    async def status(
        request: Request, host: str, report: StatusReport, p: Principal = Depends(authenticate)
    ) -> dict[str, Any]:
        m = manager_of(request)
        _check_host(p, host, Perm.STATUS_WRITE, m)
        m.hosts.report(
            host,
            m.now_iso(),
            report.realized_revision,
            report.error,
            [(c.rule_id, c.packets, c.bytes) for c in report.counters]
            if report.counters is not None
            else None,
            report.addresses,
            (report.conntrack.count, report.conntrack.max) if report.conntrack is not None else None,
        )
        if report.addresses:  # addresses follow the workload (manager/addresses.py)
            from omniwall.manager.addresses import agent_actor, reconcile

            await run_in_threadpool(reconcile, m, host, report.addresses, agent_actor(host, p.id))
        return {"host": host, **m.host_status(host)}

    @r.get("/v1/policies/{name}/stats", tags=["Policy"], summary="per-rule counters summed across hosts")
    def stats(
        request: Request, name: str, tenant: str | None = Query(None), p: Principal = Depends(authenticate)
    ) -> dict[str, Any]:
        m = manager_of(request)
        t = read_tenant(p, tenant)
        check_visible(p, m.get("Policy", t, name), m.catalog, f"Policy/{t}/{name}")
        return m.policy_stats(t, name)

    return r
