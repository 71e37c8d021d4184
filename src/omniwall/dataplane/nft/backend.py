"""`NftBackend`: one host's `HostDesiredState` realized in `table inet omniwall` of one network namespace.

The applier: it executes what the planner (planner.py, pure) decides, reads the table back, and
revokes through `self.revoker` (dataplane/revocation.py). Nothing here builds kernel operations.

- `sync(state)`: reads the table back; nothing realized (or drifted) -> the whole table is rebuilt in
  one transaction (a bulk load when none exists and the sets are big); otherwise the minimal
  incremental transaction (often nothing at all), the whole table if that fails.
- `apply(base, delta, target)`: the planner's write for what the delta names: one raw netlink batch for
  a members-only delta (set elements, ipcache entries, the revision), else one libnftables transaction
  (touched vNIC chains, index entries, port sets, stored-IR buckets, map elements, the revision).
- Every change then re-judges the conntrack entries the change can affect and deletes those the new
  state would refuse (revocation); other connections are untouched. A members-only change asks
  conntrack only about the addresses whose verdicts can have tightened.
- Interfaces whose name starts with a workload prefix (`workload_prefixes`, default `ow`) but that are
  not a vNIC of the realized state are dropped (fail closed), see render.py.
- `realized()` rebuilds the IR from the table alone (stored structure + revision + kernel set
  elements), so a restarted agent adopts the table without writing and without breaking connections.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import Any

from omniwall.compiler.ir import HostDelta, HostDesiredState
from omniwall.dataplane import ct_migrate
from omniwall.dataplane.backend import Capabilities, ConnEntry, RuleCounters
from omniwall.dataplane.conntrack import ConntrackTable
from omniwall.dataplane.nft.expr import Json
from omniwall.dataplane.nft.libnft import Nft, NftError
from omniwall.dataplane.nft.names import FAMILY, STATE_CHAIN, TABLE
from omniwall.dataplane.nft.planner import (
    BULK_LOAD_MIN_ELEMENTS,
    FAST_PATH_MAX_ELEMENTS,
    NftPlanner,
    Plan,
    normalized,
)
from omniwall.dataplane.nft.render import (
    DEFAULT_FLOW_GROUP,
    DEFAULT_LOG_GROUP,
    DEFAULT_WORKLOAD_PREFIXES,
    check_prefixes,
)
from omniwall.dataplane.revocation import Revoker, delta_vnics

log = logging.getLogger(__name__)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Planning a full table allocates ~10^6 dicts and lists, none of them garbage, while the process
    holds the states' 100k+ members: the cyclic collector traversed them over and over (half the CPU
    of a full plan on the benchmark's host, and a stray full collection in a one-rule change costs
    more than the change). Paused while we plan and write; reference counting frees what we drop.
    On the way out the survivors (the planner's book: ~10^6 containers after a full plan) go straight
    to the oldest generation (`freeze` + `unfreeze`: a list splice, and the young generations' counts
    reset), else the first allocation after `enable` traverses them all as young objects (~0.2 s of
    a full sync's CPU); cyclic garbage among them waits for the next full collection."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.freeze()
            gc.unfreeze()
            gc.enable()


class NftBackend:
    capabilities = Capabilities(kernel=True, conntrack=True, counters=True)

    def __init__(
        self,
        netns: str | None,
        *,
        log_group: int = DEFAULT_LOG_GROUP,
        flow_group: int | None = DEFAULT_FLOW_GROUP,
        allow_initial_netns: bool = False,
        revoke: bool = True,
        workload_prefixes: Sequence[str] = DEFAULT_WORKLOAD_PREFIXES,
        revoke_async: bool = False,
        raw_rules: bool = True,
    ) -> None:
        self.netns = netns
        self.log_group = log_group
        self.flow_group = flow_group  # NFLOG group of flow records (agent/flows.py); None: no flow logs
        self.revoke = revoke
        self.workload_prefixes = check_prefixes(workload_prefixes)
        # members-only deltas: re-judge conntrack on the namespace thread after apply() returned
        self.revoke_async = revoke_async
        self._revocations: list[Future[None]] = []
        self.planner = NftPlanner(log_group, flow_group, self.workload_prefixes)
        # raw_rules: transactions as raw nfnetlink where nlrules.py can encode them (False: libnftables)
        self.nft = Nft(netns, allow_initial_netns=allow_initial_netns, raw_rules=raw_rules)
        self.ct = ConntrackTable(thread=self.nft.thread, allow_initial_netns=allow_initial_netns)
        self._current: HostDesiredState | None = None
        self.revoker = Revoker(self.ct, enabled=revoke)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already logged by the job
            self.wait_revocation()
        self.ct.close()
        self.nft.close()

    def wait_revocation(self) -> None:
        """Wait for background revocations (`revoke_async`); re-raises the first that failed."""
        pending, self._revocations = self._revocations, []
        for f in pending:
            f.result()

    # --------------------------------------------------------------------------------- read back
    def _listing(self) -> list[dict[str, Any]] | None:
        return self.nft.list_table(FAMILY, TABLE)

    def realized(self) -> HostDesiredState | None:
        return self._realized(self._listing())

    def _realized(self, listing: list[dict[str, Any]] | None) -> HostDesiredState | None:
        state = self.planner.read_back(listing) if listing is not None else None
        self._current = state
        return state

    # ------------------------------------------------------------------------------------- writes
    def _execute(self, plan: Plan) -> None:
        """One plan: its transaction (the fallback if that fails and it has one), then its raw batch;
        the planner moves its book to the target only once the kernel took everything."""
        try:
            if plan.rewrites:
                plan.commands = edit_chains(self.nft, plan.commands, plan.rewrites)
            if plan.commands:
                try:  # one transaction with the raw batch when both encode raw (a bulk load: atomic)
                    self.nft.transact(plan.commands, plan.ops)
                except NftError as e:
                    if plan.fallback is None:
                        raise
                    # an unexpected kernel state: replace the table atomically instead
                    log.warning("incremental %s failed (%s); rebuilding the table", plan.kind, e.message)
                    self.nft.transact(plan.fallback, plan.ops)
                    plan.book = None
            elif plan.ops:
                self.nft.elements(FAMILY, TABLE, plan.ops)
        except BaseException:
            self.planner.forget()
            raise
        self.planner.committed(plan)

    def sync(self, state: HostDesiredState) -> None:
        with gc_paused():
            self._sync(state)

    def _sync(self, state: HostDesiredState) -> None:
        listing = self._listing()
        if listing is not None:  # the table's set types: raw batches may name its sets (nlrules.py)
            self.nft.learn_sets(listing, FAMILY, TABLE)
        current = self._realized(listing)
        if current is not None and normalized(current) == normalized(state):
            self._current = state
            return
        if current is None:
            plan = self.planner.full(state, exists=listing is not None)
        else:
            plan = self.planner.sync(normalized(current), normalized(state))
        self._execute(plan)
        self._current = state
        self._revoke(current, state)

    def apply(self, base: HostDesiredState, delta: HostDelta, target: HostDesiredState) -> None:
        with gc_paused():
            self._apply(base, delta, target)

    def _apply(self, base: HostDesiredState, delta: HostDelta, target: HostDesiredState) -> None:
        held = self._current if self._current is not None else self.realized()
        if held is None:
            raise ValueError("apply: nothing realized yet; sync a full state first")
        if delta.from_revision != held.revision or base.revision != held.revision:
            raise ValueError(
                f"apply: delta starts at revision {delta.from_revision}, realized is {held.revision}"
            )
        if target.revision != delta.to_revision:
            raise ValueError(f"apply: target {target.revision}, delta ends at {delta.to_revision}")
        plan = self.planner.change(held, delta, target)
        self._execute(plan)
        self._current = target
        if plan.revoke == "involving":
            if self.revoke_async and self.revoke and plan.suspects:
                self.revoker.last_revoked = []
                self._revocations = [f for f in self._revocations if not f.done() or f.exception()]
                self._revocations.append(self.nft.thread.submit(self._revoke_later, plan.suspects))
            else:
                self.revoker.involving(target, plan.suspects)
        elif plan.revoke == "after_change":
            self._revoke(held, target, delta_vnics(held, delta, target))

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            self.wait_revocation()
        if self._listing() is not None:
            self.nft.transact([{"delete": {"table": {"family": FAMILY, "name": TABLE}}}])
        self._current = None
        self.planner.forget()

    # --------------------------------------------------------------------------------- revocation
    def _revoke(
        self, old: HostDesiredState | None, new: HostDesiredState, vnics: frozenset[str] | None = None
    ) -> None:
        with contextlib.suppress(Exception):  # background ones first (their failures are logged)
            self.wait_revocation()
        self.revoker.after_change(old, new, vnics)

    def _revoke_later(self, addresses: set[str]) -> None:
        """On the namespace thread, in queue order: judge under the state current *now*, so a member
        that came back meanwhile does not cut connections its latest state allows."""
        state = self._current
        if state is None:
            return
        try:
            self.revoker.involving(state, addresses)
        except Exception as e:
            log.warning("background revocation for %s failed: %s", sorted(addresses), e)
            raise

    @property
    def last_revoked(self) -> list[ConnEntry]:
        return self.revoker.last_revoked

    # ------------------------------------------------------------------------------------ reports
    def counters(self) -> list[RuleCounters]:
        listing = self.nft.list_table(FAMILY, TABLE, terse=True) or []
        pk: Counter[int] = Counter()
        by: Counter[int] = Counter()
        for obj in listing:
            r = obj.get("rule")
            if not r or r.get("chain") == STATE_CHAIN or not str(r.get("comment", "")).isdigit():
                continue
            rid = int(r["comment"])
            for ex in r.get("expr", []):
                c = ex.get("counter") if isinstance(ex, dict) else None
                if isinstance(c, dict):
                    pk[rid] += c.get("packets", 0)
                    by[rid] += c.get("bytes", 0)
        ids = sorted(set(pk) | set(by))
        return [RuleCounters(rule_id=i, packets=pk[i], bytes=by[i]) for i in ids]

    def connections(self, ifname: str | None = None) -> list[ConnEntry]:
        if ifname is None:
            return self.ct.list()
        state = self._current if self._current is not None else self.realized()
        vnic = state.vnic_map().get(ifname) if state is not None else None
        if vnic is None:
            return []
        return self.ct.matching(vnic.addresses)

    def export_connections(self, addresses: list[str]) -> list[ConnEntry]:
        # the struct-parsed dump (ct_migrate.py): same entries as ct.matching, ~9x faster
        return ct_migrate.export(self.ct, addresses)

    def import_connections(self, entries: list[ConnEntry]) -> int:
        # batched sends, acks read in bulk (ct_migrate.py): ~17x faster than ct.import_entries
        return ct_migrate.import_entries(self.ct, entries)

    def flush_connections(self, entries: list[ConnEntry]) -> int:
        return self.ct.delete(entries)


def _body(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k in ("expr", "comment")}


def edit_chains(nft: Nft, commands: list[Json], rewrites: dict[str, list[Json]]) -> list[Json]:
    """`commands` with each chain of `rewrites` (flushed, then filled with its new rules) edited in
    place instead: the old rules that differ deleted by handle, the new ones inserted where they were.
    A one-rule change then adds one or two rules, not the ~140 of its chain (each one the kernel
    builds and libnftables or nlrules.py encodes), and the chain's other rules keep their counters.
    The handles come from a dump of the chain, checked rule by rule against the old rules' comments;
    anything unexpected leaves that chain's flush and re-add as they were."""
    adds: dict[str, list[int]] = {}
    flushes: dict[str, int] = {}
    for i, c in enumerate(commands):
        add = c.get("add")
        if add is not None:
            r = add.get("rule")
            if r is not None and r.get("chain") in rewrites:
                adds.setdefault(r["chain"], []).append(i)
            continue
        fl = c.get("flush")
        if fl is not None and fl.get("chain", {}).get("name") in rewrites:
            flushes[fl["chain"]["name"]] = i
    drop: set[int] = set()
    at: dict[int, list[Json]] = {}  # index of a chain's first add -> the edit replacing its adds
    for chain, old in rewrites.items():
        idx = adds.get(chain, [])
        if chain not in flushes or not idx or not old:
            continue
        new = [commands[i]["add"]["rule"] for i in idx]
        p = 0
        while p < min(len(old), len(new)) and old[p] == _body(new[p]):
            p += 1
        s = 0
        while s < min(len(old), len(new)) - p and old[-1 - s] == _body(new[-1 - s]):
            s += 1
        if p + s == 0 or (len(old) - p - s) + (len(new) - p - s) >= len(new):
            continue  # nothing in common worth a dump
        got = nft.rule_handles(FAMILY, TABLE, chain)
        if got is None or [c for _h, c in got] != [o.get("comment") for o in old]:
            continue  # not the chain the planner remembers: flush and re-add it whole
        handles = [h for h, _c in got]
        edit: list[Json] = [
            {"delete": {"rule": {"family": FAMILY, "table": TABLE, "chain": chain, "handle": h}}}
            for h in handles[p : len(old) - s]
        ]
        middle = new[p : len(new) - s]
        if s:  # before the first rule of the common tail, in order
            anchor = handles[len(old) - s]
            edit += [{"insert": {"rule": {**r, "handle": anchor}}} for r in middle]
        else:  # nothing in common at the end: appended, in order
            edit += [{"add": {"rule": r}} for r in middle]
        drop.add(flushes[chain])
        drop.update(idx)
        at[idx[0]] = edit
    if not at:
        return commands
    out: list[Json] = []
    for i, c in enumerate(commands):
        if i in at:
            out += at[i]
        if i not in drop:
            out.append(c)
    return out


__all__ = ["BULK_LOAD_MIN_ELEMENTS", "FAST_PATH_MAX_ELEMENTS", "NftBackend", "edit_chains", "normalized"]
