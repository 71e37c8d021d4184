"""Several managers on one real etcd (issue 12): shared host status with liveness on leases, one
bootstrap token, token revocation through the watch, migrations carried on by another manager under an
election, 503 while etcd is away."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from apihelpers import auth
from etcdhelpers import Cluster, etcd_cluster, manager_processes, needs_etcd
from fastapi.testclient import TestClient

from omniwall.api.app import create_app
from omniwall.api.metrics import render
from omniwall.manager.audit import chained
from omniwall.manager.hostbook_etcd import EtcdHostStatusBook
from omniwall.manager.service import Manager
from omniwall.store import open_store
from omniwall.store.etcd import EtcdStore

pytestmark = [needs_etcd, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

WORLD = "\n---\n".join(
    [
        "kind: Tenant\nmetadata: {name: acme}",
        "kind: Host\nmetadata: {name: h1}",
        "kind: Host\nmetadata: {name: h2}",
    ]
)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Cluster]:
    with etcd_cluster(tmp_path) as cluster:
        yield cluster


def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> float:
    """Seconds until `check()` holds (fails after `timeout`)."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - t0


def managers(etcd: Cluster, n: int) -> list[Manager]:
    return [Manager(chained(open_store(etcd.url))) for _ in range(n)]


def close(*ms: Manager) -> None:
    for m in ms:
        m.stop_watch()
        m.store.close()


def test_host_status_is_shared_and_liveness_follows_the_lease(etcd: Cluster) -> None:
    m1, m2 = managers(etcd, 2)
    assert isinstance(m1.hosts, EtcdHostStatusBook) and isinstance(m2.hosts, EtcdHostStatusBook)
    m1.hosts.ttl = m2.hosts.ttl = 2  # type: ignore[attr-defined]
    admin, _ = m1.tokens.create("provider-admin", name="alice")
    agent, _ = m1.tokens.create("agent", host="h1")
    c1, c2 = TestClient(create_app(m1, watch=False)), TestClient(create_app(m2, watch=False))
    assert c1.post("/v1/apply", content=WORLD, headers=auth(admin)).status_code == 200
    m2.sync()
    # the agent of h1 streams from m1 and acks there; m2 shows it
    m1.hosts.connect("h1", m1.now_iso())
    desired = m1.desired.revision("h1")
    body = {"realized_revision": desired, "counters": [{"rule_id": 7, "packets": 3, "bytes": 90}],
            "conntrack": {"count": 90, "max": 100}}  # fmt: skip
    assert c1.post("/v1/hosts/h1/status", json=body, headers=auth(agent)).status_code == 200

    def on_m2() -> dict[str, object]:
        return c2.get("/v1/status", headers=auth(admin)).json()["hosts"]["h1"]

    eventually(
        lambda: on_m2()["connected"] is True and on_m2()["realizedRevision"] == desired, what="m2 sees h1"
    )
    assert on_m2()["inSync"] is True and on_m2()["conntrack"]["alarm"] == "warning"
    acked_at = on_m2()["realizedAt"]  # m1's time of the ack, shared
    assert acked_at is not None and acked_at == m1.hosts.get("h1").realized_at
    assert m2.hosts.counters()["h1"] == {7: (3, 90)}
    assert b"omniwall_hosts_connected 1.0" in render(c2.app.state.metrics)  # type: ignore[attr-defined]
    # counters alone are coalesced: 50 reports within a second are at most a couple of writes
    writes = m1.hosts.write_count  # type: ignore[attr-defined]
    for i in range(50):
        body["counters"] = [{"rule_id": 7, "packets": 4 + i, "bytes": 100 + i}]
        c1.post("/v1/hosts/h1/status", json=body, headers=auth(agent))
    assert m1.hosts.write_count - writes <= 2  # type: ignore[attr-defined]
    eventually(lambda: m2.hosts.counters()["h1"] == {7: (53, 149)}, what="coalesced counters reach m2")
    assert on_m2()["realizedAt"] == acked_at  # later reports of the same revision leave it
    # a clean disconnect shows at once elsewhere
    m1.hosts.disconnect("h1", m1.now_iso())
    took = eventually(lambda: on_m2()["connected"] is False, what="clean disconnect")
    assert took < 1.0
    # a manager that dies (its lease is no longer renewed) loses its hosts after the lease's TTL
    m1.hosts.connect("h2", m1.now_iso())
    eventually(lambda: m2.hosts.get("h2").connected > 0, what="h2 connected")
    book = m1.hosts
    assert isinstance(book, EtcdHostStatusBook)
    with book._cond:  # as if the process were killed: nothing renews its lease any more
        book._stopped = True
        book._cond.notify_all()
    took = eventually(lambda: m2.hosts.get("h2").connected == 0, timeout=10, what="lease expiry")
    assert 0.5 < took < 6
    assert m2.hosts.get("h1").realized_revision == desired  # the last report stays
    close(m1, m2)


