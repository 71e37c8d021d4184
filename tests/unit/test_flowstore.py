"""The flow store (manager/flowstore.py) and the ingest service over it (manager/flows.py): filters,
pagination, the hits rollup, retention, enrichment, and the accounting that makes every loss visible."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from omniwall.manager.flows import AddressBook, FlowService, to_rows
from omniwall.manager.flowstore import COL, COLUMNS, FlowQuery, Row, SqliteFlowStore
from omniwall.model.catalog import Catalog
from omniwall.model.resources import Workload

T0 = 1_800_000_000.0


def row(i: int, **kw: object) -> Row:
    """A stored row; `i` spreads it over 4 workloads, 2 hosts, 2 verdicts, 3 rules and time."""
    d: dict[str, object] = {
        "start": T0 + i - 1,
        "t": T0 + i,
        "host": f"h{i % 2}",
        "hop": "egress",
        "ifname": "if0",
        "workload": f"a/w{i % 4}",
        "verdict": ("allowed", "denied")[i % 2],
        "rule_id": 100 + i % 3,
        "rule_tenant": "a",
        "policy": "p",
        "rule": f"r{i % 3}",
        "category": "application",
        "revision": 1,
        "proto": "tcp",
        "src": f"10.0.0.{i % 4}",
        "dst": f"10.0.1.{i % 5}",
        "sport": 1000,
        "dport": 80 + i % 2,
        "packets": 1,
        "bytes": 60,
        "count": 1,
        "final": 1,
        "src_workload": f"a/w{i % 4}",
        "src_tenant": "a",
        "dst_workload": None if i % 5 == 4 else f"b/d{i % 5}",
        "dst_tenant": None if i % 5 == 4 else "b",
    }
    d.update(kw)
    return tuple(d[c] for c in COLUMNS)


@pytest.fixture(params=["memory", "file", "partitions"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> SqliteFlowStore:
    """`partitions`: 16 rows a partition: every test crosses sealed (indexed) partitions and the hot one."""
    path = ":memory:" if request.param == "memory" else str(tmp_path / "f.flows")
    s = SqliteFlowStore(path, part_rows=16 if request.param == "partitions" else 100_000)
    yield s
    s.close()


ROWS = [row(i) for i in range(200)]

QUERIES = [
    FlowQuery(),
    FlowQuery(workloads=("a/w1",)),
    FlowQuery(workloads=("b/d2",), verdict="denied"),
    FlowQuery(workloads=(), addresses=("10.0.1.4",)),
    FlowQuery(workloads=(), cidrs=("10.0.1.0/30",)),
    FlowQuery(tenant="b"),
    FlowQuery(scope_tenant="b", host="h1"),
    FlowQuery(rule_id=101, since=T0 + 50, until=T0 + 150),
    FlowQuery(rule_tenant="a", policy="p", rule="r2", port=81),
    FlowQuery(proto="udp"),
]


@pytest.mark.parametrize("q", QUERIES, ids=range(len(QUERIES)))
def test_sql_and_python_filters_agree(store: SqliteFlowStore, q: FlowQuery) -> None:
    """The live stream filters with `matches`, the store with `where`: the same rows, newest first."""
    for i in range(0, len(ROWS), 10):
        store.insert(ROWS[i : i + 10])
    got = [r for _, r in store.query(q, 1000)]
    want = [r for r in reversed(ROWS) if q.matches(r)]
    assert got == want
    assert q == FlowQuery() or len(want) < len(ROWS)  # each filter narrows (the test can fail)


def test_pagination_is_newest_first_and_disjoint(store: SqliteFlowStore) -> None:
    for i in range(0, len(ROWS), 7):
        store.insert(ROWS[i : i + 7])
    seen: list[int] = []
    q = FlowQuery(workloads=("a/w2",))
    while True:
        page = store.query(q if not seen else FlowQuery(workloads=("a/w2",), before_id=seen[-1]), 7)
        seen += [i for i, _ in page]
        if len(page) < 7:
            break
    assert seen == sorted(seen, reverse=True)
    assert len(seen) == len(set(seen)) == sum(1 for r in ROWS if r[COL["src_workload"]] == "a/w2")


def test_hits_rollup_counts_per_rule_and_verdict(store: SqliteFlowStore) -> None:
    store.insert(ROWS[:100])
    store.insert([row(500, count=40, rule_id=100, verdict="allowed")])
    hits = {(h.rule_id, h.verdict): h for h in store.hits(T0 - 60)}
    want: dict[tuple[int, str], int] = {}
    for r in [*ROWS[:100], row(500, count=40, rule_id=100, verdict="allowed")]:
        k = (r[COL["rule_id"]], r[COL["verdict"]])
        want[k] = want.get(k, 0) + r[COL["count"]]
    assert {k: h.count for k, h in hits.items()} == want
    assert hits[(100, "allowed")].last == T0 + 500
    assert store.hits(T0 + 10_000) == []  # the window starts after every record


def test_prune_by_age_then_by_count(store: SqliteFlowStore) -> None:
    for i in range(0, len(ROWS), 20):
        store.insert(ROWS[i : i + 20])
    assert store.prune(T0 + 50, 10**9) == 50
    assert store.rows() == 150
    assert min(r[COL["t"]] for _, r in store.query(FlowQuery(), 1000)) == T0 + 50
    assert store.prune(0, 40) == 110
    kept = store.query(FlowQuery(), 1000)
    assert [r[COL["t"]] for _, r in kept] == [T0 + i for i in range(199, 159, -1)]  # the newest 40
    assert store.rows() == 40
    if store.path != ":memory:":  # the count is kept in memory; a reopened store counts once
        again = SqliteFlowStore(store.path)
        assert again.rows() == 40
        assert [r[COL["t"]] for _, r in again.query(FlowQuery(), 1000)] == [r[COL["t"]] for _, r in kept]
        again.insert([row(300)])  # ids run on after a reopen
        assert again.query(FlowQuery(), 1)[0][0] > kept[0][0]
        again.close()


def test_aggregate_groups_and_sums(store: SqliteFlowStore) -> None:
    store.insert([row(0, count=3)])
    store.insert([row(4, count=2), row(1)] + [row(8, verdict="x", count=0)] * 16)
    got = sorted(store.aggregate(FlowQuery(), ("src_workload", "verdict")))
    assert got == [("a/w0", "allowed", 5), ("a/w0", "x", 0), ("a/w1", "denied", 1)]
    with pytest.raises(ValueError, match="unknown flow columns"):
        store.aggregate(FlowQuery(), ("src; DROP TABLE flows",))


# ------------------------------------------------------------------------------------------ ingest


def _book() -> AddressBook:
    c = Catalog()
    for tenant, name, host, ip in (("a", "web", "h1", "10.0.0.1"), ("b", "db", "h2", "10.0.1.1")):
        c.add(
            Workload.model_validate(
                {
                    "metadata": {"name": name, "tenant": tenant},
                    "spec": {"host": host, "vnics": [{"name": "eth0", "ips": [ip] if ip else []}]},
                }
            )
        )
    c.add(
        Workload.model_validate(
            {"metadata": {"name": "new", "tenant": "a"}, "spec": {"host": "h1", "vnics": [{"name": "eth0"}]}}
        )
    )
    return AddressBook.of(c)


def record(**kw: object) -> dict[str, object]:
    d: dict[str, object] = {
        "start": T0,
        "end": T0 + 1,
        "host": "h1",
        "hop": "egress",
        "ifname": "if0",
        "workload": "a/web",
        "verdict": "denied",
        "rule_id": 7,
        "rule_tenant": "a",
        "policy": "p",
        "rule": "r",
        "category": "application",
        "revision": 3,
        "proto": "tcp",
        "src": "10.0.0.1",
        "dst": "10.0.1.1",
        "sport": 1,
        "dport": 80,
        "packets": 1,
        "bytes": 60,
        "count": 1,
        "final": True,
    }
    d.update(kw)
    return d


def test_enrichment_names_both_ends_from_the_model() -> None:
    book = _book()
    (r,) = to_rows("h1", [record()], book)
    assert (r[COL["src_workload"]], r[COL["src_tenant"]]) == ("a/web", "a")
    assert (r[COL["dst_workload"]], r[COL["dst_tenant"]]) == ("b/db", "b")
    # an address no workload has stays an address
    (r,) = to_rows("h1", [record(dst="192.0.2.9")], book)
    assert r[COL["dst_workload"]] is None and r[COL["dst_tenant"]] is None
    # the local end of a workload whose address the model does not know yet: the record's workload,
    # but only when that workload runs on the reporting host (a host cannot claim another's workload)
    (r,) = to_rows("h1", [record(workload="a/new", src="10.0.0.77")], book)
    assert r[COL["src_workload"]] == "a/new"
    (r,) = to_rows("h2", [record(host="h2", workload="a/new", src="10.0.0.77")], book)
    assert r[COL["src_workload"]] is None


class GatedStore(SqliteFlowStore):
    """A real store whose writes wait for a gate: the queue fills while the writer is held."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.gate = threading.Event()

    def insert(self, rows: Sequence[Row]) -> None:
        self.gate.wait(10)
        super().insert(rows)


