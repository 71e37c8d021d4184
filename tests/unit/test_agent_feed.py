"""The whole agent (real httpx, real sockets) against a stand-in manager on 127.0.0.1, sim backend.

Covers: convergence, incremental deltas, status acks and counters, the manager going away (fail-static:
nothing flushed), reconnect with backoff and resume from the realized revision, gap -> snapshot, restart
adoption without writes, and the wire parser.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

from doubles.fake_manager import FakeManager
from omniwall.agent.feed import Backoff, FeedError, Heartbeat, Opened, Snapshot, parse_line, read_feed
from omniwall.agent.main import Agent
from omniwall.compiler.ir import HostDesiredState, IRRule, IRSet, IRVnic, diff
from omniwall.dataplane.memory_backend import MemoryBackend

HOST = "h1"
TOKEN = "t0ken"


def state(revision: int, ips: tuple[str, ...]) -> HostDesiredState:
    rule = IRRule(
        id=7,
        tenant="t",
        policy="p",
        rule="r",
        category="application",
        action="allow",
        src_set="s",
        dst_set=None,
    )
    return HostDesiredState(
        host=HOST,
        revision=revision,
        vnics=(IRVnic(ifname="ow0", workload="t/w", tenant="t", addresses=ips, egress=(7,)),),
        rules=(rule,),
        sets=(IRSet("s", addresses=ips),),
    )


def make_agent(fm: FakeManager, backend: MemoryBackend, token: str = TOKEN) -> Agent:
    return Agent(
        fm.url,
        HOST,
        token,
        backend,
        watch_addresses=False,
        counters_interval=0.2,
        idle_timeout=3.0,
        backoff=Backoff(base=0.05, cap=0.3),
    )


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    """The agent runs in a task for the block; stopped and awaited after it, also on failure."""
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        agent.stop()
        await task


def run_within(scenario: Callable[[], Coroutine[Any, Any, None]], timeout: float = 30) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout))


def acked(fm: FakeManager, revision: int) -> Callable[[], bool]:
    return lambda: (fm.last_status(HOST) or {}).get("realized_revision") == revision


@pytest.fixture
def fm():
    m = FakeManager(tokens={HOST: TOKEN}, heartbeat=0.3)
    m.start()
    yield m
    m.stop()


def test_converges_survives_manager_outage_and_resumes(fm: FakeManager) -> None:
    be = MemoryBackend(HOST)
    s5, s6, s7 = state(5, ("10.1.0.1",)), state(6, ("10.1.0.2",)), state(7, ("10.1.0.2", "10.1.0.3"))
    fm.publish(s5)

    async def scenario() -> None:
        async with running(make_agent(fm, be)) as agent:
            await until(lambda: be.realized() == s5, "first snapshot realized")
            await until(acked(fm, 5), "ack of revision 5")
            fm.publish(s6)
            await until(lambda: be.realized() == s6, "delta 5->6 realized")
            await until(acked(fm, 6), "ack of revision 6")
            assert be.calls == [("sync", 5), ("apply", 5, 6)]

            # counters are reported periodically, once they move
            be.add_traffic(7, packets=3, nbytes=180)
            await until(
                lambda: (
                    (fm.last_status(HOST) or {}).get("counters")
                    == [{"rule_id": 7, "packets": 3, "bytes": 180}]
                ),
                "counter report",
            )

            # the manager goes away: the agent keeps enforcing revision 6 and keeps trying
            fm.stop()
            await until(lambda: not agent.connected.is_set(), "disconnect noticed")
            tries = len(fm.feed_requests)
            await asyncio.sleep(1.0)
            assert be.realized() == s6, "fail-static: the realized state must stay"
            assert ("teardown",) not in be.calls and be.calls[-1] == ("apply", 5, 6)
            assert len(fm.feed_requests) == tries  # nobody listening, so nothing recorded

            # policy moves on while the agent is cut off; the manager comes back on the same port
            fm.publish(s7)
            fm.start()
            await until(lambda: be.realized() == s7, "convergence after the manager returned")
            await until(acked(fm, 7), "ack of revision 7")
            assert (HOST, 6) in fm.feed_requests[tries:], "resumed from the realized revision"
            assert be.calls[-1] == ("apply", 6, 7), "resumed with the delta, not a full sync"
            assert agent.connects >= 2

    run_within(scenario)


def test_gap_reconnects_for_a_snapshot(fm: FakeManager) -> None:
    be = MemoryBackend(HOST)
    s5, s9 = state(5, ("10.1.0.1",)), state(9, ("10.1.0.9",))
    fm.publish(s5)

    async def scenario() -> None:
        async with running(make_agent(fm, be)):
            await until(acked(fm, 5), "ack of revision 5")
            fm.states[HOST] = s9  # the manager moved to 9, the agent is shown only a delta 8->9
            fm.inject(HOST, {"type": "delta", "delta": diff(state(8, ("10.1.0.8",)), s9).to_json()})
            await until(lambda: be.realized() == s9, "snapshot after the gap")
            await until(acked(fm, 9), "ack of revision 9")
            assert fm.feed_requests[-1] == (HOST, 0)
            assert be.calls == [("sync", 5), ("sync", 9)]

    run_within(scenario)


def test_failed_write_is_reported_then_recovered(fm: FakeManager) -> None:
    be = MemoryBackend(HOST)
    s5, s6 = state(5, ("10.1.0.1",)), state(6, ("10.1.0.6",))
    fm.publish(s5)

    async def scenario() -> None:
        async with running(make_agent(fm, be)):
            await until(acked(fm, 5), "ack of revision 5")
            be.fail_next(2, "nft: No such file or directory")  # the apply, then the full sync
            fm.publish(s6)
            await until(lambda: (fm.last_status(HOST) or {}).get("error") is not None, "error report")
            status = fm.last_status(HOST) or {}
            assert status["realized_revision"] == 5 and "No such file" in status["error"]
            # the retry loop syncs again; the error clears
            await until(lambda: be.realized() == s6, "retry")
            await until(lambda: fm.last_status(HOST) == {"realized_revision": 6, "error": None}, "clean ack")

    run_within(scenario)


def test_restart_adopts_and_writes_nothing(tmp_path) -> None:
    fm = FakeManager(tokens={HOST: TOKEN}, heartbeat=0.3, snapshot_always=True)
    fm.start()
    s5 = state(5, ("10.1.0.1",))
    fm.publish(s5)
    path = tmp_path / "sim.json"

    async def run_once(be: MemoryBackend) -> Agent:
        async with running(make_agent(fm, be)) as agent:
            await until(
                lambda: agent.connects >= 1 and acked(fm, 5)() and agent.reconciler.in_sync, "in sync"
            )
            await asyncio.sleep(0.3)
        return agent

    try:
        first = MemoryBackend(HOST, state_file=path)
        asyncio.run(run_once(first))
        assert first.calls == [("sync", 5)]
        second = MemoryBackend(HOST, state_file=path)  # the "kernel" outlived the agent
        agent = asyncio.run(run_once(second))
        assert fm.feed_requests[-1] == (HOST, 5), "resumed from the adopted revision"
        assert second.calls == [] and second.writes == 0, "identical snapshot: nothing written"
        assert second.realized() == s5 and agent.reconciler.realized_revision == 5
    finally:
        fm.stop()


def test_bad_token_is_retried_and_changes_nothing(fm: FakeManager) -> None:
    be = MemoryBackend(HOST)
    fm.publish(state(5, ("10.1.0.1",)))

    async def scenario() -> None:
        async with running(make_agent(fm, be, token="wrong")) as agent:
            await until(lambda: len(fm.feed_requests) >= 3, "several attempts")
            assert be.calls == [] and agent.connects == 0

    run_within(scenario)


def test_parse_line() -> None:
    s = state(3, ("10.0.0.1",))
    msg = parse_line(json.dumps({"type": "snapshot", "revision": 3, "state": s.to_json()}))
    assert msg == Snapshot(3, s)
    assert isinstance(parse_line('{"type":"heartbeat","revision":3}'), Heartbeat)
    assert parse_line("   ") is None
    assert parse_line('{"type":"flows-request"}') is None  # unknown kinds are ignored
    with pytest.raises(FeedError, match="bad feed line"):
        parse_line('{"type":"delta"}')
    with pytest.raises(FeedError, match="bad feed line"):
        parse_line("not json")
    with pytest.raises(FeedError, match="revision 4"):
        parse_line(json.dumps({"type": "snapshot", "revision": 4, "state": s.to_json()}))


def test_backoff_is_jittered_capped_and_resets() -> None:
    import random

    b = Backoff(base=1.0, cap=8.0, rng=random.Random(1))
    delays = [b.next() for _ in range(10)]
    assert 0.5 <= delays[0] <= 1.0
    assert all(d <= 8.0 for d in delays) and max(delays) >= 4.0
    assert len(set(delays)) == len(delays)  # jittered
    b.reset()
    assert b.next() <= 1.0


async def _serve_once(response: bytes, pause: float = 0.0) -> tuple[asyncio.Server, str, list[bytes]]:
    """A one-shot HTTP server on 127.0.0.1 that answers every request with `response`, written a few
    bytes at a time (lines and chunk framing split across reads), then keeps the connection open."""
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        for i in range(0, len(response), 7):
            writer.write(response[i : i + 7])
            await writer.drain()
            await asyncio.sleep(0)
        await asyncio.sleep(pause)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/base", requests


def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def test_the_feed_reader_takes_chunked_sized_and_refused_responses() -> None:
    """The agent's raw HTTP/1.1 feed reader: a chunked body whose lines span chunks, a sized one, a
    refusal with its text, and the idle watchdog; every end raises FeedError."""
    hb = b'{"type":"heartbeat","revision":3}'

    async def read(response: bytes, idle: float = 5.0, pause: float = 0.0) -> tuple[list[object], str, bytes]:
        server, url, requests = await _serve_once(response, pause)
        got: list[object] = []
        try:
            async for msg in read_feed(url, "h/1", "tok", 2, idle):
                got.append(msg)
        except FeedError as e:
            return got, str(e), requests[0]
        finally:
            server.close()
        raise AssertionError("the feed ended without FeedError")

    async def go() -> None:
        head = b"HTTP/1.1 200 OK\r\nX-Omniwall-Status-Stream: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        got, err, req = await read(head + _chunked(hb[:10], hb[10:] + b"\n\n" + hb, b"\n"))
        assert req.startswith(b"GET /base/v1/hosts/h%2F1/feed?from=2&heartbeat=1.25 HTTP/1.1\r\n")
        assert b"Authorization: Bearer tok\r\n" in req
        assert isinstance(got[0], Opened) and got[0].status_stream
        assert got[1:] == [Heartbeat(3), Heartbeat(3)] and err == "feed ended by the manager"
        sized = hb + b"\n"
        got, err, _ = await read(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(sized), sized))
        assert isinstance(got[0], Opened) and not got[0].status_stream and got[1:] == [Heartbeat(3)]
        got, err, _ = await read(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 13\r\n\r\ntoken revoked")
        assert got == [] and err == "feed refused: HTTP 401: token revoked"
        got, err, _ = await read(head + b"5\r\nab", idle=0.3, pause=2.0)  # a chunk that never completes
        assert len(got) == 1 and "TimeoutError" in err
        got, err, _ = await read(head + b"zz\r\n")
        assert "bad feed" not in err and "ValueError" in err  # broken framing: a connection error

    asyncio.run(go())