def test_managers_starting_at_once_create_one_bootstrap_token(etcd: Cluster, tmp_path: Path) -> None:
    from omniwall.api.server import build

    n = 4
    start = threading.Barrier(n)
    written: list[Path | None] = [None] * n
    built: list[Manager] = []

    def run(i: int) -> None:
        d = tmp_path / f"m{i}"
        d.mkdir()
        start.wait()
        m, path = build(etcd.url, token_dir=d)
        built.append(m)
        written[i] = path

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    admins = [t for t in built[0].tokens.list() if t.role == "provider-admin"]
    assert len(admins) == 1, admins
    files = [p for p in written if p is not None]
    assert len(files) == 1
    token = files[0].read_text().strip()
    assert all(m.tokens.verify(token) is not None for m in built)  # the one token works everywhere
    # a restart of every manager creates nothing more
    again = build(etcd.url, token_dir=tmp_path / "m0")
    assert again[1] is None and len([t for t in again[0].tokens.list() if t.role == "provider-admin"]) == 1
    close(*built, again[0])


def test_a_revoked_token_stops_on_every_manager_within_one_watch_round_trip(etcd: Cluster) -> None:
    m1, m2 = managers(etcd, 2)
    c2 = TestClient(create_app(m2, watch=False))
    m2.start_watch(poll=2.0)  # a long poll: the watch, not the poll, must carry the revocation
    try:
        token, rec = m1.tokens.create("provider-admin", name="bob")
        eventually(lambda: c2.get("/v1/hosts", headers=auth(token)).status_code == 200, what="token valid")
        assert rec.id in m2.tokens._cached  # served from m2's cache from now on
        assert m1.tokens.revoke(rec.id)
        took = eventually(lambda: c2.get("/v1/hosts", headers=auth(token)).status_code == 401, what="revoked")
        assert took < 1.0, f"revocation took {took:.2f} s on the other manager"
        # rotation: the old secret stops at once there too, the new one works
        t3, r3 = m1.tokens.create("provider-admin", name="carol")
        eventually(lambda: c2.get("/v1/hosts", headers=auth(t3)).status_code == 200, what="t3 valid")
        rotated = m1.tokens.rotate(r3.id)
        assert rotated is not None
        took = eventually(lambda: c2.get("/v1/hosts", headers=auth(t3)).status_code == 401, what="rotated")
        assert took < 1.0
        assert c2.get("/v1/hosts", headers=auth(rotated[0])).status_code == 200
    finally:
        close(m1, m2)


def test_a_manager_without_etcd_answers_503_serves_agents_and_recovers(etcd: Cluster) -> None:
    m = Manager(chained(EtcdStore(etcd.endpoints, timeout=2)))
    admin, _ = m.tokens.create("provider-admin", name="alice")
    agent, _ = m.tokens.create("agent", host="h1")
    with TestClient(create_app(m), raise_server_exceptions=False) as c:  # with its watch
        assert c.post("/v1/apply", content=WORLD, headers=auth(admin)).status_code == 200
        assert c.get("/v1/hosts/h1/desired", headers=auth(agent)).status_code == 200  # token now cached
        before = c.get("/v1/hosts/h1/desired", headers=auth(agent)).json()
        for member in etcd.members:
            etcd.kill(member)
        r = c.post("/v1/apply", content="kind: Host\nmetadata: {name: h3}\n", headers=auth(admin))
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] and etcd.members[0].endpoint in r.json()["message"]
        # the agents keep getting their last state (and may ack it) while the store is away
        assert c.get("/v1/hosts/h1/desired", headers=auth(agent)).json() == before
        ack = {"realized_revision": before["revision"]}
        assert c.post("/v1/hosts/h1/status", json=ack, headers=auth(agent)).status_code == 200
        for member in etcd.members:
            etcd.start(member)  # same data dir
        etcd.wait_ready()

        def written() -> bool:
            r = c.post("/v1/apply", content="kind: Host\nmetadata: {name: h3}\n", headers=auth(admin))
            return r.status_code == 200

        eventually(written, timeout=20, what="writes after etcd came back")
        eventually(lambda: "h3" in m.host_names(), what="the model follows again")
        # the ack made while etcd was away reached etcd once it was back
        book = m.hosts
        assert isinstance(book, EtcdHostStatusBook) and book.flush(10)
        kv = book.rt.get("hosts/status/h1")
        assert kv is not None and f'"realizedRevision":{before["revision"]}' in kv.value
    m.store.close()


