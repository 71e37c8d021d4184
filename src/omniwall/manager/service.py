"""The manager's core: the in-memory model kept current by the store's watch, writes as one store txn
each, and the per-host desired states recomputed on every change.

Writes follow plan -> commit: `plan_*` reads the in-memory model, validates the result and returns the
changes; `commit` writes them plus their audit entries in one txn that compares every touched key's
revision against the one the plan saw (a concurrent writer makes it fail with `Conflict`, nothing
written). After a commit the model is synced at once, so a client reads its own writes.
No authorization happens here; `api/` decides who may call what.
"""

from __future__ import annotations

import difflib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import yaml

from omniwall.compiler.build import compile_catalog
from omniwall.compiler.ir import HostDesiredState, diff, empty_state
from omniwall.model.catalog import Catalog
from omniwall.model.resources import _Resource
from omniwall.store import CompactedError, Compare, Delete, Event, Put, Store

from .audit import SYSTEM, Actor, AuditEntry, audit_put
from .contracts import (
    CompileFn,
    InvalidResources,
    Problem,
    default_compile,
    describe,
    incremental_compiler,
    validate_set,
)
from .desired import DesiredStates
from .hosts import HostStatusBook
from .migration import Migrations
from .objects import (
    RES_PREFIX,
    TOKEN_PREFIX,
    changed_paths,
    decode,
    encode,
    key_of,
    object_tenant,
    resource_key,
    spec_equal,
    split_key,
    with_metadata,
)
from .tokens import TokenBook

log = logging.getLogger(__name__)

Action = Literal["create", "update", "delete", "unchanged"]


class Conflict(Exception):
    """The object changed since the caller read it (or exists / does not exist when it must not / must)."""


