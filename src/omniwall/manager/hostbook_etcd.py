"""Host status in etcd, shared by every manager (docs/etcd.md, "Host status and agent liveness").

Runtime keys (store/runtime.py), outside the store's objects:
- `hosts/status/<host>`: the last report (realized revision, last error, counters, addresses, conntrack),
  JSON, no lease: it outlives a manager, like the agent's state does. Only reports write it, so a
  manager the agent just left never overwrites a newer report with its copy;
- `hosts/seen/<host>`: when the host was last heard of (a stream opening or ending, a heartbeat);
- `hosts/live/<host>/<manager>`: the number of feed streams of `host` that `manager` holds, put with
  that manager's lease. A host is connected while any such key exists. A clean end of the last stream
  deletes the key at once; a manager that dies stops renewing its lease, and etcd deletes its keys
  `ttl` seconds later.

Writes never happen on the caller's thread (the API's event loop): they mark the host dirty and one
flusher thread writes. A change of liveness is written at once; a change of realized revision, error or
addresses (an ack) within `gather` seconds (100 ms), with every other ack that came meanwhile, in as few
txns as they fill: a change acked by a thousand hosts over a second is then a few dozen txns instead of
one per few acks (each txn costs every etcd member and every manager's watch far more than its keys;
bench/hoststatus.py --trickle). Counters, conntrack usage and last-seen alone (no ack among them) are
written together, at most once per `interval` seconds (1 s): the first after a quiet second at once, the
ones that come within the next second in one txn when it ends. A thousand agents' heartbeats and
counters, spread over time, are then about one txn a second per manager instead of one each (each txn
wakes every manager's two watches of etcd's keyspace; 1,000 idle agents' heartbeats were ~20 txns/s,
now ~2: BENCHMARKS.md "Fan-out on etcd, part 2"). Reads come from a local copy kept by a watch of
`hosts/`, overlaid with this manager's own writes not yet echoed by the watch.

The watch brings every manager's acks to every manager: with three managers, each would decode all
the fleet's reports to read a third of them (its own hosts' before a write, `GET /v1/status` now and
then). So a watched status is kept as its JSON text and decoded when first read (`_status`); the echo
of this manager's own write is not even kept (it has the status already, at that revision).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from omniwall.store.runtime import EtcdRuntime, Follower, RuntimeEvent, RuntimeKV

from .coordination import lease_ttl
from .hosts import HostStatus, HostStatusBook, MemoryHostStatusBook, conntrack_json, copy_status

log = logging.getLogger(__name__)

STATUS = "hosts/status/"
SEEN = "hosts/seen/"
LIVE = "hosts/live/"
INTERVAL = 1.0  # seconds between two writes of the changes without an ack (all hosts' together)
# seconds an ack waits for others to share its txn. Each txn costs etcd ~11 ms of CPU over 3 members
# (raft, WAL, every watch), each key in it ~0.3 ms: 100 ms rather than 50 is ~30% fewer txns and etcd CPU
# for a fleet's acks of one change (bench/hoststatus.py --trickle; BENCHMARKS.md "Fan-out on etcd, part 2")
GATHER = 0.1
MAX_OPS = 100  # per etcd txn (etcd's default limit is 128)
WRITERS = 4  # txns in flight at once


def manager_id() -> str:
    """Unique per manager process: the host name, the PID and a random part (PIDs are reused)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def status_book(store: object, manager: str) -> HostStatusBook:
    """The book the store supports: shared in etcd's runtime keys when it has them, else in memory."""
    runtime = getattr(store, "runtime", None)
    if runtime is None:
        return MemoryHostStatusBook()
    return EtcdHostStatusBook(runtime(), manager)


def _encode(st: HostStatus) -> str:
    return json.dumps(
        {
            "realizedRevision": st.realized_revision,
            "lastError": st.last_error,
            "lastSeen": st.last_seen,
            "realizedAt": st.realized_at,
            "counters": [[rid, p, b] for rid, (p, b) in sorted(st.counters.items())],
            "addresses": st.addresses,
            "conntrack": list(st.conntrack) if st.conntrack else None,
        },
        separators=(",", ":"),
    )


def _decode(value: str) -> HostStatus:
    d = json.loads(value)
    ct = d.get("conntrack")
    return HostStatus(
        realized_revision=int(d.get("realizedRevision", 0)),
        last_error=d.get("lastError"),
        last_seen=d.get("lastSeen"),
        realized_at=d.get("realizedAt"),
        counters={int(r): (int(p), int(b)) for r, p, b in d.get("counters") or []},
        addresses=dict(d.get("addresses") or {}),
        conntrack=(int(ct[0]), int(ct[1])) if ct else None,
    )


