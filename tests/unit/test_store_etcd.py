"""EtcdStore on a real etcd (Debian's binary on loopback): what only a networked, shared store can get
wrong. The protocol's semantics run on etcd in test_store_semantics.py."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from apihelpers import auth
from etcdhelpers import Cluster, etcd_cluster, etcd_server_cert, needs_etcd
from fastapi.testclient import TestClient

from omniwall.api.app import create_app
from omniwall.manager.audit import chained
from omniwall.manager.service import Manager
from omniwall.store import CompactedError, Compare, Put, StoreError, open_store
from omniwall.store.etcd import EtcdStore, parse_endpoints

pytestmark = [needs_etcd, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Cluster]:
    with etcd_cluster(tmp_path) as cluster:
        yield cluster


@pytest.fixture
def store(etcd: Cluster) -> Iterator[EtcdStore]:
    s = EtcdStore(etcd.endpoints)
    yield s
    s.close()


def test_watch_resumes_exactly_after_a_gap(store: EtcdStore) -> None:
    for i in range(5):
        store.put(f"k/{i}", str(i))
    seen = []
    for e in store.watch(1, poll=0.05):
        seen.append(e)
        if len(seen) == 3:
            break  # the watcher goes away mid-stream
    resume_at = seen[-1].revision + 1
    # the gap: writes while nobody watches, one of them a txn of two keys
    store.txn([], [Put("k/a", "x"), Put("k/b", "y")])
    store.delete("k/0")
    rest = []
    for e in store.watch(resume_at, poll=0.05):
        rest.append(e)
        if len(rest) == 5:
            break
    got = [(e.revision, e.type, e.key) for e in seen + rest]
    assert got == [
        (1, "put", "k/0"),
        (2, "put", "k/1"),
        (3, "put", "k/2"),
        (4, "put", "k/3"),
        (5, "put", "k/4"),
        (6, "put", "k/a"),
        (6, "put", "k/b"),
        (7, "delete", "k/0"),
    ]


def test_watch_behind_compaction_raises_and_resync_from_a_snapshot_works(store: EtcdStore) -> None:
    for i in range(6):
        store.put("obj", str(i))  # revisions 1..6
    store.compact(5)
    assert store.compacted_revision() == 5
    with pytest.raises(CompactedError) as err:
        next(iter(store.watch(3, poll=0.05)))
    assert (err.value.requested, err.value.compacted) == (3, 5)
    # the resync a caller does: read a snapshot, then watch from its revision + 1
    items, rev = store.range("")
    assert [(kv.key, kv.value) for kv in items] == [("obj", "5")]
    store.put("obj", "6")
    assert [(e.revision, e.value) for e in store.events(rev + 1)] == [(7, "6")]
    # history keeps the last change before the compaction point (as SQLite does), then every later one
    assert [(e.revision, e.value) for e in store.history("obj")] == [(4, "3"), (5, "4"), (6, "5"), (7, "6")]


def test_txn_conflict_between_two_clients(etcd: Cluster) -> None:
    a, b = EtcdStore(etcd.endpoints), EtcdStore(etcd.endpoints)
    r = a.put("policy", "v1")
    seen_by_b = b.get("policy")
    assert seen_by_b is not None and seen_by_b.mod_revision == r
    assert a.txn([Compare("policy", r)], [Put("policy", "from-a")]).succeeded
    lost = b.txn([Compare("policy", r)], [Put("policy", "from-b")])
    assert not lost.succeeded and lost.failed == (Compare("policy", r),)
    assert b.get("policy").value == "from-a"  # type: ignore[union-attr]
    # creating a key that must not exist: the second creator loses
    assert a.txn([Compare("new", 0)], [Put("new", "a")]).succeeded
    assert not b.txn([Compare("new", 0)], [Put("new", "b")]).succeeded
    a.close()
    b.close()


def test_concurrent_writers_lose_no_update(etcd: Cluster) -> None:
    """Two clients increment one counter with compare-and-swap: every success counts, exactly once."""
    clients = [EtcdStore(etcd.endpoints), EtcdStore(etcd.endpoints)]
    clients[0].put("counter", "0")
    wins = [0, 0]

    def worker(i: int) -> None:
        s = clients[i]
        while wins[i] < 15:
            kv = s.get("counter")
            assert kv is not None
            if s.txn(
                [Compare("counter", kv.mod_revision)], [Put("counter", str(int(kv.value) + 1))]
            ).succeeded:
                wins[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    final = clients[0].get("counter")
    assert final is not None and int(final.value) == 30
    assert final.mod_revision == 31 == clients[1].revision()  # one revision per successful txn
    assert [e.value for e in clients[1].history("counter")] == [str(i) for i in range(31)]
    for c in clients:
        c.close()


def test_prefix_isolates_stores_sharing_one_etcd(etcd: Cluster) -> None:
    a = EtcdStore(etcd.endpoints, prefix="/a/")
    b = EtcdStore(etcd.endpoints, prefix="/b/")
    a.put("k", "in a")
    b.put("k", "in b")
    b.put("other", "x")
    assert a.get("k").value == "in a"  # type: ignore[union-attr]
    assert [kv.key for kv in a.range("")[0]] == ["k"]
    assert [(e.revision, e.key, e.value) for e in a.events(0)] == [(1, "k", "in a")]
    # b's writes moved the shared revision: a's revision follows etcd's, strictly increasing
    assert a.revision() == b.revision() == 3
    assert a.put("k2", "y") == 4
    a.close()
    b.close()


def test_manager_apply_rollback_history_audit_on_etcd(etcd: Cluster) -> None:
    store = chained(open_store(etcd.url))  # as `omniwall manager --store etcd://...` opens it
    m = Manager(store)
    token, _ = m.tokens.create("provider-admin", name="alice")
    c = TestClient(create_app(m, watch=False))
    h = auth(token)
    base = "kind: Tenant\nmetadata: {name: acme}\n---\nkind: Host\nmetadata: {name: h1}\n"
    assert c.post("/v1/apply", content=base, headers=h).status_code == 200

    def workload(ip: str) -> dict[str, object]:
        return {
            "kind": "Workload",
            "metadata": {"name": "web1", "tenant": "acme", "labels": {"tier": "web"}},
            "spec": {"host": "h1", "vnics": [{"name": "eth0", "ips": [ip]}]},
        }

    r = c.post("/v1/workloads", json=workload("10.0.0.1"), headers=h)
    assert r.status_code == 200, r.text
    r1 = r.json()["metadata"]["revision"]
    c.put("/v1/workloads/web1", json=workload("10.0.0.2"), headers=h)
    hist = c.get("/v1/workloads/web1/history", params={"tenant": "acme"}, headers=h).json()["items"]
    assert [it["object"]["spec"]["vnics"][0]["ips"][0] for it in hist] == ["10.0.0.1", "10.0.0.2"]
    r = c.post("/v1/workloads/web1/rollback", params={"tenant": "acme"}, json={"revision": r1}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["object"]["spec"]["vnics"][0]["ips"] == ["10.0.0.1"]
    assert r.json()["revision"] == m.store.revision()
    audit = c.get("/v1/audit", params={"kind": "workload", "name": "web1"}, headers=h).json()["items"]
    assert [e["action"] for e in audit] == ["create", "update", "rollback"]
    assert c.get("/v1/audit/verify", headers=h).json()["ok"] is True
    # a second manager on the same etcd sees it all (state is in etcd, not in the process)
    m2 = Manager(chained(open_store(etcd.url)))
    assert m2.revision == m.store.revision()
    c2 = TestClient(create_app(m2, watch=False))
    got = c2.get("/v1/workloads/web1", params={"tenant": "acme"}, headers=h)
    assert got.status_code == 200 and got.json()["spec"]["vnics"][0]["ips"] == ["10.0.0.1"]
    # compacted history: rollback answers 410, as on SQLite
    m.store.compact(m.store.revision())
    r = c.post("/v1/workloads/web1/rollback", params={"tenant": "acme"}, json={"revision": r1}, headers=h)
    assert r.status_code == 410 and "compacted" in r.json()["message"]
    m.store.close()
    m2.store.close()


def test_unreachable_store_is_a_clear_startup_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"127\.0\.0\.1:9.*refused"):
        open_store("etcd://127.0.0.1:9")
    with pytest.raises(ValueError, match="no port"):
        parse_endpoints("etcd://127.0.0.1")
    out = subprocess.run(
        [sys.executable, "-m", "omniwall.cli.main", "manager", "--store", "etcd://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 1
    assert "error: store etcd://127.0.0.1:9: no etcd endpoint answered" in out.stderr
    assert "Traceback" not in out.stderr


def test_not_an_etcd_endpoint_is_named(tmp_path: Path) -> None:
    from apihelpers import serving

    with serving(create_app(Manager(open_store(":memory:")), watch=False)) as url:
        err = pytest.raises(StoreError, match=f"{url} is not an etcd v3 gateway")
        with err:
            EtcdStore([url])


def test_failover_to_the_next_endpoint(etcd: Cluster) -> None:
    dead = "http://127.0.0.1:9"
    s = EtcdStore([dead, *etcd.endpoints])
    assert s.put("k", "v") == 1
    assert s.get("k").value == "v"  # type: ignore[union-attr]
    s.close()
    with httpx.Client() as c:  # the store writes under its prefix only
        r = c.post(f"{etcd.endpoints[0]}/v3/kv/range", json={"key": "AA==", "range_end": "AA=="})
        keys = [kv["key"] for kv in r.json()["kvs"]]
    assert keys == ["L29tbml3YWxsL2s="]  # base64 of /omniwall/k


def _leader(cluster: Cluster) -> int:
    """Index of the member that is the raft leader (asked through the maintenance API)."""
    for i, m in enumerate(cluster.members):
        if m.proc is None or m.proc.poll() is not None:
            continue
        st = httpx.post(f"http://{m.endpoint}/v3/maintenance/status", json={}, timeout=2).json()
        if st["header"]["member_id"] == st["leader"]:
            return i
    raise AssertionError("no leader")


def test_leader_kill_during_writes_loses_nothing_acknowledged(tmp_path: Path) -> None:
    with etcd_cluster(tmp_path, size=3) as cluster:
        s = EtcdStore(cluster.endpoints, timeout=3)
        acked: list[tuple[str, int]] = []
        failures = 0
        killed = False
        i = 0
        deadline = time.monotonic() + 40
        while len(acked) < 60 and time.monotonic() < deadline:
            if len(acked) == 20 and not killed:
                cluster.kill(cluster.members[_leader(cluster)])  # kill -9 mid-burst
                killed = True
            key = f"w/{i}"
            i += 1
            try:
                # create-only: a write whose answer was lost is never applied twice under a new revision
                res = s.txn([Compare(key, 0)], [Put(key, str(i))])
            except StoreError:
                failures += 1
                time.sleep(0.05)
                continue
            assert res.succeeded
            acked.append((key, res.revision))
        assert killed and len(acked) == 60, f"writes did not resume after the leader died ({failures} failed)"
        revs = [r for _, r in acked]
        assert revs == sorted(set(revs))  # no duplicate revision, strictly increasing
        items, _ = s.range("w/")
        stored = {kv.key: kv.mod_revision for kv in items}
        for key, rev in acked:
            assert stored.get(key) == rev, f"acknowledged write {key}@{rev} lost"
        s.close()


def test_kill_9_of_etcd_mid_burst_keeps_every_acknowledged_txn(tmp_path: Path) -> None:
    """etcd fsyncs before it answers: after kill -9 and a restart on the same data dir, every
    acknowledged txn is there, whole (its three keys agree), and revisions go on without a gap."""
    with etcd_cluster(tmp_path) as cluster:
        member = cluster.members[0]
        s = EtcdStore(cluster.endpoints, timeout=3)
        acked: list[tuple[int, int]] = []
        stop = threading.Event()

        def writer() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                ops = [Put(f"a/{i % 7}", str(i)), Put(f"b/{i % 7}", str(i)), Put("last", str(i))]
                try:
                    rev = s.txn([], ops).revision
                except StoreError:
                    return  # etcd is gone: this txn is not acknowledged
                acked.append((i, rev))

        t = threading.Thread(target=writer)
        t.start()
        deadline = time.monotonic() + 20
        while len(acked) < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        cluster.kill(member)  # mid-stream: the writer is sending its next txn
        t.join(timeout=10)
        stop.set()
        assert len(acked) >= 100, "writer made no progress"
        cluster.start(member)  # same data dir
        cluster.wait_ready()
        last_i, last_rev = acked[-1]
        committed = int(s.get("last").value)  # type: ignore[union-attr]
        assert committed >= last_i and s.revision() >= last_rev
        assert s.revision() == committed  # one revision per txn, none lost or half counted
        for k in range(7):
            a, b = s.get(f"a/{k}"), s.get(f"b/{k}")
            assert a is not None and b is not None
            assert (a.value, a.mod_revision) == (b.value, b.mod_revision)
        s.close()


def test_two_managers_on_one_etcd(etcd: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    """Two manager processes' worth of state on one etcd: writes, conflicts, revocation, resync."""
    m1, m2 = Manager(chained(open_store(etcd.url))), Manager(chained(open_store(etcd.url)))
    c1, c2 = TestClient(create_app(m1, watch=False)), TestClient(create_app(m2, watch=False))
    admin, _ = m1.tokens.create("provider-admin", name="alice")
    h = auth(admin)
    base = "kind: Tenant\nmetadata: {name: acme}\n---\nkind: Host\nmetadata: {name: h1}\n"
    assert c1.post("/v1/apply", content=base, headers=h).status_code == 200

    def workload(name: str, ip: str, rev: int | None = None) -> dict[str, object]:
        md: dict[str, object] = {"name": name, "tenant": "acme"}
        if rev is not None:
            md["revision"] = rev
        return {
            "kind": "Workload",
            "metadata": md,
            "spec": {"host": "h1", "vnics": [{"name": "e", "ips": [ip]}]},
        }

    m2.sync()
    rev = c1.post("/v1/workloads", json=workload("web1", "10.0.0.1"), headers=h).json()["metadata"][
        "revision"
    ]
    m2.sync()
    # both managers read web1 at `rev`; the first writer wins, the second gets 409 even though its own
    # model has not seen the first write (the compare runs in the etcd transaction)
    assert c1.put("/v1/workloads/web1", json=workload("web1", "10.0.0.2", rev), headers=h).status_code == 200
    r = c2.put("/v1/workloads/web1", json=workload("web1", "10.0.0.3", rev), headers=h)
    assert r.status_code == 409, r.text
    # m2 follows m1's writes through the etcd watch
    m2.start_watch(poll=0.1)
    try:
        assert c1.post("/v1/workloads", json=workload("web2", "10.0.0.9"), headers=h).status_code == 200
        deadline = time.monotonic() + 10
        while c2.get("/v1/workloads/web2", params={"tenant": "acme"}, headers=h).status_code != 200:
            assert time.monotonic() < deadline, "m2 never saw m1's write"
            time.sleep(0.05)
        # a token revoked through m1 stops working on m2 within a watch round
        t2, rec = m1.tokens.create("provider-admin", name="bob")
        assert c2.get("/v1/hosts", headers=auth(t2)).status_code == 200  # now cached by m2
        assert m1.tokens.revoke(rec.id)
        deadline = time.monotonic() + 10
        while c2.get("/v1/hosts", headers=auth(t2)).status_code != 401:
            assert time.monotonic() < deadline, "revoked token still accepted by m2"
            time.sleep(0.05)
    finally:
        m2.stop_watch()
    # a manager that fell behind a compaction reloads its model instead of missing changes
    m3 = Manager(chained(open_store(etcd.url)))
    c1.delete("/v1/workloads/web2", params={"tenant": "acme"}, headers=h)
    c1.post("/v1/workloads", json=workload("web3", "10.0.0.7"), headers=h)
    m1.store.compact(m1.store.revision())
    with caplog.at_level("WARNING"):
        m3.sync()  # m3 last saw the revision before the delete: those events are compacted away
    assert "fell behind a compaction" in caplog.text
    c3 = TestClient(create_app(m3, watch=False))
    assert c3.get("/v1/workloads/web2", params={"tenant": "acme"}, headers=h).status_code == 404
    assert c3.get("/v1/workloads/web1", params={"tenant": "acme"}, headers=h).status_code == 200
    assert c3.get("/v1/workloads/web3", params={"tenant": "acme"}, headers=h).status_code == 200
    for m in (m1, m2, m3):
        m.store.close()  # and their watches on etcd


