"""Flows across managers, the HTTP side (docs/ha.md, "Flows across managers"; the merge rules are in
manager/flowpeers.py).

    POST /v1/flows/peer   managers only: one store's part of a flow query (op query | aggregate | hits),
                          or its live rows (op watch, newline-delimited JSON)

A manager answering `GET /v1/flows` (and watch, graph, hits, unused) resolves the caller's filters and
tenant scope once, into a `FlowQuery`, and sends that query to each live peer here; each peer filters its
own store with it and answers raw rows; the merging manager redacts them for the caller (`present`).
Scoping is therefore applied at both places: each peer returns only the rows the query (scope included)
selects, so a tenant's page is `limit` rows of its own and never unredacted rows it may not see beyond
those; the redaction, which depends on who asks, happens once, where the caller is known. Peers need no
principal of the caller and accept no user token: `X-Omniwall-Peer: <manager id> <peer key>`, checked
against the caller's entry in the etcd registry of managers (the trust root every manager shares already,
as the command relay through etcd does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any, Literal

import httpx
import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from omniwall.manager.flowpeers import PEER_HEADER, Found, Peer, Registry, SourceError
from omniwall.manager.flows import FlowService, Subscription
from omniwall.manager.flowstore import FlowQuery, Hit

from .auth import authenticate
from .errors import ApiError

log = logging.getLogger(__name__)

PEER_CA_ENV = "OMNIWALL_PEER_CA"  # CA file to verify https peers (default: the system's)
ADVERTISE_ENV = "OMNIWALL_ADVERTISE_URL"  # the URL peers reach this manager at (default: from --listen)
PEER_PERMISSION = "flows.peer"  # no role has it: only managers call the peer route
CONNECT_TIMEOUT = 1.0
QUERY_TIMEOUT = 10.0
WATCH_HEARTBEAT = 2.0  # seconds between a peer stream's keep-alive lines
PEERS_EVERY = 2.0  # seconds between registry reads of a live fan-out (peers joining or leaving)
RETRY_EVERY = 1.0  # seconds before a broken peer stream is opened again


class PeerCall(msgspec.Struct, forbid_unknown_fields=True):
    op: Literal["query", "aggregate", "hits", "watch"]
    query: FlowQuery | None = None
    limit: int = 100
    columns: list[str] = []
    since: float = 0.0


_DECODE = msgspec.json.Decoder(PeerCall)
_ENCODE = msgspec.json.Encoder()


# ---------------------------------------------------------------------------------------------- registry


def registry_of(request: Request) -> Registry:
    return registry_for(request.app)


def registry_for(app: Any) -> Registry:
    reg: Registry | None = getattr(app.state, "flow_registry", None)
    svc: FlowService = app.state.flows
    if reg is None or reg.store_id != svc.store.store_id:  # tests swap the flow service
        m = app.state.manager
        runtime = getattr(m.store, "runtime", None)
        reg = Registry(m.coordination, runtime() if runtime is not None else None, svc.store.store_id)
        app.state.flow_registry = reg
    return reg


def advertise(app: Any, scheme: str, host: str, port: int) -> None:
    """Make this manager findable by its peers (api/server.py, before it starts serving)."""
    url = os.environ.get(ADVERTISE_ENV, "")
    if not url:
        if host in ("", "0.0.0.0", "::"):
            host = socket.getfqdn()
        url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
    reg = registry_for(app)
    try:
        reg.advertise(url.rstrip("/"))
    except Exception as err:  # etcd away at start: the registration is retried with the lease
        reg.url = url
        log.warning("flow store %s not listed in etcd (peers will not know it yet): %s", reg.store_id, err)


async def sources(request: Request) -> tuple[Registry, list[Peer], list[SourceError]]:
    """(registry, live peers, stores nobody serves). A registry that cannot be read is itself an error."""
    reg = registry_of(request)
    if not reg.clustered:
        return reg, [], []
    svc: FlowService = request.app.state.flows
    try:
        peers, stores = await run_in_threadpool(reg.view)
    except Exception as err:
        return reg, [], [SourceError("", "", "", f"registry of managers unreadable: {err}")]
    return reg, peers, reg.missing(peers, stores, svc.retention)


# ---------------------------------------------------------------------------------------------- client


def _client(app: Any) -> httpx.AsyncClient:
    """One pooled client per event loop (creating one builds an SSL context: milliseconds)."""
    loop = asyncio.get_running_loop()
    clients: dict[int, httpx.AsyncClient] | None = getattr(app.state, "flow_peer_clients", None)
    if clients is None:
        clients = app.state.flow_peer_clients = {}
    c = clients.get(id(loop))
    if c is None or c.is_closed:
        ca = os.environ.get(PEER_CA_ENV)
        c = httpx.AsyncClient(
            verify=ca or True, timeout=httpx.Timeout(QUERY_TIMEOUT, connect=CONNECT_TIMEOUT), trust_env=False
        )
        clients[id(loop)] = c
    return c


def _why(err: Exception) -> str:
    text = str(err) or type(err).__name__
    return f"{type(err).__name__}: {text}" if text != type(err).__name__ else text


async def call_peers(
    request: Request, reg: Registry, peers: list[Peer], body: dict[str, Any]
) -> tuple[dict[Peer, dict[str, Any]], list[SourceError]]:
    """POST `body` to every peer at once: (answers by peer, errors)."""
    if not peers:
        return {}, []
    client = _client(request.app)
    headers = {PEER_HEADER: reg.header()}
    data = json.dumps(body, separators=(",", ":"))

    async def one(p: Peer) -> dict[str, Any]:
        r = await client.post(
            f"{p.url}/v1/flows/peer", content=data, headers={**headers, "Content-Type": "application/json"}
        )
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        out: dict[str, Any] = msgspec.json.decode(r.content)
        return out

    results = await asyncio.gather(*(one(p) for p in peers), return_exceptions=True)
    answers: dict[Peer, dict[str, Any]] = {}
    errors: list[SourceError] = []
    for p, res in zip(peers, results, strict=True):
        if isinstance(res, BaseException):
            errors.append(SourceError(p.manager, p.url, p.store, _why(res)))  # type: ignore[arg-type]
        else:
            answers[p] = res
    return answers, errors


def query_body(q: FlowQuery, limit: int) -> dict[str, Any]:
    return {"op": "query", "query": asdict(q), "limit": limit}


def found_of(answer: dict[str, Any]) -> Found:
    return [(int(r[0]), tuple(r[1:])) for r in answer["rows"]]


def hits_of(answer: dict[str, Any]) -> list[Hit]:
    return [Hit(*h) for h in answer["hits"]]


# ---------------------------------------------------------------------------------------------- peer route


async def _check_peer(request: Request) -> str:
    """The calling manager's id; 401 for a wrong peer key or no token, 403 for any user token."""
    header = request.headers.get(PEER_HEADER)
    if header:
        mid = await run_in_threadpool(registry_of(request).verify, header)
        if mid is not None:
            return mid
        raise ApiError(401, f"{PEER_HEADER}: not a live manager's key")
    await authenticate(request)  # 401/429 as for any route
    raise ApiError(403, f"only managers call this route (permission {PEER_PERMISSION})",
                   permission=PEER_PERMISSION)  # fmt: skip


