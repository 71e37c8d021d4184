"""Where the manager keeps flow records: the `FlowStore` protocol and its default, SQLite in its own file.

Flow writes must never delay a policy write, so flows live in a database of their own (`<db>.flows` next
to the manager's store, WAL), written by one thread (manager/flows.py) through its own connection; queries
use a second connection (WAL lets them read while the writer writes). An external engine (ClickHouse,
Loki, ...) can take over by implementing `FlowStore`; nothing else touches SQL.

A stored row is a `FlowRecord` plus what the manager added at ingest (`src_workload`/`src_tenant`,
`dst_workload`/`dst_tenant`: the address's workload in the model at that time, NULL for an address no
workload had) and `id`, the insertion order (newest first pagination). `t` is the record's `end`.
Per-rule hit counts are kept in a rollup (`hits`, one row per minute x rule x verdict) updated in the same
transaction as the rows, so hit counts and unused rules over a window do not scan the flows.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# Column order of a row tuple (ingest builds tuples in this order; `id` is assigned by the store).
COLUMNS: tuple[str, ...] = (
    "start",
    "t",  # FlowRecord.end
    "host",
    "hop",
    "ifname",
    "workload",
    "verdict",
    "rule_id",
    "rule_tenant",
    "policy",
    "rule",
    "category",
    "revision",
    "proto",
    "src",
    "dst",
    "sport",
    "dport",
    "packets",
    "bytes",
    "count",
    "final",
    "src_workload",
    "src_tenant",
    "dst_workload",
    "dst_tenant",
)
Row = tuple[Any, ...]
COL = {c: i for i, c in enumerate(COLUMNS)}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS flows (
    id INTEGER PRIMARY KEY,
    start REAL NOT NULL, t REAL NOT NULL, host TEXT NOT NULL, hop TEXT NOT NULL, ifname TEXT NOT NULL,
    workload TEXT NOT NULL, verdict TEXT NOT NULL, rule_id INTEGER NOT NULL, rule_tenant TEXT NOT NULL,
    policy TEXT NOT NULL, rule TEXT NOT NULL, category TEXT NOT NULL, revision INTEGER NOT NULL,
    proto TEXT NOT NULL, src TEXT NOT NULL, dst TEXT NOT NULL, sport INTEGER NOT NULL,
    dport INTEGER NOT NULL, packets INTEGER NOT NULL, bytes INTEGER NOT NULL, count INTEGER NOT NULL,
    final INTEGER NOT NULL,
    src_workload TEXT, src_tenant TEXT, dst_workload TEXT, dst_tenant TEXT
);
CREATE INDEX IF NOT EXISTS flows_t ON flows (t);
CREATE INDEX IF NOT EXISTS flows_src_workload ON flows (src_workload, t);
CREATE INDEX IF NOT EXISTS flows_dst_workload ON flows (dst_workload, t);
CREATE TABLE IF NOT EXISTS hits (
    minute INTEGER NOT NULL, rule_id INTEGER NOT NULL, verdict TEXT NOT NULL,
    rule_tenant TEXT NOT NULL, policy TEXT NOT NULL, rule TEXT NOT NULL, category TEXT NOT NULL,
    count INTEGER NOT NULL, last REAL NOT NULL,
    PRIMARY KEY (minute, rule_id, verdict)
) WITHOUT ROWID;
"""
# Three indexes: time, and either end's workload with time ("this workload over the last hour"). Every
# index costs insert throughput (each roughly halves it); the rule, host, verdict, proto and port filters
# ride on these or on the newest-first scan, and per-rule counts come from the `hits` rollup.

_INSERT = f"INSERT INTO flows ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_HIT = (
    "INSERT INTO hits (minute, rule_id, verdict, rule_tenant, policy, rule, category, count, last) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (minute, rule_id, verdict) "
    "DO UPDATE SET count = count + excluded.count, last = max(last, excluded.last)"
)


