"""Where the manager keeps flow records: the `FlowStore` protocol and its default, SQLite in its own file.

Flow writes must never delay a policy write, so flows live in a database of their own (`<db>.flows` next
to the manager's store, WAL), written by one thread (manager/flows.py) through its own connection; queries
use a second connection (WAL lets them read while the writer writes). An external engine (ClickHouse,
Loki, ...) can take over by implementing `FlowStore`; nothing else touches SQL.

A stored row is a `FlowRecord` plus what the manager added at ingest (`src_workload`/`src_tenant`,
`dst_workload`/`dst_tenant`: the address's workload in the model at that time, NULL for an address no
workload had) and `id`, the insertion order (newest first pagination). `t` is the record's `end`.
Per-rule hit counts are kept in a rollup (`hits`, one row per minute x rule x verdict) updated in the same
transaction as the rows, so hit counts and unused rules over a window do not scan the flows. The rows
themselves live in partitions (`_SCHEMA`): an unindexed hot one takes the inserts, sealed ones are
indexed in one sort, and retention drops them whole.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
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

_COLUMNS_SQL = """
    id INTEGER PRIMARY KEY,
    start REAL NOT NULL, t REAL NOT NULL, host TEXT NOT NULL, hop TEXT NOT NULL, ifname TEXT NOT NULL,
    workload TEXT NOT NULL, verdict TEXT NOT NULL, rule_id INTEGER NOT NULL, rule_tenant TEXT NOT NULL,
    policy TEXT NOT NULL, rule TEXT NOT NULL, category TEXT NOT NULL, revision INTEGER NOT NULL,
    proto TEXT NOT NULL, src TEXT NOT NULL, dst TEXT NOT NULL, sport INTEGER NOT NULL,
    dport INTEGER NOT NULL, packets INTEGER NOT NULL, bytes INTEGER NOT NULL, count INTEGER NOT NULL,
    final INTEGER NOT NULL,
    src_workload TEXT, src_tenant TEXT, dst_workload TEXT, dst_tenant TEXT
"""
# Rows live in partitions: tables `flows_<n>` of about `part_rows` rows each, listed in `parts` with their
# id range, row count and time bounds (a zone map: a time filter skips whole partitions, so no time index).
# Only the newest partition (the "hot" one) takes inserts, and it has no index: an insert is one append
# to one B-tree. When it is full it is sealed: its two workload indexes are built in one sort, ~3x cheaper
# than maintaining them row by row (bench/flows.py, BENCHMARKS.md). Retention drops whole partitions
# (DROP TABLE frees pages, no per-row index deletes) and deletes rows only in the partition at the edge.
# A query of the hot partition scans it (at most part_rows + one write batch rows, newest first).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS parts (
    n INTEGER PRIMARY KEY, name TEXT NOT NULL, first_id INTEGER NOT NULL, last_id INTEGER NOT NULL,
    rows INTEGER NOT NULL, tmin REAL NOT NULL, tmax REAL NOT NULL, sealed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hits (
    minute INTEGER NOT NULL, rule_id INTEGER NOT NULL, verdict TEXT NOT NULL,
    rule_tenant TEXT NOT NULL, policy TEXT NOT NULL, rule TEXT NOT NULL, category TEXT NOT NULL,
    count INTEGER NOT NULL, last REAL NOT NULL,
    PRIMARY KEY (minute, rule_id, verdict)
) WITHOUT ROWID;
"""
# A sealed partition's indexes: either end's workload with time ("this workload over the last hour").
# The rule, host, verdict, proto and port filters ride on these or on the newest-first scan, and
# per-rule counts come from the `hits` rollup.
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS {name}_src ON {name} (src_workload, t)",
    "CREATE INDEX IF NOT EXISTS {name}_dst ON {name} (dst_workload, t)",
)
PART_ROWS = 100_000

_NAMES = ", ".join(COLUMNS)
_INSERT = "INSERT INTO {name} (" + _NAMES + ") VALUES (" + ", ".join("?" * len(COLUMNS)) + ")"
_INSERT_ID = "INSERT INTO {name} (id, " + _NAMES + ") VALUES (" + ", ".join("?" * (len(COLUMNS) + 1)) + ")"
_HIT = (
    "INSERT INTO hits (minute, rule_id, verdict, rule_tenant, policy, rule, category, count, last) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (minute, rule_id, verdict) "
    "DO UPDATE SET count = count + excluded.count, last = max(last, excluded.last)"
)


