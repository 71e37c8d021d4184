"""Status reports on one long-lived stream (api/feed.py `StatusStream`, agent/upstream.py, the reporter's
stream mode), over a real uvicorn on loopback: the feed advertises it, lines are recorded as they come,
a bad line is refused with its reason and counted, the authorization is the status route's, a revoked
token ends the stream, and an agent whose stream ends re-sends its report by POST."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from apihelpers import ACME_TWO_HOSTS, ADMIN_AND_AGENTS, Grants, auth, issue_tokens, seeded_manager, serving

from omniwall.agent.reporter import Reporter
from omniwall.agent.upstream import StatusUpstream
from omniwall.api.app import create_app
from omniwall.api.feed import stream_stats
from omniwall.manager.service import SYSTEM, Manager
from omniwall.store.memory import MemoryStore
from omniwall.stream.wire import STATUS_STREAM_HEADER

World = tuple[str, Manager, dict[str, str], object]


@pytest.fixture()
def world() -> Iterator[World]:
    m = seeded_manager(MemoryStore(), ACME_TWO_HOSTS)
    tokens = issue_tokens(m, ADMIN_AND_AGENTS)
    app = create_app(m, watch=False)
    with serving(app) as url:
        yield url, m, tokens, app.state


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def streaming_reporter(url: str, host: str, token: str, **kw: Any) -> AsyncIterator[Reporter]:
    """A running Reporter whose manager advertised status streams; stopped and closed after."""
    async with httpx.AsyncClient() as client:
        rep = Reporter(client, url, host, token, **kw)
        rep.use_stream(True)
        task = asyncio.create_task(rep.run())
        try:
            yield rep
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await rep.aclose()


def raw_stream(url: str, host: str, token: str) -> socket.socket:
    port = int(url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(
        f"POST /v1/hosts/{host}/status/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    return s


def chunk(line: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(line), line)


def read_until(s: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        got = s.recv(65536)
        if not got:
            break
        data += got
    return data


def test_the_feed_advertises_status_streams(world: World) -> None:
    url, _, tokens, _ = world
    r = httpx.get(
        f"{url}/v1/hosts/h1/feed",
        params={"follow": "false"},
        headers={"Authorization": f"Bearer {tokens['h1']}"},
    )
    assert r.status_code == 200 and r.headers[STATUS_STREAM_HEADER] == "1"


def test_lines_are_recorded_as_they_come_and_a_bad_line_is_refused_and_counted(world: World) -> None:
    url, m, tokens, state = world
    s = raw_stream(url, "h1", tokens["h1"])
    try:
        s.sendall(chunk(b'{"realized_revision":1,"error":null}\n'))
        head = read_until(s, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        deadline = time.monotonic() + 5
        while m.hosts.get("h1").realized_revision != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert m.hosts.get("h1").realized_revision == 1
        # two lines in one chunk, the first one bad: refused with the field, the second recorded
        s.sendall(chunk(b'{"realized_revision":-3}\n{"realized_revision":2,"error":"boom"}\n'))
        refused = read_until(s, b"\n")
        assert b'"type":"refused"' in refused and b'"line":2' in refused and b"realized_revision" in refused
        deadline = time.monotonic() + 5
        while m.hosts.get("h1").realized_revision != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        st = m.hosts.get("h1")
        assert (st.realized_revision, st.last_error) == (2, "boom")
        assert stream_stats(state).refused == 1
        s.sendall(chunk(b"not json\n"))
        assert b"refused" in read_until(s, b"\n")
        assert stream_stats(state).refused == 2
        s.sendall(b"0\r\n\r\n")  # end of the body: the manager closes with its summary
        tail = read_until(s, b"0\r\n\r\n")
        assert b'"type":"closed","status":200,"lines":4' in tail, tail
    finally:
        s.close()


# Every kind of caller (the authorization matrix's principals, test_api_authz.py): the stream is not a
# FastAPI route, so the matrix's route enumeration does not see it; here it must answer at its start
# exactly as the status route it replaces does.
CALLERS: Grants = {
    "provider-admin": ("provider-admin", {}),
    "auditor": ("auditor", {}),
    "tenant-admin": ("tenant-admin", {"tenant": "acme"}),
    "tenant-viewer": ("tenant-viewer", {"tenant": "acme"}),
    "identity-source": ("identity-source", {}),
    "agent of h1": ("agent", {"host": "h1"}),
    "agent of h2": ("agent", {"host": "h2"}),
}


@pytest.mark.parametrize("caller", [*CALLERS, "a revoked token", "no such token"])
def test_every_caller_gets_at_the_start_what_the_status_route_answers(world: World, caller: str) -> None:
    url, m, _, _ = world
    tokens = issue_tokens(m, CALLERS)
    tokens["a revoked token"] = revoked = issue_tokens(m, {"r": ("agent", {"host": "h1"})})["r"]
    m.tokens.revoke(revoked.split(".")[1], SYSTEM)
    tokens["no such token"] = "ow.000000000000.nothing"
    token = tokens[caller]
    route = httpx.post(
        f"{url}/v1/hosts/h1/status", json={"realized_revision": 0, "error": None}, headers=auth(token)
    ).status_code
    s = raw_stream(url, "h1", token)
    try:
        head = read_until(s, b"\r\n\r\n")
    finally:
        s.close()
    stream = int(head.split(b" ", 2)[1])
    assert stream == route, (caller, head)
    assert (route == 200) == (caller == "agent of h1"), (caller, route)


def test_another_hosts_token_is_refused_at_the_start(world: World) -> None:
    url, m, tokens, _ = world
    s = raw_stream(url, "h2", tokens["h1"])
    try:
        s.sendall(chunk(b'{"realized_revision":7}\n'))
        answer = read_until(s, b"}")
        assert answer.startswith(b"HTTP/1.1 403") and b"scoped to host h1" in answer, answer
    finally:
        s.close()
    assert m.hosts.get("h2").realized_revision == 0
    s = raw_stream(url, "h1", "ow.nope.nope")
    try:
        assert read_until(s, b"}").startswith(b"HTTP/1.1 401")
    finally:
        s.close()


def test_the_reporter_streams_and_falls_back_to_post_when_the_token_is_revoked(world: World) -> None:
    url, m, tokens, _ = world

    async def go() -> None:
        async with streaming_reporter(url, "h1", tokens["h1"]) as rep:
            rep.set_realized(3, None)
            await until(lambda: m.hosts.get("h1").realized_revision == 3, "revision 3 recorded")
            rep.set_realized(4, None)
            await until(lambda: m.hosts.get("h1").realized_revision == 4, "revision 4 recorded")
            assert (rep.streamed, rep.posts) == (2, 0)
            # revoked: the manager ends the stream with the reason; the reporter goes back to POSTs
            tid = tokens["h1"].split(".")[1]
            m.tokens.revoke(tid, SYSTEM)
            rep.set_realized(5, None)
            await until(lambda: rep.last_stream_close is not None, "the stream's end")
            assert "401" in (rep.last_stream_close or "") and "revoked" in (rep.last_stream_close or "")
            assert m.hosts.get("h1").realized_revision == 4  # never recorded with a revoked token
            assert not rep._stream_ok

    asyncio.run(go())


def test_a_lost_stream_makes_the_reporter_resend_by_post(world: World) -> None:
    url, m, tokens, _ = world

    async def go() -> None:
        async with streaming_reporter(url, "h2", tokens["h2"]) as rep:
            rep.set_realized(6, None)
            await until(lambda: m.hosts.get("h2").realized_revision == 6, "revision 6 recorded")
            # the connection breaks (a manager killed): the whole report goes again, by POST
            m.hosts.report("h2", m.now_iso(), 0, None, None, None, None)  # as if never recorded
            assert rep._upstream is not None and rep._upstream._writer is not None
            rep._upstream._writer.transport.abort()
            await until(lambda: m.hosts.get("h2").realized_revision == 6, "revision 6 re-sent")
            # the manager records the report before its answer reaches the reporter, which counts it then
            await until(lambda: rep.posts == 1, "the POST's answer")
            assert rep.posts == 1 and "connection lost" in (rep.last_stream_close or "")
            # the next feed connection advertises streams again: a new stream, whole report first
            rep.use_stream(True)
            rep.resend()
            streamed = rep.streamed
            await until(lambda: rep.streamed == streamed + 1, "the report on a new stream")

    asyncio.run(go())


def test_closing_a_stream_the_manager_stopped_reading_ends_within_the_bound() -> None:
    """A manager that accepts the stream and then reads nothing must not keep a stopping agent alive:
    close() gives up after CLOSE_TIMEOUT and aborts the connection."""
    from omniwall.agent import upstream

    async def go() -> None:
        held: list[asyncio.StreamWriter] = []

        async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)  # never reads, never answers

        server = await asyncio.start_server(deaf, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reasons: list[str] = []
        up = StatusUpstream(f"http://127.0.0.1:{port}", "h1", "t", reasons.append)
        await up.open()
        assert up._writer is not None
        up._writer.transport.set_write_buffer_limits(high=1)
        up._writer.write(b"x" * 64 * 1024 * 1024)  # more than the socket buffers take: drain would block
        t0 = time.monotonic()
        await up.close()
        took = time.monotonic() - t0
        assert upstream.CLOSE_TIMEOUT - 0.1 <= took < upstream.CLOSE_TIMEOUT + 2, took
        assert up.closed and len(reasons) == 1 and "did not take" in reasons[0]
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()

    asyncio.run(go())


def test_the_upstream_rejects_a_url_that_is_not_http() -> None:
    with pytest.raises(ValueError, match="not http"):
        StatusUpstream("ftp://x", "h1", "t", lambda _: None)


def test_the_end_of_a_replaced_stream_leaves_the_reporter_on_its_new_one(world: World) -> None:
    url, m, tokens, _ = world

    async def go() -> None:
        async with streaming_reporter(url, "h1", tokens["h1"]) as rep:
            rep.set_realized(3, None)
            await until(lambda: m.hosts.get("h1").realized_revision == 3, "revision 3 recorded")
            old = rep._upstream
            assert old is not None and old._writer is not None
            # a failover: the feed reconnects (resend), and the old stream's reader then finds its
            # connection dead (before its own close ran): not the reporter's stream any more
            rep.resend()
            old.on_closed("connection lost: ConnectionResetError")
            assert rep._stream_ok
            await until(lambda: rep.streamed == 2, "the whole report on a new stream")
            await asyncio.sleep(0.1)
            assert rep._stream_ok and rep.posts == 0
            rep.set_realized(4, None)
            await until(lambda: m.hosts.get("h1").realized_revision == 4, "revision 4 recorded")
            assert rep.streamed == 3 and rep.posts == 0

    asyncio.run(go())


def test_an_idle_stream_gets_empty_lines_that_the_manager_skips(world: World) -> None:
    url, m, tokens, state = world

    async def go() -> None:
        async with streaming_reporter(url, "h1", tokens["h1"], counters_interval=3600.0) as rep:
            rep.stream_idle = 0.1
            rep.set_realized(2, None)
            await until(lambda: m.hosts.get("h1").realized_revision == 2, "revision 2 recorded")
            up = rep._upstream
            assert up is not None
            await until(lambda: up.lines >= 4, "keep-alive lines on the idle stream")
            assert rep.streamed == 1 and stream_stats(state).lines == 1  # empty lines are no reports
            assert not up.closed and stream_stats(state).refused == 0

    asyncio.run(go())
