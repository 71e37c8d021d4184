"""Live migration of a workload to another host (DESIGN §8, docs/design/migration.md), manager side.

Phases, each written to the store (the record at `migrations/<tenant>/<name>`, with an audit entry in
the same txn) so every replica, the API and the audit log see them:

  prepare    the record exists: the compiler places the workload's vNICs on the destination too (a
             placement, `Migrations.placements`: an input of the compiler); wait
             until the destination's agent acks that revision (its policy is in place first)
  export     the source agent exports the workload's conntrack entries (feed command)
  import     the destination agent imports them (liberal TCP window, CONFIRMED, mark)
  switching  wait for the vNIC to move: `POST .../migrate/{id}/switched`, or the destination agent
             reporting a route to the vNIC (its address report)
  switched   (with `secondCopy`) entries opened since the first export are exported and imported again
  finalize   `spec.host` = destination (audited as `migrate`); the source drops the chains, its
             backend revokes the entries no local hop needs; leftovers are flushed by command
  done       result `succeeded`; the placement is gone (the workload's own host is the destination now)

A failure before the switch rolls back: phase `rollback` removes the placement (the destination drops
the chains; its backend revokes the imported entries, and a flush command removes any left), then
`rolled-back`, result `failed`. The workload never stops being protected on the source. After the switch
nothing rolls back: the vNIC is on the destination, whose policy is in place; errors are recorded.

Agent commands travel on the host feed (`{"type": "command", ...}` lines) and come back through
`POST /v1/hosts/{host}/commands/{id}`; with several managers they are relayed through etcd to the
manager that holds the host's feed (`HostCommands`). The orchestrating thread lives in the manager
that drives the migration; the record (and so
the placement) lives in the store and names that manager (`owner`). When the owner dies, the leader of
the `migrations` election (coordination.py) adopts the record: before the switch it rolls back, from
`switching` on it carries on to `done`. A `switched` call on another manager is passed to the owner
through the record (`stats.switchRequested`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from omniwall.compiler.ir import HostDesiredState, IRVnic
from omniwall.model.catalog import Catalog
from omniwall.model.resources import _Resource
from omniwall.store import Compare, Event, Put, Store
from omniwall.store.runtime import EtcdRuntime, Follower, RuntimeEvent, RuntimeKV

from .audit import SYSTEM, Actor, AuditEntry, audit_put
from .contracts import InvalidResources, Problem
from .coordination import Coordination
from .desired import DesiredStates
from .hosts import HostStatusBook
from .plan import Conflict, NotFound, Plan

log = logging.getLogger(__name__)

MIG_PREFIX = "migrations/"
# The placement (workload on both hosts) is on in these phases only.
SPANNING = ("prepare", "export", "import", "switching", "switched", "finalize")
MIGRATION_JOB = "migrations"  # the election whose leader adopts migrations of managers that died
FAULTS_ENV = "OMNIWALL_MIGRATION_FAULTS"  # "1": the API accepts `failAt` (tests of the rollback)
POLL = 0.01


class MigrationError(Exception):
    pass


def workload_vnics(state: HostDesiredState | None, workload: str) -> list[IRVnic]:
    """The vNICs of `workload` ("tenant/name") in `state`."""
    if state is None:
        return []
    return [v for v in state.vnics if v.workload == workload]


def _key(tenant: str, name: str) -> str:
    return f"{MIG_PREFIX}{tenant}/{name}"


def _dump(mig: Migration) -> str:
    return json.dumps(mig.to_json(), sort_keys=True)


@dataclass
class Migration:
    id: str
    tenant: str
    name: str
    source: str
    destination: str
    started: str
    actor: str = ""
    phase: str = "prepare"
    result: str = "running"  # running | succeeded | failed
    ended: str | None = None
    error: str | None = None
    phases: list[dict[str, Any]] = field(default_factory=list)  # [{phase, at, ms}]
    stats: dict[str, Any] = field(default_factory=dict)
    owner: str = ""  # the manager driving it (its id); another one adopts it when that one is gone
    t0: float = field(default_factory=time.monotonic, repr=False)

    @property
    def workload(self) -> str:
        return f"{self.tenant}/{self.name}"

    @property
    def spanning(self) -> bool:
        return self.result == "running" and self.phase in SPANNING

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "workload": self.workload,
            "tenant": self.tenant,
            "name": self.name,
            "source": self.source,
            "destination": self.destination,
            "phase": self.phase,
            "result": self.result,
            "started": self.started,
            "ended": self.ended,
            "error": self.error,
            "actor": self.actor,
            "phases": list(self.phases),
            "stats": dict(self.stats),
            "owner": self.owner,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> Migration:
        return Migration(
            id=d["id"],
            tenant=d["tenant"],
            name=d["name"],
            source=d["source"],
            destination=d["destination"],
            started=d["started"],
            actor=d.get("actor", ""),
            phase=d.get("phase", "prepare"),
            result=d.get("result", "running"),
            ended=d.get("ended"),
            error=d.get("error"),
            phases=list(d.get("phases", [])),
            stats=dict(d.get("stats", {})),
            owner=d.get("owner", ""),
        )


@dataclass
class Options:
    prepare_timeout: float = 30.0  # destination acks the revision with the placement
    command_timeout: float = 30.0  # one export/import/flush on an agent
    switch_timeout: float = 120.0  # the vNIC moves
    fail_at: str | None = None  # test hook (FAULTS_ENV): fail right after this phase's work
    # Export/import again after the switch (connections opened since the first copy). Off by default:
    # measured, it did not lower the connections hurt by a move and cost time (docs/design/migration.md).
    second_copy: bool = False


# ------------------------------------------------------------------------------------------ commands


@dataclass
class _Pending:
    host: str
    line: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    taken: bool = False
    local: bool = True  # sent by this manager (False: relayed from another one)


CMD_QUEUE, CMD_RESULT = "commands/queue/", "commands/result/"


class HostCommands:
    """Commands for agents, delivered on their feeds, answered by POST. Thread-safe.

    With several managers (etcd), a command is also published as the runtime key
    `commands/queue/<host>/<id>`; every manager follows those keys, so whichever holds the host's feed
    delivers it, and the agent's answer, POSTed to that manager, goes back as `commands/result/<id>` to
    the one waiting for it."""

    def __init__(self, wake: Callable[[], None], runtime: EtcdRuntime | None = None) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._rt = runtime
        self._follower: Follower | None = None

    # ---- the relay between managers
    def follow(self) -> None:
        if self._rt is not None and self._follower is None:
            self._follower = self._rt.follow("commands/", self._snapshot, self._event, "omniwall-commands")

    def stop(self) -> None:
        if self._follower is not None:
            self._follower.stop()
            self._follower = None

    def _snapshot(self, items: list[RuntimeKV]) -> None:
        for kv in items:
            self._event(RuntimeEvent("put", kv.key, kv.value, kv.mod_revision))

    def _event(self, ev: RuntimeEvent) -> None:
        try:
            if ev.key.startswith(CMD_QUEUE):
                host, _, cid = ev.key[len(CMD_QUEUE) :].rpartition("/")
                with self._lock:
                    if ev.type == "delete":
                        p = self._pending.get(cid)
                        if p is not None and not p.local:
                            del self._pending[cid]
                        return
                    if cid in self._pending:
                        return
                    self._pending[cid] = _Pending(host, json.loads(ev.value or "{}"), local=False)
                self._wake()
            elif ev.key.startswith(CMD_RESULT) and ev.type == "put":
                cid = ev.key[len(CMD_RESULT) :]
                with self._lock:
                    p = self._pending.get(cid)
                    if p is None or not p.local or p.done.is_set():
                        return
                    p.result = json.loads(ev.value or "{}")
                p.done.set()
        except (ValueError, TypeError) as err:
            log.error("skipping unreadable relayed command %s: %s", ev.key, err)

    # ---- commands
    def send(self, host: str, op: str, args: dict[str, Any]) -> str:
        cid = uuid.uuid4().hex[:16]
        line = {"type": "command", "id": cid, "op": op, "args": args}
        with self._lock:
            self._pending[cid] = _Pending(host, line)
        if self._rt is not None:
            self.follow()
            try:
                self._rt.write([(f"{CMD_QUEUE}{host}/{cid}", json.dumps(line), 0)])
            except Exception as err:  # only this manager's own feeds get it
                log.warning("command %s for host %s not relayed to the other managers: %s", op, host, err)
        self._wake()
        return cid

    def waiting(self, host: str) -> bool:
        """A command not yet sent to `host`: its feed must send it before any later delta."""
        with self._lock:
            return any(p.host == host and not p.taken for p in self._pending.values())

    def take(self, host: str) -> list[dict[str, Any]]:
        """The command lines not yet sent to `host` (each goes to one feed stream)."""
        with self._lock:
            out = []
            for p in self._pending.values():
                if p.host == host and not p.taken:
                    p.taken = True
                    out.append(p.line)
            return out

    def resolve(self, host: str, cid: str, result: dict[str, Any]) -> bool:
        with self._lock:
            p = self._pending.get(cid)
            if p is None or p.host != host:
                return False
            if p.local:
                p.result = result
        if not p.local:  # relayed: the manager that sent it waits for the answer
            assert self._rt is not None
            self._rt.write([(f"{CMD_RESULT}{cid}", json.dumps(result), 0)])
            return True
        p.done.set()
        return True

    def _forget(self, host: str, cid: str) -> None:
        with self._lock:
            self._pending.pop(cid, None)
        if self._rt is not None:
            try:
                self._rt.write([], [f"{CMD_QUEUE}{host}/{cid}", f"{CMD_RESULT}{cid}"])
            except Exception as err:
                log.warning("relayed command %s not cleaned up: %s", cid, err)

    def call(self, host: str, op: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send and wait for the answer; MigrationError on timeout or an error the agent reports.
        Unanswered after a third of `timeout`, the command is sent once more (a feed that broke after
        the line left, a lost result POST; every op is idempotent: imports skip existing entries)."""
        state = "was not delivered (no feed)"
        for share in (1 / 3, 2 / 3):
            cid = self.send(host, op, args)
            with self._lock:
                p = self._pending[cid]
            try:
                if p.done.wait(timeout * share):
                    assert p.result is not None
                    if p.result.get("error"):
                        raise MigrationError(f"{op} on host {host}: {p.result['error']}")
                    return p.result
                if p.taken:
                    state = "was delivered but not answered"
                log.warning("%s on host %s: no answer yet (it %s)", op, host, state)
            finally:
                self._forget(host, cid)
        raise MigrationError(f"{op} on host {host}: no answer within {timeout:g} s (it {state}, twice)")