class StoreClosed(RuntimeError):
    """The flow store was closed (shutdown): nothing more is written or read."""


@dataclass(slots=True, eq=False)  # identity: the writer's list holds each once
class Part:
    """One partition as listed in `parts`. `tmin`/`tmax` bound its rows' `t` (deletes only narrow them)."""

    n: int
    name: str
    first_id: int
    last_id: int
    rows: int
    tmin: float
    tmax: float
    sealed: bool


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

    @property
    def store_id(self) -> str:
        """Unique per store, stable across restarts: the pagination cursor over several stores names it."""
        ...

    def prune(self, older_than: float, max_rows: int) -> int:
        """Delete rows older than `older_than`, then the oldest beyond `max_rows`; returns how many."""
        ...

    def close(self) -> None: ...


class SqliteFlowStore:
    """The default FlowStore: partitioned SQLite (see `_SCHEMA`). `path` ":memory:" keeps everything in one
    connection (tests). `part_rows`: rows per partition before it is sealed (indexed) and a new one begun."""

    def __init__(self, path: str, *, part_rows: int = PART_ROWS) -> None:
        self.path = path
        self.part_rows = part_rows
        self._write = self._connect()
        self._write.executescript(_SCHEMA)
        self._write_lock = threading.Lock()
        if path == ":memory:":
            self._read, self._read_lock = self._write, self._write_lock
        else:
            self._read, self._read_lock = self._connect(), threading.Lock()
        self._closed = False
        self._adopt_unpartitioned()
        self._parts = self._list(self._write)  # the writer's view, oldest first
        self._rows = sum(p.rows for p in self._parts)
        self._next_id = max((p.last_id for p in self._parts), default=0) + 1
        self.store_id = self._identity()

    def _identity(self) -> str:
        """This store's id, made once and kept in the file: row ids are only unique within one store,
        so a cursor over several managers' stores (manager/flowpeers.py) names each by it; a manager
        restarted on the same file is the same store."""
        new = uuid.uuid4().hex[:16]
        self._write.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('id', ?)", (new,))
        return str(self._write.execute("SELECT value FROM meta WHERE key = 'id'").fetchone()[0])

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL: a power cut may lose the last transactions, never corrupt; flows are
            # telemetry and their loss would be a counted drop, not worth an fsync per batch.
            conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA cache_size = -65536")  # 64 MiB: the hot partition's pages
        if self.path != ":memory:":
            conn.execute("PRAGMA wal_autocheckpoint = 16384")  # checkpoint every 64 MiB, not every 4
        return conn

    def _adopt_unpartitioned(self) -> None:
        """A store written before partitions has one `flows` table (indexed): it becomes partition 0."""
        conn = self._write
        if (
            conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'flows'").fetchone()
            is None
        ):
            return
        if conn.execute("SELECT 1 FROM parts WHERE name = 'flows'").fetchone() is not None:
            return
        n, lo, hi, tmin, tmax = conn.execute(
            "SELECT count(*), min(id), max(id), min(t), max(t) FROM flows"
        ).fetchone()
        conn.execute(
            "INSERT INTO parts VALUES (0, 'flows', ?, ?, ?, ?, ?, 1)",
            (lo or 0, hi or 0, n, tmin if tmin is not None else 0.0, tmax if tmax is not None else 0.0),
        )

    @staticmethod
    def _list(conn: sqlite3.Connection) -> list[Part]:
        rows = conn.execute(
            "SELECT n, name, first_id, last_id, rows, tmin, tmax, sealed FROM parts ORDER BY n"
        ).fetchall()
        return [Part(n, name, a, b, k, lo, hi, bool(s)) for n, name, a, b, k, lo, hi, s in rows]

    # ------------------------------------------------------------------ writes
    def insert(self, rows: Sequence[Row]) -> None:
        if not rows:
            return
        # the minute rollup and the batch's time bounds, grouped here (one dict probe a row; positions
        # as locals: this loop runs for every ingested record)
        hits: dict[tuple[int, int, str], list[Any]] = {}
        get = hits.get
        c = COL
        it, ir, iv, ic = c["t"], c["rule_id"], c["verdict"], c["count"]
        irt, ip, iru, ica = c["rule_tenant"], c["policy"], c["rule"], c["category"]
        tmin = tmax = rows[0][it]
        for r in rows:
            t = r[it]
            if t < tmin:
                tmin = t
            elif t > tmax:
                tmax = t
            key = (int(t // 60), r[ir], r[iv])
            h = get(key)
            if h is None:
                hits[key] = [key[0], key[1], key[2], r[irt], r[ip], r[iru], r[ica], r[ic], t]
            else:
                h[7] += r[ic]
                if t > h[8]:
                    h[8] = t
        with self._write_lock:
            self._open()
            conn = self._write
            hot = self._parts[-1] if self._parts and not self._parts[-1].sealed else None
            first = self._next_id
            last = first + len(rows) - 1
            conn.execute("BEGIN")
            try:
                if hot is None:
                    n = self._parts[-1].n + 1 if self._parts else 1
                    hot = Part(n, f"flows_{n}", first, first - 1, 0, tmin, tmax, False)
                    conn.execute(f"CREATE TABLE {hot.name} ({_COLUMNS_SQL})")
                    conn.execute(
                        "INSERT INTO parts VALUES (?, ?, ?, ?, 0, ?, ?, 0)",
                        (hot.n, hot.name, hot.first_id, hot.last_id, tmin, tmax),
                    )
                    created = True
                else:
                    created = False
                # the first row names its id (a new table would start at 1; ids run on across tables)
                conn.execute(_INSERT_ID.format(name=hot.name), (first, *rows[0]))
                conn.executemany(_INSERT.format(name=hot.name), rows[1:] if len(rows) > 1 else ())
                conn.executemany(_HIT, hits.values())
                k, lo, hi = hot.rows + len(rows), min(hot.tmin, tmin), max(hot.tmax, tmax)
                seal = k >= self.part_rows
                if seal:
                    for sql in _INDEXES:
                        conn.execute(sql.format(name=hot.name))
                conn.execute(
                    "UPDATE parts SET last_id = ?, rows = ?, tmin = ?, tmax = ?, sealed = ? WHERE n = ?",
                    (last, k, lo, hi, int(seal), hot.n),
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            if created:
                self._parts.append(hot)
            hot.last_id, hot.rows, hot.tmin, hot.tmax, hot.sealed = last, k, lo, hi, seal
            self._next_id = last + 1
            self._rows += len(rows)

    def _open(self) -> None:
        """Under a lock: a closed store says so (sqlite's own "Cannot operate on a closed database" named
        neither the store nor why; a reader or a late writer racing shutdown gets this instead)."""
        if self._closed:
            raise StoreClosed(f"flow store {self.path} is closed")

    # ------------------------------------------------------------------ reads
    def _snapshot(self, q: FlowQuery) -> list[Part]:
        """The partitions a query must read, newest first (call inside a read transaction)."""
        out = []
        for p in reversed(self._list(self._read)):
            if p.rows == 0:
                continue
            if q.since is not None and p.tmax < q.since:
                continue
            if q.until is not None and p.tmin >= q.until:
                continue
            if q.before_id is not None and p.first_id >= q.before_id:
                continue
            out.append(p)
        return out

    def query(self, q: FlowQuery, limit: int) -> list[tuple[int, Row]]:
        where, args = q.where()
        out: list[tuple[int, Row]] = []
        with self._read_lock:
            self._open()
            self._cidr_function(q)
            self._read.execute("BEGIN")  # one snapshot across partitions (retention may drop one)
            try:
                for p in self._snapshot(q):
                    sql = f"SELECT id, {_NAMES} FROM {p.name} WHERE {where} ORDER BY id DESC LIMIT ?"
                    for r in self._read.execute(sql, [*args, limit - len(out)]).fetchall():
                        out.append((r[0], tuple(r[1:])))
                    if len(out) >= limit:
                        break
            finally:
                self._read.execute("COMMIT")
        return out

    def aggregate(self, q: FlowQuery, columns: Sequence[str]) -> list[tuple[Any, ...]]:
        bad = [c for c in columns if c not in COL]
        if bad:
            raise ValueError(f"unknown flow columns {bad}")
        cols = ", ".join(columns)
        where, args = q.where()
        sums: dict[tuple[Any, ...], int] = {}
        with self._read_lock:
            self._open()
            self._cidr_function(q)
            self._read.execute("BEGIN")
            try:
                for p in self._snapshot(q):
                    sql = f"SELECT {cols}, sum(count) FROM {p.name} WHERE {where} GROUP BY {cols}"
                    for r in self._read.execute(sql, args).fetchall():
                        key = tuple(r[:-1])
                        sums[key] = sums.get(key, 0) + r[-1]
            finally:
                self._read.execute("COMMIT")
        return [(*k, n) for k, n in sums.items()]

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
            self._open()
            rows = self._read.execute(sql, (int(since // 60),)).fetchall()
        return [Hit(*r) for r in rows]

    def rows(self) -> int:
        """Kept as rows are written and deleted (count(*) walks a table: seconds at 10M)."""
        return self._rows

    @property
    def partitions(self) -> int:
        return len(self._parts)

    # ------------------------------------------------------------------ retention
    def prune(self, older_than: float, max_rows: int, chunk: int = 20_000) -> int:
        """Rows older than `older_than`, then all but the newest `max_rows` ids. A partition entirely
        beyond the bound is dropped whole; the one at the edge loses rows in chunks, each its own
        transaction, so a large prune never holds the write lock for long. Ids grow with each insert and
        only the oldest are deleted, so "the newest max_rows" is an id bound (no count, no OFFSET scan); a
        row deleted by age out of order only makes it keep fewer. Stops early once the store is closed."""
        deleted = 0
        # by age: a partition whose newest row is older goes whole, an older-starting one row by row
        for p in list(self._parts):
            if p.tmin >= older_than:
                continue
            if p.tmax < older_than:
                deleted += self._drop(p)
            else:
                deleted += self._delete(p, "t < ?", older_than, chunk)
        # by count
        live = [p for p in self._parts if p.rows]
        if live:
            bound = live[-1].last_id - max_rows
            for p in list(self._parts):
                if p.first_id > bound:
                    break
                if p.last_id <= bound:
                    deleted += self._drop(p)
                else:
                    deleted += self._delete(p, "id <= ?", bound, chunk)
        with self._write_lock:
            if not self._closed:
                self._write.execute("DELETE FROM hits WHERE minute < ?", (int(older_than // 60),))
        return deleted

    def _drop(self, p: Part) -> int:
        with self._write_lock:
            if self._closed or p not in self._parts:
                return 0
            conn = self._write
            conn.execute("BEGIN")
            try:
                conn.execute(f"DROP TABLE IF EXISTS {p.name}")
                conn.execute("DELETE FROM parts WHERE n = ?", (p.n,))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            self._parts.remove(p)
            self._rows -= p.rows
            return p.rows

    def _delete(self, p: Part, cond: str, bound: float, chunk: int) -> int:
        sql = f"DELETE FROM {p.name} WHERE id IN (SELECT id FROM {p.name} WHERE {cond} ORDER BY id LIMIT ?)"
        deleted = 0
        while True:
            with self._write_lock:
                if self._closed or p not in self._parts:
                    return deleted
                conn = self._write
                conn.execute("BEGIN")
                try:
                    n = conn.execute(sql, (bound, chunk)).rowcount
                    conn.execute("UPDATE parts SET rows = rows - ? WHERE n = ?", (n, p.n))
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                p.rows -= n
                self._rows -= n
            deleted += n
            if n < chunk:
                return deleted

    def close(self) -> None:
        with self._write_lock:
            self._closed = True
            self._write.close()
        if self._read is not self._write:
            with self._read_lock:
                self._read.close()


__all__ = [
    "COL",
    "COLUMNS",
    "PART_ROWS",
    "FlowQuery",
    "FlowStore",
    "Hit",
    "Part",
    "Row",
    "SqliteFlowStore",
    "StoreClosed",
    "in_cidrs",
]
