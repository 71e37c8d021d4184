"""Per-host feed and status endpoints (the wire format they speak is `omniwall.stream.wire`).

- `GET /v1/hosts/{host}/feed?from=R`: a snapshot (from=0, unknown, or older than the delta log), else
  the deltas since R; then, while the connection lives, each new delta as the host's state changes, and a
  heartbeat every `heartbeat` seconds of silence. `follow=false` ends the response after the catch-up.
  An R newer than this manager's state (the agent came from a manager that was ahead) first waits for
  this manager to catch up, or gets 503 (`catch_up`).
- `GET /v1/hosts/{host}/desired`: the current desired state (one JSON object).
- `POST /v1/hosts/{host}/status`: the agent's ack (realized revision, error, counters, addresses).
- `POST /v1/hosts/{host}/status/stream`: the same reports as NDJSON lines on one long-lived chunked
  request (`StatusStream`); the feed advertises it with the `X-Omniwall-Status-Stream` header.
- `GET /v1/policies/{name}/stats`: per-rule counters summed over every host's last report.

An ack is the request every agent makes for every change, so a change to N hosts costs the manager N of
them: `AgentPath` (an ASGI middleware, installed by `install`) answers the common case of the status
POST (a cached agent token, a body msgspec reads, no addresses) without FastAPI's routing, dependency
injection and pydantic (bench/manager_hosts.py, BENCHMARKS.md "The manager's cost per host"). Anything
else (an error to answer, a token not cached, addresses to reconcile, a body only pydantic accepts) goes
to the route below unchanged, with the body replayed: both answer alike.

Even the lean route leaves uvicorn's work per request (a task, the header parse, two writes: ~58 us for
a trivial app), more than half the budget of 0.1 ms per host per change. So an agent whose feed
advertises it keeps one status request open instead (`StatusStream`): its body is the agent's reports,
one JSON object per line, and the manager records each line as it arrives, answering nothing for a good
line. The response, sent as soon as the stream is accepted, carries only the bad news: a refused line
(`{"type":"refused","line":N,"error":...}`, counted in `refused_reports`, the stream goes on) or the
end of the stream (`{"type":"closed","status":S,"error":...}`: the token was revoked, the host removed).
An agent re-sends its whole report on every new stream, so a line lost with a broken connection is
superseded, never lost silently (agent/reporter.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from omniwall.compiler.ir import HostDelta, empty_state
from omniwall.manager.service import Manager
from omniwall.manager.tokens import TokenRecord
from omniwall.stream.wire import (
    STATUS_STREAM_HEADER,
    StatusIn,
    StatusReport,
    command_line,
    decode_status,
    delta_line,
    heartbeat_line,
    snapshot_line,
)

from .auth import (
    Perm,
    Principal,
    authenticate,
    bearer_token,
    cached_principal,
    check_visible,
    manager_of,
    read_tenant,
    require,
)
from .errors import ApiError, not_found
from .limits import Limits

NDJSON = "application/x-ndjson"
log = logging.getLogger("omniwall.api")
# How long a feed request waits for this manager to catch up with a revision the agent realized through
# another manager, before refusing (the agent keeps its rules and tries the next manager).
CATCH_UP_BOUND = 5.0
# Scope key: the server's own `send`, before any middleware wraps it (set by `EndStreams`, api/server.py,
# which wraps the whole app in `omniwall manager`; without it a feed sends as any response does).
RAW_SEND = "omniwall.raw_send"
_HTTPTOOLS_CYCLE = ("uvicorn.protocols.http.httptools_impl", "RequestResponseCycle")


class DirectChunks:
    """Body chunks of a started chunked response written straight to its connection from a plain
    callback, not through an awaited `send` (a feed's deltas, from the broadcaster's push: no task
    wake-up per host per change). Only uvicorn's httptools cycle is written to so (its `send` is its
    bound method; the chunk framing is its own); with any other server `of` gives None and the feed
    sends as every response does."""

    __slots__ = ("_cycle",)

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle

    @classmethod
    def of(cls, send: Any) -> DirectChunks | None:
        cycle = getattr(send, "__self__", None)
        kind = type(cycle)
        if (kind.__module__, kind.__name__) != _HTTPTOOLS_CYCLE:
            return None
        return cls(cycle)

    def ready(self) -> bool:
        """Written now without waiting: started, chunked, not ended, not paused by flow control."""
        c = self._cycle
        return (
            c.chunked_encoding is True
            and c.response_started
            and not c.response_complete
            and not c.disconnected
            and not c.flow.write_paused
        )

    def write(self, data: bytes) -> None:
        self._cycle.transport.write(b"%x\r\n%s\r\n" % (len(data), data))


def _host_refusal(p: Principal, host: str, perm: Perm, m: Manager) -> ApiError | None:
    """Why `p` may not use `host`'s feed or status routes with `perm` (None: it may). Both ack routes and
    the feed ask this one question."""
    try:
        require(p, perm)
    except ApiError as e:
        return e
    if p.host is not None and p.host != host:
        return ApiError(403, f"this token is scoped to host {p.host}, not {host}", permission=perm.value)
    if not m.host_known(host):
        return not_found(f"host {host}")
    if m.desired.snapshot(host) is None:
        # Never send an empty state for a host we could not compile: the agent would wipe its rules.
        return ApiError(
            503, f"desired state of host {host} is not computed yet: {m.compile_error or 'starting'}"
        )
    return None


def _check_host(p: Principal, host: str, perm: Perm, m: Manager) -> None:
    refusal = _host_refusal(p, host, perm, m)
    if refusal is not None:
        raise refusal


async def catch_up(m: Manager, host: str, from_revision: int) -> None:
    """An agent that realized `from_revision` through another manager must never be sent this manager's
    older state (it would roll its rules back until the next change). When the agent is ahead of this
    manager's state for the host, sync the model now (which also waits for a sync in flight to finish
    compiling); a manager that cannot catch up within the bound answers 503 instead. After the sync, an
    agent still ahead holds a revision this store never had (another history): the snapshot is the truth."""
    if from_revision <= m.desired.revision(host):
        return
    try:
        await asyncio.wait_for(run_in_threadpool(m.sync), timeout=CATCH_UP_BOUND)
    except Exception as e:  # a slow sync goes on in its thread; the next feed request finds it done
        reason = "timed out" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
        raise ApiError(
            503,
            f"this manager is at revision {m.revision}, behind revision {from_revision} that host {host} "
            f"realized, and could not catch up ({reason}); try another manager",
            headers={"Retry-After": "1"},
        ) from e


def _deltas_chunk(deltas: list[HostDelta]) -> bytes:
    """Deltas found together, as one write (the feed's task and its push both send them so)."""
    return delta_line(deltas[0]) if len(deltas) == 1 else b"".join(map(delta_line, deltas))


class FeedResponse(Response):
    """The feed written from the ASGI level: one coroutine per feed sends each line itself, instead of a
    StreamingResponse pulling an async generator through a second task (with 1,000 hosts a line per host
    per change went through the generator, the task group and StreamingResponse's loop: bench
    manager_hosts.py, BENCHMARKS.md "Manager per-host cost, part 3"). The bytes are the same lines;
    deltas found together (a catch-up, or several changes between two wake-ups) go in one write. A
    second task per feed only waits for the agent to leave (as StreamingResponse's did), and wakes the
    feed when it does."""

    media_type = NDJSON

    def __init__(self, m: Manager, host: str, from_revision: int, *, follow: bool, heartbeat: float) -> None:
        # Response.__init__ is not called: it would add a content-length; the body is chunked.
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),
            (STATUS_STREAM_HEADER.lower().encode(), b"1"),
            (b"content-type", NDJSON.encode()),
        ]
        self.m, self.host, self.from_revision = m, host, from_revision
        self.follow, self.heartbeat = follow, heartbeat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        m, host, heartbeat = self.m, self.host, self.heartbeat
        direct = DirectChunks.of(scope.get(RAW_SEND)) if self.follow else None
        # The task parks in `changed.wait()` between lines; only then may `push` write (no line of the
        # task's is half sent), and `sent` is shared: whichever writes a delta moves it on.
        parked = False

        def push() -> bool:
            """The broadcaster's call on a change of this host: its deltas written here and now (True),
            or the task woken for anything else (a command first, flow control, a snapshot)."""
            nonlocal sent, last_line
            if not parked or gone or direct is None or not direct.ready():
                return False
            if m.migrations.commands.waiting(host):
                return False
            deltas = m.desired.deltas_since(host, sent)
            if deltas is None:
                return False
            if deltas:
                direct.write(_deltas_chunk(deltas))
                sent = deltas[-1].to_revision
                last_line = loop.time()
            return True

        # before reading: no change slips between read and wait
        changed = m.desired.changed.subscribe(host, push if direct is not None else None)
        m.hosts.connect(host, m.now_iso())
        # The heartbeat: one timer per stream, re-armed when it fires, not a timeout per wait (that was a
        # timer created and cancelled per host per change, a tenth of the event loop's time with 1,000
        # hosts). It sets `changed` too; `beat` says the silence lasted `heartbeat` seconds.
        loop = asyncio.get_running_loop()
        last_line = loop.time()
        beat = gone = False

        def tick() -> None:
            nonlocal timer, beat
            left = last_line + heartbeat - loop.time()
            if left > 0:
                timer = loop.call_later(left, tick)
            else:
                beat = True
                changed.set()

        async def listen() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            changed.set()

        def body(chunk: bytes) -> Message:
            return {"type": "http.response.body", "body": chunk, "more_body": True}

        timer = loop.call_later(heartbeat, tick)
        listener = asyncio.create_task(listen()) if self.follow else None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            deltas = m.desired.deltas_since(host, self.from_revision)
            if deltas is None:
                state = m.desired.snapshot(host) or empty_state(host, 0)  # present: checked before the stream
                await send(body(snapshot_line(state)))
                sent = state.revision
            else:
                sent = self.from_revision
                if deltas:
                    await send(body(_deltas_chunk(deltas)))
                    sent = deltas[-1].to_revision
            while self.follow:
                for cmd in m.migrations.commands.take(host):  # after the deltas they may depend on
                    await send(body(command_line(cmd)))
                    last_line = loop.time()
                parked = True
                try:
                    await changed.wait()
                finally:
                    parked = False
                changed.clear()
                if gone:
                    return
                if beat:
                    beat = False
                    m.hosts.seen(host, m.now_iso())
                    await send(body(heartbeat_line(sent)))
                    last_line = loop.time()
                    timer = loop.call_later(heartbeat, tick)
                deltas = m.desired.deltas_since(host, sent)
                if deltas is None:  # fell behind the delta log: start over from a snapshot
                    state = m.desired.snapshot(host) or empty_state(host, 0)
                    await send(body(snapshot_line(state)))
                    sent = state.revision
                    last_line = loop.time()
                elif deltas:
                    await send(body(_deltas_chunk(deltas)))
                    sent = deltas[-1].to_revision
                    last_line = loop.time()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            timer.cancel()
            if listener is not None:
                listener.cancel()
            m.desired.changed.unsubscribe(changed)
            m.hosts.disconnect(host, m.now_iso())


