"""Store semantics, run against every implementation (SQLite, memory and etcd must agree)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcdhelpers import needs_etcd

from omniwall.store import CompactedError, Compare, Delete, FutureRevisionError, Put, Store
from omniwall.store.memory import MemoryStore
from omniwall.store.sqlite import SqliteStore


@pytest.fixture(params=["sqlite", "memory", pytest.param("etcd", marks=needs_etcd)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "etcd":
        from etcdhelpers import etcd_cluster

        from omniwall.store.etcd import EtcdStore

        with etcd_cluster(tmp_path) as cluster:  # a fresh cluster: revisions start at 0 as elsewhere
            es = EtcdStore(cluster.endpoints)
            yield es
            es.close()
        return
    s: Store = SqliteStore(tmp_path / "store.db") if request.param == "sqlite" else MemoryStore()
    yield s
    s.close()


def test_every_write_bumps_one_global_revision(store: Store) -> None:
    assert store.revision() == 0
    assert store.put("a", "1") == 1
    assert store.put("b", "1") == 2
    assert store.put("a", "2") == 3
    kv = store.get("a")
    assert kv is not None
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == ("2", 1, 3, 2)
    assert store.delete("a") == 4
    assert store.get("a") is None
    assert store.delete("a") is None  # absent: no write, no revision
    assert store.revision() == 4


def test_range_is_sorted_prefix_scoped_and_pages(store: Store) -> None:
    for k in ["p/c", "p/a", "q/x", "p/b", "pz"]:
        store.put(k, k)
    items, rev = store.range("p/")
    assert [kv.key for kv in items] == ["p/a", "p/b", "p/c"]
    assert rev == 5
    page1, _ = store.range("p/", limit=2)
    page2, _ = store.range("p/", start_after=page1[-1].key, limit=2)
    assert [kv.key for kv in page1 + page2] == ["p/a", "p/b", "p/c"]


def test_txn_compare_and_swap_is_all_or_nothing(store: Store) -> None:
    r1 = store.put("x", "1")
    ok = store.txn([Compare("x", r1), Compare("y", 0)], [Put("x", "2"), Put("y", "2")])
    assert ok.succeeded and ok.revision == r1 + 1
    assert store.get("x").mod_revision == store.get("y").mod_revision == ok.revision  # type: ignore[union-attr]
    stale = store.txn([Compare("x", r1)], [Put("x", "3"), Delete("y")])
    assert not stale.succeeded
    assert stale.failed == (Compare("x", r1),)
    assert stale.revision == ok.revision  # nothing written
    assert store.get("x").value == "2" and store.get("y") is not None  # type: ignore[union-attr]
    other = store.txn([Compare("x", r1)], [Put("x", "3")], [Put("z", "else")])
    assert not other.succeeded and store.get("z").value == "else"  # type: ignore[union-attr]


def test_txn_rejects_touching_a_key_twice(store: Store) -> None:
    with pytest.raises(ValueError, match="more than once"):
        store.txn([], [Put("k", "1"), Delete("k")])
    assert store.revision() == 0


def test_watch_replays_every_change_from_a_revision(store: Store) -> None:
    store.put("a", "1")
    store.txn([], [Put("b", "1"), Put("c", "1")])  # one revision, two events
    store.delete("a")
    evs = store.events(2)
    assert [(e.revision, e.type, e.key) for e in evs] == [
        (2, "put", "b"),
        (2, "put", "c"),
        (3, "delete", "a"),
    ]
    assert [e.key for e in store.events(1)] == ["a", "b", "c", "a"]
    assert store.events(4) == []


def test_watch_follows_new_writes(store: Store) -> None:
    store.put("a", "1")
    stop = threading.Event()
    seen: list[tuple[int, str]] = []

    def consume() -> None:
        for e in store.watch(1, stop=stop, poll=0.05):
            seen.append((e.revision, e.key))
            if len(seen) == 3:
                stop.set()

    t = threading.Thread(target=consume)
    t.start()
    store.put("b", "1")
    store.put("c", "1")
    t.join(timeout=5)
    stop.set()
    assert not t.is_alive()
    assert seen == [(1, "a"), (2, "b"), (3, "c")]


def test_compaction_then_watch_from_compacted_revision_raises_clearly(store: Store) -> None:
    store.put("a", "1")  # 1
    store.put("a", "2")  # 2
    store.put("b", "1")  # 3
    store.delete("b")  # 4
    store.put("a", "3")  # 5
    store.compact(4)
    assert store.compacted_revision() == 4
    with pytest.raises(CompactedError, match="revision 2 has been compacted") as err:
        store.events(2)
    assert err.value.compacted == 4
    assert [(e.revision, e.key) for e in store.events(4)] == [(4, "b"), (5, "a")]
    # Values as of a retained revision are still readable; older ones are gone.
    assert store.get("a", revision=4).value == "2"  # type: ignore[union-attr]
    assert store.get("b", revision=4) is None
    with pytest.raises(CompactedError):
        store.get("a", revision=1)
    with pytest.raises(FutureRevisionError):
        store.compact(99)
    # Current values survive compaction.
    assert store.get("a").value == "3"  # type: ignore[union-attr]


def test_history_per_key_and_value_at_revision(store: Store) -> None:
    store.put("k", "v1")
    store.put("other", "x")
    store.put("k", "v2")
    store.delete("k")
    store.put("k", "v3")
    hist = store.history("k")
    assert [(e.revision, e.type, e.value) for e in hist] == [
        (1, "put", "v1"),
        (3, "put", "v2"),
        (4, "delete", None),
        (5, "put", "v3"),
    ]
    assert store.get("k", revision=2).value == "v1"  # type: ignore[union-attr]
    assert store.get("k", revision=4) is None
    kv = store.get("k")
    assert kv is not None and kv.create_revision == 5 and kv.version == 1  # a new incarnation


def test_wait_returns_when_the_revision_arrives(store: Store) -> None:
    assert not store.wait(1, 0.05)
    threading.Timer(0.05, lambda: store.put("a", "1")).start()
    assert store.wait(1, 5)


def test_sqlite_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    s = SqliteStore(path)
    s.put("a", "1")
    s.txn([], [Put("b", "2"), Put("c", "3")])
    s.close()
    s2 = SqliteStore(path)
    assert s2.revision() == 2
    assert [kv.key for kv in s2.range("")[0]] == ["a", "b", "c"]
    assert len(s2.events(1)) == 3
    mode = s2._db.execute("PRAGMA journal_mode").fetchone()[0]
    sync = s2._db.execute("PRAGMA synchronous").fetchone()[0]
    assert (mode, sync) == ("wal", 2)  # 2 = FULL
    s2.close()


def test_sqlite_two_handles_see_each_others_writes(tmp_path: Path) -> None:
    a, b = SqliteStore(tmp_path / "s.db"), SqliteStore(tmp_path / "s.db")
    a.put("k", "1")
    assert b.get("k").value == "1"  # type: ignore[union-attr]
    res = b.txn([Compare("k", 1)], [Put("k", "2")])
    assert res.succeeded
    assert not a.txn([Compare("k", 1)], [Put("k", "3")]).succeeded
    assert a.wait(2, 1)
    a.close()
    b.close()


def test_event_pages_never_split_a_txn(store: Store) -> None:
    store.put("a", "1")  # 1
    store.txn([], [Put("b", "1"), Put("c", "1"), Put("d", "1")])  # 2: three events
    store.put("e", "1")  # 3
    page = store.events(1, limit=2)
    assert [(e.revision, e.key) for e in page] == [(1, "a"), (2, "b"), (2, "c"), (2, "d")]
    assert [e.key for e in store.events(3, limit=1)] == ["e"]
    # watch pages through with limit and still sees every event exactly once
    stop = threading.Event()
    seen = []
    for e in store.watch(1, stop=stop, poll=0.01):
        seen.append(e.key)
        if len(seen) == 5:
            stop.set()
    assert seen == ["a", "b", "c", "d", "e"]
