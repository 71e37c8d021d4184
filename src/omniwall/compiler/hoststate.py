"""One host's current desired state, kept as maps, updated in place and turned into a HostDelta.

The host tracks which of its vNICs reference which rules (reference counts) and which of its rules
reference which sets, so that a rule is present exactly while some vNIC lists it and a set exactly while
some present rule names it. Deltas are assembled from what was touched, in the order `ir.diff` uses, and
equal `ir.diff(old, new)`; the full `HostDesiredState` is only built when asked for (and cached).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from itertools import chain, filterfalse, repeat
from operator import attrgetter
from typing import Any

from omniwall.compiler.ir import (
    HostDelta,
    HostDesiredState,
    IRRule,
    IRSet,
    IRVnic,
    RuleRemove,
    RuleUpdate,
    SetRemove,
    SetUpdate,
    VnicRemove,
    VnicUpdate,
    set_updates_deltas,
)
from omniwall.compiler.sets import created_update

# (rank, workload key, vNIC index): the lowest wins a duplicate ifname; rank 0 = the host's own workload,
# 1 = a workload placed there (migration), so a placed vNIC never displaces a local one
ClaimKey = tuple[int, tuple[str, str], int]
# One vNIC a workload puts on the host: its claim on the vNIC's ifname
Entry = tuple[ClaimKey, IRVnic]


def rule_sets(r: IRRule | None) -> tuple[str, ...]:
    if r is None:
        return ()
    if r.src_set is not None and r.dst_set is not None and r.src_set != r.dst_set:
        return (r.src_set, r.dst_set)
    s = r.src_set if r.src_set is not None else r.dst_set
    return () if s is None else (s,)


@dataclass
class Globals:
    """What a host needs from the compiler while updating."""

    rule_by_id: Mapping[int, IRRule]
    set_current: Callable[[str], IRSet]
    rule_hosts: dict[int, set[str]]
    rule_sets: Mapping[int, tuple[str, ...]]  # rule id -> rule_sets(its IRRule)
    set_memo: Mapping[str, IRSet]  # current IRSet of every set some host holds (and of others)
    old_rules: Mapping[int, IRRule]  # the IR, before this update, of every rule id whose IR changed


@dataclass(slots=True)
class HostState:
    """Which rules and sets the host holds is kept as reference counts only; their content is the
    compiler's (`rule_by_id`, `set_memo`, shared by every host): after each update, every host holding a
    rule or set that changed was updated in it, so a host's version of a rule or set is always the
    current one, and a per-host copy (two more dicts of ~1,000 entries per host) was redundant.

    Claims: almost every ifname has one claim, so `claims[ifname]` is that claim's entry itself (the
    (ClaimKey, IRVnic) tuple the compiler made) and `by_wid[wid]` the compiler's list of the workload's
    entries; only an ifname claimed twice (a placed workload sharing an ifname with a local one) gets a
    dict ClaimKey -> IRVnic. At 1M vNICs a 1-entry dict, a list and a tuple per vNIC were ~300 MB and a
    few allocations each in the build."""

    name: str
    revision: int
    rule_by_id: Mapping[int, IRRule]
    set_memo: Mapping[str, IRSet]
    claims: dict[str, Entry | dict[ClaimKey, IRVnic]] = field(default_factory=dict)
    by_wid: dict[int, list[Entry]] = field(default_factory=dict)  # the lists given to fill/update
    vnics: dict[str, IRVnic] = field(default_factory=dict)
    rule_refs: dict[int, int] = field(default_factory=dict)
    set_refs: dict[str, int] = field(default_factory=dict)
    _cached: HostDesiredState | None = None

    @property
    def rules(self) -> dict[int, int]:
        """The ids of the rules the host holds (with their reference counts)."""
        return self.rule_refs

    @property
    def sets(self) -> dict[str, int]:
        """The names of the sets the host holds (with their reference counts)."""
        return self.set_refs

    def state(self) -> HostDesiredState:
        if self._cached is None or self._cached.revision != self.revision:
            vnics = self.vnics
            self._cached = HostDesiredState(
                host=self.name,
                revision=self.revision,
                vnics=tuple(map(vnics.__getitem__, sorted(vnics))),
                rules=tuple(map(self.rule_by_id.__getitem__, sorted(self.rule_refs))),
                sets=tuple(map(self.set_memo.__getitem__, sorted(self.set_refs))),
            )
        return self._cached

    def _claim(self, entries: list[Entry]) -> None:
        claims = self.claims
        for e in entries:
            ifname = e[1].ifname
            c = claims.get(ifname)
            if c is None:
                claims[ifname] = e
            elif type(c) is dict:
                c[e[0]] = e[1]
            else:
                claims[ifname] = {c[0]: c[1], e[0]: e[1]}

    def _unclaim(self, entries: list[Entry], touched: set[str]) -> None:
        claims = self.claims
        for ck, v in entries:
            ifname = v.ifname
            c = claims[ifname]
            if type(c) is dict:
                del c[ck]
                if not c:
                    del claims[ifname]
            else:
                del claims[ifname]  # its only claim: this entry
            touched.add(ifname)

    def _winner(self, ifname: str) -> IRVnic | None:
        c = self.claims.get(ifname)
        if c is None:
            return None
        return c[min(c)] if type(c) is dict else c[1]

    def fill(self, g: Globals, workloads: Mapping[int, list[Entry]]) -> None:
        """Bulk path for a host that holds nothing yet (initial build, new host): same result as
        `update`, with the counting, lookups and index updates done by C-level iteration (Counter, map,
        zip): at 10k hosts of ~700 rules and ~1,000 sets each, a Python-level loop per rule and set per
        host was most of the build. The lists of `workloads` are kept (`by_wid`): not to be changed."""
        assert not self.vnics and not self.claims
        self._cached = None
        by_wid = self.by_wid
        for wid, entries in workloads.items():
            if entries:
                by_wid[wid] = entries
                self._claim(entries)
        vnics = self.vnics
        ids: list[int] = []
        for ifname, c in self.claims.items():
            v = c[min(c)] if type(c) is dict else c[1]
            vnics[ifname] = v
            ids += v.egress
            ids += v.ingress
        refs = self.rule_refs = Counter(ids)  # one C-level count instead of one call per vNIC
        srefs = self.set_refs = Counter(chain.from_iterable(map(g.rule_sets.__getitem__, refs)))
        for s in list(filterfalse(g.set_memo.__contains__, srefs)):
            g.set_current(s)
        _add_host(g.rule_hosts, refs, self.name)

    def update(
        self,
        g: Globals,
        workloads: Mapping[int, list[Entry]],
        changed_rules: Collection[int],
        changed_sets: Mapping[str, SetUpdate],
        revision: int,
        emit: bool = True,
    ) -> HostDelta | None:
        """Replace the vNICs of `workloads` (wid -> its vNICs here, empty when gone), take the new global
        IR of `changed_rules` and the new content of `changed_sets`. Returns the delta (None when nothing
        changed, or when `emit` is false). The lists of `workloads` are kept (`by_wid`)."""
        self._cached = None
        touched_if: set[str] = set()
        for wid, entries in workloads.items():
            old = self.by_wid.pop(wid, None)
            if old:
                self._unclaim(old, touched_if)
            if entries:
                self.by_wid[wid] = entries
                self._claim(entries)
                touched_if.update(v.ifname for _, v in entries)

        refs = self.rule_refs
        # present before this update? (the first transition of a rule's count says it)
        was: dict[int, bool] = {i: True for i in changed_rules if i in refs}
        ir_changed = set(was)
        vnic_updates: dict[str, IRVnic] = {}
        vnic_removes: list[str] = []
        for ifname in touched_if:
            new = self._winner(ifname)
            old = self.vnics.get(ifname)
            if new == old:
                continue
            if old is not None:
                for i in old.egress + old.ingress:
                    n = refs[i] - 1
                    if n:
                        refs[i] = n
                    else:
                        del refs[i]
                        was.setdefault(i, True)
            if new is not None:
                for i in new.egress + new.ingress:
                    n = refs.get(i, 0)
                    refs[i] = n + 1
                    if not n:
                        was.setdefault(i, False)
                self.vnics[ifname] = new
                vnic_updates[ifname] = new
            else:
                del self.vnics[ifname]
                vnic_removes.append(ifname)

        rule_updates: list[IRRule] = []
        rule_removes: list[int] = []
        srefs = self.set_refs
        if len(changed_sets) < len(srefs):
            swas = {s: True for s in changed_sets if s in srefs}
        else:
            swas = {s: True for s in srefs if s in changed_sets}
        rule_by_id, old_rules = g.rule_by_id, g.old_rules
        for i, present in was.items():
            old_r = (old_rules.get(i) or rule_by_id.get(i)) if present else None
            new_r = rule_by_id.get(i) if i in refs else None
            if old_r is new_r:
                continue
            for s in rule_sets(old_r):
                n = srefs[s] - 1
                if n:
                    srefs[s] = n
                else:
                    del srefs[s]
                    swas.setdefault(s, True)
            for s in rule_sets(new_r):
                n = srefs.get(s, 0)
                srefs[s] = n + 1
                if not n:
                    swas.setdefault(s, False)
            if new_r is None:
                rule_removes.append(i)
                hs = g.rule_hosts.get(i)
                if hs is not None:
                    hs.discard(self.name)
                    if not hs:
                        del g.rule_hosts[i]
            else:
                if old_r is None:
                    _add_host(g.rule_hosts, (i,), self.name)
                if emit and old_r != new_r:
                    rule_updates.append(new_r)

        set_updates: list[SetUpdate] = []
        set_removes: list[str] = []
        for s, present in swas.items():
            if s in srefs:
                if not present:
                    new_s = g.set_current(s)
                    if emit:
                        set_updates.append(created_update(new_s))
                elif emit and s in changed_sets:
                    set_updates.append(changed_sets[s])
            elif present:
                set_removes.append(s)

        if not emit:
            return None
        # A vNIC whose rule changed (same id, new content) must be re-rendered.
        ir_updated = {r.id for r in rule_updates if r.id in ir_changed}
        if ir_updated:
            for ifname, v in self.vnics.items():
                if ifname not in vnic_updates and (
                    any(i in ir_updated for i in v.egress) or any(i in ir_updated for i in v.ingress)
                ):
                    vnic_updates[ifname] = v
        if not (set_updates or rule_updates or vnic_updates or vnic_removes or rule_removes or set_removes):
            return None
        delta = HostDelta(
            host=self.name,
            from_revision=self.revision,
            to_revision=revision,
            set_updates=tuple(sorted(set_updates, key=lambda u: u.name)),
            rule_updates=tuple(RuleUpdate(r) for r in sorted(rule_updates, key=lambda r: r.id)),
            vnic_updates=tuple(VnicUpdate(v) for _, v in sorted(vnic_updates.items())),
            vnic_removes=tuple(VnicRemove(n) for n in sorted(vnic_removes)),
            rule_removes=tuple(RuleRemove(i) for i in sorted(rule_removes)),
            set_removes=tuple(SetRemove(n) for n in sorted(set_removes)),
        )
        self.revision = revision
        return delta


_hs_revision = HostState.__dict__["revision"].__set__
_hs_cached = HostState.__dict__["_cached"].__set__
_name, _revision = attrgetter("name"), attrgetter("revision")
_consume = deque(maxlen=0).extend  # runs an iterator to its end in C


def sets_changed(
    states: list[HostState], updates: list[tuple[SetUpdate, ...]], revision: int
) -> list[HostDelta]:
    """Fast path, the common one for label and IP changes: for each host of `states`, only the content
    of sets it holds changed (`updates[i]`, sorted by name; hosts with the same changed sets share one
    tuple). A host's sets are the compiler's, already current: only its revision moves. One C-level map
    per field over all the hosts (an env or quarantine change reaches every host)."""
    deltas = set_updates_deltas(list(map(_name, states)), list(map(_revision, states)), revision, updates)
    _consume(map(_hs_cached, states, repeat(None)))
    _consume(map(_hs_revision, states, repeat(revision)))
    return deltas


def _add_host(index: dict[Any, set[str]], keys: Collection[Any], host: str) -> None:
    """`host` into index[k] for every k of `keys` (hot: once per rule and set per host). The missing
    entries are created first, then every add runs as one C-level map, no Python call per key."""
    if len(keys) < 8:
        for k in keys:
            hs = index.get(k)
            if hs is None:
                index[k] = {host}
            else:
                hs.add(host)
        return
    # (not `keys.keys() - index.keys()`: that iterates over the whole index, once per host)
    for k in list(filterfalse(index.__contains__, keys)):
        index[k] = set()
    deque(map(set.add, map(index.__getitem__, keys), repeat(host)), maxlen=0)
