"""What the manager knows about each host's agent: connected, realized revision, errors, counters.

It is runtime state, not policy: it never goes through the store's objects and never changes one. Two
books implement `HostStatusBook`:
- `MemoryHostStatusBook`: in this process's memory (SQLite and memory stores: one manager);
- `EtcdHostStatusBook` (hostbook_etcd.py): in etcd's runtime keys, shared by every manager, with
  agent liveness on the manager's lease (docs/etcd.md).
`hostbook_etcd.status_book(store)` picks the one the store supports: manager code never asks which.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

# the host's conntrack table: warning at 80% of nf_conntrack_max, critical at 95% (agent/conntrack_usage.py)
CONNTRACK_WARNING, CONNTRACK_CRITICAL = 0.80, 0.95


def conntrack_json(count: int, maximum: int) -> dict[str, Any]:
    """`conntrack` of a host's status: usage, ratio (the gauge `omniwall_host_conntrack_usage_ratio`) and
    alarm level (ok / warning / critical)."""
    ratio = count / maximum if maximum > 0 else 0.0
    alarm = "critical" if ratio >= CONNTRACK_CRITICAL else "warning" if ratio >= CONNTRACK_WARNING else "ok"
    return {"count": count, "max": maximum, "ratio": round(ratio, 4), "alarm": alarm}


@dataclass
class HostStatus:
    connected: int = 0  # open feed streams
    realized_revision: int = 0
    last_error: str | None = None
    last_seen: str | None = None  # ISO 8601, UTC
    # when a manager recorded the first report of `realized_revision` (ISO 8601, UTC, its clock): the
    # moment the host's ack of that revision arrived, whatever came later (counters, heartbeats)
    realized_at: str | None = None
    counters: dict[int, tuple[int, int]] = field(default_factory=dict)  # rule id -> (packets, bytes)
    addresses: dict[str, Any] = field(default_factory=dict)
    conntrack: tuple[int, int] | None = None  # (entries, nf_conntrack_max), last reported

    def to_json(self, desired_revision: int) -> dict[str, Any]:
        return {
            "connected": self.connected > 0,
            "desiredRevision": desired_revision,
            "realizedRevision": self.realized_revision,
            "inSync": self.realized_revision == desired_revision and self.last_error is None,
            "lastError": self.last_error,
            "lastSeen": self.last_seen,
            "realizedAt": self.realized_at,
            "conntrack": None if self.conntrack is None else conntrack_json(*self.conntrack),
        }

    def take_report(
        self,
        now: str,
        realized_revision: int,
        error: str | None,
        counters: list[tuple[int, int, int]] | None,
        addresses: dict[str, Any] | None,
        conntrack: tuple[int, int] | None,
    ) -> bool:
        """Record an agent's report (what every host book does with one). True: it changed what other
        managers should see soon (the realized revision, the error, the addresses)."""
        changed = self.realized_revision != realized_revision or self.last_error != error
        if self.realized_revision != realized_revision or self.realized_at is None:
            self.realized_at = now
        self.realized_revision = realized_revision
        self.last_error = error
        self.last_seen = now
        if counters is not None:
            self.counters = {rid: (p, b) for rid, p, b in counters}
        if addresses is not None:
            changed = changed or self.addresses != addresses
            self.addresses = dict(addresses)
        if conntrack is not None:
            self.conntrack = conntrack
        return changed


class HostStatusBook(Protocol):
    """Agents' feed streams and status reports. Writers (`connect` ... `report`) are called on the
    event loop: they never block on I/O."""

    def get(self, host: str) -> HostStatus: ...

    def connect(self, host: str, now: str) -> None: ...

    def disconnect(self, host: str, now: str) -> None: ...

    def seen(self, host: str, now: str) -> None: ...

    def report(
        self,
        host: str,
        now: str,
        realized_revision: int,
        error: str | None,
        counters: list[tuple[int, int, int]] | None,
        addresses: dict[str, Any] | None,
        conntrack: tuple[int, int] | None = None,
    ) -> None: ...

    def statuses(self, desired: dict[str, int], hosts: list[str]) -> dict[str, dict[str, Any]]: ...

    def conntrack(self) -> dict[str, dict[str, Any]]: ...

    def counters(self) -> dict[str, dict[int, tuple[int, int]]]: ...

    def stop(self) -> None:
        """This manager is going away cleanly: its agents show disconnected now."""
        ...


class MemoryHostStatusBook:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hosts: dict[str, HostStatus] = {}

    def get(self, host: str) -> HostStatus:
        with self._lock:
            st = self._hosts.get(host)
            return HostStatus() if st is None else copy_status(st)

    def connect(self, host: str, now: str) -> None:
        with self._lock:
            st = self._hosts.setdefault(host, HostStatus())
            st.connected += 1
            st.last_seen = now

    def disconnect(self, host: str, now: str) -> None:
        with self._lock:
            st = self._hosts.setdefault(host, HostStatus())
            st.connected = max(0, st.connected - 1)
            st.last_seen = now

    def seen(self, host: str, now: str) -> None:
        with self._lock:
            self._hosts.setdefault(host, HostStatus()).last_seen = now

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
        with self._lock:
            self._hosts.setdefault(host, HostStatus()).take_report(
                now, realized_revision, error, counters, addresses, conntrack
            )

    def statuses(self, desired: dict[str, int], hosts: list[str]) -> dict[str, dict[str, Any]]:
        """`to_json` of each of `hosts` under one lock acquisition (GET /v1/status with many hosts)."""
        empty = HostStatus()
        with self._lock:
            return {h: self._hosts.get(h, empty).to_json(desired.get(h, 0)) for h in hosts}

    def conntrack(self) -> dict[str, dict[str, Any]]:
        """Each reporting host's conntrack usage (`conntrack_json`), for the metrics endpoint: gauge
        `omniwall_host_conntrack_usage_ratio{host}` = `ratio`."""
        with self._lock:
            return {h: conntrack_json(*st.conntrack) for h, st in self._hosts.items() if st.conntrack}

    def counters(self) -> dict[str, dict[int, tuple[int, int]]]:
        with self._lock:
            return {h: dict(st.counters) for h, st in self._hosts.items()}

    def stop(self) -> None:
        pass  # the streams end with the process; nothing is shared


def copy_status(st: HostStatus) -> HostStatus:
    return HostStatus(
        st.connected,
        st.realized_revision,
        st.last_error,
        st.last_seen,
        st.realized_at,
        dict(st.counters),
        dict(st.addresses),
        st.conntrack,
    )
