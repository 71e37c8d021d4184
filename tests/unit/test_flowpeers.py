"""The merge rules of flows across managers (manager/flowpeers.py), on real SQLite flow stores: pages over
several stores return every row exactly once in time order, whatever the page size, a store that fails
keeps its place, cursors refuse what the API did not give out, counts sum."""

from __future__ import annotations

import random

import pytest

from omniwall.manager.flowpeers import (
    EXHAUSTED,
    decode_cursor,
    encode_cursor,
    merge_aggregate,
    merge_hits,
    merge_page,
)
from omniwall.manager.flowstore import COLUMNS, FlowQuery, Hit, Row, SqliteFlowStore


def row(t: float, host: str, rule_id: int = 7, verdict: str = "allowed") -> Row:
    values = dict.fromkeys(COLUMNS, "")
    values.update(
        start=t - 1, t=t, host=host, hop="egress", ifname="eth0", workload="acme/w", verdict=verdict,
        rule_id=rule_id, rule_tenant="acme", policy="p", rule="r", category="application", revision=1,
        proto="tcp", src="10.0.0.1", dst="10.0.0.2", sport=1, dport=80, packets=0, bytes=0, count=1,
        final=1, src_workload=None, src_tenant=None, dst_workload=None, dst_tenant=None,
    )  # fmt: skip
    return tuple(values[c] for c in COLUMNS)


def stores(n: int, rows_each: list[int], seed: int = 1) -> list[SqliteFlowStore]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        s = SqliteFlowStore(":memory:", part_rows=13)  # small partitions: pages cross them
        ts = sorted(rnd.uniform(0, 1000) for _ in range(rows_each[i]))
        for k in range(0, len(ts), 9):  # several insert batches
            s.insert([row(t, f"h{i}") for t in ts[k : k + 9]])
        out.append(s)
    return out


def walk(
    ss: list[SqliteFlowStore], limit: int, fail: dict[int, set[str]] | None = None
) -> list[list[tuple[str, int, Row]]]:
    """Page through `ss` as the API does; `fail[page]`: stores that do not answer on that page."""
    cursor: dict[str, int] = {}
    pages = []
    for n in range(1000):
        down = (fail or {}).get(n, set())
        answers = {}
        for s in ss:
            pos = cursor.get(s.store_id)
            if pos == EXHAUSTED or s.store_id in down:
                continue
            answers[s.store_id] = s.query(FlowQuery(before_id=pos), limit)
        got, nxt = merge_page(answers, limit, cursor, down)
        pages.append(got)
        if nxt is None:
            return pages
        cursor = decode_cursor(encode_cursor(nxt), "")  # through the wire form
    raise AssertionError("pages never ended")


@pytest.mark.parametrize("limit", [1, 4, 10, 1000])
def test_every_row_once_in_time_order(limit: int) -> None:
    ss = stores(3, [40, 0, 25])
    pages = walk(ss, limit)
    rows = [r for p in pages for r in p]
    assert len(rows) == len({(s, i) for s, i, _ in rows}) == 65
    ends = [r[COLUMNS.index("t")] for _, _, r in rows]
    assert ends == sorted(ends, reverse=True)
    assert all(len(p) == limit for p in pages[:-1])


def test_a_store_down_keeps_its_place_and_the_end_is_not_complete() -> None:
    ss = stores(3, [20, 20, 20], seed=2)
    down = ss[1].store_id
    # store 1 fails on pages 1 and 2 of 5 rows, then answers again: nothing of it is lost or repeated
    pages = walk(ss, 5, {1: {down}, 2: {down}})
    rows = [(s, i) for p in pages for s, i, _ in p]
    assert len(rows) == len(set(rows)) == 60
    # a store down for good: the listing ends (no endless empty pages), without its rows
    cursor: dict[str, int] = {}
    seen = 0
    for _ in range(100):
        answers = {
            s.store_id: s.query(FlowQuery(before_id=cursor.get(s.store_id)), 7)
            for s in ss
            if s.store_id != down
        }
        got, nxt = merge_page(
            {k: v for k, v in answers.items() if cursor.get(k) != EXHAUSTED}, 7, cursor, [down]
        )
        seen += len(got)
        if nxt is None:
            break
        cursor = nxt
    assert seen == 40


def test_a_store_that_joins_later_starts_from_its_newest_row() -> None:
    a, b = stores(2, [10, 10], seed=3)
    _, nxt = merge_page({a.store_id: a.query(FlowQuery(), 4)}, 4, {})
    assert nxt is not None and b.store_id not in nxt
    answers = {
        a.store_id: a.query(FlowQuery(before_id=nxt[a.store_id]), 4),
        b.store_id: b.query(FlowQuery(), 4),
    }
    got2, _ = merge_page(answers, 4, nxt)
    assert {s for s, _, _ in got2} <= {a.store_id, b.store_id} and len(got2) == 4


def test_cursor_codec() -> None:
    c = encode_cursor({"s1": 5, "s2": EXHAUSTED})
    assert decode_cursor(c, "x") == {"s1": 5, "s2": 0}
    assert decode_cursor("42", "local") == {"local": 42}  # a single manager's cursor still works
    assert decode_cursor("m1.e30", "x") == {}  # "{}"
    for bad in ("abc", "m1.!!!", "m1.WyJhIl0", "m1.eyJzIjp0cnVlfQ"):  # not base64 JSON, a list, {"s":true}
        with pytest.raises(ValueError, match="not a cursor"):
            decode_cursor(bad, "x")
    with pytest.raises(ValueError):
        decode_cursor("m1.eyJzIjotMX0", "x")  # {"s":-1}


def test_hits_and_graph_rows_sum() -> None:
    h1 = [Hit(7, "acme", "p", "r", "application", "allowed", 3, 100.0)]
    h2 = [
        Hit(7, "acme", "p", "r", "application", "allowed", 4, 150.0),
        Hit(7, "acme", "p", "r", "application", "denied", 1, 90.0),
    ]
    merged = {(h.rule_id, h.verdict): (h.count, h.last) for h in merge_hits([h1, h2])}
    assert merged == {(7, "allowed"): (7, 150.0), (7, "denied"): (1, 90.0)}
    agg = merge_aggregate([[("a", "b", "allowed", 2)], [("a", "b", "allowed", 5), ("a", "c", "denied", 1)]])
    assert sorted(agg) == [("a", "b", "allowed", 7), ("a", "c", "denied", 1)]


def test_store_id_is_kept_in_the_file(tmp_path: pytest.TempPathFactory) -> None:
    path = str(tmp_path / "f.flows")  # type: ignore[operator]
    s = SqliteFlowStore(path)
    first = s.store_id
    s.close()
    again = SqliteFlowStore(path)
    assert again.store_id == first and SqliteFlowStore(":memory:").store_id != first
    again.close()