def router() -> APIRouter:
    r = APIRouter(tags=["Flows"])

    @r.post(
        "/v1/flows/peer",
        summary="managers only: one manager's part of a flow query across managers (docs/ha.md)",
        responses={401: {"description": "no valid peer key"}, 403: {"description": "not a manager"}},
    )
    async def peer(request: Request) -> Any:
        await _check_peer(request)
        try:
            call = _DECODE.decode(await request.body())
        except (msgspec.ValidationError, msgspec.DecodeError) as err:
            raise ApiError(422, f"invalid peer call: {err}") from None
        svc: FlowService = request.app.state.flows
        store = svc.store
        if call.op == "hits":
            hits = await run_in_threadpool(store.hits, call.since)
            return _json({"store": store.store_id, "hits": [asdict_hit(h) for h in hits]})
        if call.query is None:
            raise ApiError(422, "query: required for op " + call.op)
        q = call.query
        if call.op == "query":
            found = await run_in_threadpool(store.query, q, max(1, min(call.limit, 10_000)))
            return _json({"store": store.store_id, "rows": [(rid, *row) for rid, row in found]})
        if call.op == "aggregate":
            try:
                rows = await run_in_threadpool(store.aggregate, q, call.columns)
            except ValueError as err:
                raise ApiError(422, f"columns: {err}") from None
            return _json({"store": store.store_id, "rows": rows})
        try:
            sub = svc.subscribe()
        except LookupError as err:
            raise ApiError(503, str(err)) from None
        return StreamingResponse(
            _peer_stream(request, sub, q),
            background=BackgroundTask(svc.unsubscribe, sub),
            media_type="application/x-ndjson",
        )

    return r