def test_full_queue_drops_are_counted_never_silent() -> None:
    store = GatedStore()
    svc = FlowService(store, queue_records=250)
    book = _book()
    results = [svc.submit("h1", to_rows("h1", [record()] * 100, book), {}) for _ in range(5)]
    store.gate.set()
    assert svc.flush(10)
    st = svc.stats()
    assert sum(a for a, _ in results) == 200 and sum(d for _, d in results) == 300
    assert st["offered"] == 500
    assert st["stored"] + st["dropped"]["manager-queue"] + st["dropped"]["manager-store"] == st["offered"]
    assert st["dropped"]["manager-queue"] == 300 and store.rows() == 200
    svc.close()


def test_failed_writes_are_counted() -> None:
    store = SqliteFlowStore(":memory:")
    svc = FlowService(store)
    store._write.close()  # every insert now raises (a broken disk, from the service's point of view)
    svc.submit("h1", to_rows("h1", [record()] * 10, _book()), {"kernel": 4})
    assert svc.flush(10)
    st = svc.stats()
    assert st["dropped"]["manager-store"] == 10 and st["stored"] == 0
    assert st["hosts"]["h1"]["agentDropped"] == {"kernel": 4}


def test_live_subscribers_get_rows_and_a_slow_one_loses_counted() -> None:
    async def run() -> tuple[int, int, int]:
        svc = FlowService(SqliteFlowStore(":memory:"))
        fast, slow = svc.subscribe(), svc.subscribe()
        rows = to_rows("h1", [record()] * 6000, _book())
        svc.submit("h1", rows, {})
        got = await fast.get(1)
        svc.submit("h1", rows, {})  # `slow` has 6000 queued: the next 6000 overflow its bound
        svc.close()
        return len(got or []), slow.dropped, fast.dropped

    got, slow_dropped, fast_dropped = asyncio.run(run())
    assert got == 6000 and slow_dropped == 6000 and fast_dropped == 0