# ------------------------------------------------------------------------------------------ service


class ManagerView(Protocol):
    """What a migration needs of the manager (manager/service.py implements it)."""

    store: Store
    desired: DesiredStates
    hosts: HostStatusBook
    coordination: Coordination

    @property
    def catalog(self) -> Catalog: ...

    def now_iso(self) -> str: ...

    def sync(self) -> int: ...

    def get(self, kind: str, tenant: str, name: str) -> _Resource | None: ...

    def plan_apply(
        self,
        resources: Iterable[_Resource],
        *,
        mode: Literal["apply", "create", "update"] = ...,
        verb: str = ...,
    ) -> Plan: ...

    def commit(self, plan: Plan, actor: Actor, request: str | None = None) -> int: ...


class Migrations:
    """Records (from the store), the placements they imply, the agent commands and the orchestrating
    threads."""

    def __init__(self, manager: ManagerView) -> None:
        self.m = manager
        runtime = getattr(manager.store, "runtime", None)  # etcd: commands relayed between managers
        self.commands = HostCommands(manager.desired.changed.notify, runtime() if runtime else None)
        self._lock = threading.RLock()  # the records only; never held while writing the store
        self._start_lock = threading.Lock()
        self._records: dict[tuple[str, str], Migration] = {}
        self._mod: dict[tuple[str, str], int] = {}
        self._switch: dict[str, threading.Event] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._driver: threading.Thread | None = None
        self._driver_stop = threading.Event()

    # ---- store side (called under the manager's sync lock)
    def load(self) -> None:
        items, _ = self.m.store.range(MIG_PREFIX)
        with self._lock:
            self._records.clear()
            self._mod.clear()
            for kv in items:
                self._take(kv.key, kv.value, kv.mod_revision)

    def on_event(self, e: Event) -> bool:
        """A store event; True when it was a migration record (the placements may have changed)."""
        if not e.key.startswith(MIG_PREFIX):
            return False
        with self._lock:
            if e.type == "put" and e.value:
                self._take(e.key, e.value, e.revision)
            else:
                t, _, n = e.key[len(MIG_PREFIX) :].partition("/")
                self._records.pop((t, n), None)
                self._mod.pop((t, n), None)
        return True

    def _take(self, key: str, value: str, revision: int) -> None:
        try:
            mig = Migration.from_json(json.loads(value))
        except (ValueError, KeyError, TypeError) as err:
            log.error("skipping unreadable migration record %s: %s", key, err)
            return
        k = (mig.tenant, mig.name)
        old = self._records.get(k)
        if old is not None and old.id == mig.id:
            mig.t0 = old.t0
        self._records[k] = mig
        self._mod[k] = revision

    def placements(self) -> dict[tuple[str, str], str]:
        """Workload (tenant, name) -> the destination it is compiled onto too, while it migrates."""
        with self._lock:
            return {(m.tenant, m.name): m.destination for m in self._records.values() if m.spanning}

    # ---- reads
    def get(self, tenant: str, name: str) -> Migration | None:
        with self._lock:
            return self._records.get((tenant, name))

    def status_of(self, tenant: str, name: str) -> dict[str, Any] | None:
        mig = self.get(tenant, name)
        return mig.to_json() if mig is not None else None

    # ---- API actions
    def start(self, tenant: str, name: str, to: str, actor: Actor, opts: Options | None = None) -> Migration:
        opts = opts or Options()
        if opts.fail_at is not None and os.environ.get(FAULTS_ENV) != "1":
            raise InvalidResources([Problem("request body", "failAt", f"only with {FAULTS_ENV}=1")])
        with self._start_lock:
            wl = self.m.get("Workload", tenant, name)
            if wl is None:
                raise NotFound(f"Workload/{tenant}/{name} not found")
            source = wl.spec.host  # type: ignore[attr-defined]
            doc = f"Workload/{tenant}/{name}"
            if to not in self.m.catalog.hosts:
                raise InvalidResources([Problem(doc, "to", f"unknown host {to!r}")])
            if to == source:
                raise InvalidResources([Problem(doc, "to", f"the workload already runs on {to!r}")])
            cur = self.get(tenant, name)
            if cur is not None and cur.result == "running" and self._driven(cur):
                raise Conflict(f"{doc} is already migrating ({cur.id}: {cur.source} -> {cur.destination})")
            wkey = f"{tenant}/{name}"
            src_state = self.m.desired.snapshot(source)
            dst_state = self.m.desired.snapshot(to)
            if dst_state is None:
                raise InvalidResources([Problem(doc, "to", f"host {to!r} has no desired state yet")])
            taken = dst_state.vnic_map()
            for v in workload_vnics(src_state, wkey):
                other = taken.get(v.ifname)
                if other is not None and other.workload != wkey:
                    raise Conflict(f"{doc}: interface {v.ifname} is taken on {to} by {other.workload}")
            mig = Migration(
                id=uuid.uuid4().hex[:12],
                tenant=tenant,
                name=name,
                source=source,
                destination=to,
                started=self.m.now_iso(),
                actor=actor.name,
                owner=self.m.coordination.id,
            )
            self._switch[mig.id] = threading.Event()
            with self._lock:
                prev = self._mod.get((tenant, name), 0)
            self._write(mig, "prepare", actor, compare=prev)
            t = threading.Thread(
                target=self._run, args=(mig, actor, opts), name=f"migrate-{mig.id}", daemon=True
            )
            self._threads[mig.id] = t
            t.start()
            return mig

    def switched(self, tenant: str, name: str, mid: str) -> Migration:
        mig = self.get(tenant, name)
        if mig is None or mig.id != mid:
            raise NotFound(f"migration {mid} of Workload/{tenant}/{name} not found")
        if mig.phase in ("switched", "finalize") or mig.result == "succeeded":
            return mig  # already seen (the destination agent reported the vNIC's route first)
        ev = self._switch.get(mid)
        if mig.result != "running":
            raise Conflict(f"migration {mid} is not running (phase {mig.phase}, result {mig.result})")
        if ev is not None:
            ev.set()
            return mig
        # driven by another manager: tell it through the record (it polls it while switching)
        with self._lock:
            mod = self._mod.get((tenant, name), 0)
        rec = Migration.from_json(mig.to_json())
        rec.stats["switchRequested"] = True
        res = self.m.store.txn([Compare(_key(tenant, name), mod)], [Put(_key(tenant, name), _dump(rec))])
        if not res.succeeded:
            raise Conflict(f"migration {mid} changed meanwhile; try again")
        self.m.sync(res.revision)
        return mig

    def wait(self, tenant: str, name: str, mid: str, timeout: float) -> Migration | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            mig = self.get(tenant, name)
            if mig is None or mig.id != mid or mig.result != "running":
                return mig
            time.sleep(0.02)
        return self.get(tenant, name)

    def _alive(self, mid: str) -> bool:
        t = self._threads.get(mid)
        return t is not None and t.is_alive()

    def _driven(self, mig: Migration) -> bool:
        """Some manager drives it: a thread here, or its owner (another manager) is alive."""
        if self._alive(mig.id) or mig.id in self._switch:  # _switch: being started or driven here
            return True
        me = self.m.coordination.id
        return bool(mig.owner) and mig.owner != me and self.m.coordination.alive(mig.owner)

    # ---- adoption: the leader carries on (or rolls back) what a dead manager was driving
    def adopt_orphans(self, opts: Options | None = None) -> list[str]:
        """Under the `migrations` election: every running migration whose driver is gone is adopted
        (one CAS write of the record names this manager its owner; a lost race means another manager
        adopted it). Before the switch it rolls back, as the dead driver would have on a failure; from
        `switching` on it carries on. Returns the ids adopted."""
        if not self.m.coordination.is_leader(MIGRATION_JOB):
            return []
        with self._lock:
            running = [
                (m, self._mod[(m.tenant, m.name)]) for m in self._records.values() if m.result == "running"
            ]
        adopted = []
        for rec, mod in running:
            if self._driven(rec):
                continue
            mig = Migration.from_json(rec.to_json())
            dead, mig.owner = mig.owner, self.m.coordination.id
            try:
                self._write(mig, mig.phase, SYSTEM, compare=mod, adoptedFrom=dead or "?")
            except Conflict:
                continue  # another manager adopted it first
            log.warning("migration %s of %s: manager %s is gone in phase %s; adopted", mig.id, mig.workload,
                        dead or "?", mig.phase)  # fmt: skip
            opts = opts or Options(prepare_timeout=10.0, command_timeout=10.0)
            t = threading.Thread(
                target=self._carry_on, args=(mig, dead, opts), name=f"adopt-{mig.id}", daemon=True
            )
            self._threads[mig.id] = t
            t.start()
            adopted.append(mig.id)
        return adopted

    def _carry_on(self, mig: Migration, dead: str, opts: Options) -> None:
        if mig.phase in ("prepare", "export", "import", "rollback"):
            self._rollback(
                mig, SYSTEM, MigrationError(f"manager {dead or '?'} stopped while driving it"), opts
            )
            return
        self._switch[mig.id] = threading.Event()
        try:
            if mig.phase == "switching":
                try:
                    how = self._wait_switch(mig, opts)
                except Exception as err:
                    self._rollback(mig, SYSTEM, err, opts)
                    return
                mig.stats["switchedBy"] = how
                self._write(mig, "switched", SYSTEM, by=how)
            self._finalize(mig, SYSTEM, opts)
        except Exception as err:
            log.exception("migration %s: finalize failed", mig.id)
            mig.result, mig.error = "failed", f"finalize: {err}"
            self._write(mig, "done", SYSTEM)
        finally:
            self._switch.pop(mig.id, None)

    def start_driver(self, interval: float = 1.0) -> None:
        """A thread that adopts orphaned migrations while this manager leads `migrations`."""
        self.commands.follow()  # deliver other managers' commands to the feeds held here
        if self._driver is not None:
            return
        self._driver_stop.clear()

        def loop() -> None:
            while not self._driver_stop.wait(interval):
                try:
                    self.adopt_orphans()
                except Exception as e:  # the store away: the next round retries
                    log.warning("adopting orphaned migrations failed: %s", e)

        self._driver = threading.Thread(target=loop, name="omniwall-migration-driver", daemon=True)
        self._driver.start()

    def stop_driver(self) -> None:
        self.commands.stop()
        self._driver_stop.set()
        if self._driver is not None:
            self._driver.join(timeout=5)
            self._driver = None

    # ---- the orchestration (one thread per migration)
    def _write(
        self, mig: Migration, phase: str, actor: Actor, *, compare: int | None = None, **extra: Any
    ) -> None:
        mig.phase = phase
        now = self.m.now_iso()
        mig.phases.append({"phase": phase, "at": now, "ms": round((time.monotonic() - mig.t0) * 1000, 1)})
        if mig.result != "running" and mig.ended is None:
            mig.ended = now
        entry = AuditEntry(
            time=now,
            actor=actor.name,
            actor_id=actor.id,
            role=actor.role,
            action="migrate",
            kind="Workload",
            tenant=mig.tenant,
            name=mig.name,
            request=mig.id,
            extra={
                "migration": mig.id,
                "phase": phase,
                "from": mig.source,
                "to": mig.destination,
                "result": mig.result,
                **({"error": mig.error} if mig.error else {}),
                **extra,
            },
        )
        key = _key(mig.tenant, mig.name)
        compares = [Compare(key, compare)] if compare is not None else []
        res = self.m.store.txn(compares, [Put(key, _dump(mig)), audit_put(entry, time.time_ns())])
        if not res.succeeded:
            raise Conflict(f"Workload/{mig.tenant}/{mig.name}: a migration was started concurrently")
        self.m.sync(res.revision)

    def _run(self, mig: Migration, actor: Actor, opts: Options) -> None:
        switched = False
        try:
            ips = self._prepare(mig, opts)
            self._fault(mig, opts, "prepare")
            self._write(mig, "export", actor)
            entries = self._export(mig.source, ips, opts)
            mig.stats["exported"] = len(entries)
            self._fault(mig, opts, "export")
            self._write(mig, "import", actor, entries=len(entries))
            mig.stats["imported"] = self._import(mig.destination, entries, opts)
            self._fault(mig, opts, "import")
            # what the destination's agent reports before anyone may move the vNIC: a workload that left
            # that host a moment ago may still be listed there (the agent's report lags)
            before = dict(self.m.hosts.get(mig.destination).addresses)
            self._write(mig, "switching", actor, imported=mig.stats["imported"])
            how = self._wait_switch(mig, opts, before)
            switched = True
            mig.stats["switchedBy"] = how
            self._write(mig, "switched", actor, by=how)
        except Exception as err:
            if not switched:
                self._rollback(mig, actor, err)
                return
        try:
            if not opts.second_copy:
                raise MigrationError("skipped (secondCopy: false)")
            again = self._export(mig.source, self._ips(mig), opts)
            mig.stats["exportedAfterSwitch"] = len(again)
            mig.stats["importedAfterSwitch"] = self._import(mig.destination, again, opts)
        except Exception as err:  # the vNIC moved: go on, the flows the first copy carried are there
            mig.stats["secondCopyError"] = str(err)
        try:
            self._finalize(mig, actor, opts)
        except Exception as err:
            log.exception("migration %s: finalize failed", mig.id)
            mig.result, mig.error = "failed", f"finalize: {err}"
            self._write(mig, "done", actor)
        finally:
            self._switch.pop(mig.id, None)

    def _ips(self, mig: Migration) -> list[str]:
        for host in (mig.source, mig.destination):
            vnics = workload_vnics(self.m.desired.snapshot(host), mig.workload)
            if vnics:
                return sorted({a for v in vnics for a in v.addresses})
        return []

    def _prepare(self, mig: Migration, opts: Options) -> list[str]:
        dst = self.m.desired.snapshot(mig.destination)
        want = workload_vnics(self.m.desired.snapshot(mig.source), mig.workload)
        have = {v.ifname for v in workload_vnics(dst, mig.workload)}
        missing = [v.ifname for v in want if v.ifname not in have]
        if missing:
            raise MigrationError(f"destination state lacks vNIC(s) {', '.join(missing)}")
        assert dst is not None
        self._wait_realized(mig.destination, dst.revision, opts.prepare_timeout)
        mig.stats["prepareRevision"] = dst.revision
        return sorted({a for v in want for a in v.addresses})

    def _wait_realized(self, host: str, revision: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            st = self.m.hosts.get(host)
            if st.realized_revision >= revision and st.last_error is None:
                return
            if time.monotonic() > deadline:
                why = f"; its last error: {st.last_error}" if st.last_error else ""
                raise MigrationError(
                    f"host {host} did not realize revision {revision} within {timeout:g} s "
                    f"(realized {st.realized_revision}, connected: {st.connected > 0}){why}"
                )
            time.sleep(POLL)

    def _export(self, host: str, ips: list[str], opts: Options) -> list[dict[str, Any]]:
        if not ips:
            return []
        out = self.commands.call(host, "export_connections", {"addresses": ips}, opts.command_timeout)
        return list(out.get("entries", []))

    def _import(self, host: str, entries: list[dict[str, Any]], opts: Options) -> int:
        if not entries:
            return 0
        out = self.commands.call(host, "import_connections", {"entries": entries}, opts.command_timeout)
        return int(out.get("imported", 0))

    def _flush(self, host: str, ips: list[str], opts: Options) -> int:
        if not ips:
            return 0
        out = self.commands.call(host, "flush_connections", {"addresses": ips}, opts.command_timeout)
        return int(out.get("flushed", 0))

    def _fault(self, mig: Migration, opts: Options, phase: str) -> None:
        if opts.fail_at == phase:
            raise MigrationError(f"injected failure after phase {phase} ({FAULTS_ENV})")

    def _wait_switch(self, mig: Migration, opts: Options, before: dict[str, Any] | None = None) -> str:
        """Until the vNIC is on the destination: "api" (a hypervisor said `switched`) or "route" (the
        destination's agent sees the vNIC's addresses). An interface the destination already listed in
        `before` counts only once a report has shown it gone: migrating back to the host a workload
        just left, its agent's last report may still list it, and taking that for the move finalized
        migrations whose vNIC never moved (spec.host on one host, the vNIC on another)."""
        ev = self._switch[mig.id]
        ifnames = {v.ifname for v in workload_vnics(self.m.desired.snapshot(mig.destination), mig.workload)}
        stale = {i for i in ifnames if (before or {}).get(i)}
        deadline = time.monotonic() + opts.switch_timeout
        while True:
            rec = self.get(mig.tenant, mig.name)
            if ev.is_set() or (rec is not None and rec.id == mig.id and rec.stats.get("switchRequested")):
                return "api"
            seen = self.m.hosts.get(mig.destination).addresses
            stale = {i for i in stale if seen.get(i)}
            if ifnames and not stale and all(seen.get(i) for i in ifnames):
                return "route"
            if time.monotonic() > deadline:
                raise MigrationError(
                    f"the vNIC did not reach {mig.destination} within {opts.switch_timeout:g} s"
                )
            time.sleep(POLL)

    def _finalize(self, mig: Migration, actor: Actor, opts: Options) -> None:
        self._write(mig, "finalize", actor)
        ips = self._ips(mig)
        for _ in range(5):  # the workload may be edited meanwhile: re-read and retry
            wl = self.m.get("Workload", mig.tenant, mig.name)
            if wl is None:
                raise MigrationError("the workload was deleted during the migration")
            if wl.spec.host == mig.destination:  # type: ignore[attr-defined]
                break
            if wl.spec.host != mig.source:  # type: ignore[attr-defined]
                raise MigrationError(f"spec.host was changed to {wl.spec.host} meanwhile")  # type: ignore[attr-defined]
            moved = wl.model_copy(update={"spec": wl.spec.model_copy(update={"host": mig.destination})})  # type: ignore[attr-defined]
            try:
                plan = self.m.plan_apply([moved], mode="update", verb="migrate")
                self.m.commit(plan, actor, request=mig.id)
                break
            except Conflict:
                self.m.sync()  # the model may be behind the write that beat us: read it before retrying
                continue
        else:  # never silently "succeeded" with spec.host still on the source
            raise MigrationError("spec.host could not be moved: the workload kept changing (5 tries)")
        src = self.m.desired.snapshot(mig.source)
        if src is not None:
            try:
                self._wait_realized(mig.source, src.revision, opts.prepare_timeout)
                mig.stats["leftoverFlushed"] = self._flush(mig.source, ips, opts)
            except MigrationError as err:  # the source agent is away: it drops the chains when back
                mig.stats["sourceCleanupError"] = str(err)
        mig.result = "succeeded"
        self._write(mig, "done", actor)

    def _rollback(self, mig: Migration, actor: Actor, err: Exception, cleanup: Options | None = None) -> None:
        log.warning("migration %s of %s failed (%s); rolling back", mig.id, mig.workload, err)
        mig.error = f"{mig.phase}: {err}"
        ips = self._ips(mig)
        try:
            self._write(mig, "rollback", actor)  # no placement: the destination drops the chains
            dst = self.m.desired.snapshot(mig.destination)
            if dst is not None:
                opts = cleanup or Options(prepare_timeout=10.0, command_timeout=10.0)
                try:
                    self._wait_realized(mig.destination, dst.revision, opts.prepare_timeout)
                    mig.stats["destinationFlushed"] = self._flush(mig.destination, ips, opts)
                except MigrationError as e2:
                    mig.stats["destinationCleanupError"] = str(e2)
            mig.result = "failed"
            self._write(mig, "rolled-back", actor)
        finally:
            self._switch.pop(mig.id, None)


__all__ = ["MIG_PREFIX", "HostCommands", "Migration", "MigrationError", "Migrations", "Options"]