@dataclass(frozen=True, slots=True)
class FlowQuery:
    """A filter over stored rows; every field narrows (None: no condition). Times are epoch seconds."""

    scope_tenant: str | None = None  # a tenant role: only rows touching this tenant's workloads
    tenant: str | None = None  # rows touching this tenant's workloads
    workloads: tuple[str, ...] | None = None  # "t/n": rows with either end among them (or addresses)
    addresses: tuple[str, ...] = ()  # ... or with either address among these
    cidrs: tuple[str, ...] = ()  # ... or inside one of these networks (checked in Python)
    rule_tenant: str | None = None
    policy: str | None = None
    rule: str | None = None
    rule_id: int | None = None
    verdict: str | None = None
    host: str | None = None
    proto: str | None = None
    port: int | None = None
    since: float | None = None
    until: float | None = None
    before_id: int | None = None  # pagination: rows older (lower id) than this

    def matches(self, row: Row) -> bool:
        """The same condition as `where()`, on one row (the live stream filters with it)."""
        c = COL
        st, dt = row[c["src_tenant"]], row[c["dst_tenant"]]
        if self.scope_tenant is not None and self.scope_tenant not in (st, dt):
            return False
        if self.tenant is not None and self.tenant not in (st, dt):
            return False
        if self.workloads is not None and not (
            row[c["src_workload"]] in self.workloads
            or row[c["dst_workload"]] in self.workloads
            or row[c["src"]] in self.addresses
            or row[c["dst"]] in self.addresses
            or (self.cidrs and (in_cidrs(row[c["src"]], self.cidrs) or in_cidrs(row[c["dst"]], self.cidrs)))
        ):
            return False
        for name in ("rule_tenant", "policy", "rule", "rule_id", "verdict", "host", "proto"):
            want = getattr(self, name)
            if want is not None and row[c[name]] != want:
                return False
        if self.port is not None and row[c["dport"]] != self.port:
            return False
        t = row[c["t"]]
        return (self.since is None or t >= self.since) and (self.until is None or t < self.until)

    def where(self) -> tuple[str, list[Any]]:
        conds: list[str] = []
        args: list[Any] = []
        for tenant in (self.scope_tenant, self.tenant):
            if tenant is not None:
                conds.append("(src_tenant = ? OR dst_tenant = ?)")
                args += [tenant, tenant]
        if self.workloads is not None:
            ors: list[str] = []
            if self.workloads:
                marks = ", ".join("?" * len(self.workloads))
                ors += [f"src_workload IN ({marks})", f"dst_workload IN ({marks})"]
                args += [*self.workloads, *self.workloads]
            if self.addresses:
                marks = ", ".join("?" * len(self.addresses))
                ors += [f"src IN ({marks})", f"dst IN ({marks})"]
                args += [*self.addresses, *self.addresses]
            if self.cidrs:
                ors.append("ow_in_cidrs(src) OR ow_in_cidrs(dst)")
            conds.append("(" + (" OR ".join(ors) or "0") + ")")
        for name in ("rule_tenant", "policy", "rule", "rule_id", "verdict", "host", "proto"):
            want = getattr(self, name)
            if want is not None:
                conds.append(f"{name} = ?")
                args.append(want)
        if self.port is not None:
            conds.append("dport = ?")
            args.append(self.port)
        if self.since is not None:
            conds.append("t >= ?")
            args.append(self.since)
        if self.until is not None:
            conds.append("t < ?")
            args.append(self.until)
        if self.before_id is not None:
            conds.append("id < ?")
            args.append(self.before_id)
        return (" AND ".join(conds) or "1"), args


def in_cidrs(address: str, cidrs: Sequence[str]) -> bool:
    import ipaddress

    try:
        a = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(a in ipaddress.ip_network(c, strict=False) for c in cidrs)


@dataclass(frozen=True, slots=True)
class Hit:
    rule_id: int
    rule_tenant: str
    policy: str
    rule: str
    category: str
    verdict: str
    count: int
    last: float


class FlowStore(Protocol):
    """What the manager needs of a flow store. `insert` is called from one thread only (the writer);
    the reads may come from any thread, concurrently with it."""

    def insert(self, rows: Sequence[Row]) -> None:
        """Store rows atomically (all or none), with their hit counts."""
        ...

    def query(self, q: FlowQuery, limit: int) -> list[tuple[int, Row]]:
        """Up to `limit` matching rows, newest first, each with its id."""
        ...

    def aggregate(self, q: FlowQuery, columns: Sequence[str]) -> list[tuple[Any, ...]]:
        """Matching rows grouped by `columns`: each group's values and its summed `count` (the graph)."""
        ...

    def hits(self, since: float) -> list[Hit]:
        """Per rule and verdict, records counted since `since` (minute resolution) and the last one."""
        ...

    def rows(self) -> int: ...

    def prune(self, older_than: float, max_rows: int) -> int:
        """Delete rows older than `older_than`, then the oldest beyond `max_rows`; returns how many."""
        ...

    def close(self) -> None: ...


