"""Agents with several managers: the URL list (flag, commas, config file), failover to the next manager,
and resuming there without a kernel write when that manager holds the same state (its own numbering).

Real httpx and sockets against two stand-in managers on 127.0.0.1 (tests/doubles/fake_manager.py), sim
backend whose `calls` list counts every write.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
from test_agent_feed import HOST, TOKEN, run_within, running, state, until
from typer.testing import CliRunner

from doubles.fake_manager import FakeManager
from omniwall.agent.feed import Backoff
from omniwall.agent.main import Agent
from omniwall.agent.managers import Managers, parse_manager_urls
from omniwall.cli.main import app
from omniwall.dataplane.memory_backend import MemoryBackend


@pytest.fixture
def two():
    a, b = FakeManager(tokens={HOST: TOKEN}, heartbeat=0.3), FakeManager(tokens={HOST: TOKEN}, heartbeat=0.3)
    a.start()
    b.start()
    yield a, b
    a.stop()
    b.stop()


def make_agent(urls: list[str], be: MemoryBackend) -> Agent:
    agent = Agent(
        urls,
        HOST,
        TOKEN,
        be,
        watch_addresses=False,
        counters_interval=0.2,
        idle_timeout=3.0,
        backoff=Backoff(base=0.05, cap=0.3),
    )
    agent.managers.index = 0  # start on the first, whatever the host name hashes to
    return agent


def acked(fm: FakeManager, revision: int):
    return lambda: (fm.last_status(HOST) or {}).get("realized_revision") == revision


def test_failover_resumes_without_a_kernel_write_and_keeps_enforcing(two) -> None:
    a, b = two
    s5 = state(5, ("10.1.0.1",))
    a.publish(s5)
    # manager b numbers the same content differently (it compiled the host at its own start)
    b.publish(state(9, ("10.1.0.1",)))
    be = MemoryBackend(HOST)

    async def scenario() -> None:
        async with running(make_agent([a.url, b.url], be)) as agent:
            await until(acked(a, 5), "ack of revision 5 at manager a")
            assert be.calls == [("sync", 5)]
            a.stop()  # the manager the agent is attached to dies
            while not acked(b, 9)():  # fail-static all the way through the switch
                assert be.realized() == s5
                await asyncio.sleep(0.005)
            assert agent.managers.current == b.url and agent.managers.switches >= 1
            assert be.calls == [("sync", 5)], "same state at the new manager: no kernel write"
            assert (HOST, 5) in b.feed_requests, "resumed from the realized revision"

            # the next change at b is a delta on what the kernel holds, not a full sync
            s10 = state(10, ("10.1.0.1", "10.1.0.2"))
            b.publish(s10)
            await until(acked(b, 10), "ack of revision 10 at manager b")
            assert be.calls == [("sync", 5), ("apply", 5, 10)]
            assert be.realized() == s10

    run_within(scenario)


def test_failover_to_a_manager_with_other_content_syncs(two) -> None:
    a, b = two
    a.publish(state(5, ("10.1.0.1",)))
    s12 = state(12, ("10.1.0.3",))
    b.publish(s12)
    be = MemoryBackend(HOST)

    async def scenario() -> None:
        async with running(make_agent([a.url, b.url], be)):
            await until(acked(a, 5), "ack at a")
            a.stop()
            await until(acked(b, 12), "ack at b")
            assert be.calls == [("sync", 5), ("sync", 12)] and be.realized() == s12

    run_within(scenario)


def test_manager_urls_from_flags_commas_and_duplicates() -> None:
    urls = parse_manager_urls(
        ["http://127.0.0.1:1,http://127.0.0.1:2/", "http://127.0.0.1:1", "http://[::1]:3"]
    )
    assert urls == ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://[::1]:3"]
    with pytest.raises(ValueError, match="--manager: give at least one"):
        parse_manager_urls([" , "])
    with pytest.raises(ValueError, match=r"--manager: 'http://10.0.0.1:8443': plain HTTP"):
        parse_manager_urls(["https://10.0.0.2:8443,http://10.0.0.1:8443"])
    with pytest.raises(ValueError, match="mix of http:// and https://"):
        parse_manager_urls(["https://127.0.0.1:1", "http://127.0.0.1:2"])


def test_hosts_spread_over_managers_and_failover_cycles() -> None:
    urls = ["https://m1", "https://m2", "https://m3"]
    spread = Counter(Managers(urls, f"host-{i}").current for i in range(999))
    assert set(spread) == set(urls) and min(spread.values()) > 250, spread
    m = Managers(urls, "h")
    seen = [m.current] + [m.failover() for _ in range(3)]
    assert seen[0] == seen[3] and len(set(seen[:3])) == 3
    one = Managers("https://only", "h")
    assert one.failover() == "https://only" and one.switches == 0


def test_config_file_takes_a_list_of_managers(tmp_path: Path) -> None:
    runner = CliRunner()
    cfg = tmp_path / "agent.yaml"
    token = tmp_path / "missing.token"
    cfg.write_text(f"manager: [http://127.0.0.1:9, http://127.0.0.1:10]\nhost: h1\ntoken-file: {token}\n")
    out = runner.invoke(app, ["agent", "--config", str(cfg), "--backend", "sim"])
    assert out.exit_code == 2 and "--token-file: cannot read" in out.output, out.output  # URLs accepted
    cfg.write_text(f"manager: [http://10.0.0.1:9]\nhost: h1\ntoken-file: {token}\n")
    out = runner.invoke(app, ["agent", "--config", str(cfg), "--backend", "sim"])
    assert out.exit_code == 2 and "plain HTTP" in out.output, out.output
    cfg.write_text("manager: [[x]]\nhost: h1\n")
    out = runner.invoke(app, ["agent", "--config", str(cfg)])
    assert out.exit_code == 2 and "manager: expected a value or a list of values" in out.output, out.output