def test_the_in_memory_tail_agrees_with_etcds_history_also_across_a_restart(tmp_path: Path) -> None:
    """`events` answers recent revisions from one long-lived watch (the tail); it must return exactly
    what a fresh read of etcd's history returns, for every start and page size, also after the etcd it
    follows was killed and restarted."""
    with etcd_cluster(tmp_path) as cluster:
        s = EtcdStore(cluster.endpoints, timeout=3)
        s.put("seed", "0")
        s.events(0)  # starts the tail
        deadline = time.monotonic() + 10
        while not s._tail.running():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        start = s._tail._start

        def burst(n: int) -> None:
            for i in range(n):
                s.txn([], [Put(f"t/{i % 3}", str(i)), Put(f"u/{i}", "x")])
                if i % 4 == 0:
                    s.delete(f"u/{i}")

        burst(12)
        cluster.kill(cluster.members[0])
        cluster.start(cluster.members[0])
        cluster.wait_ready()
        burst(8)
        head = s.revision()
        history = s._events(start)  # a fresh read of etcd's history (no tail)
        assert len(history) == 20 * 2 + 5  # two puts per txn, and the deletes of i = 0, 4, 8, 0, 4
        assert s._tail.wait(head, 5) and s._tail._rev >= head
        for r in range(start, head + 2):
            want = [e for e in history if e.revision >= r]
            assert s.events(r) == want, r
            for limit in (1, 3):
                page = want[:limit]
                page += [e for e in want[limit:] if page and e.revision == page[-1].revision]
                assert s.events(r, limit=limit) == page, (r, limit)
        assert s._tail._start == start  # served by the tail: it resumed, it did not start over
        s.close()


