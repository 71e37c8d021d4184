"""SQLite implementation of `Store` (the embedded default), stdlib `sqlite3` only.

Durability: WAL journal + `synchronous=FULL`, so a commit is fsynced before `put`/`txn` return; nothing
acknowledged is lost on power failure or `kill -9`, and a txn is one SQLite transaction (all or nothing).

Layout: `kv` holds the current value of each key; `events` holds one row per change (the history, and
what `watch` replays); `meta` holds the global revision and the compaction point. Several processes
(manager replicas, `omniwall token` on the same file) may share one database: writes take SQLite's write
lock (`BEGIN IMMEDIATE`), and `wait`/`watch` poll for revisions written by other processes.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from omniwall.store.base import (
    CompactedError,
    Compare,
    Delete,
    Event,
    FutureRevisionError,
    KeyValue,
    Op,
    Put,
    TxnResult,
    check_unique_keys,
    follow,
    prefix_end,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL CHECK (type IN ('put', 'delete')),
    key TEXT NOT NULL,
    value TEXT,
    PRIMARY KEY (revision, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_by_key ON events (key, revision);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0), ('compacted', 0);
"""


def private_file(path: str) -> None:
    """Create the database file 0600 (owner only), or take group/other access away from an existing one:
    it holds every tenant's configuration and the token hashes. SQLite creates the -wal and -shm files
    with the database file's mode, so they follow."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
        for extra in (f"{path}-wal", f"{path}-shm"):
            with contextlib.suppress(FileNotFoundError):
                if os.stat(extra).st_mode & 0o077:
                    os.chmod(extra, 0o600)
    else:
        os.close(fd)


class SqliteStore:
    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 10_000) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            private_file(self.path)
        # One connection shared by threads, serialised by a lock: simple, and SQLite serialises writers
        # anyway. isolation_level=None: we issue BEGIN/COMMIT ourselves.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        with self._lock:
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if self.path != ":memory:" and str(mode).lower() != "wal":
                raise RuntimeError(f"{self.path}: could not switch SQLite to WAL mode (got {mode})")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.executescript(SCHEMA)

    # ---- reads
    def revision(self) -> int:
        with self._lock:
            return self._meta("revision")

    def compacted_revision(self) -> int:
        with self._lock:
            return self._meta("compacted")

    def get(self, key: str, *, revision: int | None = None) -> KeyValue | None:
        with self._lock, self._read():
            current = self._meta("revision")
            if revision is None or revision == current:
                row = self._db.execute(
                    "SELECT key, value, create_revision, mod_revision, version FROM kv WHERE key = ?", (key,)
                ).fetchone()
                return KeyValue(*row) if row else None
            if revision > current:
                raise FutureRevisionError(revision, current)
            compacted = self._meta("compacted")
            if revision < compacted:
                raise CompactedError(revision, compacted)
            row = self._db.execute(
                "SELECT revision, type, value FROM events WHERE key = ? AND revision <= ? "
                "ORDER BY revision DESC, seq DESC LIMIT 1",
                (key, revision),
            ).fetchone()
            if row is None or row[1] == "delete":
                return None
            return KeyValue(key, row[2], row[0], row[0], 0)

    def range(
        self, prefix: str, *, start_after: str | None = None, limit: int | None = None
    ) -> tuple[list[KeyValue], int]:
        lo = prefix if start_after is None or start_after < prefix else start_after
        op = ">" if start_after is not None and lo == start_after else ">="
        sql = (
            "SELECT key, value, create_revision, mod_revision, version FROM kv "
            f"WHERE key {op} ? AND key < ? ORDER BY key"
        )
        args: tuple[object, ...] = (lo, prefix_end(prefix))
        if limit is not None:
            sql += " LIMIT ?"
            args += (int(limit),)
        with self._lock, self._read():
            rows = self._db.execute(sql, args).fetchall()
            rev = self._meta("revision")
        return [KeyValue(*r) for r in rows if r[0].startswith(prefix)], rev

    def events(self, from_revision: int, *, limit: int | None = None, head: int | None = None) -> list[Event]:
        sql = "SELECT revision, type, key, value FROM events WHERE revision >= ? ORDER BY revision, seq"
        args: tuple[object, ...] = (from_revision,)
        with self._lock, self._read():
            compacted = self._meta("compacted")
            if from_revision < compacted:
                raise CompactedError(from_revision, compacted)
            if limit is not None:
                # Never split one revision across pages: a txn's events arrive together.
                last = self._db.execute(
                    "SELECT revision FROM events WHERE revision >= ? ORDER BY revision, seq LIMIT 1 OFFSET ?",
                    (from_revision, max(int(limit) - 1, 0)),
                ).fetchone()
                if last is not None:
                    sql = sql.replace("WHERE revision >= ?", "WHERE revision >= ? AND revision <= ?")
                    args = (from_revision, last[0])
            rows = self._db.execute(sql, args).fetchall()
        return [Event(*r) for r in rows]

    def history(self, key: str) -> list[Event]:
        with self._lock:
            rows = self._db.execute(
                "SELECT revision, type, key, value FROM events WHERE key = ? ORDER BY revision, seq", (key,)
            ).fetchall()
        return [Event(*r) for r in rows]

    def watch(
        self, from_revision: int, *, stop: threading.Event | None = None, poll: float = 0.5
    ) -> Iterator[Event]:
        return follow(self, from_revision, stop, poll)

    def watched_revision(self) -> None:
        return None  # its head is a local read

    def wait(self, revision: int, timeout: float) -> bool:
        # Writes from this process notify the condition; writes from other processes are seen by polling.
        step = min(timeout, 0.1) if timeout > 0 else 0
        remaining = timeout
        with self._cond:
            while True:
                if self._meta("revision") >= revision:
                    return True
                if remaining <= 0:
                    return False
                self._cond.wait(step)
                remaining -= step

    # ---- writes
    def put(self, key: str, value: str) -> int:
        return self.txn([], [Put(key, value)]).revision

    def delete(self, key: str) -> int | None:
        with self._lock:
            # "Key absent" holds -> nothing to do; otherwise the failure branch deletes it.
            res = self.txn([Compare(key, 0)], [], [Delete(key)])
            return None if res.succeeded else res.revision

    def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        check_unique_keys(success)
        check_unique_keys(failure)
        with self._cond:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                failed = tuple(c for c in compares if self._mod_rev(c.key) != c.mod_revision)
                ops = failure if failed else success
                rev = self._meta("revision") + 1
                seq = 0
                for op in ops:
                    if isinstance(op, Put):
                        row = db.execute(
                            "SELECT create_revision, version FROM kv WHERE key = ?", (op.key,)
                        ).fetchone()
                        create, version = (row[0], row[1] + 1) if row else (rev, 1)
                        db.execute(
                            "INSERT OR REPLACE INTO kv (key, value, create_revision, mod_revision, version) "
                            "VALUES (?, ?, ?, ?, ?)",
                            (op.key, op.value, create, rev, version),
                        )
                        db.execute(
                            "INSERT INTO events (revision, seq, type, key, value) VALUES (?, ?, 'put', ?, ?)",
                            (rev, seq, op.key, op.value),
                        )
                        seq += 1
                    elif isinstance(op, Delete):
                        if db.execute("DELETE FROM kv WHERE key = ?", (op.key,)).rowcount:
                            db.execute(
                                "INSERT INTO events (revision, seq, type, key, value) "
                                "VALUES (?, ?, 'delete', ?, NULL)",
                                (rev, seq, op.key),
                            )
                            seq += 1
                    else:  # pragma: no cover - guarded by the type
                        raise TypeError(f"not a store op: {op!r}")
                if seq:
                    db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (rev,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            current = rev if seq else rev - 1
            if seq:
                self._cond.notify_all()
            return TxnResult(not failed, current, failed)

    def compact(self, revision: int) -> None:
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                current, compacted = self._meta("revision"), self._meta("compacted")
                if revision > current:
                    raise FutureRevisionError(revision, current)
                if revision > compacted:
                    # Keep each key's last put before `revision` (its value as of `revision`).
                    db.execute(
                        "DELETE FROM events WHERE revision < :r AND NOT ("
                        " type = 'put' AND revision = (SELECT MAX(e2.revision) FROM events e2"
                        "  WHERE e2.key = events.key AND e2.revision < :r))",
                        {"r": revision},
                    )
                    db.execute("UPDATE meta SET value = ? WHERE name = 'compacted'", (revision,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- helpers
    def _meta(self, name: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()[0])

    def _mod_rev(self, key: str) -> int:
        row = self._db.execute("SELECT mod_revision FROM kv WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _read(self) -> _ReadTxn:
        return _ReadTxn(self._db)


class _ReadTxn:
    """A read transaction: several SELECTs see one snapshot even while other processes write."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._own = False

    def __enter__(self) -> None:
        if not self._db.in_transaction:
            self._db.execute("BEGIN")
            self._own = True

    def __exit__(self, *exc: object) -> None:
        if self._own:
            self._db.execute("COMMIT")
