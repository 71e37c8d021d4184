"""Flow ingest: enrich agents' records, queue them (bounded), store them from one writer thread, and
count everything that does not make it.

    submit(host, rows, agent_dropped)   from the API, on the event loop: never blocks on the disk
      -> bounded queue (records)        full: the batch is dropped and counted ("manager-queue")
      -> writer thread                  one transaction per batch (coalesced); a failed write is
                                        counted ("manager-store"); prunes by age and row count
    subscribers (live stream)           each a bounded asyncio queue; a slow reader's overflow is
                                        counted against that reader ("watch"), never the store

Accounting: `offered == stored + dropped["manager-queue"] + dropped["manager-store"] + pending`, at every
moment (`stats()`), so no record is lost silently. What agents lost before posting (FlowBatch.dropped,
cumulative since the agent started) is kept per host as last reported.

Enrichment: each end's address is looked up in an address book built from the model (workload ips ->
"tenant/name"), rebuilt when the model's revision moves; the local end falls back to the record's own
`workload` when that workload runs on the reporting host (an address not yet reported).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omniwall.model.catalog import Catalog

from .flowstore import COL, FlowStore, Row

if TYPE_CHECKING:
    from .service import Manager

log = logging.getLogger(__name__)

QUEUE_RECORDS = 500_000  # records waiting for the writer before batches are dropped
WRITE_BATCH = 50_000  # records per write transaction at most (batches are coalesced up to it)
SUBSCRIBER_RECORDS = 10_000  # records a live-stream reader may lag behind before it loses some
MAX_SUBSCRIBERS = 256  # live readers at once: each costs a filter pass per record ingested
POLICY_SERIES = 1_000  # distinct (policy, verdict) counters kept before the rest go to "(other)"
DROP_PLACES = ("manager-queue", "manager-store")
Stored = Callable[[bool], None]  # told whether a submitted batch was committed


# A record as the API parsed it: a dict with FlowRecord's fields (FlowRecord.to_json() gives one too).
RecordDict = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class AddressBook:
    """The model's addresses: ip -> (workload "tenant/name", tenant); workload -> its host."""

    addresses: Mapping[str, tuple[str, str]]
    hosts: Mapping[str, str]

    @staticmethod
    def of(catalog: Catalog) -> AddressBook:
        addresses: dict[str, tuple[str, str]] = {}
        hosts: dict[str, str] = {}
        for (tenant, name), w in catalog.workloads.items():
            wl = f"{tenant}/{name}"
            hosts[wl] = w.spec.host
            for v in w.spec.vnics:
                for ip in v.ips:
                    addresses[ip] = (wl, tenant)
        return AddressBook(addresses, hosts)


def to_rows(host: str, records: Iterable[RecordDict], book: AddressBook) -> list[Row]:
    """Stored rows (flowstore.COLUMNS order) of one host's records, each end named from the model."""
    return rows_of(host, (_values(host, r) for r in records), book)


def _values(host: str, r: RecordDict) -> tuple[Any, ...]:
    return (
        r["start"],
        r["end"],
        host,
        r["hop"],
        r["ifname"],
        r["workload"],
        r["verdict"],
        r["rule_id"],
        r["rule_tenant"],
        r["policy"],
        r["rule"],
        r["category"],
        r["revision"],
        r["proto"],
        r["src"],
        r["dst"],
        r.get("sport", 0),
        r.get("dport", 0),
        r.get("packets", 0),
        r.get("bytes", 0),
        r.get("count", 1),
        bool(r.get("final", True)),
    )


_UNKNOWN = (None, None)  # an address no workload has: (workload, tenant)


def rows_of(host: str, records: Iterable[Sequence[Any]], book: AddressBook) -> list[Row]:
    """`to_rows` of records given as value tuples in FlowRecord's field order (the API's decoder yields
    these; their `host` is `host`, which the API checked): one tuple build per record, no dict, the
    record's 22 values kept as they are (`final` a bool, stored as 0/1). The ingest's hot loop
    (bench/flows.py)."""
    look = book.addresses.get
    host_of = book.hosts.get
    unknown = _UNKNOWN
    out: list[Row] = []
    append = out.append
    for r in records:
        s = look(r[14], unknown)
        d = look(r[15], unknown)
        if r[3] == "egress":
            if s is unknown:
                wl = r[5]
                if host_of(wl) == host:
                    s = (wl, wl.partition("/")[0])
        elif d is unknown:
            wl = r[5]
            if host_of(wl) == host:
                d = (wl, wl.partition("/")[0])
        append((*r[:22], *s, *d))
    return out


