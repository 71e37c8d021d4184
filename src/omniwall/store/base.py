"""The store contract: a revisioned key-value store with transactions and a replayable watch.

Modelled on etcd v3 so an etcd implementation is a drop-in:
- one global `revision`; every write (put, delete, or a whole txn) bumps it by exactly one, and every key
  it touched records that revision as its `mod_revision`;
- history is kept per key (one `Event` per change) until an explicit `compact(R)`;
- `txn` compares keys' `mod_revision`s and applies one list of operations or the other, all or nothing;
- `events(R)` / `watch(R)` replay every change with revision >= R (inclusive, like etcd's start
  revision), and raise `CompactedError` when R is older than the compaction point.

Values are text (JSON in practice). A delete of a missing key is a no-op and writes nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable


class StoreError(Exception):
    """Base class of store failures."""


class StoreUnavailable(StoreError):
    """The store cannot be reached now (a cluster store with no member answering); nothing was written
    by the failed call, and the caller may retry (the API answers 503)."""


class StoreLimitError(StoreError):
    """One write is larger than the store takes in one transaction (etcd's --max-txn-ops or
    --max-request-bytes); nothing was written (the API answers 413: split the request)."""


class CompactedError(StoreError):
    """The requested revision's history was compacted away; callers must resync from a snapshot."""

    def __init__(self, requested: int, compacted: int) -> None:
        super().__init__(
            f"revision {requested} has been compacted (history starts at revision {compacted}); "
            "resync from a snapshot"
        )
        self.requested = requested
        self.compacted = compacted


class FutureRevisionError(StoreError):
    """The requested revision is newer than the store's current revision."""

    def __init__(self, requested: int, current: int) -> None:
        super().__init__(f"revision {requested} is in the future (current revision is {current})")
        self.requested = requested
        self.current = current


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: str
    create_revision: int  # revision of the put that created this incarnation of the key
    mod_revision: int  # revision of the last change
    version: int  # number of puts since creation (1 after the first put)


@dataclass(frozen=True, slots=True)
class Event:
    revision: int
    type: Literal["put", "delete"]
    key: str
    value: str | None  # the new value (None for a delete)


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: str


@dataclass(frozen=True, slots=True)
class Delete:
    key: str


Op = Put | Delete


@dataclass(frozen=True, slots=True)
class Compare:
    """Holds when `key`'s current mod_revision equals `mod_revision` (0 means: the key must not exist)."""

    key: str
    mod_revision: int


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool  # all compares held (the success ops ran) or not (the failure ops ran)
    revision: int  # store revision after the txn (unchanged when nothing was written)
    failed: tuple[Compare, ...] = ()  # the compares that did not hold


@runtime_checkable
class Store(Protocol):
    def revision(self) -> int:
        """Current revision (0 for an empty store that was never written)."""
        ...

    def compacted_revision(self) -> int:
        """Oldest revision whose history is still kept (0 when never compacted)."""
        ...

    def get(self, key: str, *, revision: int | None = None) -> KeyValue | None:
        """Current value, or the value as of `revision` (CompactedError if that history is gone)."""
        ...

    def range(
        self, prefix: str, *, start_after: str | None = None, limit: int | None = None
    ) -> tuple[list[KeyValue], int]:
        """Keys starting with `prefix`, sorted, after `start_after`; and the revision they reflect."""
        ...

    def put(self, key: str, value: str) -> int:
        """Write one key; returns the new revision."""
        ...

    def delete(self, key: str) -> int | None:
        """Delete one key; returns the new revision, or None when the key did not exist."""
        ...

    def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """Compare-and-swap: all compares hold -> apply `success`, else `failure`; one revision, atomic."""
        ...

    def events(self, from_revision: int, *, limit: int | None = None, head: int | None = None) -> list[Event]:
        """Every change with revision >= from_revision, oldest first (CompactedError if compacted).
        `head`: the store revision the caller already knows is reached (it read it, or wrote it): a
        store that must otherwise ask its server for it (etcd) reads up to there without asking."""
        ...

    def watch(
        self, from_revision: int, *, stop: threading.Event | None = None, poll: float = 0.5
    ) -> Iterator[Event]:
        """Replay from `from_revision`, then follow new changes until `stop` is set (blocking)."""
        ...

    def wait(self, revision: int, timeout: float) -> bool:
        """Block until the store revision is >= `revision` or `timeout` passes; True if reached."""
        ...

    def watched_revision(self) -> int | None:
        """The revision up to which this store already holds every change without asking its server
        (etcd: its own watch), for a woken watcher to read up to; None when it has no such view (a
        local store reads its head for free)."""
        ...

    def history(self, key: str) -> list[Event]:
        """Every retained change of one key, oldest first."""
        ...

    def compact(self, revision: int) -> None:
        """Drop history older than `revision`; values as of `revision` and later stay readable."""
        ...

    def close(self) -> None: ...


def follow(store: Store, from_revision: int, stop: threading.Event | None, poll: float) -> Iterator[Event]:
    """Shared `watch` loop: page through `events`, block in `wait` between pages."""
    next_rev = from_revision
    while stop is None or not stop.is_set():
        batch = store.events(next_rev, limit=1000)
        if batch:
            yield from batch
            next_rev = batch[-1].revision + 1
            continue
        store.wait(next_rev, poll)


def check_unique_keys(ops: Sequence[Op]) -> None:
    """A txn touches each key at most once (as in etcd), so its outcome never depends on op order."""
    seen: set[str] = set()
    for op in ops:
        if op.key in seen:
            raise ValueError(f"txn touches key {op.key!r} more than once")
        seen.add(op.key)


def prefix_end(prefix: str) -> str:
    """Smallest string greater than every string starting with `prefix` (for range scans)."""
    return prefix + "\U0010ffff"