def record(m: Manager, host: str, report: StatusReport | StatusIn) -> None:
    """An agent's status report into the host book (both ack routes)."""
    m.hosts.report(
        host,
        m.now_iso(),
        report.realized_revision,
        report.error,
        [(c.rule_id, c.packets, c.bytes) for c in report.counters] if report.counters is not None else None,
        report.addresses,
        (report.conntrack.count, report.conntrack.max) if report.conntrack is not None else None,
    )


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
STATUS_PATH = "/v1/hosts/{host}/status"
STREAM_SUFFIX = "/status/stream"


class _StatusRoute:
    """What `RequestTimer` (api/metrics.py) reads of `scope["route"]`: acks answered by `AgentPath` are
    timed under the status route's template, like the ones the route answers."""

    path = STATUS_PATH


class _StreamRoute:
    path = STATUS_PATH + "/stream"


class StreamStats:
    """Counts of the status streams (app.state.status_streams): tests, GET /v1/status, the log."""

    def __init__(self) -> None:
        self.open = 0
        self.lines = 0
        self.refused = 0


def stream_stats(state: Any) -> StreamStats:
    stats = getattr(state, "status_streams", None)
    if not isinstance(stats, StreamStats):
        stats = StreamStats()
        state.status_streams = stats
    return stats


