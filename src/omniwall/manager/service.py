"""The manager: its jobs wired together, behind the one object the API holds.

- the model, kept from the store's watch: `model.py` (`Model`);
- the desired states, compiled from the model's changes and sent as the compiler's deltas:
  `compilation.py` (`Compilation`) and `desired.py` (`DesiredStates`);
- writes with plan/commit/audit: `writes.py` (`Writes`), the plan's data in `plan.py`;
- live migration (records, placements, agent commands): `migration.py` (`Migrations`);
- host feed bookkeeping (`hosts.py`), tokens (`tokens.py`), policy counters (`stats.py`);
- the dry run's impact, from the compiler's deltas (`preview`): `api/impact.py`.

`Manager` only constructs and connects them, and keeps the surface `api/` uses (methods that pass
through). No authorization happens here; `api/` decides who may call what.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Literal

from omniwall.compiler.ir import HostDelta, HostDesiredState
from omniwall.model.catalog import Catalog
from omniwall.model.resources import _Resource
from omniwall.store import Event, Store

from .audit import SYSTEM, Actor
from .compilation import Compilation
from .contracts import CompileFn
from .coordination import coordination
from .desired import DesiredStates
from .hostbook_etcd import manager_id, status_book
from .migration import MIGRATION_JOB, Migrations
from .model import Model, Removed
from .plan import Change, Conflict, NotFound, Plan, copy_catalog
from .stats import policy_stats
from .tokens import TokenBook
from .writes import Writes

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


class Manager:
    def __init__(
        self,
        store: Store,
        *,
        compile_fn: CompileFn | None = None,
        clock: Callable[[], datetime] = _now,
        max_delta_log: int = 256,
    ) -> None:
        self.store = store
        self.clock = clock
        self._iso_ms, self._iso = -1, ""  # now_iso's last millisecond and its text
        self._iso_s, self._iso_prefix = -1, ""  # ... and its last second's text, up to the milliseconds
        self.tokens = TokenBook(store)
        self.desired = DesiredStates(max_delta_log)
        self.id = manager_id()  # this manager process, among the replicas sharing the store
        self.hosts = status_book(store, self.id)
        # who is alive, who leads the singleton jobs (always this one without etcd)
        self.coordination = coordination(store, self.id, (MIGRATION_JOB,))
        self.model = Model(store, self.tokens)
        self.migrations = Migrations(self)  # live migration: records, placements, agent commands
        self.compilation = Compilation(self.desired, self.migrations.placements, compile_fn)
        self.writes = Writes(self.model, self.now_iso)
        self.model.listener = self
        self.model.load_all()

    # ------------------------------------------------------------------ the model's listener
    def reloaded(self, catalog: Catalog, revision: int) -> None:
        self.migrations.load()
        self.compilation.recompile(catalog, revision)

    def other_event(self, e: Event) -> bool:
        return self.migrations.on_event(e)

    def changed(
        self, catalog: Catalog, revision: int, changed: list[_Resource], removed: list[Removed], other: bool
    ) -> None:
        self.compilation.recompile(catalog, revision, changed, removed)

    # ------------------------------------------------------------------ model
    @property
    def revision(self) -> int:
        return self.model.revision

    @property
    def catalog(self) -> Catalog:
        return self.model.catalog

    @property
    def compile_error(self) -> str | None:
        return self.compilation.error

    def now_iso(self) -> str:
        if self.clock is not _now:
            return self.clock().isoformat(timespec="milliseconds").replace("+00:00", "Z")
        # Every ack and feed event records this: with the real clock, one text per millisecond (a fleet's
        # acks arrive many to the millisecond; formatting a datetime for each was ~5% of the loop's time),
        # and a datetime formatted once a second: the milliseconds are three digits added to its text.
        ms = time.time_ns() // 1_000_000
        if ms != self._iso_ms:
            s, milli = divmod(ms, 1000)
            if s != self._iso_s:
                self._iso_s = s
                self._iso_prefix = datetime.fromtimestamp(s, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
            self._iso_ms, self._iso = ms, f"{self._iso_prefix}{milli:03d}Z"
        return self._iso

    def load_all(self) -> None:
        self.model.load_all()

    def sync(self, written: int | None = None) -> int:
        return self.model.sync(written)

    def start_watch(self, poll: float = 0.25) -> None:
        """Follow the store, take part in the elections, adopt the migrations of managers that died."""
        self.model.start_watch(poll)
        self.coordination.start()
        self.migrations.start_driver()

    def stop_watch(self) -> None:
        self.migrations.stop_driver()
        self.coordination.stop()
        self.model.stop_watch()
        self.hosts.stop()  # a clean stop: the hosts it streams to show disconnected now

    def get(self, kind: str, tenant: str, name: str, *, catalog: Catalog | None = None) -> _Resource | None:
        return self.model.get(kind, tenant, name, catalog=catalog)

    def list(self, kind: str) -> list[_Resource]:
        return self.model.list(kind)

    def host_names(self) -> list[str]:
        return self.model.host_names()

    def snapshot_catalog(self) -> tuple[Catalog, int]:
        return self.model.snapshot_catalog()

    def history(self, kind: str, tenant: str, name: str) -> list[tuple[Event, _Resource | None]]:
        return self.model.history(kind, tenant, name)

    def value_at(self, kind: str, tenant: str, name: str, revision: int) -> _Resource | None:
        return self.model.value_at(kind, tenant, name, revision)

    # ------------------------------------------------------------------ writes
    def plan_apply(
        self,
        resources: Iterable[_Resource],
        *,
        mode: Literal["apply", "create", "update"] = "apply",
        verb: str = "apply",
        from_source: bool = False,
    ) -> Plan:
        return self.writes.plan_apply(resources, mode=mode, verb=verb, from_source=from_source)

    def plan_delete(self, kind: str, tenant: str, name: str, *, revision: int | None = None) -> Plan:
        return self.writes.plan_delete(kind, tenant, name, revision=revision)

    def commit(self, plan: Plan, actor: Actor, request: str | None = None) -> int:
        return self.writes.commit(plan, actor, request)

    def object_diffs(self, plan: Plan) -> list[dict[str, Any]]:
        return self.writes.object_diffs(plan)

    def preview(self, plan: Plan) -> list[tuple[HostDesiredState, HostDelta]]:
        """(current state, delta) of every host the plan's writes would change, from the compiler's
        deltas (api/impact.py turns them into the dry run's impact). Raises what the compiler raises."""
        with self.model.sync_lock:  # no sync sees the compiler while the preview runs
            return self.compilation.preview(self.model.catalog, plan.writes, plan.catalog, self.revision)

    # ------------------------------------------------------------------ host feed bookkeeping, stats
    def host_known(self, host: str) -> bool:
        return host in self.model.catalog.hosts or self.desired.snapshot(host) is not None

    def host_status(self, host: str) -> dict[str, Any]:
        return self.hosts.get(host).to_json(self.desired.revision(host))

    def host_statuses(self) -> dict[str, dict[str, Any]]:
        """host_status() of every host, sorted by name, in two lock acquisitions rather than 2 per host."""
        return self.hosts.statuses(self.desired.revisions(), self.host_names())

    def policy_stats(self, tenant: str, name: str) -> dict[str, Any]:
        """Counters of a policy's rules, summed over every host's last report."""
        return policy_stats(self.model.catalog, self.desired, self.hosts, tenant, name)

    def desired_state(self, host: str) -> HostDesiredState | None:
        return self.desired.snapshot(host)


__all__ = ["SYSTEM", "Actor", "Change", "Conflict", "Manager", "NotFound", "Plan", "copy_catalog"]
