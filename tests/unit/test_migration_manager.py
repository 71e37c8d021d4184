"""Live migration, manager + agents (sim backends) over real sockets: phases, placement on the destination,
conntrack entries carried by feed commands, spec.host moved, audit, rollback. No root needed."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from apihelpers import (
    ACME_TWO_HOSTS,
    ADMIN_AND_AGENTS,
    WEB1_DB1,
    WEB_TO_DB_SQL,
    issue_tokens,
    seeded_manager,
    serving,
    yaml_docs,
)

from omniwall.agent.main import Agent
from omniwall.api.app import create_app
from omniwall.dataplane.backend import ConnEntry
from omniwall.dataplane.memory_backend import MemoryBackend
from omniwall.manager.migration import FAULTS_ENV
from omniwall.manager.service import Manager
from omniwall.store.sqlite import SqliteStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# WEB_TO_DB_SQL's policy with one more rule: anyone may reach web on tcp/80
WORLD = yaml_docs(
    ACME_TWO_HOSTS,
    WEB1_DB1,
    WEB_TO_DB_SQL.rstrip("\n")
    + "\n  - {name: in, sources: [any], destinations: [web], services: [tcp/80], action: allow}",
)

ENTRY = ConnEntry(
    family=2, protocol=6, src="10.9.9.9", dst="10.0.0.1", sport=40000, dport=80, reply_src="10.0.0.1",
    reply_dst="10.9.9.9", reply_sport=80, reply_dport=40000, state="ESTABLISHED", timeout=300, mark=7,
)  # fmt: skip


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Any]]:
    store = SqliteStore(tmp_path / "m.db")
    m = seeded_manager(store, WORLD)
    tokens = issue_tokens(m, ADMIN_AND_AGENTS)
    try:
        with serving(create_app(m, watch=False)) as url, _agents(m, url, tokens) as (backends, client):
            yield {"m": m, "client": client, "backends": backends}
    finally:
        store.close()


@contextlib.contextmanager
def _agents(
    m: Manager, url: str, tokens: dict[str, str]
) -> Iterator[tuple[dict[str, MemoryBackend], httpx.Client]]:
    """An agent per host (sim backends, h1 holding ENTRY) in one event loop, and an admin client."""
    backends = {h: MemoryBackend(h) for h in ("h1", "h2")}
    backends["h1"].import_connections([ENTRY])
    loop = asyncio.new_event_loop()
    agents: list[Agent] = []

    async def run_agents() -> None:
        for h, be in backends.items():
            agents.append(Agent(url, h, tokens[h], be, watch_addresses=False, counters_interval=3600))
        await asyncio.gather(*(a.run() for a in agents))

    lt = threading.Thread(target=loop.run_until_complete, args=(run_agents(),))
    lt.start()
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens['admin']}"}, timeout=30)
    try:
        _until(lambda: all(m.host_status(h)["inSync"] and m.host_status(h)["connected"] for h in backends))
        yield backends, client
    finally:
        client.close()
        for a in agents:
            loop.call_soon_threadsafe(a.stop)
        lt.join(timeout=10)
        loop.close()


def _until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _vnics(m: Manager, host: str) -> set[str]:
    st = m.desired.snapshot(host)
    return {v.workload for v in st.vnics} if st else set()


def _migration(c: httpx.Client) -> dict[str, Any]:
    r = c.get("/v1/workloads/web1/migration", params={"tenant": "acme"})
    assert r.status_code == 200, r.text
    return r.json()


def test_migration_phases_overlay_entries_and_audit(world: dict[str, Any]) -> None:
    m, c, be = world["m"], world["client"], world["backends"]
    r = c.post("/v1/workloads/web1/migrate", params={"tenant": "acme"}, json={"to": "h2"})
    assert r.status_code == 202, r.text
    mid = r.json()["id"]
    _until(lambda: _migration(c)["phase"] == "switching")
    # the destination enforces the workload's policy already; the source still does
    assert "acme/web1" in _vnics(m, "h2") and "acme/web1" in _vnics(m, "h1")
    assert be["h2"].realized().vnic_map().keys() >= {v.ifname for v in be["h1"].realized().vnics}
    assert ENTRY in be["h2"].connections()  # imported, mark and all
    r = c.post(f"/v1/workloads/web1/migrate/{mid}/switched", params={"tenant": "acme"})
    assert r.status_code == 200, r.text
    _until(lambda: _migration(c)["result"] != "running")
    mig = _migration(c)
    assert mig["result"] == "succeeded", mig
    assert [p["phase"] for p in mig["phases"]] == [
        "prepare", "export", "import", "switching", "switched", "finalize", "done",
    ]  # fmt: skip
    assert mig["stats"]["exported"] == 1 and mig["stats"]["imported"] == 1
    wl = c.get("/v1/workloads/web1", params={"tenant": "acme"}).json()
    assert wl["spec"]["host"] == "h2" and wl["status"]["migration"]["id"] == mid
    assert _vnics(m, "h1") == set() and "acme/web1" in _vnics(m, "h2")
    _until(lambda: not be["h1"].realized().vnics)
    assert ENTRY not in be["h1"].connections()  # flushed on the source
    audit = c.get("/v1/audit", params={"name": "web1"}).json()["items"]
    phases = [
        e["extra"]["phase"] for e in audit if e["action"] == "migrate" and "phase" in e.get("extra", {})
    ]
    assert phases[0] == "prepare" and phases[-1] == "done"
    assert any(e["action"] == "migrate" and "spec.host" in e["changed"] for e in audit)
    # a second migration back works, a migration to where it is does not
    assert (
        c.post("/v1/workloads/web1/migrate", params={"tenant": "acme"}, json={"to": "h2"}).status_code == 422
    )


def test_failed_import_rolls_back(world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULTS_ENV, "1")
    m, c, be = world["m"], world["client"], world["backends"]
    r = c.post(
        "/v1/workloads/web1/migrate",
        params={"tenant": "acme"},
        json={"to": "h2", "failAt": "import", "wait": True},
    )
    assert r.status_code == 200, r.text
    mig = r.json()
    assert mig["result"] == "failed" and "import" in mig["error"]
    assert [p["phase"] for p in mig["phases"]][-2:] == ["rollback", "rolled-back"]
    assert m.get("Workload", "acme", "web1").spec.host == "h1"  # type: ignore[attr-defined]
    assert _vnics(m, "h2") == {"acme/db1"} and "acme/web1" in _vnics(m, "h1")
    _until(lambda: {v.workload for v in be["h2"].realized().vnics} == {"acme/db1"})
    assert ENTRY not in be["h2"].connections() and ENTRY in be["h1"].connections()


def test_fault_hook_needs_the_env_and_unknown_host_is_422(world: dict[str, Any]) -> None:
    c = world["client"]
    r = c.post("/v1/workloads/web1/migrate", params={"tenant": "acme"}, json={"to": "h2", "failAt": "import"})
    assert r.status_code == 422
    r = c.post("/v1/workloads/web1/migrate", params={"tenant": "acme"}, json={"to": "h9"})
    assert r.status_code == 422 and "h9" in r.text
    assert c.get("/v1/workloads/db1/migration", params={"tenant": "acme"}).status_code == 404


def test_a_migration_record_is_a_placement_the_compiler_sends_as_deltas(tmp_path: Path) -> None:
    """The destination's state gets the workload's vNIC (the same as on its own host) with its rules and
    sets, as one compiler delta; the record's end takes them away again; the source is untouched."""
    import json

    m = seeded_manager(SqliteStore(tmp_path / "m.db"), WORLD)
    h1, h2 = m.desired.snapshot("h1"), m.desired.snapshot("h2")
    assert h1 is not None and h2 is not None
    rec = {
        "id": "0123456789ab", "tenant": "acme", "name": "web1", "source": "h1", "destination": "h2",
        "started": "2026-11-27T00:00:00.000Z", "phase": "prepare", "result": "running",
    }  # fmt: skip
    m.store.put("migrations/acme/web1", json.dumps(rec))
    m.sync()
    assert m.migrations.placements() == {("acme", "web1"): "h2"}
    assert m.desired.snapshot("h1") == h1  # no new revision for the source
    (d,) = m.desired.deltas_since("h2", h2.revision) or []
    (web1,) = [v for v in h1.vnics if v.workload == "acme/web1"]
    assert [u.vnic for u in d.vnic_updates] == [web1]
    placed = m.desired.snapshot("h2")
    assert placed is not None and placed.vnic_map()[web1.ifname] == web1
    assert set(web1.egress + web1.ingress) <= placed.rule_map().keys()
    assert {s.name for s in placed.sets} >= {s for r in placed.rules for s in (r.src_set, r.dst_set) if s}
    m.store.put("migrations/acme/web1", json.dumps({**rec, "phase": "rolled-back", "result": "failed"}))
    m.sync()
    assert m.migrations.placements() == {}
    back = m.desired.snapshot("h2")
    assert back is not None and back.vnics == h2.vnics and back.rules == h2.rules and back.sets == h2.sets
    m.store.close()