def _body_limit(state: Any) -> int:
    """The largest status report taken, in bytes (the app's `Limits`)."""
    limits = getattr(state, "limits", None)
    return (limits if isinstance(limits, Limits) else Limits()).max_apply_bytes


async def _take_report(m: Manager, host: str, report: StatusIn | StatusReport, p: Principal) -> None:
    """Record an agent's report; its addresses follow the workload (manager/addresses.py; may write the
    store: in the threadpool). The status route and the status stream both take reports so."""
    record(m, host, report)
    if report.addresses:
        from omniwall.manager.addresses import agent_actor, reconcile

        await run_in_threadpool(reconcile, m, host, report.addresses, agent_actor(host, p.id))


def _json_line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _line_problem(line: bytes) -> tuple[StatusReport | None, str]:
    """A line `decode_status` refused, judged by the full route's model: the report it accepts, or the
    reason naming the field."""
    from pydantic import ValidationError

    try:
        return StatusReport.model_validate_json(line), ""
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "line"
        return None, f"{where}: {err.get('msg', 'invalid')}"


def _replay(chunks: list[bytes], receive: Receive, more: bool) -> Receive:
    """`receive` for the full route after `AgentPath` read (part of) the body: that part first."""
    pending = True

    async def again() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": b"".join(chunks), "more_body": more}
        return await receive()

    return again


