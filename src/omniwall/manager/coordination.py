"""Which managers are alive, and which one runs each singleton job (docs/etcd.md, "Elections").

- `LocalCoordination` (SQLite and memory stores): one manager, always the leader; only it is alive.
- `EtcdCoordination`: each manager holds a lease and puts `managers/<id>` with it (alive while the lease
  is); an election is the runtime key `elections/<name>`, created with the manager's lease only if it
  does not exist (a txn comparing its create revision with 0). The manager whose key it is leads until
  its lease expires (it died or lost etcd for `ttl` seconds) or it stops cleanly (revokes the lease);
  the others retry every `ttl / 3` seconds, so a new leader takes over within about `ttl * 4 / 3`.

Why not etcd's own `/v3/election/campaign`: over the HTTP gateway it is one request that blocks until
the caller leads and cannot be cancelled but by closing the connection, and leadership is then only
as good as the same lease anyway. A create-if-absent txn on a leased key gives the same guarantee with
two calls this code already uses (a txn, a lease keepalive), and never blocks a thread on etcd.

Registry: the value of `managers/<id>` is JSON, `{"since": epoch seconds, **advertised}`; a manager that
serves HTTP advertises its URL there (`advertise`, api/flowrelay.py), so others find their live peers
(`peers()`: the flow fan-out, docs/ha.md "Flows across managers").

A leader acts only while `is_leader` holds: it turns false as soon as a renewal fails or when the last
successful one is older than the TTL, before etcd can hand the key to another manager.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Protocol

from omniwall.store.runtime import EtcdRuntime

log = logging.getLogger(__name__)

MANAGERS = "managers/"
ELECTIONS = "elections/"
TTL_ENV = "OMNIWALL_ETCD_LEASE_TTL"  # seconds a manager's lease outlives it (default 5)


def lease_ttl() -> int:
    """The TTL of a manager's etcd leases: how long its hosts stay connected and it keeps leading after
    it died without a clean stop. `OMNIWALL_ETCD_LEASE_TTL` (seconds, 1 to 60), default 5."""
    raw = os.environ.get(TTL_ENV, "5")
    if not raw.isdigit() or not 1 <= int(raw) <= 60:
        raise ValueError(f"{TTL_ENV}={raw!r}: expected whole seconds from 1 to 60")
    return int(raw)


class Coordination(Protocol):
    id: str

    def is_leader(self, job: str) -> bool:
        """This manager runs `job` now (compaction, migration driving)."""
        ...

    def alive(self, manager: str) -> bool:
        """`manager` (an id) is running and reachable through the store."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def advertise(self, info: dict[str, str]) -> None:
        """Publish `info` (url, ...) in this manager's registry entry, for as long as it lives."""
        ...

    def peers(self) -> dict[str, dict[str, Any]]:
        """The other live managers: id -> what each advertised (empty without etcd)."""
        ...


class LocalCoordination:
    def __init__(self, manager: str) -> None:
        self.id = manager

    def is_leader(self, job: str) -> bool:
        return True

    def alive(self, manager: str) -> bool:
        return manager == self.id

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def advertise(self, info: dict[str, str]) -> None:
        pass

    def peers(self) -> dict[str, dict[str, Any]]:
        return {}


def coordination(store: object, manager: str, jobs: tuple[str, ...]) -> Coordination:
    runtime = getattr(store, "runtime", None)
    if runtime is None:
        return LocalCoordination(manager)
    return EtcdCoordination(runtime(), manager, jobs)


class EtcdCoordination:
    def __init__(self, runtime: EtcdRuntime, manager: str, jobs: tuple[str, ...], *, ttl: int = 0) -> None:
        self.rt = runtime
        self.id = manager
        self.jobs = jobs
        self.ttl = ttl or lease_ttl()
        self._lease = 0
        self._renewed = 0.0  # monotonic time the last successful renewal was sent
        self._led: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._info: dict[str, str] = {}  # advertised in managers/<id>

    def advertise(self, info: dict[str, str]) -> None:
        with self._lock:
            self._info = dict(info)
            lease = self._lease
        if lease:  # already registered: update the entry now (else the next registration carries it)
            self.rt.write([(MANAGERS + self.id, self._entry(), lease)])

    def _entry(self) -> str:
        with self._lock:
            return json.dumps({"since": int(time.time()), **self._info})

    def peers(self) -> dict[str, dict[str, Any]]:
        items, _ = self.rt.range(MANAGERS)
        out: dict[str, dict[str, Any]] = {}
        for kv in items:
            mid = kv.key[len(MANAGERS) :]
            if mid == self.id:
                continue
            try:
                info = json.loads(kv.value)
            except ValueError:
                info = {}
            out[mid] = info if isinstance(info, dict) else {}
        return out

    def is_leader(self, job: str) -> bool:
        with self._lock:
            return job in self._led and time.monotonic() - self._renewed < self.ttl

    def leader(self, job: str) -> str | None:
        kv = self.rt.get(ELECTIONS + job)
        return kv.value if kv is not None else None

    def alive(self, manager: str) -> bool:
        if manager == self.id:
            return True
        return self.rt.get(MANAGERS + manager) is not None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="omniwall-elections", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._round()
            except Exception as e:  # etcd away: lead nothing until a renewal succeeds again
                with self._lock:
                    if self._led:
                        log.warning("manager %s: leads nothing until etcd answers: %s", self.id, e)
                    self._led.clear()
            self._stop.wait(self.ttl / 3)

    def _round(self) -> None:
        sent = time.monotonic()
        if not self._lease or not self.rt.keepalive(self._lease):
            with self._lock:
                self._led.clear()  # the old lease is gone, and the keys with it
            self._lease = self.rt.grant(self.ttl)
            self.rt.write([(MANAGERS + self.id, self._entry(), self._lease)])
        with self._lock:
            self._renewed = sent
        for job in self.jobs:
            _, holder = self.rt.create(ELECTIONS + job, self.id, self._lease)
            with self._lock:
                won = holder == self.id
                if won and job not in self._led:
                    log.info("manager %s leads %s", self.id, job)
                if won:
                    self._led.add(job)
                else:
                    self._led.discard(job)

    def stop(self) -> None:
        """Step down at once: revoking the lease deletes this manager's keys (its elections too)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            self._led.clear()
        if self._lease:
            try:
                self.rt.revoke(self._lease)
            except Exception as e:
                log.warning("manager %s: lease not revoked (it expires in %d s): %s", self.id, self.ttl, e)
            self._lease = 0
