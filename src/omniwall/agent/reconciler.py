"""The agent's decisions: given what the kernel holds and what the manager says, which backend call to make.

No I/O of its own besides the backend calls, no clock, no network: unit-tested with the sim backend.

Two states are tracked (Felix's desired/realized split):
- `desired`: what the manager has told us so far (last snapshot plus the deltas after it);
- `realized`: what the data plane holds, as of the last successful write or read-back.

Rules (docs/design/agent.md has the reasons):
- At start, `adopt()` reads the kernel back; nothing is written before the manager has spoken.
- A snapshot equal to the realized state writes nothing (restart without a blip). Otherwise `sync()`.
- A delta must start at the desired revision. Older deltas (replays) are skipped; a gap asks the feed for
  a snapshot (`Outcome.kind == "resync"`), the data plane untouched until it comes.
- A delta on top of an in-sync data plane is `apply()`-ed: the target is computed here, once, and the
  backend gets (base, delta, target), writing only what the delta names. If that fails, or a previous
  write failed, the whole desired state is `sync()`-ed instead. A failed sync keeps the old state (the
  backend's transactions are all or nothing), re-reads it, records the error, and `retry()` tries again later.
- Every state passes the `Guard` first (agent/guard.py): a vNIC on an interface this host does not allow
  is not attached, one whose data the kernel cannot load fails closed, and the rest of the host converges.
  While anything is refused, the backend realizes the guarded state (by `sync()`), and the refusals are
  the reported error.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

from omniwall.agent.guard import Guard, Refusal
from omniwall.compiler.ir import HostDelta, HostDesiredState, apply_delta
from omniwall.dataplane.backend import Backend

log = logging.getLogger("omniwall.agent")

OutcomeKind = Literal["unchanged", "applied", "synced", "skipped", "resync", "failed"]


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: OutcomeKind
    realized_revision: int  # what the data plane holds after this step (0: nothing)
    error: str | None = None

    @property
    def wrote(self) -> bool:
        return self.kind in ("applied", "synced")


def same_state(a: HostDesiredState, b: HostDesiredState) -> bool:
    """Equal, ignoring the order of set members (a kernel hash set reads back in its own order)."""
    if a == b:
        return True
    return _members_sorted(a) == _members_sorted(b)


def _members_sorted(s: HostDesiredState) -> HostDesiredState:
    sets = tuple(
        dataclasses.replace(x, addresses=tuple(sorted(x.addresses)), cidrs=tuple(sorted(x.cidrs)))
        for x in s.sets
    )
    return dataclasses.replace(s, sets=sets)


class Reconciler:
    def __init__(self, backend: Backend, host: str, guard: Guard | None = None) -> None:
        self.backend = backend
        self.host = host
        self.guard = guard or Guard()
        self.realized: HostDesiredState | None = None
        self.desired: HostDesiredState | None = None
        # What the backend should hold: `desired`, less what the guard refused (the same object when clean).
        self.target: HostDesiredState | None = None
        self.refusals: tuple[Refusal, ...] = ()
        self.write_error: str | None = None  # last write error, None once a write succeeded
        # The revision the backend holds when it differs from `realized.revision` with the same content:
        # another manager numbers an unchanged host differently (its own first compile), and a snapshot
        # equal but for the number is taken without a kernel write (failover: docs/ha.md).
        self._held_revision: int | None = None

    # ---- queries
    @property
    def realized_revision(self) -> int:
        return self.realized.revision if self.realized is not None else 0

    @property
    def resume_revision(self) -> int:
        """The revision to ask the feed to continue from (0: send a snapshot)."""
        return self.desired.revision if self.desired is not None else 0

    @property
    def in_sync(self) -> bool:
        return self.target is None or self.target == self.realized

    @property
    def error(self) -> str | None:
        """What to report: the last write error, and every vNIC the guard refused."""
        parts = [self.write_error] if self.write_error else []
        parts.extend(str(r) for r in self.refusals)
        return "; ".join(parts) or None

    # ---- steps
    def adopt(self) -> HostDesiredState | None:
        """Read the data plane back (restart); it becomes both realized and desired until the feed speaks."""
        try:
            self.realized = self.backend.realized()
        except Exception as e:  # unreadable or foreign table: the first snapshot will replace it atomically
            log.warning("cannot read the realized state back (%s); waiting for a snapshot", e)
            self.realized = None
        self.desired = self.target = self.realized
        self._held_revision = None
        return self.realized

    def on_snapshot(self, state: HostDesiredState) -> Outcome:
        if state.host != self.host:
            # a manager bug or a mis-issued token; never program another host's policy
            return self._fail(f"snapshot is for host {state.host!r}, this agent is {self.host!r}")
        self._set_desired(state)
        assert self.target is not None
        realized = self.realized
        if realized is not None and realized.revision != self.target.revision:
            realized = dataclasses.replace(realized, revision=self.target.revision)
        if self.realized is not None and realized is not None and same_state(realized, self.target):
            if self.realized.revision != self.target.revision and self._held_revision is None:
                self._held_revision = self.realized.revision
            self.realized = self.target  # equal; keep the manager's ordering: later comparisons are cheap
            self.write_error = None
            return Outcome("unchanged", self.realized_revision)
        return self._sync()

    def on_delta(self, delta: HostDelta) -> Outcome:
        base = self.desired
        if delta.host != self.host:
            return self._fail(f"delta is for host {delta.host!r}, this agent is {self.host!r}")
        if base is None:
            return Outcome("resync", self.realized_revision)
        if delta.to_revision <= base.revision:
            return Outcome("skipped", self.realized_revision)  # a replay of what we already have
        if delta.from_revision != base.revision:
            log.info(
                "feed gap: delta from %d, we are at %d; asking for a snapshot",
                delta.from_revision,
                base.revision,
            )
            return Outcome("resync", self.realized_revision)
        target = apply_delta(base, delta)
        was_clean = not self.refusals
        if was_clean and self.guard.delta_clean(delta):
            self.desired = self.target = target
        else:
            self._set_desired(target)  # something refused before or now: realize the guarded state
        if was_clean and not self.refusals and self.realized == base:
            held = self._held_revision
            try:
                if held is None:
                    self.backend.apply(base, delta, target)  # target computed once, here
                else:  # the backend holds this content under the number it was written with
                    self.backend.apply(
                        dataclasses.replace(base, revision=held),
                        dataclasses.replace(delta, from_revision=held),
                        target,
                    )
                    self._held_revision = None
            except Exception as e:
                log.warning(
                    "apply %d->%d failed (%s); retrying with a full sync",
                    delta.from_revision,
                    delta.to_revision,
                    e,
                )
                self.realized = self._read_back()
            else:
                self.realized = target
                self.write_error = None
                return Outcome("applied", self.realized_revision)
        return self._sync()

    def retry(self) -> Outcome:
        """Called later after a failure: sync the whole desired state again."""
        if self.in_sync:
            return Outcome("unchanged", self.realized_revision)
        return self._sync()

    # ---- internals
    def _set_desired(self, state: HostDesiredState) -> None:
        guarded = self.guard.check(state)
        self.desired, self.target = state, guarded.state
        if guarded.refusals != self.refusals:
            for r in guarded.refusals:
                log.error("%s", r)
        self.refusals = guarded.refusals

    def _sync(self) -> Outcome:
        assert self.target is not None
        try:
            self.backend.sync(self.target)
        except Exception as e:
            self.realized = self._read_back()
            return self._fail(f"sync to revision {self.target.revision} failed: {e}")
        self.realized = self.target
        self._held_revision = None
        self.write_error = None
        return Outcome("synced", self.realized_revision, self.error)

    def _fail(self, message: str) -> Outcome:
        log.error("%s", message)
        self.write_error = message
        return Outcome("failed", self.realized_revision, message)

    def _read_back(self) -> HostDesiredState | None:
        try:
            state = self.backend.realized()
            self._held_revision = None  # read back: numbered as the backend holds it
            return state
        except Exception as e:
            log.warning("read-back after a failed write failed too (%s)", e)
            return self.realized


__all__ = ["Outcome", "Reconciler", "same_state"]