def _json(body: dict[str, Any]) -> Response:
    """Encoded by msgspec, not FastAPI's jsonable_encoder: rows are plain tuples, and the encoder's
    walk over a thousand of them costs more than the query."""
    return Response(_ENCODE.encode(body), media_type="application/json")


def asdict_hit(h: Hit) -> tuple[Any, ...]:
    return (h.rule_id, h.rule_tenant, h.policy, h.rule, h.category, h.verdict, h.count, h.last)


async def _peer_stream(request: Request, sub: Subscription, q: FlowQuery) -> AsyncIterator[bytes]:
    """This manager's live rows matching `q`, one JSON line per batch; `{}` lines keep it alive."""
    yield b"{}\n"
    try:
        while True:
            rows = await sub.get(WATCH_HEARTBEAT)
            if rows is None:
                yield b"{}\n"
            else:
                mine = [list(r) for r in rows if q.matches(r)]
                if mine:
                    yield json.dumps({"rows": mine}, separators=(",", ":")).encode() + b"\n"
            if await request.is_disconnected():
                return
    finally:
        request.app.state.flows.unsubscribe(sub)


# ---------------------------------------------------------------------------------------------- live fan-out


class PeerFeeds:
    """The live half of `GET /v1/flows/watch` on several managers: one stream per live peer, whose rows go
    into the reader's own subscription (bounded and counted like local rows); the peer set is read again
    every PEERS_EVERY seconds, so managers that join are followed and those that leave are dropped.
    `changes` gets the state after every change: {"managers": [...], "errors": [...], "partial": bool}."""

    def __init__(self, request: Request, reg: Registry, sub: Subscription, q: FlowQuery) -> None:
        self.request = request
        self.reg = reg
        self.sub = sub
        self.body = {"op": "watch", "query": asdict(q)}
        self.tasks: dict[Peer, asyncio.Task[None]] = {}
        self.errors: dict[str, SourceError] = {}  # peer or store -> why its rows are missing
        self.connected: set[str] = set()
        self.changes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._main: asyncio.Task[None] | None = None
        self._last: dict[str, Any] | None = None

    def start(self) -> None:
        self._main = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        for t in [self._main, *self.tasks.values()]:
            if t is not None:
                t.cancel()
        for t in [self._main, *self.tasks.values()]:
            if t is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    def _publish(self) -> None:
        state = {
            "managers": sorted(self.connected),
            "errors": [e.to_json() for _, e in sorted(self.errors.items())],
            "partial": bool(self.errors),
        }
        if state != self._last:
            self._last = state
            self.changes.put_nowait(state)

    async def _follow(self) -> None:
        while True:
            _, peers, missing = await sources(self.request)
            live = set(peers)
            for p in list(self.tasks):
                if p not in live:  # left the registry (stopped, or its lease expired)
                    self.tasks.pop(p).cancel()
                    self.connected.discard(p.manager)
                    self.errors.pop(p.manager, None)
            for p in peers:
                if p not in self.tasks:
                    self.tasks[p] = asyncio.create_task(self._stream(p))
            for key in [k for k in self.errors if k.startswith("store:")]:
                del self.errors[key]
            for e in missing:
                self.errors[f"store:{e.store}"] = e
            self._publish()
            await asyncio.sleep(PEERS_EVERY)

    async def _stream(self, p: Peer) -> None:
        client = _client(self.request.app)
        headers = {PEER_HEADER: self.reg.header(), "Content-Type": "application/json"}
        data = json.dumps(self.body, separators=(",", ":"))
        timeout = httpx.Timeout(CONNECT_TIMEOUT, read=WATCH_HEARTBEAT * 3)
        while True:
            try:
                async with client.stream(
                    "POST", f"{p.url}/v1/flows/peer", content=data, headers=headers, timeout=timeout
                ) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                    async for line in r.aiter_lines():
                        if p.manager not in self.connected or p.manager in self.errors:
                            self.connected.add(p.manager)
                            self.errors.pop(p.manager, None)
                            self._publish()
                        if line.startswith('{"rows"'):
                            self.sub.offer([tuple(row) for row in json.loads(line)["rows"]])
                raise RuntimeError("stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self.connected.discard(p.manager)
                self.errors[p.manager] = SourceError(p.manager, p.url, p.store, _why(err))
                self._publish()
            await asyncio.sleep(RETRY_EVERY)


__all__ = [
    "ADVERTISE_ENV",
    "PEER_CA_ENV",
    "PEER_PERMISSION",
    "PeerFeeds",
    "advertise",
    "call_peers",
    "found_of",
    "hits_of",
    "query_body",
    "registry_of",
    "router",
    "sources",
]