def test_retention_runs_in_the_writer() -> None:
    clock = [T0 + 3600]
    svc = FlowService(SqliteFlowStore(":memory:"), retention=1800, prune_every=0.05, clock=lambda: clock[0])
    old = [record(start=T0, end=T0 + i) for i in range(10)]
    new = [record(start=T0 + 3000, end=T0 + 3000 + i) for i in range(5)]
    svc.submit("h1", to_rows("h1", old + new, _book()), {})
    assert svc.flush(10)
    deadline = 600  # up to 30 s: the writer thread competes for CPU on a loaded machine
    while svc.store.rows() != 5 and deadline:
        threading.Event().wait(0.05)
        deadline -= 1
    assert svc.store.rows() == 5 and svc.stats()["pruned"] == 10
    svc.close()


def test_random_rows_round_trip(store: SqliteFlowStore) -> None:
    rnd = random.Random(7)
    rows = [row(rnd.randrange(10_000)) for _ in range(300)]
    store.insert(rows)
    got = [r for _, r in store.query(FlowQuery(), 1000)]
    assert got == list(reversed(rows))


def test_retention_drops_whole_partitions(tmp_path: Path) -> None:
    store = SqliteFlowStore(str(tmp_path / "f.flows"), part_rows=20)
    for i in range(0, 100, 10):
        store.insert(ROWS[i : i + 10])
    assert store.partitions == 5
    assert store.prune(T0 + 45, 10**9) == 45  # two partitions whole, five rows of the third
    assert store.partitions == 3 and store.rows() == 55
    assert store.prune(0, 30) == 25  # the next partition whole (15 rows), then 10 rows by id
    assert [r[COL["t"]] for _, r in store.query(FlowQuery(), 1000)] == [T0 + i for i in range(99, 69, -1)]
    assert store.prune(T0 + 1000, 10**9) == 30 and store.rows() == 0 and store.partitions == 0
    store.insert(ROWS[:3])  # a new hot partition after everything was dropped
    assert [r for _, r in store.query(FlowQuery(), 10)] == list(reversed(ROWS[:3]))
    store.close()


