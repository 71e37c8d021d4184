"""Conntrack table alarms (docs/conntrack-limits.md): the agent's reader and levels, what the reporter
sends, the manager's host status and `/v1/status` summary, and `omniwall status`'s column."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from apihelpers import ACME_TWO_HOSTS, ADMIN_AND_AGENTS, issue_tokens, seeded_manager, yaml_docs
from fastapi.testclient import TestClient

from omniwall.agent.conntrack_usage import ConntrackUsage, ConntrackUsageReader, alarm_level
from omniwall.agent.reporter import Reporter
from omniwall.api.app import create_app
from omniwall.cli.server_cmds import _conntrack_cell
from omniwall.manager.service import Manager
from omniwall.store.memory import MemoryStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize(
    ("count", "maximum", "level"),
    [(0, 1000, "ok"), (799, 1000, "ok"), (800, 1000, "warning"), (949, 1000, "warning"),
     (950, 1000, "critical"), (1000, 1000, "critical"), (5, 0, "ok")],
)  # fmt: skip
def test_alarm_levels(count: int, maximum: int, level: str):
    assert alarm_level(count, maximum) == level


def test_reader_rereads_the_open_files(tmp_path: Path):
    (tmp_path / "nf_conntrack_count").write_text("12\n")
    (tmp_path / "nf_conntrack_max").write_text("100\n")
    r = ConntrackUsageReader(None, str(tmp_path))
    assert r.read() == ConntrackUsage(12, 100)
    (tmp_path / "nf_conntrack_count").write_text("97\n")  # same inode: pread sees the new value
    u = r.read()
    assert u == ConntrackUsage(97, 100) and u.alarm == "critical" and u.ratio == pytest.approx(0.97)
    r.close()
    assert ConntrackUsageReader(None, str(tmp_path / "absent")).read() is None


def test_reporter_sends_usage_when_it_moves():
    rep = Reporter(httpx.AsyncClient(), "http://127.0.0.1:1", "h1", "t")
    rep.set_realized(3, None)
    body = rep.build(None, ConntrackUsage(100, 10_000))
    assert body is not None and body["conntrack"] == {"count": 100, "max": 10_000}
    rep._sent_revision, rep._sent_error = 3, None
    rep._sent_conntrack = ConntrackUsage(100, 10_000)
    assert rep.build(None, ConntrackUsage(150, 10_000)) is None  # under 1% of the maximum: quiet
    assert rep.build(None, ConntrackUsage(200, 10_000))["conntrack"]["count"] == 200  # type: ignore[index]
    rep._sent_conntrack = ConntrackUsage(7_990, 10_000)
    assert rep.build(None, ConntrackUsage(8_000, 10_000)) is not None  # a new alarm level: at once


@pytest.fixture
def env() -> Iterator[tuple[TestClient, Manager, dict[str, str]]]:
    m = seeded_manager(MemoryStore(), yaml_docs(ACME_TWO_HOSTS))
    headers = {k: f"Bearer {v}" for k, v in issue_tokens(m, ADMIN_AND_AGENTS).items()}
    yield TestClient(create_app(m, watch=False)), m, headers


def test_host_status_carries_usage_and_alarm(env):
    c, m, h = env
    r = c.post(
        "/v1/hosts/h1/status",
        json={"realized_revision": 0, "conntrack": {"count": 250_000, "max": 262_144}},
        headers={"Authorization": h["h1"]},
    )
    assert r.status_code == 200, r.text
    assert r.json()["conntrack"] == {"count": 250_000, "max": 262_144, "ratio": 0.9537, "alarm": "critical"}
    st = c.get("/v1/status", headers={"Authorization": h["admin"]}).json()
    assert st["hosts"]["h1"]["conntrack"]["alarm"] == "critical"
    assert st["hosts"]["h2"]["conntrack"] is None  # never reported
    assert st["summary"]["conntrackAlarms"] == 1
    assert m.hosts.conntrack() == {"h1": r.json()["conntrack"]}  # what the metrics endpoint reads
    # a report without the field keeps the last known usage
    c.post("/v1/hosts/h1/status", json={"realized_revision": 0}, headers={"Authorization": h["h1"]})
    assert m.host_status("h1")["conntrack"]["count"] == 250_000
    bad = c.post(
        "/v1/hosts/h1/status",
        json={"realized_revision": 0, "conntrack": {"count": -1, "max": 10}},
        headers={"Authorization": h["h1"]},
    )
    assert bad.status_code == 422 and "count" in bad.text


def test_status_column():
    assert _conntrack_cell(None) == "-"
    assert _conntrack_cell({"count": 1, "max": 4, "ratio": 0.25, "alarm": "ok"}) == "25%"
    assert _conntrack_cell({"count": 85, "max": 100, "ratio": 0.85, "alarm": "warning"}) == "85% WARN"
    assert _conntrack_cell({"count": 96, "max": 100, "ratio": 0.96, "alarm": "critical"}) == "96% CRIT"
