"""THE backend interface: every data plane (nftables, sim) implements all of it.

Differences between backends are capability fields, never NotImplementedError (the Neutron lesson).
A backend realizes one host's `HostDesiredState`; the agent drives it and never computes policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from omniwall.compiler.ir import HostDelta, HostDesiredState


@dataclass(frozen=True, slots=True)
class Capabilities:
    kernel: bool  # enforces real packets
    conntrack: bool  # can list/flush/export/import connection state
    counters: bool  # per-rule packet/byte counters


@dataclass(frozen=True, slots=True)
class RuleCounters:
    rule_id: int
    packets: int
    bytes: int


@dataclass(frozen=True, slots=True)
class ConnEntry:
    """One conntrack entry, enough to recreate it elsewhere (migration) or to judge it (revocation)."""

    family: int  # 2 (AF_INET) or 10 (AF_INET6)
    protocol: int  # IP protocol number
    src: str
    dst: str
    sport: int = 0
    dport: int = 0
    reply_src: str = ""
    reply_dst: str = ""
    reply_sport: int = 0
    reply_dport: int = 0
    icmp_type: int | None = None
    icmp_code: int | None = None
    icmp_id: int | None = None
    state: str = ""  # TCP state name, e.g. ESTABLISHED
    timeout: int = 0
    mark: int = 0
    status: int = 0
    zone: int = 0
    extra: dict[str, object] = field(default_factory=dict)  # backend-private attributes for import


@runtime_checkable
class Backend(Protocol):
    capabilities: Capabilities

    def realized(self) -> HostDesiredState | None:
        """What the data plane holds now, read back (adoption after restart, drift checks)."""

    def sync(self, state: HostDesiredState) -> None:
        """Make the data plane equal to `state` in one atomic step; minimal writes if already close."""

    def apply(self, base: HostDesiredState, delta: HostDelta, target: HostDesiredState) -> None:
        """Take the data plane from `base` (what it holds, as the caller last saw it realized) to
        `target` = apply_delta(base, delta), atomically (all or nothing). The caller computed `target`
        once; the backend never re-applies the delta, and writes only what `delta` names. Raises on
        failure (a base it does not hold included), old state intact."""

    def counters(self) -> list[RuleCounters]:
        """Per-rule counters, summed over every place the rule is installed on this host."""

    def connections(self, ifname: str | None = None) -> list[ConnEntry]:
        """Tracked connections, optionally only those of one vNIC's addresses."""

    def export_connections(self, addresses: list[str]) -> list[ConnEntry]:
        """Entries to or from any of `addresses`, with everything needed to import them elsewhere."""

    def import_connections(self, entries: list[ConnEntry]) -> int:
        """Recreate entries (live migration); returns how many were created."""

    def flush_connections(self, entries: list[ConnEntry]) -> int:
        """Delete entries (revocation); returns how many were deleted."""

    def teardown(self) -> None:
        """Remove everything this backend created."""

    def close(self) -> None:
        """Release handles (sockets, threads); the data plane's state stays as it is."""