class SqliteFlowStore:
    """The default FlowStore. `path` ":memory:" keeps everything in one connection (tests)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._write = self._connect()
        self._write.executescript(_SCHEMA)
        self._write_lock = threading.Lock()
        if path == ":memory:":
            self._read, self._read_lock = self._write, self._write_lock
        else:
            self._read, self._read_lock = self._connect(), threading.Lock()
        self._rows = int(self._write.execute("SELECT count(*) FROM flows").fetchone()[0])  # once, at open

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL: a power cut may lose the last transactions, never corrupt; flows are
            # telemetry and their loss would be a counted drop, not worth an fsync per batch.
            conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA cache_size = -65536")  # 64 MiB: the indexes' hot pages
        if self.path != ":memory:":
            conn.execute("PRAGMA wal_autocheckpoint = 16384")  # checkpoint every 64 MiB, not every 4
        return conn

    def insert(self, rows: Sequence[Row]) -> None:
        if not rows:
            return
        # the minute rollup, grouped here (one dict probe a row; positions as locals: this loop runs for
        # every ingested record)
        hits: dict[tuple[int, int, str], list[Any]] = {}
        get = hits.get
        c = COL
        it, ir, iv, ic = c["t"], c["rule_id"], c["verdict"], c["count"]
        irt, ip, iru, ica = c["rule_tenant"], c["policy"], c["rule"], c["category"]
        for r in rows:
            t = r[it]
            key = (int(t // 60), r[ir], r[iv])
            h = get(key)
            if h is None:
                hits[key] = [key[0], key[1], key[2], r[irt], r[ip], r[iru], r[ica], r[ic], t]
            else:
                h[7] += r[ic]
                if t > h[8]:
                    h[8] = t
        with self._write_lock:
            conn = self._write
            conn.execute("BEGIN")
            try:
                conn.executemany(_INSERT, rows)
                conn.executemany(_HIT, hits.values())
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            self._rows += len(rows)

    def query(self, q: FlowQuery, limit: int) -> list[tuple[int, Row]]:
        where, args = q.where()
        sql = f"SELECT id, {', '.join(COLUMNS)} FROM flows WHERE {where} ORDER BY id DESC LIMIT ?"
        with self._read_lock:
            self._cidr_function(q)
            rows = self._read.execute(sql, [*args, limit]).fetchall()
        return [(r[0], tuple(r[1:])) for r in rows]

    def aggregate(self, q: FlowQuery, columns: Sequence[str]) -> list[tuple[Any, ...]]:
        bad = [c for c in columns if c not in COL]
        if bad:
            raise ValueError(f"unknown flow columns {bad}")
        cols = ", ".join(columns)
        where, args = q.where()
        sql = f"SELECT {cols}, sum(count) FROM flows WHERE {where} GROUP BY {cols}"
        with self._read_lock:
            self._cidr_function(q)
            return self._read.execute(sql, args).fetchall()

    def _cidr_function(self, q: FlowQuery) -> None:
        if q.cidrs:
            cidrs = q.cidrs
            self._read.create_function("ow_in_cidrs", 1, lambda a: in_cidrs(a, cidrs), deterministic=True)

    def hits(self, since: float) -> list[Hit]:
        sql = (
            "SELECT rule_id, rule_tenant, policy, rule, category, verdict, sum(count), max(last) "
            "FROM hits WHERE minute >= ? GROUP BY rule_id, verdict"
        )
        with self._read_lock:
            rows = self._read.execute(sql, (int(since // 60),)).fetchall()
        return [Hit(*r) for r in rows]

    def rows(self) -> int:
        """Kept as rows are written and deleted: count(*) walks the whole table (seconds at 10M)."""
        return self._rows

    def prune(self, older_than: float, max_rows: int, chunk: int = 20_000) -> int:
        """Rows older than `older_than`, then all but the newest `max_rows` ids. In chunks, each its own
        transaction, so a large prune never holds the write lock for long. Ids grow with each insert
        and only the oldest are deleted, so "the newest max_rows" is an id bound (no count, no OFFSET
        scan); a row deleted by age out of order only makes it keep fewer."""
        deleted = 0
        for sql, arg in (
            ("DELETE FROM flows WHERE id IN (SELECT id FROM flows WHERE t < ? LIMIT ?)", older_than),
            ("DELETE FROM flows WHERE id IN (SELECT id FROM flows WHERE id <= ? ORDER BY id LIMIT ?)", None),
        ):
            while True:
                with self._write_lock:
                    if arg is None:
                        top = self._write.execute("SELECT max(id) FROM flows").fetchone()[0]
                        if top is None:
                            break
                        bound: float = top - max_rows
                    else:
                        bound = arg
                    n = self._write.execute(sql, (bound, chunk)).rowcount
                    self._rows -= n
                deleted += n
                if n < chunk:
                    break
        with self._write_lock:
            self._write.execute("DELETE FROM hits WHERE minute < ?", (int(older_than // 60),))
        return deleted

    def close(self) -> None:
        with self._write_lock:
            self._write.close()
        if self._read is not self._write:
            with self._read_lock:
                self._read.close()


__all__ = ["COL", "COLUMNS", "FlowQuery", "FlowStore", "Hit", "Row", "SqliteFlowStore", "in_cidrs"]