def test_the_tail_stays_bounded_and_older_revisions_come_from_etcd(store: EtcdStore) -> None:
    store._tail.MAX_EVENTS = 8  # tiny, to see it drop old events
    store.put("seed", "0")
    store.events(0)  # starts the tail
    deadline = time.monotonic() + 10
    while not store._tail.running():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    first = store._tail._start
    for i in range(30):
        store.txn([], [Put(f"k/{i % 5}", str(i)), Put("n", str(i))])
    head = store.revision()
    assert store._tail.wait(head, 5)
    assert len(store._tail._events) <= 8 and store._tail._start > first  # it dropped whole revisions
    history = store._events(first)
    for r in range(first, head + 1):
        assert store.events(r) == [e for e in history if e.revision >= r], r


def test_etcd_over_tls_with_client_certificates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from omniwall import pki

    d = tmp_path / "pki"
    ca = pki.init_ca(d)
    server_crt, server_key = etcd_server_cert(d)
    client = pki.issue_host(d, "manager-1")
    tls = (ca.cert, server_crt, server_key, client.cert, client.key)
    with etcd_cluster(tmp_path, tls=tls) as cluster:
        url = "etcd://" + ",".join(m.endpoint for m in cluster.members)  # https:// implied by the env
        monkeypatch.setenv("OMNIWALL_ETCD_CA", str(ca.cert))
        monkeypatch.setenv("OMNIWALL_ETCD_CERT", str(client.cert))
        monkeypatch.setenv("OMNIWALL_ETCD_KEY", str(client.key))
        s = open_store(url)
        assert s.put("k", "v") == 1
        assert [e.key for e in s.events(1)] == ["k"]
        s.close()
        monkeypatch.delenv("OMNIWALL_ETCD_CERT")
        monkeypatch.delenv("OMNIWALL_ETCD_KEY")
        with pytest.raises(StoreError, match=f"store {url}: no etcd endpoint answered"):
            open_store(url)  # no client certificate: etcd refuses the handshake


