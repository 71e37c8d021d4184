"""In-memory `Store` for tests and `--db :memory:`; same semantics as the SQLite store, nothing durable."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Sequence

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
)


class MemoryStore:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._rev = 0
        self._compacted = 0
        self._kv: dict[str, KeyValue] = {}
        self._keys: list[str] = []  # sorted, for range scans
        self._events: list[Event] = []  # ordered by revision

    # ---- reads
    def revision(self) -> int:
        with self._cond:
            return self._rev

    def compacted_revision(self) -> int:
        with self._cond:
            return self._compacted

    def get(self, key: str, *, revision: int | None = None) -> KeyValue | None:
        with self._cond:
            if revision is None or revision >= self._rev:
                if revision is not None and revision > self._rev:
                    raise FutureRevisionError(revision, self._rev)
                return self._kv.get(key)
            if revision < self._compacted:
                raise CompactedError(revision, self._compacted)
            last: Event | None = None
            for e in self._events:
                if e.revision > revision:
                    break
                if e.key == key:
                    last = e
            if last is None or last.type == "delete":
                return None
            # create_revision/version are not tracked historically; mod_revision is what callers need.
            return KeyValue(key, last.value or "", last.revision, last.revision, 0)

    def range(
        self, prefix: str, *, start_after: str | None = None, limit: int | None = None
    ) -> tuple[list[KeyValue], int]:
        with self._cond:
            lo = prefix if start_after is None or start_after < prefix else start_after
            i = (
                bisect.bisect_right(self._keys, lo)
                if start_after is not None
                else bisect.bisect_left(self._keys, lo)
            )
            out: list[KeyValue] = []
            while i < len(self._keys) and self._keys[i].startswith(prefix):
                if limit is not None and len(out) >= limit:
                    break
                out.append(self._kv[self._keys[i]])
                i += 1
            return out, self._rev

    def events(self, from_revision: int, *, limit: int | None = None, head: int | None = None) -> list[Event]:
        with self._cond:
            if from_revision < self._compacted:
                raise CompactedError(from_revision, self._compacted)
            revs = [e.revision for e in self._events]
            i = bisect.bisect_left(revs, from_revision)
            if limit is None or i + limit >= len(revs):
                return self._events[i:]
            # Never split one revision across pages: a txn's events arrive together.
            end = bisect.bisect_right(revs, revs[i + limit - 1]) if limit > 0 else i
            return self._events[i:end]

    def history(self, key: str) -> list[Event]:
        with self._cond:
            return [e for e in self._events if e.key == key]

    def watch(
        self, from_revision: int, *, stop: threading.Event | None = None, poll: float = 0.5
    ) -> Iterator[Event]:
        return follow(self, from_revision, stop, poll)

    def watched_revision(self) -> None:
        return None  # its head is a local read

    def wait(self, revision: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._rev >= revision, timeout)

    # ---- writes
    def put(self, key: str, value: str) -> int:
        return self.txn([], [Put(key, value)]).revision

    def delete(self, key: str) -> int | None:
        with self._cond:
            if key not in self._kv:
                return None
            return self.txn([], [Delete(key)]).revision

    def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        check_unique_keys(success)
        check_unique_keys(failure)
        with self._cond:
            failed = tuple(c for c in compares if self._mod_rev(c.key) != c.mod_revision)
            ops = failure if failed else success
            rev = self._rev + 1
            events: list[Event] = []
            for op in ops:
                match op:
                    case Put(key, value):
                        prev = self._kv.get(key)
                        if prev is None:
                            bisect.insort(self._keys, key)
                            kv = KeyValue(key, value, rev, rev, 1)
                        else:
                            kv = KeyValue(key, value, prev.create_revision, rev, prev.version + 1)
                        self._kv[key] = kv
                        events.append(Event(rev, "put", key, value))
                    case Delete(key):
                        if key in self._kv:
                            del self._kv[key]
                            self._keys.pop(bisect.bisect_left(self._keys, key))
                            events.append(Event(rev, "delete", key, None))
            if events:
                self._rev = rev
                self._events.extend(events)
                self._cond.notify_all()
            return TxnResult(not failed, self._rev, failed)

    def compact(self, revision: int) -> None:
        with self._cond:
            if revision > self._rev:
                raise FutureRevisionError(revision, self._rev)
            if revision <= self._compacted:
                return
            # Keep each key's last put before `revision` (its value as of `revision`), drop the rest.
            keep_base: dict[str, Event] = {}
            for e in self._events:
                if e.revision < revision:
                    keep_base[e.key] = e
            base = {id(e) for e in keep_base.values() if e.type == "put"}
            self._events = [e for e in self._events if e.revision >= revision or id(e) in base]
            self._compacted = revision

    def close(self) -> None:
        return None

    def _mod_rev(self, key: str) -> int:
        kv = self._kv.get(key)
        return kv.mod_revision if kv else 0