class EtcdHostStatusBook:
    def __init__(
        self,
        runtime: EtcdRuntime,
        manager: str,
        *,
        ttl: int = 0,
        interval: float = INTERVAL,
        gather: float = GATHER,
    ) -> None:
        self.rt = runtime
        self.manager = manager
        self.ttl = ttl or lease_ttl()  # a killed manager's agents show disconnected this long after
        self.interval = interval
        self.gather = gather
        self._urgent_at: float | None = None  # monotonic time the oldest unwritten ack came
        self._cond = threading.Condition()
        # from the watch: every manager's writes
        # host -> (mod revision, status or its JSON not decoded yet)
        self._remote: dict[str, tuple[int, HostStatus | str]] = {}
        self._live: dict[str, dict[str, int]] = {}  # host -> manager -> streams
        # this manager's: the newest status of hosts it wrote to or must write, and its streams
        self._local: dict[str, HostStatus] = {}  # reports not yet written
        self._seen: dict[str, str] = {}  # host -> last seen, every manager's (from the watch and ours)
        self._seen_dirty: set[str] = set()
        self._streams: dict[str, int] = {}
        self._dirty: dict[str, bool] = {}  # host -> urgent
        self._live_dirty: set[str] = set()
        self._lazy_next = 0.0  # monotonic time from which the changes without an ack may be written
        self._lease = 0
        self._renewed = 0.0
        self._follower: Follower | None = None
        self._synced = threading.Event()
        self._flusher: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._stopped = False
        self._force = False  # flush(): write everything dirty now
        self._inflight = 0  # chunks being written
        self.write_count = 0  # status and liveness txns written (the write volume, for tests)
        self.status_puts = 0  # host status keys written

    # ------------------------------------------------------------------ reads
    def _ensure_follow(self) -> None:
        if self._follower is None:
            self._follower = self.rt.follow(
                "hosts/", self._on_snapshot, self._on_event, "omniwall-hoststatus"
            )
            # the first snapshot, once; then (also while etcd is away) the local copy answers at once
            self._synced.wait(2.0)

    def _on_snapshot(self, items: list[RuntimeKV]) -> None:
        with self._cond:
            live: dict[str, dict[str, int]] = {}
            for kv in items:
                self._apply(kv.key, kv.value, kv.mod_revision, live)
            self._live = live
        self._synced.set()

    def _on_event(self, ev: RuntimeEvent) -> None:
        with self._cond:
            if ev.type == "put" and ev.value is not None:
                self._apply(ev.key, ev.value, ev.mod_revision, self._live)
            elif ev.key.startswith(LIVE):
                host, _, mgr = ev.key[len(LIVE) :].rpartition("/")
                self._live.get(host, {}).pop(mgr, None)
            elif ev.key.startswith(STATUS):
                self._remote.pop(ev.key[len(STATUS) :], None)
            self._cond.notify_all()

    def _apply(self, key: str, value: str, rev: int, live: dict[str, dict[str, int]]) -> None:
        try:
            if key.startswith(STATUS):
                host = key[len(STATUS) :]
                cur = self._remote.get(host)
                if cur is None or cur[0] < rev:  # the same revision: our own write, decoded already
                    self._remote[host] = (rev, value)
            elif key.startswith(LIVE):
                host, _, mgr = key[len(LIVE) :].rpartition("/")
                live.setdefault(host, {})[mgr] = int(value)
            elif key.startswith(SEEN):
                self._saw(key[len(SEEN) :], value)
        except (ValueError, KeyError, TypeError, IndexError) as err:
            log.error("skipping unreadable host status key %s: %s", key, err)

    def _status(self, host: str) -> HostStatus | None:
        """Under the lock: the watched status of `host`, decoded now if it was not yet."""
        cur = self._remote.get(host)
        if cur is None:
            return None
        rev, st = cur
        if isinstance(st, str):
            try:
                st = _decode(st)
            except (ValueError, KeyError, TypeError, IndexError) as err:
                log.error("skipping unreadable host status key %s%s: %s", STATUS, host, err)
                del self._remote[host]
                return None
            self._remote[host] = (rev, st)
        return st

    def _saw(self, host: str, when: str) -> None:
        if when > self._seen.get(host, ""):  # ISO 8601 UTC, one format: text order is time order
            self._seen[host] = when

    def _view(self, host: str) -> HostStatus:
        """Under the lock: this manager's newer status if any, else the watched one; connected from
        every manager's live keys (this manager's own streams counted locally, without delay)."""
        st = self._local.get(host)
        if st is None:
            st = self._status(host) or HostStatus()
        st = copy_status(st)
        seen = self._seen.get(host)
        if seen is not None and (st.last_seen is None or seen > st.last_seen):
            st.last_seen = seen
        others = sum(n for m, n in self._live.get(host, {}).items() if m != self.manager)
        st.connected = others + self._streams.get(host, 0)
        return st

    def _hosts(self) -> set[str]:
        return set(self._remote) | set(self._local) | set(self._live) | set(self._streams) | set(self._seen)

    def get(self, host: str) -> HostStatus:
        self._ensure_follow()
        with self._cond:
            return self._view(host)

    def statuses(self, desired: dict[str, int], hosts: list[str]) -> dict[str, dict[str, Any]]:
        self._ensure_follow()
        with self._cond:
            return {h: self._view(h).to_json(desired.get(h, 0)) for h in hosts}

    def conntrack(self) -> dict[str, dict[str, Any]]:
        self._ensure_follow()
        with self._cond:
            views = {h: self._view(h) for h in self._hosts()}
        return {h: conntrack_json(*st.conntrack) for h, st in views.items() if st.conntrack}

    def counters(self) -> dict[str, dict[int, tuple[int, int]]]:
        self._ensure_follow()
        with self._cond:
            return {h: self._view(h).counters for h in self._hosts()}

    # ------------------------------------------------------------------ writes (never block)
    def _mine(self, host: str) -> HostStatus:
        st = self._local.get(host)
        if st is None:
            remote = self._status(host)
            st = copy_status(remote) if remote is not None else HostStatus()
            self._local[host] = st
        return st

    def _mark(self, host: str, urgent: bool) -> None:
        self._dirty[host] = self._dirty.get(host, False) or urgent
        if urgent and self._urgent_at is None:
            self._urgent_at = time.monotonic()
        self._start_flusher()
        self._cond.notify_all()

    def connect(self, host: str, now: str) -> None:
        with self._cond:
            self._streams[host] = self._streams.get(host, 0) + 1
            self._saw_now(host, now)
            self._live_dirty.add(host)
            self._mark(host, False)

    def disconnect(self, host: str, now: str) -> None:
        with self._cond:
            self._streams[host] = max(0, self._streams.get(host, 0) - 1)
            self._saw_now(host, now)
            self._live_dirty.add(host)
            self._mark(host, False)

    def seen(self, host: str, now: str) -> None:
        with self._cond:
            self._saw_now(host, now)
            self._mark(host, False)

    def _saw_now(self, host: str, now: str) -> None:
        self._saw(host, now)
        self._seen_dirty.add(host)

    def report(
        self,
        host: str,
        now: str,
        realized_revision: int,
        error: str | None,
        counters: list[tuple[int, int, int]] | None,
        addresses: dict[str, Any] | None,
        conntrack: tuple[int, int] | None = None,
    ) -> None:
        with self._cond:
            st = self._mine(host)
            urgent = st.take_report(now, realized_revision, error, counters, addresses, conntrack)
            self._saw(host, now)
            self._mark(host, urgent)

    # ------------------------------------------------------------------ the flusher
    def _start_flusher(self) -> None:
        if self._flusher is None or not self._flusher.is_alive():
            self._stopped = False
            self._flusher = threading.Thread(target=self._run, name="omniwall-hoststatus-flush", daemon=True)
            self._flusher.start()

    def _due(self, now: float) -> tuple[list[str], float]:
        """Under the lock: the hosts to write now, and how long until the next one is due."""
        due, wait = [], self.ttl / 3
        gathered = self._urgent_at is None or now - self._urgent_at >= self.gather
        ticked = now >= self._lazy_next
        lazy = False  # a change without an ack is written now
        for host, urgent in self._dirty.items():
            if self._force or host in self._live_dirty or (gathered if urgent else ticked):
                due.append(host)
                lazy = lazy or not urgent
            elif urgent:  # an ack waits for the window, however long ago the host was last written
                wait = min(wait, self._urgent_at + self.gather - now)  # type: ignore[operator]
            else:  # the others wait for the next tick, all together
                wait = min(wait, self._lazy_next - now)
        if gathered or self._force:
            self._urgent_at = None  # every ack so far is due: the next one opens a new window
        if lazy:
            self._lazy_next = now + self.interval
        return due, wait

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                now = time.monotonic()
                due, wait = self._due(now)
                self._force = False
                if not due and (not self._lease or now - self._renewed < self.ttl / 3):
                    self._cond.wait(wait)
                    continue
                self._inflight += 1
            try:
                self._renew()
                if due:
                    self._write(due)
            except Exception as e:  # etcd away: keep everything dirty and retry
                log.warning("host status not written to etcd (retrying): %s", e)
                with self._cond:
                    self._inflight -= 1
                    if self._cond.wait_for(lambda: self._stopped, 0.5):
                        return
                continue
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()

    def _renew(self) -> None:
        """Keep this manager's lease alive; a lost one (etcd was away longer than `ttl`) is replaced and
        every live key put again."""
        now = time.monotonic()
        if self._lease and now - self._renewed < self.ttl / 3:
            return
        if self._lease and self.rt.keepalive(self._lease):
            self._renewed = now
            return
        if not self._lease and not any(self._streams.values()):
            return  # no stream held: no lease needed yet
        self._lease = self.rt.grant(self.ttl)
        self._renewed = now
        with self._cond:
            for host, n in self._streams.items():
                if n:
                    self._live_dirty.add(host)
                    self._dirty.setdefault(host, True)

    def _write(self, hosts: list[str]) -> None:
        """Up to two keys per host (status or seen, never both: seen goes with a status; live):
        chunks of MAX_OPS // 2 hosts, one txn each, `WRITERS` at a time (a burst of a thousand acks is
        twenty txns, not twenty round trips)."""
        if any(self._streams.get(h, 0) for h in hosts) and not self._lease:
            self._renew()
        size = MAX_OPS // 2
        chunks = [hosts[i : i + size] for i in range(0, len(hosts), size)]
        if len(chunks) == 1:
            self._write_chunk(chunks[0])
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(WRITERS, thread_name_prefix="omniwall-hoststatus-write")
        errors = [f.exception() for f in [self._pool.submit(self._write_chunk, c) for c in chunks]]
        for err in errors:
            if err is not None:
                raise err

    def _write_chunk(self, chunk: list[str]) -> None:
        with self._cond:
            sent = {h: copy_status(self._local[h]) for h in chunk if h in self._local}
            snap = {h: _encode(st) for h, st in sent.items()}
            live = {h: self._streams.get(h, 0) for h in chunk if h in self._live_dirty}
            seen = {h: self._seen[h] for h in chunk if h in self._seen_dirty and h not in snap}
            for h in chunk:
                self._dirty.pop(h, None)
                self._live_dirty.discard(h)
                self._seen_dirty.discard(h)
        puts = [(STATUS + h, v, 0) for h, v in snap.items()]
        puts += [(SEEN + h, v, 0) for h, v in seen.items()]
        puts += [(f"{LIVE}{h}/{self.manager}", str(n), self._lease) for h, n in live.items() if n]
        deletes = [f"{LIVE}{h}/{self.manager}" for h, n in live.items() if not n]
        try:
            rev = self.rt.write(puts, deletes)
        except Exception:
            with self._cond:  # written nothing: all of it is still to write
                for h in chunk:
                    self._dirty[h] = True
                self._live_dirty.update(live)
                self._seen_dirty.update(seen)
            raise
        with self._cond:
            self.write_count += 1
            self.status_puts += len(snap)
            for h in snap:
                cur = self._remote.get(h)
                if cur is None or cur[0] <= rev:
                    self._remote[h] = (rev, sent[h])
                if h not in self._dirty:  # nothing newer: the watched copy is ours
                    self._local.pop(h, None)
            for h, n in live.items():
                if n:
                    self._live.setdefault(h, {})[self.manager] = n
                else:
                    self._live.get(h, {}).pop(self.manager, None)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything reported so far is written (tests, clean shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._dirty or self._live_dirty or self._seen_dirty:
                self._force = True
                self._start_flusher()
            self._cond.notify_all()
            while self._dirty or self._live_dirty or self._seen_dirty or self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def stop(self) -> None:
        """Clean shutdown: this manager's streams are gone (revoking the lease deletes its live keys)."""
        self.flush(2.0)
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._flusher is not None:
            self._flusher.join(timeout=5)
            self._flusher = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._lease:
            try:
                self.rt.revoke(self._lease)
            except Exception as e:
                log.warning(
                    "lease of manager %s not revoked (it expires in %d s): %s", self.manager, self.ttl, e
                )
            self._lease = 0
        if self._follower is not None:
            self._follower.stop()
            self._follower = None
            self._synced.clear()