def test_a_manager_that_loses_etcd_answers_503_and_writes_nothing(etcd: Cluster) -> None:
    store = chained(EtcdStore(etcd.endpoints, timeout=2))
    m = Manager(store)
    token, _ = m.tokens.create("provider-admin", name="alice")
    c = TestClient(create_app(m, watch=False), raise_server_exceptions=False)
    h = auth(token)
    base = "kind: Tenant\nmetadata: {name: acme}\n---\nkind: Host\nmetadata: {name: h1}\n"
    assert c.post("/v1/apply", content=base, headers=h).status_code == 200
    before = m.revision
    for member in etcd.members:
        etcd.kill(member)
    r = c.post("/v1/apply", content="kind: Host\nmetadata: {name: h2}\n", headers=h)
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"] == "1" and "store is unavailable" in r.json()["message"]
    assert m.revision == before  # the model did not move on a write the store never took
    store.close()


def test_a_write_larger_than_one_etcd_transaction_is_413_and_writes_nothing(etcd: Cluster) -> None:
    # the fixture's etcd keeps the default --max-txn-ops (128): one apply of 200 objects is over it
    store = chained(EtcdStore(etcd.endpoints, timeout=5))
    m = Manager(store)
    token, _ = m.tokens.create("provider-admin", name="alice")
    c = TestClient(create_app(m, watch=False), raise_server_exceptions=False)
    h = auth(token)
    before = store.revision()
    docs = "---\n".join(f"kind: Host\nmetadata: {{name: h{i}}}\n" for i in range(200))
    r = c.post("/v1/apply", content=docs, headers=h)
    assert r.status_code == 413, r.text
    body = r.json()
    assert "operations" in body["message"] and "--max-txn-ops" in body["message"]
    assert body["errors"][0]["path"] == "body"
    assert store.revision() == before  # nothing half applied
    assert c.get("/v1/hosts", headers=h).json()["items"] == []
    store.close()
