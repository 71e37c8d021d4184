"""An in-memory `Backend`: holds one host's realized state in a Python object instead of a kernel.

(It evaluates no packets: that is `omniwall.sim`. The CLI's `--backend sim` is an alias of `memory`.)

Used by the agent's unit tests and by the 1,000-agent fan-out benchmark, where a kernel per agent is out
of the question. It is a *strict* fake (Faucet's FakeOFTable is the model): it refuses what the kernel
backend would refuse — a delta for another base revision, a vNIC naming a rule that is not there, a rule
naming a missing set — and a refused write leaves the old state intact, all or nothing.

Connections: it tracks the entries it was given (`import_connections`, or `track` in tests) in a
`MemoryConntrack`, and revokes like the kernel backend: after every write, the same `Revoker` cuts the
tracked connections the new state refuses at a hop on this host (docs/semantics.md §6), so
`capabilities.conntrack` is true.

Test hooks (not part of `Backend`): `calls` records every write the backend was asked to make, `writes`
counts the ones that changed something, `fail_next()` makes the next writes raise, `add_traffic()` bumps
rule counters, `track()` adds connections as if traffic had opened them. With `state_file`, the
realized state survives the process (as a kernel table survives
its agent), so restart adoption can be tested without root.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from omniwall.compiler.ir import HostDelta, HostDesiredState
from omniwall.dataplane.backend import Capabilities, ConnEntry, RuleCounters
from omniwall.dataplane.conntrack import canonical
from omniwall.dataplane.revocation import Revoker, delta_vnics


class MemoryConntrack:
    """A conntrack table in memory: entries by original tuple (what a kernel delete names), with
    the lookups `Revoker` asks of a table."""

    def __init__(self) -> None:
        self._entries: dict[tuple[object, ...], ConnEntry] = {}

    @staticmethod
    def _key(e: ConnEntry) -> tuple[object, ...]:
        return (e.family, e.protocol, canonical(e.src), canonical(e.dst), e.sport, e.dport, e.icmp_id,
                e.icmp_type, e.zone)  # fmt: skip

    def count(self) -> int:
        return len(self._entries)

    def list(self) -> list[ConnEntry]:
        return list(self._entries.values())

    def involving(self, addresses: Iterable[str]) -> list[ConnEntry]:
        """Entries whose original source or destination is one of `addresses`."""
        want = {canonical(a) for a in addresses}
        return [e for e in self._entries.values() if canonical(e.src) in want or canonical(e.dst) in want]

    def matching(self, addresses: Iterable[str]) -> list[ConnEntry]:
        """Entries with any of `addresses` on either side of either tuple."""
        want = {canonical(a) for a in addresses}
        return [
            e
            for e in self._entries.values()
            if any(x and canonical(x) in want for x in (e.src, e.dst, e.reply_src, e.reply_dst))
        ]

    def add(self, entries: Iterable[ConnEntry]) -> int:
        """Create entries; those already there are skipped (as a kernel import)."""
        made = 0
        for e in entries:
            k = self._key(e)
            if k not in self._entries:
                self._entries[k] = e
                made += 1
        return made

    def delete(self, entries: Iterable[ConnEntry]) -> int:
        """Delete entries (by original tuple); those already gone are not counted."""
        return sum(self._entries.pop(self._key(e), None) is not None for e in entries)

    def clear(self) -> None:
        self._entries.clear()


class MemoryBackendError(RuntimeError):
    """A write the in-memory backend refused (or was told to fail)."""


def check_references(state: HostDesiredState) -> None:
    """Raise MemoryBackendError when the state names a rule or a set it does not hold."""
    rules = state.rule_map()
    sets = state.set_map()
    for v in state.vnics:
        for rid in (*v.egress, *v.ingress):
            if rid not in rules:
                raise MemoryBackendError(f"vnic {v.ifname}: rule {rid} is not in the state")
    for r in state.rules:
        for name in (r.src_set, r.dst_set):
            if name is not None and name not in sets:
                raise MemoryBackendError(f"rule {r.id}: set {name!r} is not in the state")


class MemoryBackend:
    capabilities = Capabilities(kernel=False, conntrack=True, counters=True)

    def __init__(self, host: str = "", state_file: Path | str | None = None) -> None:
        self.host = host
        self.state_file = Path(state_file) if state_file is not None else None
        self._state: HostDesiredState | None = None
        self._counters: dict[int, tuple[int, int]] = {}
        self.ct = MemoryConntrack()
        self.revoker = Revoker(self.ct)
        self._fail: list[str] = []
        self.calls: list[tuple[object, ...]] = []  # ("sync", revision) / ("apply", from, to) / ("teardown",)
        self.writes = 0  # writes that changed the state
        if self.state_file is not None and self.state_file.exists():
            self._state = HostDesiredState.loads(self.state_file.read_text())

    # ---- test hooks
    def fail_next(self, count: int = 1, message: str = "injected failure") -> None:
        """Make the next `count` writes (sync or apply) raise MemoryBackendError."""
        self._fail.extend([message] * count)

    def add_traffic(self, rule_id: int, packets: int = 1, nbytes: int = 100) -> None:
        p, b = self._counters.get(rule_id, (0, 0))
        self._counters[rule_id] = (p + packets, b + nbytes)

    # ---- Backend
    def realized(self) -> HostDesiredState | None:
        return self._state

    def sync(self, state: HostDesiredState) -> None:
        self.calls.append(("sync", state.revision))
        self._maybe_fail()
        check_references(state)
        if state == self._state:
            return  # minimal writes: none
        old = self._state
        self._commit(state)
        self.revoker.after_change(old, state)

    def apply(self, base: HostDesiredState, delta: HostDelta, target: HostDesiredState) -> None:
        self.calls.append(("apply", delta.from_revision, delta.to_revision))
        self._maybe_fail()
        if self._state is None:
            raise MemoryBackendError("apply: nothing realized yet, a full sync is needed first")
        if delta.from_revision != self._state.revision or base.revision != self._state.revision:
            raise MemoryBackendError(
                f"apply: delta starts at revision {delta.from_revision}, realized is {self._state.revision}"
            )
        if target.revision != delta.to_revision:
            raise MemoryBackendError(f"apply: target {target.revision}, delta ends at {delta.to_revision}")
        check_references(target)
        old = self._state
        self._commit(target)
        self.revoker.after_change(old, target, delta_vnics(old, delta, target))

    def counters(self) -> list[RuleCounters]:
        if self._state is None:
            return []
        return [
            RuleCounters(
                rule_id=r.id,
                packets=self._counters.get(r.id, (0, 0))[0],
                bytes=self._counters.get(r.id, (0, 0))[1],
            )
            for r in self._state.rules
        ]

    def connections(self, ifname: str | None = None) -> list[ConnEntry]:
        if ifname is None:
            return self.ct.list()
        vnic = self._state.vnic_map().get(ifname) if self._state else None
        if vnic is None:
            return []
        return self.export_connections(list(vnic.addresses))

    def export_connections(self, addresses: list[str]) -> list[ConnEntry]:
        return self.ct.matching(addresses)

    def import_connections(self, entries: list[ConnEntry]) -> int:
        return self.ct.add(entries)

    def flush_connections(self, entries: list[ConnEntry]) -> int:
        return self.ct.delete(entries)

    @property
    def last_revoked(self) -> list[ConnEntry]:
        return self.revoker.last_revoked

    def track(self, entries: list[ConnEntry]) -> int:
        """Test hook: connections opened by traffic (the kernel would have tracked them)."""
        return self.ct.add(entries)

    def teardown(self) -> None:
        self.calls.append(("teardown",))
        self._state = None
        self._counters.clear()
        self.ct.clear()
        if self.state_file is not None:
            self.state_file.unlink(missing_ok=True)

    def close(self) -> None:
        """Nothing to release: the state lives in this object (and `state_file`)."""

    # ---- internals
    def _maybe_fail(self) -> None:
        if self._fail:
            raise MemoryBackendError(self._fail.pop(0))

    def _commit(self, state: HostDesiredState) -> None:
        self._state = state
        self.writes += 1
        # a removed rule takes its counters with it, as an nft rule does
        kept = {r.id for r in state.rules}
        self._counters = {k: v for k, v in self._counters.items() if k in kept}
        if self.state_file is not None:
            # write-then-rename: a crash leaves the old file or the new one, never half of one
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(state.to_json(), sort_keys=True))
            os.replace(tmp, self.state_file)


__all__ = ["MemoryBackend", "MemoryBackendError", "MemoryConntrack", "check_references"]