MIGRATION_WORLD = (
    WORLD
    + """
---
kind: Workload
metadata: {name: w1, tenant: acme}
spec: {host: h1, vnics: [{name: eth1}]}
---
kind: Workload
metadata: {name: w2, tenant: acme}
spec: {host: h1, vnics: [{name: eth2, ips: [10.0.0.2]}]}
"""
)


def test_migrations_of_a_killed_manager_are_rolled_back_or_carried_on(etcd: Cluster, tmp_path: Path) -> None:
    """kill -9 of the manager driving two migrations, one before the switch (prepare: rolled back) and
    one switching (carried on to done); another manager adopts both once it leads `migrations`."""
    m2 = Manager(chained(open_store(etcd.url)))
    admin, _ = m2.tokens.create("provider-admin", name="alice")
    h2_agent, _ = m2.tokens.create("agent", host="h2")
    c2 = TestClient(create_app(m2, watch=False))
    assert c2.post("/v1/apply", content=MIGRATION_WORLD, headers=auth(admin)).status_code == 200
    with manager_processes(tmp_path, etcd.url, env={"OMNIWALL_ETCD_LEASE_TTL": "2"}) as [p1]:
        c1 = httpx.Client(base_url=p1.url, headers=auth(admin), timeout=10)
        r = c1.post("/v1/workloads/w1/migrate", params={"tenant": "acme"}, json={"to": "h2"})
        assert r.status_code == 202, r.text
        # the destination's agent acks the placement (through p1): w1 has no address, so nothing to
        # export or import: it goes on to wait for the switch
        rev = c1.get("/v1/hosts/h2/desired", headers=auth(h2_agent)).json()["revision"]
        ack = c1.post("/v1/hosts/h2/status", json={"realized_revision": rev}, headers=auth(h2_agent))
        assert ack.status_code == 200

        def phase(name: str) -> str:
            m2.sync()
            mig = m2.migrations.get("acme", name)
            return mig.phase if mig is not None else ""

        eventually(lambda: phase("w1") == "switching", what="w1 switching")
        assert (
            c1.post("/v1/workloads/w2/migrate", params={"tenant": "acme"}, json={"to": "h2"}).status_code
            == 202
        )
        eventually(lambda: phase("w2") == "prepare", what="w2 in prepare")
        owner = m2.migrations.get("acme", "w1").owner  # type: ignore[union-attr]
        assert owner and owner != m2.id
        p1.kill()
    # m2 leads `migrations` once p1's lease has expired, and adopts both
    m2.coordination.start()
    from omniwall.manager.migration import Options

    opts = Options(prepare_timeout=1.0, command_timeout=1.0, switch_timeout=30.0)
    adopted: list[str] = []
    eventually(lambda: bool(adopted.extend(m2.migrations.adopt_orphans(opts)) or len(adopted) == 2),
               timeout=15, what="adoption")  # fmt: skip
    w1, w2 = m2.migrations.get("acme", "w1"), m2.migrations.get("acme", "w2")
    assert w1 is not None and w2 is not None and {w1.id, w2.id} == set(adopted)
    eventually(lambda: phase("w2") == "rolled-back", what="w2 rolled back")
    w2 = m2.migrations.get("acme", "w2")
    assert w2 is not None and w2.result == "failed" and "stopped while driving" in (w2.error or "")
    assert w2.owner == m2.id
    # the hypervisor reports the switch to the adopting manager: w1 finishes there
    assert c2.post(f"/v1/workloads/w1/migrate/{w1.id}/switched", params={"tenant": "acme"},
                   headers=auth(admin)).status_code == 200  # fmt: skip
    eventually(lambda: phase("w1") == "done", timeout=15, what="w1 done")
    w1 = m2.migrations.get("acme", "w1")
    assert w1 is not None and w1.result == "succeeded", w1
    assert m2.get("Workload", "acme", "w1").spec.host == "h2"  # type: ignore[union-attr]
    assert m2.get("Workload", "acme", "w2").spec.host == "h1"  # type: ignore[union-attr]
    # nothing adopts a finished migration again
    assert m2.migrations.adopt_orphans(opts) == []
    close(m2)