class AgentPath:
    """ASGI middleware: the lean route of `POST /v1/hosts/{host}/status` (module docstring)."""

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            if path.startswith("/v1/hosts/") and path.endswith("/status"):
                host = path[len("/v1/hosts/") : -len("/status")]
                if host and "/" not in host:
                    rest = await self._status(scope, receive, send, host)
                    if rest is None:
                        return
                    receive = rest
            elif path.startswith("/v1/hosts/") and path.endswith(STREAM_SUFFIX):
                host = path[len("/v1/hosts/") : -len(STREAM_SUFFIX)]
                if host and "/" not in host:
                    await StatusStream(self.state, scope, receive, send, host).run()
                    return
        await self.app(scope, receive, send)

    async def _status(self, scope: Scope, receive: Receive, send: Send, host: str) -> Receive | None:
        """None: answered here; else the `receive` the full route reads the body from."""
        m: Manager = self.state.manager
        p = cached_principal(self.state, scope)
        if p is None or _host_refusal(p, host, Perm.STATUS_WRITE, m) is not None:
            return receive  # the full route answers the refusal
        limit = _body_limit(self.state)
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                return receive  # BodyLimit answers 413 without reading it
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the agent left: nothing to answer
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = bool(message.get("more_body", False))
            if size > limit:
                return _replay(chunks, receive, more)
            if not more:
                break
        report = decode_status(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if report is None or report.addresses is not None:  # the route judges it / reconciles them
            return _replay(chunks, receive, False)
        record(m, host, report)
        body = json.dumps({"host": host, **m.host_status(host)}, separators=(",", ":")).encode()
        scope["route"] = _StatusRoute
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return None


class StatusStream:
    """One agent's status stream (module docstring): authorized once like the status route, then every
    line is checked like a report (msgspec, else pydantic for the reason), and the token and the host
    before each line is recorded: a token revoked or a host removed ends the stream."""

    def __init__(self, state: Any, scope: Scope, receive: Receive, send: Send, host: str) -> None:
        self.state, self.scope, self.receive, self.send, self.host = state, scope, receive, send, host
        self.m: Manager = state.manager
        self.stats = stream_stats(state)
        self.limit = _body_limit(state)
        self.token = bearer_token(scope["headers"]) or ""  # checked again before each line
        self.rec: TokenRecord | None = None  # what it last verified as (`TokenBook.still_cached`)
        self.line_no = 0

    async def _refuse_start(self, e: ApiError) -> None:
        body = json.dumps(e.body(), separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        headers += [(k.lower().encode(), v.encode()) for k, v in (e.headers or {}).items()]
        headers.append((b"connection", b"close"))  # the agent may still be writing its body
        await self.send({"type": "http.response.start", "status": e.status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    async def _out(self, obj: dict[str, Any], more: bool = True) -> None:
        await self.send({"type": "http.response.body", "body": _json_line(obj), "more_body": more})

    async def run(self) -> None:
        self.scope["route"] = _StreamRoute
        p = cached_principal(self.state, self.scope)
        try:
            if p is None:
                from starlette.requests import Request as _Request

                p = await authenticate(_Request(self.scope, self.receive))
            refusal = _host_refusal(p, self.host, Perm.STATUS_WRITE, self.m)
            if refusal is not None:
                raise refusal
        except ApiError as e:
            await self._refuse_start(e)
            return
        await self.send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", NDJSON.encode()), (b"cache-control", b"no-store")],
            }
        )
        self.stats.open += 1
        try:
            closed = await self._lines(p)
        finally:
            self.stats.open -= 1
        if closed is not None:
            log.warning("status stream of host %s closed: %s", self.host, closed.message)
            await self._out({"type": "closed", "status": closed.status, "error": closed.message}, more=False)
        else:
            await self._out({"type": "closed", "status": 200, "lines": self.line_no}, more=False)

    async def _lines(self, p: Principal) -> ApiError | None:
        """Read and record lines until the agent ends its body (None) or the stream must end (why)."""
        buf = b""
        while True:
            message = await self.receive()
            if message["type"] != "http.request":
                return None  # the agent left
            buf += message.get("body", b"")
            if b"\n" in buf:
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        why = self._line(p, line)
                        if why is not None and not isinstance(why, ApiError):
                            why = await why
                        if why is not None:
                            return why
            if len(buf) > self.limit:
                return ApiError(413, f"status line {self.line_no + 1} exceeds {self.limit} bytes")
            if not message.get("more_body", False):
                if buf.strip():
                    why = self._line(p, buf)
                    return why if why is None or isinstance(why, ApiError) else await why
                return None

    def _line(self, p: Principal, line: bytes) -> ApiError | Awaitable[ApiError | None] | None:
        """Record one line. The common one (its token still cached, a report msgspec reads, no addresses)
        is recorded here, without a coroutine (one per host per change); anything else gives back the
        awaitable that finishes it: a token to verify again, a refusal to write, addresses to reconcile."""
        self.line_no += 1
        self.stats.lines += 1
        if self.rec is None or not self.m.tokens.still_cached(self.rec):
            return self._verified_line(p, line)
        return self._checked_line(p, line)

    async def _verified_line(self, p: Principal, line: bytes) -> ApiError | None:
        tokens = self.m.tokens
        self.rec = tokens.verify_cached(self.token) or await run_in_threadpool(tokens.verify, self.token)
        if self.rec is None:
            return ApiError(401, "invalid, expired or revoked token")
        why = self._checked_line(p, line)
        return why if why is None or isinstance(why, ApiError) else await why

    def _checked_line(self, p: Principal, line: bytes) -> ApiError | Awaitable[None] | None:
        m = self.m
        refusal = _host_refusal(p, self.host, Perm.STATUS_WRITE, m)
        if refusal is not None:
            return refusal
        report = decode_status(line)
        if report is None:
            return self._refused_line(p, line)
        if report.addresses:
            return _take_report(m, self.host, report, p)
        record(m, self.host, report)
        return None

    async def _refused_line(self, p: Principal, line: bytes) -> None:
        """A line msgspec refused: recorded if the full route's model takes it, else answered refused."""
        report, why = _line_problem(line)
        if report is None:
            self.stats.refused += 1
            log.warning("host %s: status line %d refused: %s", self.host, self.line_no, why)
            await self._out({"type": "refused", "line": self.line_no, "error": why})
            return
        await _take_report(self.m, self.host, report, p)


class QuietAcks(logging.Filter):
    """uvicorn's access log without the line of each successful ack: that was one line per host per
    change (10,000 for one change to 10,000 hosts), and formatting and writing it cost a tenth of the
    ack. Refused acks are still logged; accepted ones show in GET /v1/status and the request metrics."""

    def filter(self, record: logging.LogRecord) -> bool:
        a = record.args  # uvicorn: (client, method, path and query, HTTP version, status)
        return not (
            isinstance(a, tuple)
            and len(a) == 5
            and a[1] == "POST"
            and a[4] == 200
            and isinstance(a[2], str)
            and a[2].startswith("/v1/hosts/")
            and a[2].endswith("/status")
        )


QUIET_ACKS = QuietAcks()


def install(app: FastAPI) -> None:
    """`AgentPath` in front of the routes (create_app, before the request timer so acks are timed), and
    `QuietAcks` on uvicorn's access log (added once, whatever the number of apps)."""
    app.add_middleware(AgentPath, state=app.state)  # type: ignore[arg-type]
    logging.getLogger("uvicorn.access").addFilter(QUIET_ACKS)


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
    ) -> Response:
        m = manager_of(request)
        _check_host(p, host, Perm.FEED_READ, m)
        await catch_up(m, host, from_)
        return FeedResponse(m, host, from_, follow=follow, heartbeat=heartbeat)

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
        await _take_report(m, host, report, p)
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