def test_cli_migrate_reports_a_switch_timeout_as_failure(world: dict[str, Any]) -> None:
    from typer.testing import CliRunner

    from omniwall.cli.main import app as cli

    c, m = world["client"], world["m"]
    token = c.headers["Authorization"].split(" ", 1)[1]
    args = ["migrate", "web1", "--to", "h2", "-t", "acme", "--switch-timeout", "0.5"]
    res = CliRunner().invoke(cli, [*args, "--server", str(c.base_url), "--token", token])
    assert res.exit_code == 1, res.output
    assert "switching" in res.output and "did not reach h2" in res.output
    assert m.get("Workload", "acme", "web1").spec.host == "h1"  # type: ignore[attr-defined]
    assert "acme/web1" not in _vnics(m, "h2")


def test_a_running_record_without_its_thread_keeps_the_placement_and_can_be_resumed(
    world: dict[str, Any],
) -> None:
    """What a manager restart mid-migration leaves: the record says `switching`, nobody drives it."""
    import json

    m, c = world["m"], world["client"]
    stale = {
        "id": "deadbeef0000", "tenant": "acme", "name": "web1", "source": "h1", "destination": "h2",
        "started": "2026-11-27T00:00:00.000Z", "phase": "switching", "result": "running",
    }  # fmt: skip
    m.store.put("migrations/acme/web1", json.dumps(stale))
    m.sync()
    assert "acme/web1" in _vnics(m, "h2") and "acme/web1" in _vnics(m, "h1")  # protected on both
    r = c.post("/v1/workloads/web1/migrate", params={"tenant": "acme"}, json={"to": "h2"})
    assert r.status_code == 202, r.text
    mid = r.json()["id"]
    assert mid != "deadbeef0000"
    _until(lambda: _migration(c)["phase"] == "switching")
    c.post(f"/v1/workloads/web1/migrate/{mid}/switched", params={"tenant": "acme"})
    _until(lambda: _migration(c)["result"] != "running")
    assert _migration(c)["result"] == "succeeded"
    assert _vnics(m, "h1") == set()