@dataclass(eq=False)  # identity: readers live in a set
class Subscription:
    """One live-stream reader: batches of rows, bounded in records; what overflows is counted."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[list[Row]] = field(default_factory=asyncio.Queue)
    queued: int = 0
    dropped: int = 0

    def offer(self, rows: list[Row]) -> None:
        if self.queued + len(rows) > SUBSCRIBER_RECORDS:
            self.dropped += len(rows)
            return
        self.queued += len(rows)
        self.queue.put_nowait(rows)

    async def get(self, timeout: float) -> list[Row] | None:
        try:
            rows = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None
        self.queued -= len(rows)
        return rows


@dataclass
class HostFlows:
    received: int = 0  # records this host posted (accepted batches)
    batches: int = 0
    last: float = 0.0  # epoch seconds of its last batch
    agent_dropped: dict[str, int] = field(default_factory=dict)  # as last reported (cumulative)


class FlowService:
    def __init__(
        self,
        store: FlowStore,
        *,
        retention: float = 24 * 3600.0,
        max_records: int = 10_000_000,
        queue_records: int = QUEUE_RECORDS,
        prune_every: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.retention = retention
        self.max_records = max_records
        self.queue_records = queue_records
        self.prune_every = prune_every
        self.clock = clock
        self._lock = threading.Lock()
        # (rows, called with True/False once they are written or failed to be: the API's acknowledgement)
        self._queue: queue.SimpleQueue[tuple[list[Row], Stored | None] | None] = queue.SimpleQueue()
        self._idle = threading.Condition(self._lock)
        self.pending = 0  # records queued or being written
        self.offered = 0
        self.stored = 0
        self.pruned = 0
        self.write_seconds = 0.0  # wall time inside store.insert: stored / this = the store's own rate
        self.dropped: dict[str, int] = dict.fromkeys(DROP_PLACES, 0)
        self.refused_batches: dict[str, int] = {}  # reason -> batches refused before parsing records
        self.deferred_batches = 0  # answered 429 (queue nearly full): the agent keeps them and retries
        self.hosts: dict[str, HostFlows] = {}
        self.verdicts: dict[tuple[str, str], int] = {}  # ("tenant/policy", verdict) -> records
        self.subscribers: set[Subscription] = set()
        self._book: tuple[object, int, AddressBook] | None = None
        self._writer: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ ingest
    def address_book(self, m: Manager) -> AddressBook:
        cached = self._book
        if cached is not None and cached[0] is m and cached[1] == m.revision:
            return cached[2]
        catalog, revision = m.snapshot_catalog()
        book = AddressBook.of(catalog)
        self._book = (m, revision, book)
        return book

    def refuse(self, reason: str) -> None:
        """Count a batch refused before its records were read (malformed, oversized, wrong host)."""
        with self._lock:
            self.refused_batches[reason] = self.refused_batches.get(reason, 0) + 1

    def busy(self, records: int) -> bool:
        """True when `records` more would not fit the queue: the API then answers 429 before reading the
        body, and the agent keeps the batch and retries later (backpressure, not loss). Counted."""
        with self._lock:
            if self.pending + min(records, self.queue_records) <= self.queue_records:
                return False
            self.deferred_batches += 1
            return True

    def submit(
        self,
        host: str,
        rows: list[Row],
        agent_dropped: Mapping[str, int],
        on_stored: Stored | None = None,
    ) -> tuple[int, int]:
        """Queue one host's rows for storage and hand them to live readers. Returns (accepted, dropped).
        `on_stored(ok)` is called from the writer thread once the rows are committed (ok) or failed to be
        (the API acknowledges a batch only then: nothing acknowledged is lost in a crash). Call on the
        event loop of the live readers (the API's), so publishing needs no hop."""
        self._ensure_writer()
        n = len(rows)
        with self._lock:
            self.offered += n
            h = self.hosts.setdefault(host, HostFlows())
            h.batches += 1
            h.received += n
            h.last = self.clock()
            if agent_dropped:
                h.agent_dropped = dict(agent_dropped)
            if self._closed:  # shutting down: not written, not acknowledged (the agent sends it again)
                self.dropped["manager-store"] += n
                accepted = False
            elif self.pending + n > self.queue_records:
                self.dropped["manager-queue"] += n
                accepted = False
            else:
                self.pending += n
                accepted = True
            self._count_verdicts(rows)
        if accepted and n:
            self._queue.put((rows, on_stored))
        elif on_stored is not None:
            on_stored(accepted)  # nothing to write (empty), or refused: answer at once
        for s in list(self.subscribers):
            s.offer(rows)
        return (n, 0) if accepted else (0, n)

    def _count_verdicts(self, rows: list[Row]) -> None:
        # group the batch first (tuple keys, no string per row), then fold into the bounded series
        c = COL
        it, ip, iv, ic = c["rule_tenant"], c["policy"], c["verdict"], c["count"]
        batch: dict[tuple[str, str, str], int] = {}
        get = batch.get
        for r in rows:
            k = (r[it], r[ip], r[iv])
            batch[k] = get(k, 0) + r[ic]
        v = self.verdicts
        for (tenant, policy, verdict), n in batch.items():
            key = (f"{tenant}/{policy}", verdict)
            if key not in v and len(v) >= POLICY_SERIES:
                key = ("(other)", verdict)
            v[key] = v.get(key, 0) + n

    # ------------------------------------------------------------------ writer
    def _ensure_writer(self) -> None:
        if self._writer is None and not self._closed:
            with self._lock:  # close() takes the lock too: a writer starts before it, or never
                if self._writer is None and not self._closed:
                    self._writer = threading.Thread(
                        target=self._write_loop, name="omniwall-flows", daemon=True
                    )
                    self._writer.start()

    def _write_loop(self) -> None:
        next_prune = time.monotonic() + self.prune_every
        while True:
            try:
                first = self._queue.get(timeout=min(1.0, self.prune_every))
            except queue.Empty:
                first = []
            if first is None:
                return
            batch: list[Row] = []
            waiting: list[Stored] = []
            stop = False
            item: tuple[list[Row], Stored | None] | None = first or None
            while True:  # coalesce what is already waiting, up to WRITE_BATCH
                if item is not None:
                    batch += item[0]
                    if item[1] is not None:
                        waiting.append(item[1])
                if len(batch) >= WRITE_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
            if batch:
                ok = self._write(batch)
                for done in waiting:
                    done(ok)
            if not self._closed and time.monotonic() >= next_prune:  # shutting down: close() waits
                self.prune()
                next_prune = time.monotonic() + self.prune_every
            if stop:
                return

    def _write(self, batch: list[Row]) -> bool:
        t0 = time.perf_counter()
        try:
            self.store.insert(batch)
            ok = True
        except Exception:
            log.exception("storing %d flow records failed; counted as dropped (manager-store)", len(batch))
            ok = False
        with self._lock:
            self.write_seconds += time.perf_counter() - t0
            self.pending -= len(batch)
            if ok:
                self.stored += len(batch)
            else:
                self.dropped["manager-store"] += len(batch)
            self._idle.notify_all()
        return ok

    def prune(self) -> int:
        """Retention: rows older than `retention` seconds, then the oldest beyond `max_records`. Not once
        `close()` began: the store may be closed under a slow writer (the store also stops mid-prune)."""
        if self._closed:
            return 0
        try:
            n = self.store.prune(self.clock() - self.retention, self.max_records)
        except Exception:
            log.exception("pruning flow records failed; retrying later")
            return 0
        with self._lock:
            self.pruned += n
        return n

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every accepted record is written (tests, benchmarks, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self) -> None:
        """Write what is queued, stop the writer, close the store. Under the lock `_ensure_writer` takes:
        a writer being started as close begins is joined, not left running into a closed store."""
        with self._lock:
            self._closed = True
            writer = self._writer
        if writer is not None:
            self._queue.put(None)
            writer.join(timeout=60)
            if writer.is_alive():  # its next write or read fails as StoreClosed, counted, not a crash
                log.warning("the flow writer is still busy after 60 s; closing the flow store under it")
            self._writer = None
        with contextlib.suppress(Exception):
            self.store.close()

    # ------------------------------------------------------------------ live readers
    def subscribe(self) -> Subscription:
        """A new live reader (on the running event loop); LookupError when MAX_SUBSCRIBERS read already."""
        if len(self.subscribers) >= MAX_SUBSCRIBERS:
            raise LookupError(f"{MAX_SUBSCRIBERS} live flow readers already; try again later")
        s = Subscription(asyncio.get_running_loop())
        self.subscribers.add(s)
        return s

    def unsubscribe(self, s: Subscription) -> None:
        self.subscribers.discard(s)

    # ------------------------------------------------------------------ numbers
    def verdict_counts(self) -> dict[tuple[str, str], int]:
        """("tenant/policy", verdict) -> records, bounded (POLICY_SERIES, then "(other)")."""
        with self._lock:
            return dict(self.verdicts)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "offered": self.offered,
                "stored": self.stored,
                "pending": self.pending,
                "pruned": self.pruned,
                "dropped": dict(self.dropped),
                "refusedBatches": dict(self.refused_batches),
                "deferredBatches": self.deferred_batches,
                "hosts": {
                    h: {
                        "received": f.received,
                        "batches": f.batches,
                        "last": f.last,
                        "agentDropped": dict(f.agent_dropped),
                    }
                    for h, f in sorted(self.hosts.items())
                },
                "watchDropped": sum(s.dropped for s in self.subscribers),
                "writeSeconds": round(self.write_seconds, 3),
            }


__all__ = ["AddressBook", "FlowService", "HostFlows", "RecordDict", "Subscription", "rows_of", "to_rows"]
