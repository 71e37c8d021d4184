"""What the manager knows about each host's agent: connected, realized revision, errors, counters.

Kept in memory per manager replica (agents report to the replica they stream from); it is runtime
state, not policy, so it does not go through the store and never bumps the revision.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

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
            "conntrack": None if self.conntrack is None else conntrack_json(*self.conntrack),
        }


class HostStatusBook:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hosts: dict[str, HostStatus] = {}

    def get(self, host: str) -> HostStatus:
        with self._lock:
            st = self._hosts.get(host)
            return HostStatus() if st is None else _copy(st)

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
            st = self._hosts.setdefault(host, HostStatus())
            st.realized_revision = realized_revision
            st.last_error = error
            st.last_seen = now
            if counters is not None:
                st.counters = {rid: (p, b) for rid, p, b in counters}
            if addresses is not None:
                st.addresses = dict(addresses)
            if conntrack is not None:
                st.conntrack = conntrack

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


def _copy(st: HostStatus) -> HostStatus:
    return HostStatus(
        st.connected,
        st.realized_revision,
        st.last_error,
        st.last_seen,
        dict(st.counters),
        dict(st.addresses),
        st.conntrack,
    )