class NotFound(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Change:
    action: Action
    kind: str
    tenant: str
    name: str
    old: _Resource | None
    new: _Resource | None

    @property
    def key(self) -> str:
        return key_of(self.kind, self.tenant, self.name)

    def summary(self) -> dict[str, Any]:
        return {"action": self.action, "kind": self.kind, "tenant": self.tenant, "name": self.name}


@dataclass
class Plan:
    changes: list[Change]
    catalog: Catalog  # the model as it would be after the commit
    base_revision: int  # the model revision the plan was made against
    verb: str = "apply"  # audit action override: apply | rollback | ...
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def writes(self) -> list[Change]:
        return [c for c in self.changes if c.action != "unchanged"]


def _now() -> datetime:
    return datetime.now(UTC)


def copy_catalog(c: Catalog) -> Catalog:
    return Catalog(
        tenants=dict(c.tenants),
        hosts=dict(c.hosts),
        workloads=dict(c.workloads),
        groups=dict(c.groups),
        services=dict(c.services),
        applications=dict(c.applications),
        policies=dict(c.policies),
    )


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
        self.tokens = TokenBook(store)
        self.desired = DesiredStates(max_delta_log)
        self.hosts = HostStatusBook()
        self.migrations = Migrations(self)  # live migration: records, placements, agent commands
        self.clock = clock
        self._compile: CompileFn = compile_fn or default_compile()
        # Incremental compiler (unless a compile function was injected): changes cost what they touch.
        self._incremental_cls = None if compile_fn is not None else incremental_compiler()
        self._incremental: Any = None
        # _sync_lock serialises syncs (event application + compile); _model_lock is held only while the
        # catalog's dicts change or are iterated, so readers never wait for a compile.
        self._sync_lock = threading.RLock()
        self._model_lock = threading.Lock()
        self._catalog = Catalog()
        self._rev = 0
        self.compile_error: str | None = None
        self._watch_stop = threading.Event()
        self._watch_thread: threading.Thread | None = None
        self.load_all()

    # ------------------------------------------------------------------ model: load, sync, watch
    @property
    def revision(self) -> int:
        return self._rev

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    def now_iso(self) -> str:
        return self.clock().isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def load_all(self) -> None:
        """Rebuild the model from the store (at start, or when the watch fell behind a compaction)."""
        with self._sync_lock:
            items, rev = self.store.range(RES_PREFIX)
            cat = Catalog()
            for kv in items:
                r = self._decode(kv.key, kv.value, kv.mod_revision)
                if r is not None:
                    cat.add(r)
            with self._model_lock:
                self._catalog, self._rev = cat, rev
            self.migrations.load()
            self._recompile()

    def sync(self) -> int:
        """Apply every store change since the model's revision; recompile if a resource changed."""
        with self._sync_lock:
            try:
                events = self.store.events(self._rev + 1)
            except CompactedError:
                log.warning("watch fell behind a compaction; reloading the model")
                self.tokens.forget()  # token changes may be among the events we cannot see
                self.load_all()
                return self._rev
            if not events:
                return self._rev
            changed: dict[str, _Resource] = {}
            removed: dict[str, tuple[str, str, str]] = {}
            moved = False
            with self._model_lock:
                for e in events:
                    if e.key.startswith(TOKEN_PREFIX):  # created or revoked, maybe by another process
                        self.tokens.forget(e.key[len(TOKEN_PREFIX) :])
                    elif self.migrations.on_event(e):
                        moved = True
                    elif e.key.startswith(RES_PREFIX):
                        r = self._apply_event(e)
                        if r is None:
                            changed.pop(e.key, None)
                            removed[e.key] = split_key(e.key)
                        else:
                            removed.pop(e.key, None)
                            changed[e.key] = r
                self._rev = events[-1].revision
            if changed or removed or moved:
                self._recompile(list(changed.values()), list(removed.values()))
            return self._rev

    def start_watch(self, poll: float = 0.25) -> None:
        """Follow writes made by other processes (replicas, `omniwall token`) in a background thread."""
        if self._watch_thread is not None:
            return
        self._watch_stop.clear()
        self.tokens.cache = True  # the watch drops cached tokens that any process changes (sync())

        def loop() -> None:
            while not self._watch_stop.is_set():
                try:
                    if self.store.wait(self._rev + 1, poll):
                        self.sync()
                except Exception:  # keep watching; the next round retries
                    log.exception("model sync failed")
                    time.sleep(poll)

        self._watch_thread = threading.Thread(target=loop, name="omniwall-watch", daemon=True)
        self._watch_thread.start()

    def stop_watch(self) -> None:
        self.tokens.cache = False
        self.tokens.forget()
        self._watch_stop.set()
        if self._watch_thread is not None:
            self._watch_thread.join(timeout=5)
            self._watch_thread = None

    def _apply_event(self, e: Event) -> _Resource | None:
        """Apply one store event to the catalog; returns the new object (None: gone)."""
        kind, tenant, name = split_key(e.key)
        r = self._decode(e.key, e.value or "", e.revision) if e.type == "put" else None
        if r is None:
            self._catalog.remove(kind, tenant, name)
        else:
            self._catalog.add(r)
        return r

    def _decode(self, key: str, value: str, revision: int) -> _Resource | None:
        try:
            return decode(value, revision)
        except Exception as err:  # a stored object the current schema rejects: skip it, loudly
            log.error("skipping unreadable stored object %s: %s", key, describe(err))
            return None

    def _recompile(
        self, changed: list[_Resource] | None = None, removed: list[tuple[str, str, str]] | None = None
    ) -> None:
        """Bring the desired states to the model's revision: incrementally when we have the changes and
        a healthy incremental compiler, else by a full compile."""
        placements = self.migrations.placements()  # migrating workloads: also on their destination
        if self._incremental is not None and changed is not None:
            try:
                deltas = self._incremental.update(
                    changed, removed or [], revision=self._rev, placements=placements
                )
                # The compiler's deltas are what the feeds store and send: no full state, no re-diff.
                self.desired.apply(deltas)
                self.compile_error = None
                return
            except Exception as err:
                log.warning("incremental compile failed (%s); rebuilding", describe(err))
                self._incremental = None
        # A full rebuild (first load, after a compiler failure, the reload after a compaction): complete
        # states, which DesiredStates.update diffs against the previous ones (hosts whose content did not
        # change keep their revision, the others get deltas as usual).
        try:
            if self._incremental_cls is not None:
                self._incremental = self._incremental_cls(self._catalog, self._rev, placements=placements)
                states = self._incremental.states()
            else:  # an injected compile function (tests) knows nothing of placements
                states = self._compile(self._catalog, self._rev)
        except Exception as err:
            # Fail-static: keep the last good desired states, report why.
            self._incremental = None
            self.compile_error = describe(err)
            log.exception("compile failed at revision %d; keeping the previous desired states", self._rev)
            return
        self.compile_error = None
        self.desired.update(states, self._rev)

    # ------------------------------------------------------------------ reads
    def get(self, kind: str, tenant: str, name: str, *, catalog: Catalog | None = None) -> _Resource | None:
        table = (catalog or self._catalog).table(kind)
        t = object_tenant(kind, tenant, name)
        return table.get(name if kind in ("Tenant", "Host") else (t, name))

    def list(self, kind: str) -> list[_Resource]:
        with self._model_lock:
            items = list(self._catalog.table(kind).values())
        return sorted(items, key=resource_key)

    def host_names(self) -> list[str]:
        with self._model_lock:
            return sorted(self._catalog.hosts)

    def snapshot_catalog(self) -> tuple[Catalog, int]:
        """A private copy of the model and its revision (safe to iterate while the model moves on)."""
        with self._model_lock:
            return copy_catalog(self._catalog), self._rev

    def history(self, kind: str, tenant: str, name: str) -> list[tuple[Event, _Resource | None]]:
        key = key_of(kind, tenant, name)
        out: list[tuple[Event, _Resource | None]] = []
        for e in self.store.history(key):
            obj = self._decode(key, e.value, e.revision) if e.type == "put" and e.value else None
            out.append((e, obj))
        return out

    def value_at(self, kind: str, tenant: str, name: str, revision: int) -> _Resource | None:
        key = key_of(kind, tenant, name)
        kv = self.store.get(key, revision=revision)
        return self._decode(key, kv.value, kv.mod_revision) if kv else None

    # ------------------------------------------------------------------ plans
    def plan_apply(
        self,
        resources: Iterable[_Resource],
        *,
        mode: Literal["apply", "create", "update"] = "apply",
        verb: str = "apply",
        from_source: bool = False,
    ) -> Plan:
        """Create or update `resources` (one txn). `metadata.revision`, when given, must match the stored
        object's (optimistic concurrency); mode `create` requires absence, `update` presence.
        Workloads keep their identity/posture attributes unless `from_source` (manager/attributes.py)."""
        existing, base_rev = self.snapshot_catalog()
        catalog = copy_catalog(existing)
        now = self.now_iso()
        changes: list[Change] = []
        originals: list[_Resource] = []  # as given: the loader remembers their source documents
        seen: dict[str, int] = {}
        problems: list[Problem] = []
        for i, r in enumerate(resources):
            key = resource_key(r)
            kind, tenant, name = split_key(key)
            doc = f"{kind}/{name}" if kind in ("Tenant", "Host") else f"{kind}/{tenant}/{name}"
            if key in seen:
                problems.append(
                    Problem(
                        doc,
                        "metadata.name",
                        f"defined twice in one request (documents {seen[key]} and {i + 1})",
                    )
                )
                continue
            seen[key] = i + 1
            if r.kind == "Host" and r.metadata.tenant != object_tenant("Host", "", name):  # type: ignore[attr-defined]
                problems.append(Problem(doc, "metadata.tenant", "Host objects belong to the provider tenant"))
                continue
            old = self.get(kind, tenant, name, catalog=existing)
            given = r
            if r.kind == "Workload" and not from_source:  # type: ignore[attr-defined]
                from .attributes import protect_source_facts  # lazy: attributes imports this module

                r = protect_source_facts(old, r, doc, problems)
            if r.kind == "Tenant":  # type: ignore[attr-defined]
                r = with_metadata(r, tenant=tenant)  # a Tenant lives in its own namespace: compare as stored
            want = r.metadata.revision
            if mode == "create" and old is not None:
                raise Conflict(f"{doc} already exists (revision {old.metadata.revision})")
            if mode == "update" and old is None:
                raise NotFound(f"{doc} not found")
            if want is not None and want != (old.metadata.revision if old else 0):
                have = old.metadata.revision if old else "absent"
                raise Conflict(f"{doc}: metadata.revision {want} does not match the stored revision {have}")
            if old is not None and spec_equal(old, r):
                changes.append(Change("unchanged", kind, tenant, name, old, old))
                continue
            new = with_metadata(
                r,
                tenant=tenant,
                uid=old.metadata.uid if old else str(uuid.uuid4()),
                created=old.metadata.created if old else now,
                updated=now,
                revision=None,
            )
            changes.append(Change("update" if old else "create", kind, tenant, name, old, new))
            originals.append(given)
            catalog.add(new)
        if problems:
            raise InvalidResources(problems)
        if originals:
            validate_set(originals, existing, catalog)
        return Plan(changes, catalog, base_rev, verb)

    def plan_delete(self, kind: str, tenant: str, name: str, *, revision: int | None = None) -> Plan:
        """Delete one object; an Application takes everything it owns along, in the same txn."""
        catalog, base_rev = self.snapshot_catalog()
        old = self.get(kind, tenant, name, catalog=catalog)
        tenant = object_tenant(kind, tenant, name)
        if old is None:
            raise NotFound(f"{kind}/{name} not found")
        if revision is not None and revision != old.metadata.revision:
            raise Conflict(
                f"{kind}/{name}: revision {revision} does not match "
                f"the stored revision {old.metadata.revision}"
            )
        changes = [Change("delete", kind, tenant, name, old, None)]
        catalog.remove(kind, tenant, name)
        if kind == "Application":
            for r in list(catalog):
                if r.metadata.tenant == tenant and r.metadata.application == name and r.kind != "Application":  # type: ignore[attr-defined]
                    k, t, n = split_key(resource_key(r))
                    changes.append(Change("delete", k, t, n, r, None))
                    catalog.remove(k, t, n)
        return Plan(changes, catalog, base_rev, "delete")

    def commit(self, plan: Plan, actor: Actor, request: str | None = None) -> int:
        """Write the plan's changes and their audit entries in one txn; returns the new revision."""
        writes = plan.writes
        if not writes:
            return self._rev
        request = request or uuid.uuid4().hex[:12]
        now = self.now_iso()
        ns = time.time_ns()
        compares: list[Compare] = []
        ops: list[Put | Delete] = []
        for i, c in enumerate(writes):
            compares.append(Compare(c.key, (c.old.metadata.revision or 0) if c.old else 0))
            ops.append(Delete(c.key) if c.new is None else Put(c.key, encode(c.new)))
            old_d = c.old.model_dump(mode="json", exclude_none=True) if c.old else None
            new_d = c.new.model_dump(mode="json", exclude_none=True) if c.new else None
            action = c.action if plan.verb in ("apply", "delete") else plan.verb
            entry = AuditEntry(
                time=now,
                actor=actor.name,
                actor_id=actor.id,
                role=actor.role,
                action=action,
                kind=c.kind,
                tenant=c.tenant,
                name=c.name,
                changed=tuple(changed_paths(old_d, new_d)) if old_d and new_d else (),
                previous_revision=c.old.metadata.revision if c.old else None,
                request=request,
                extra={"cascade": True} if plan.verb == "delete" and i > 0 else {},
            )
            ops.append(audit_put(entry, ns + i))
        ops.extend(plan.notes.get("store_puts", ()))  # records written with the change (posture)
        res = self.store.txn(compares, ops)
        if not res.succeeded:
            names = ", ".join(split_key(f.key)[0] + "/" + split_key(f.key)[2] for f in res.failed)
            raise Conflict(f"changed concurrently, nothing written: {names}; read it again and retry")
        self.sync()
        return res.revision

    # ------------------------------------------------------------------ dry-run reports
    def object_diffs(self, plan: Plan) -> list[dict[str, Any]]:
        out = []
        for c in plan.changes:
            d = c.summary()
            if c.action != "unchanged":
                d["diff"] = _yaml_diff(c)
            out.append(d)
        return out

    def impact(self, plan: Plan, *, tenant: str | None = None) -> dict[str, Any]:
        """Which hosts and vNICs the plan changes, how many rules and set elements (tenant: only that
        tenant's vNICs are named)."""
        if not plan.writes:
            return {"hosts": [], "totals": _totals([])}
        try:
            after = compile_catalog(plan.catalog, self._rev + 1, self.migrations.placements())
        except Exception as err:
            return {"error": describe(err), "hosts": [], "totals": _totals([])}
        current = self.desired.all()
        hosts = []
        for host in sorted(set(after) | set(current)):
            old = current.get(host) or empty_state(host, 0)
            new = replace(after.get(host) or empty_state(host, 0), revision=old.revision + 1)
            d = diff(old, new)
            if d.empty:
                continue
            vnic_tenants = {v.ifname: v.tenant for v in (*old.vnics, *new.vnics)}
            vnics = sorted({u.vnic.ifname for u in d.vnic_updates} | {r.ifname for r in d.vnic_removes})
            if tenant is not None:
                vnics = [v for v in vnics if vnic_tenants.get(v) == tenant]
                if not vnics:
                    continue
            old_rules = old.rule_map()
            old_sets = old.set_map()
            owner = {v.ifname: v.workload for v in (*old.vnics, *new.vnics)}
            hosts.append(
                {
                    "host": host,
                    "vnics": vnics,
                    # what a person recognises: `tenant/name (ifname)`, in the order of `vnics`
                    "workloads": [f"{owner[i]} ({i})" if owner.get(i) else i for i in vnics],
                    "rulesAdded": sum(1 for u in d.rule_updates if u.rule.id not in old_rules),
                    "rulesChanged": sum(1 for u in d.rule_updates if u.rule.id in old_rules),
                    "rulesRemoved": len(d.rule_removes),
                    "setElementsAdded": sum(
                        len(u.added_addresses) + len(u.added_cidrs) for u in d.set_updates
                    ),
                    "setElementsRemoved": sum(
                        len(u.removed_addresses) + len(u.removed_cidrs) for u in d.set_updates
                    )
                    + sum(
                        len(old_sets[r.name].addresses) + len(old_sets[r.name].cidrs) for r in d.set_removes
                    ),
                }
            )
        return {"hosts": hosts, "totals": _totals(hosts)}

    # ------------------------------------------------------------------ host feed bookkeeping
    def host_known(self, host: str) -> bool:
        return host in self._catalog.hosts or self.desired.snapshot(host) is not None

    def host_status(self, host: str) -> dict[str, Any]:
        return self.hosts.get(host).to_json(self.desired.revision(host))

    def host_statuses(self) -> dict[str, dict[str, Any]]:
        """host_status() of every host, sorted by name, in two lock acquisitions rather than 2 per host."""
        return self.hosts.statuses(self.desired.revisions(), self.host_names())

    def policy_stats(self, tenant: str, name: str) -> dict[str, Any]:
        """Counters of a policy's rules, summed over every host's last report."""
        pol = self._catalog.policies.get((tenant, name))
        ids: dict[int, str] = {}
        for st in self.desired.all().values():
            for r in st.rules:
                if r.tenant == tenant and r.policy == name:
                    ids[r.id] = r.rule
        totals: dict[int, list[int]] = {rid: [0, 0, 0] for rid in ids}
        for _host, counters in self.hosts.counters().items():
            for rid, (packets, nbytes) in counters.items():
                if rid in totals:
                    totals[rid][0] += packets
                    totals[rid][1] += nbytes
                    totals[rid][2] += 1
        by_rule = {ids[rid]: (rid, t) for rid, t in totals.items()}
        rule_names = [r.name for r in pol.spec.rules] if pol is not None else sorted(by_rule)  # type: ignore[attr-defined]
        rules = []
        for rn in rule_names:
            rid, t = by_rule.get(rn, (None, [0, 0, 0]))
            rules.append({"rule": rn, "ruleId": rid, "packets": t[0], "bytes": t[1], "hosts": t[2]})
        return {
            "tenant": tenant,
            "policy": name,
            "rules": rules,
            "packets": sum(r["packets"] for r in rules),
            "bytes": sum(r["bytes"] for r in rules),
        }

    def desired_state(self, host: str) -> HostDesiredState | None:
        return self.desired.snapshot(host)


def _totals(hosts: list[dict[str, Any]]) -> dict[str, int]:
    keys = ("rulesAdded", "rulesChanged", "rulesRemoved", "setElementsAdded", "setElementsRemoved")
    out = {k: sum(h[k] for h in hosts) for k in keys}
    out["hosts"] = len(hosts)
    out["vnics"] = sum(len(h["vnics"]) for h in hosts)
    return out


def _yaml_diff(c: Change) -> str:
    def text(r: _Resource | None) -> list[str]:
        if r is None:
            return []
        d = r.model_dump(mode="json", exclude_none=True)
        for f in ("uid", "revision", "created", "updated"):
            d["metadata"].pop(f, None)
        return yaml.safe_dump(d, sort_keys=False).splitlines(keepends=True)

    label = f"{c.kind}/{c.tenant}/{c.name}"
    return "".join(difflib.unified_diff(text(c.old), text(c.new), f"a/{label}", f"b/{label}"))


__all__ = ["SYSTEM", "Actor", "Change", "Conflict", "Manager", "NotFound", "Plan"]
