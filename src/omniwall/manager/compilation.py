"""From the model to the per-host desired states: the incremental compiler, fed with the model's
changes and the migrations' placements, hands its per-host deltas to `DesiredStates` (which stores and
sends them as they are). A full rebuild happens at start, after a compiler failure and after the model
was reloaded; the compiler failing keeps the last good states (fail-static) and says why.

`preview(writes)` answers "which deltas would this write cause" (the dry run's impact) with the same
compiler: the writes are applied, their deltas kept, and the current objects put back, two small
incremental updates instead of a full compile of the whole model per dry run. The caller holds the
model's sync lock, so no sync sees the compiler in between.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import replace

from omniwall.compiler.build import compile_catalog
from omniwall.compiler.incremental import IncrementalCompiler
from omniwall.compiler.ir import HostDelta, HostDesiredState, diff, empty_state
from omniwall.model.catalog import Catalog
from omniwall.model.resources import _Resource

from .contracts import CompileFn, describe
from .desired import DesiredStates
from .objects import object_tenant
from .plan import Change

log = logging.getLogger(__name__)

Placements = dict[tuple[str, str], str]
Removed = tuple[str, str, str]


class Compilation:
    def __init__(
        self,
        desired: DesiredStates,
        placements: Callable[[], Placements],
        compile_fn: CompileFn | None = None,
    ) -> None:
        """`placements()`: the migrating workloads' extra hosts, read at every compile. `compile_fn`
        (tests): a whole-catalog compile used instead of the incremental compiler; it knows nothing of
        placements."""
        self.desired = desired
        self._placements = placements
        self._compile_fn = compile_fn
        self._incremental: IncrementalCompiler | None = None
        self.error: str | None = None

    def recompile(
        self,
        catalog: Catalog,
        revision: int,
        changed: list[_Resource] | None = None,
        removed: list[Removed] | None = None,
    ) -> None:
        """Bring the desired states to `revision`: incrementally when we have the changes and a healthy
        incremental compiler, else by a full rebuild."""
        placements = self._placements()
        if self._incremental is not None and changed is not None:
            try:
                deltas = self._incremental.update(changed, removed or [], revision, placements=placements)
                # The compiler's deltas are what the feeds store and send: no full state, no re-diff.
                self.desired.apply(deltas)
                self.error = None
                return
            except Exception as err:
                log.warning("incremental compile failed (%s); rebuilding", describe(err))
                self._incremental = None
        # A full rebuild (first load, after a compiler failure, the reload after a compaction): complete
        # states, which DesiredStates.update diffs against the previous ones (hosts whose content did not
        # change keep their revision, the others get deltas as usual).
        try:
            if self._compile_fn is None:
                self._incremental = IncrementalCompiler(catalog, revision, placements=placements)
                states = self._incremental.states()
            else:
                states = self._compile_fn(catalog, revision)
        except Exception as err:
            # Fail-static: keep the last good desired states, report why.
            self._incremental = None
            self.error = describe(err)
            log.exception("compile failed at revision %d; keeping the previous desired states", revision)
            return
        self.error = None
        self.desired.update(states, revision)

    def preview(
        self, current: Catalog, writes: Iterable[Change], after: Catalog, revision: int
    ) -> list[tuple[HostDesiredState, HostDelta]]:
        """The (current state, delta) of every host the writes would change. `current`: the model now
        (the objects put back afterwards); `after`: the model with the writes (used only without an
        incremental compiler, for a full compile). Raises what the compiler raises. The caller holds
        the model's sync lock."""
        writes = list(writes)
        states = self.desired.all()
        ic = self._incremental
        if ic is None:  # no healthy incremental compiler (or an injected compile function): compile all
            if self._compile_fn is None:
                full = compile_catalog(after, revision + 1, self._placements())
            else:
                full = self._compile_fn(after, revision + 1)
            out = []
            for host in sorted(set(full) | set(states)):
                old = states.get(host) or empty_state(host, 0)
                d = diff(old, _at(full.get(host) or empty_state(host, 0), old.revision + 1))
                if not d.empty:
                    out.append((old, d))
            return out
        put = [c.new for c in writes if c.new is not None]
        drop = [(c.kind, c.tenant, c.name) for c in writes if c.new is None]
        back_put: list[_Resource] = []
        back_drop: list[Removed] = []
        for c in writes:
            now = current.table(c.kind).get(_table_key(c))
            if now is None:
                back_drop.append((c.kind, c.tenant, c.name))
            else:
                back_put.append(now)
        try:
            deltas = ic.update(put, drop, ic.revision)
            ic.update(back_put, back_drop, ic.revision)
        except Exception:
            # Half applied: rebuilt from the model at the next change (the desired states are untouched).
            self._incremental = None
            raise
        out = []
        for host, d in deltas.items():
            old = states.get(host) or empty_state(host, 0)
            if not d.empty:
                out.append((old, d))
        return out


def _table_key(c: Change) -> object:
    t = object_tenant(c.kind, c.tenant, c.name)
    return c.name if c.kind in ("Tenant", "Host") else (t, c.name)


def _at(state: HostDesiredState, revision: int) -> HostDesiredState:
    return replace(state, revision=revision)


__all__ = ["Compilation", "Placements"]