def test_unpartitioned_store_is_adopted(tmp_path: Path) -> None:
    """A flow file written before partitions (one indexed `flows` table) is read and pruned as partition 0."""
    import sqlite3

    path = str(tmp_path / "old.flows")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE flows (id INTEGER PRIMARY KEY, " + ", ".join(COLUMNS) + ")")
    conn.executemany(
        f"INSERT INTO flows ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", ROWS[:50]
    )
    conn.close()
    store = SqliteFlowStore(path, part_rows=20)
    assert store.rows() == 50
    store.insert(ROWS[50:60])
    assert [r for _, r in store.query(FlowQuery(), 1000)] == list(reversed(ROWS[:60]))
    assert store.prune(T0 + 1000, 10**9) == 60 and store.rows() == 0
    store.close()


def test_prune_after_close_is_a_no_op() -> None:
    """A slow shutdown: the writer's retention must not run into a closed store."""
    store = SqliteFlowStore(":memory:")
    store.insert(ROWS[:10])
    svc = FlowService(store)
    svc.close()
    assert svc.prune() == 0 and store.prune(T0 + 1000, 0) == 0


def test_close_racing_ingest_never_reaches_a_closed_database(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 10's "Cannot operate on a closed database": a submit whose writer starts while close() runs
    used to start a writer after close() had looked for one, and that writer then wrote into the closed
    store. Now a writer starts before close() (and is joined) or never; a batch after close is refused
    (not acknowledged) and counted; reads of a closed store say so."""
    import logging
    import threading

    from omniwall.manager.flowstore import StoreClosed

    caplog.set_level(logging.WARNING)
    for _ in range(30):
        svc = FlowService(SqliteFlowStore(":memory:"), prune_every=0.001)
        answers: list[bool] = []
        go = threading.Barrier(2)

        def post(svc: FlowService = svc, go: threading.Barrier = go, answers: list[bool] = answers) -> None:
            go.wait()
            for i in range(0, 40, 4):
                svc.submit("h1", list(ROWS[i : i + 4]), {}, answers.append)

        t = threading.Thread(target=post)
        t.start()
        go.wait()
        svc.close()
        t.join(10)
        st = svc.stats()
        assert st["offered"] == st["stored"] + sum(st["dropped"].values()) + st["pending"]
        assert st["pending"] == 0 and svc._writer is None
    assert not [r for r in caplog.records if "closed database" in r.getMessage()]
    with pytest.raises(StoreClosed, match="is closed"):
        svc.store.query(FlowQuery(), 1)
    refused: list[bool] = []
    assert svc.submit("h1", list(ROWS[:2]), {}, refused.append) == (0, 2) and refused == [False]