def test_who_may_migrate_and_answer_commands(world: dict[str, Any]) -> None:
    m, c = world["m"], world["client"]
    url = str(c.base_url)

    def as_(token: str) -> httpx.Client:
        return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10)

    viewer = m.tokens.create("tenant-viewer", tenant="acme")[0]
    other = m.tokens.create("tenant-admin", tenant="other")[0]
    agent1 = m.tokens.create("agent", host="h1")[0]
    body = {"to": "h2"}
    with as_(viewer) as v, as_(other) as o, as_(agent1) as a:
        r = v.post("/v1/workloads/web1/migrate", params={"tenant": "acme"}, json=body)
        assert r.status_code == 403 and r.json()["permission"] == "resources.write"
        assert o.post("/v1/workloads/web1/migrate", params={"tenant": "acme"}, json=body).status_code == 404
        assert o.get("/v1/workloads/web1/migration", params={"tenant": "acme"}).status_code == 404
        assert a.post("/v1/workloads/web1/migrate", params={"tenant": "acme"}, json=body).status_code == 403
        assert a.post("/v1/hosts/h2/commands/x", json={}).status_code == 403  # another host's
        assert a.post("/v1/hosts/h1/commands/x", json={}).status_code == 404  # no such command
    assert m.migrations.get("acme", "web1") is None  # nothing was started