def test_agent_commands_reach_the_manager_holding_the_feed_and_answers_come_back(etcd: Cluster) -> None:
    m1, m2 = managers(etcd, 2)
    m2.migrations.commands.follow()  # as start_watch does
    out: dict[str, object] = {}

    def driver() -> None:  # m1 drives a migration; h1's agent streams from m2
        out["result"] = m1.migrations.commands.call("h1", "export_connections", {"addresses": []}, 10.0)

    t = threading.Thread(target=driver)
    t.start()
    lines: list[dict[str, object]] = []
    eventually(lambda: bool(lines.extend(m2.migrations.commands.take("h1")) or lines), what="relayed command")
    assert lines[0]["op"] == "export_connections" and m2.migrations.commands.take("h1") == []
    assert m2.migrations.commands.resolve("h1", str(lines[0]["id"]), {"entries": [{"x": 1}]})
    t.join(timeout=10)
    assert out["result"] == {"entries": [{"x": 1}]}
    # answered: the relay keys are gone, and no manager delivers it again
    assert m1.store.runtime().range("commands/")[0] == []  # type: ignore[attr-defined]
    eventually(lambda: not m2.migrations.commands._pending, what="relayed command dropped")
    close(m1, m2)


def test_watched_statuses_are_decoded_when_read_and_an_unreadable_one_is_skipped(etcd: Cluster) -> None:
    m1, m2 = managers(etcd, 2)
    b1, b2 = m1.hosts, m2.hosts
    assert isinstance(b1, EtcdHostStatusBook) and isinstance(b2, EtcdHostStatusBook)
    b2.get("h1")  # m2 follows the host keys
    b1.report("h1", m1.now_iso(), 5, "boom", [(3, 1, 2)], None)
    assert b1.flush()
    eventually(lambda: "h1" in b2._remote, what="the report watched by m2")
    with b2._cond:
        assert isinstance(b2._remote["h1"][1], str)  # kept as JSON: m2 did not need it yet
    st = b2.get("h1")
    assert (st.realized_revision, st.last_error, st.counters) == (5, "boom", {3: (1, 2)})
    with b2._cond:
        assert not isinstance(b2._remote["h1"][1], str)  # decoded once, kept
        assert not isinstance(b1._remote["h1"][1], str)  # the writer kept what it wrote
    # a value no manager wrote: skipped with its key named, the host reads as unknown
    b1.rt.write([("hosts/status/h2", "{not json", 0)], [])
    eventually(lambda: "h2" in b2._remote, what="the bad value watched")
    assert b2.get("h2").realized_revision == 0 and "h2" not in b2._remote
    close(m1, m2)


def _etcd_watchers(etcd: Cluster) -> int:
    """The watches open on the member the stores talk to (etcd's own gauge)."""
    text = etcd.client().get(f"{etcd.scheme}://{etcd.members[0].endpoint}/metrics").text
    return sum(
        int(float(line.split()[-1]))
        for line in text.splitlines()
        if line.startswith("etcd_debugging_mvcc_watcher_total")
    )


def test_a_manager_follows_the_store_and_its_runtime_keys_on_one_etcd_watch(etcd: Cluster) -> None:
    """Host status and agent commands ride on the store's watch of etcd's keyspace (each watch of it
    gets every ack of the fleet); a watch that starts over hands its followers a new snapshot."""
    before = _etcd_watchers(etcd)
    (m,) = managers(etcd, 1)
    book = m.hosts
    assert isinstance(book, EtcdHostStatusBook)
    snapshots: list[int] = []
    real = book._on_snapshot
    book._on_snapshot = lambda items: (snapshots.append(len(items)), real(items))  # type: ignore[method-assign]
    m.start_watch(poll=0.1)  # the model's watch and the agent commands'
    book.get("h1")  # the host keys are followed
    ostore = EtcdStore(etcd.endpoints)
    other = EtcdHostStatusBook(ostore.runtime(), "other")  # another manager's writes
    other.report("h1", m.now_iso(), 7, None, None, None)
    assert other.flush()
    eventually(lambda: book.get("h1").realized_revision == 7, what="the other manager's report")
    assert _etcd_watchers(etcd) - before == 1  # the model's, the host book's and the commands': one
    assert len(snapshots) == 1
    m.store._tail._reset_subs()  # type: ignore[attr-defined]  # as after a compaction: events may be lost
    eventually(lambda: len(snapshots) == 2, what="a new snapshot after the reset")
    other.report("h1", m.now_iso(), 8, None, None, None)
    assert other.flush()
    eventually(lambda: book.get("h1").realized_revision == 8, what="changes after the new snapshot")
    other.stop()
    ostore.close()
    close(m)
