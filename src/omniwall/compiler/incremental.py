"""The incremental compiler: resources in, per-host desired states and deltas out.

`IncrementalCompiler(catalog, revision)` builds every index once; `update(changed, removed, revision)`
applies resource changes and returns a `HostDelta` for each host whose state changed. `compile_catalog`
(build.py) is the same machinery run once over a whole catalog, so there is one implementation of the
semantics; tests check that any sequence of updates lands exactly where a fresh compile does.

Data flow of one update (see docs/design/compiler.md):
  tenants -> workloads (label index, IPs) -> groups (membership, nesting) -> services/policies (rules,
  ids, span, unions) -> address sets flushed once -> dirty workloads' rule lists -> touched hosts.

What is touched, and why it is small for a label change: the label index re-evaluates the selectors that
mention a changed key, for that one workload; membership flips climb only to groups that could contain
it; the workload's own rule lists are recomputed (cached by signature); the sets whose addresses flipped
are patched once and handed to the hosts where they are present (the hosts of the rules naming them:
`rules_by_set`, `rule_hosts`; a host holds a set exactly while it holds a rule naming it); rule IR
changes go to `rule_hosts`. Nothing iterates over all workloads, groups, rules or hosts.

Placements (migration, docs/design/migration.md): `placements` maps a workload (tenant, name) to one
extra host. While it is there, the workload's vNICs are compiled onto that host too, exactly as on its
own host (same rule lists, same rules and sets: these do not depend on the host), so the destination of
a live migration enforces the workload's policy before the vNIC arrives. Setting or clearing a placement
is an update like any other: the extra host gets the delta that adds or removes the vNICs (with the
rules and sets only they needed). A vNIC of the host's own workloads wins an ifname over a placed one.

Host revisions: a host's state carries the revision of the last update that changed it (or the initial
revision). Each delta goes from the host's previous revision to the update's revision, so deltas chain
per host. A host that appears gets a delta from `empty_state(host, 0)`; a host that disappears gets a
delta to an empty state and is forgotten.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain

from omniwall import PROVIDER_TENANT
from omniwall.compiler.hoststate import ClaimKey, Globals, HostState, rule_sets, sets_changed
from omniwall.compiler.ir import (
    HostDelta,
    HostDesiredState,
    IRRule,
    IRSet,
    IRVnic,
    SetUpdate,
    diff,
    empty_state,
    make_vnic,
)
from omniwall.compiler.labelindex import LabelIndex
from omniwall.compiler.membership import Groups, visible
from omniwall.compiler.ruleids import RuleIds, default_rule_id
from omniwall.compiler.rules import CompiledRule, UnionSpec, compile_rule, stamped
from omniwall.compiler.sets import AddrSet, split_literal
from omniwall.compiler.span import SpanIndex
from omniwall.model.catalog import Catalog
from omniwall.model.resources import (
    Group,
    Host,
    Mode,
    Policy,
    Service,
    Tenant,
    TenantSpec,
    Workload,
    vnic_ifname,
)
from omniwall.selectors import facts_of

Key = tuple[str, str]
RuleKey = tuple[str, str, str]
Removed = tuple[str, str, str]  # (kind, tenant, name)


@dataclass(slots=True)
class _Wl:
    wid: int
    key: Key
    host: str
    vnics: tuple[tuple[str, tuple[str, ...], str | None], ...]  # (ifname, sorted IPs, mac)
    ips: tuple[str, ...]
    label: str  # "tenant/name", shared by every IRVnic of the workload


@dataclass(slots=True)
class _Union:
    spec: UnionSpec
    addr: AddrSet
    refs: int = 0


@dataclass
class _Pending:
    """What one update touched, collected before hosts are visited."""

    host_wids: dict[str, set[int]] = field(default_factory=dict)  # host -> workloads to re-place there
    rules: set[RuleKey] = field(default_factory=set)  # rules to recompile
    groups: set[Key] = field(default_factory=set)  # groups to recompute
    changed_ids: set[int] = field(default_factory=set)  # rule ids whose IR changed / vanished
    new_hosts: set[str] = field(default_factory=set)
    gone_hosts: dict[str, HostDesiredState] = field(default_factory=dict)


def _workload_info(wid: int, w: Workload) -> _Wl:
    vnics = []
    ips: set[str] = set()
    for v in w.spec.vnics:
        addrs = tuple(sorted(set(v.ips)))
        ips.update(addrs)
        vnics.append((vnic_ifname(w, v), addrs, v.mac))
    tenant, name = w.metadata.tenant, w.metadata.name
    return _Wl(wid, (tenant, name), w.spec.host, tuple(vnics), tuple(sorted(ips)), f"{tenant}/{name}")


def effective_limit(spec: TenantSpec, provider: TenantSpec) -> tuple[int | None, int | None]:
    """(concurrent connections, new per second) for a tenant's vNICs: the tenant's own limit, never
    above the provider's (the provider's limit is the default and the ceiling; None = no limit)."""
    own, top = spec.connectionLimit, provider.connectionLimit

    def pick(mine: int | None, ceiling: int | None) -> int | None:
        if mine is None or ceiling is None:
            return ceiling if mine is None else mine
        return min(mine, ceiling)

    return (
        pick(own.perWorkload if own else None, top.perWorkload if top else None),
        pick(own.newPerSecond if own else None, top.newPerSecond if top else None),
    )


class IncrementalCompiler:
    def __init__(
        self,
        catalog: Catalog,
        revision: int = 0,
        *,
        freeze: bool = True,
        placements: Mapping[Key, str] | None = None,
    ) -> None:
        """`placements`: workload (tenant, name) -> extra host (see the module's doc).
        `freeze`: after a large build, move its objects out of the cyclic collector's reach
        (`_gc_paused`); right for a compiler that lives on (the manager's), pointless for a one-shot
        compile whose result is dropped soon (`compile_catalog`, what-if previews)."""
        self.revision = revision
        self.tenants: dict[str, Tenant] = {}
        self.host_res: dict[str, Host] = {}
        self.workloads: dict[Key, Workload] = {}
        self.group_res: dict[Key, Group] = {}
        self.services: dict[Key, Service] = {}
        self.policies: dict[Key, Policy] = {}

        self.registry: dict[str, AddrSet] = {}  # address sets with a stale IRSet
        self.labels = LabelIndex()
        self.groups = Groups(self.labels, self.registry)
        self.span = SpanIndex(self.groups.gid)
        self.rule_ids = RuleIds()

        self._next_wid = 1
        self.wl: dict[int, _Wl] = {}
        self.tenant_wids: dict[str, set[int]] = {}
        self.host_wids: dict[str, set[int]] = {}  # also for hosts that do not exist (yet); with placements
        self.placements: dict[Key, str] = dict(placements or {})
        self.extra: dict[int, str] = {}  # wid -> its placement's host (workloads that exist)

        self.rules: dict[RuleKey, CompiledRule] = {}
        self.rule_by_id: dict[int, IRRule] = {}
        self.rule_sets: dict[int, tuple[str, ...]] = {}  # rule id -> the sets its IR names (rule_sets)
        self.policy_rules: dict[Key, tuple[RuleKey, ...]] = {}
        self.rules_by_group: dict[Key, set[RuleKey]] = {}
        self.rules_by_service: dict[Key, set[RuleKey]] = {}
        self.rules_by_tenant: dict[str, set[RuleKey]] = {}
        self.unions: dict[str, _Union] = {}
        self.unions_by_group: dict[Key, set[str]] = {}
        self._idle_unions: set[str] = set()  # refs fell to 0 during this update's recompile

        self.hosts: dict[str, HostState] = {}
        self.rule_hosts: dict[int, set[str]] = {}
        # set name -> ids of the rules whose IR names it. No host index per set: a host holds a set exactly
        # while it holds a rule naming it, so the set's hosts are its rules' hosts (`_set_hosts`); at 1M
        # workloads a per-set index cost 10M scattered set insertions in the build and ~0.5 GB.
        self.rules_by_set: dict[str, set[int]] = {}
        # name -> current IRSet of every set some host holds (hosts read their sets' content here): filled
        # on first use, replaced when a set is flushed, dropped with the set
        self._set_memo: dict[str, IRSet] = {}
        self._old_rules: dict[int, IRRule] = {}  # during one update: the previous IR of changed rule ids
        # tenant -> vNIC defaults (action, monitor, connection limits), idem
        self._defaults: dict[str, tuple[str, bool, tuple[int | None, int | None], int]] = {}

        self._apply(list(catalog), [], revision, emit=False, freeze=freeze)

    # ------------------------------------------------------------------------------------ public API
    def state(self, host: str) -> HostDesiredState:
        """The host's current desired state (KeyError for an unknown host)."""
        return self.hosts[host].state()

    def states(self) -> dict[str, HostDesiredState]:
        with _gc_paused():
            return {h: self.hosts[h].state() for h in sorted(self.hosts)}

    def update(
        self,
        resources_changed: Iterable[object],
        removed: Iterable[Removed] = (),
        revision: int | None = None,
        placements: Mapping[Key, str] | None = None,
    ) -> dict[str, HostDelta]:
        """Apply changed (added or modified) resources and removals (kind, tenant, name), and the new
        `placements` when given (None: unchanged); returns the delta of every host whose state changed,
        sorted by host."""
        rev = self.revision + 1 if revision is None else revision
        if rev < self.revision:
            raise ValueError(f"revision {rev} is older than the compiler's revision {self.revision}")
        return self._apply(list(resources_changed), list(removed), rev, emit=True, placements=placements)

    # ------------------------------------------------------------------------------------ lookups
    def _tenant_spec(self, tenant: str) -> TenantSpec:
        t = self.tenants.get(tenant)
        return t.spec if t is not None else TenantSpec()

    def _mode(self, tenant: str) -> Mode:
        return self._tenant_spec(tenant).mode

    def _group_exists(self, referrer: str, key: Key) -> bool:
        node = self.groups.nodes.get(key)
        return node is not None and visible(referrer, node)

    def _set_hosts(self, name: str) -> Iterable[str]:
        """The hosts holding set `name` before this update's host phase, as far as the fast path needs:
        exact for every host whose rules did not change (hosts whose rules changed take the update path,
        which reads every changed set it holds itself)."""
        rids = self.rules_by_set.get(name)
        if not rids:
            return ()
        rule_hosts = self.rule_hosts
        if len(rids) == 1:
            return rule_hosts.get(next(iter(rids)), ())
        return set().union(*[rule_hosts.get(i, ()) for i in rids])

    def _set_current(self, name: str) -> IRSet:
        s = self._set_memo.get(name)
        if s is None:
            a = self.unions[name].addr if name.startswith("u.") else self.groups.set_by_name[name]
            s = self._set_memo[name] = a.current()
        return s

    # ------------------------------------------------------------------------------------ the update
    def _apply(
        self,
        changed: list[object],
        removed: list[Removed],
        revision: int,
        emit: bool,
        freeze: bool = False,
        placements: Mapping[Key, str] | None = None,
    ) -> dict[str, HostDelta]:
        with _gc_paused(build=freeze):
            return self._apply_inner(changed, removed, revision, emit, placements)

    def _apply_inner(
        self,
        changed: list[object],
        removed: list[Removed],
        revision: int,
        emit: bool,
        placements: Mapping[Key, str] | None,
    ) -> dict[str, HostDelta]:
        p = _Pending()
        self._old_rules.clear()  # (left over only by an update that raised)
        initial = not self.wl  # the first build: every workload below is new, and touched as such
        self.groups.track_dirty = not initial
        if placements is not None:
            self._place(placements, p)
        by_kind: dict[str, list[object]] = {}
        for r in changed:
            by_kind.setdefault(getattr(r, "kind", ""), []).append(r)
        gone: dict[str, list[Removed]] = {}
        for k in removed:
            gone.setdefault(k[0], []).append(k)

        self._hosts(by_kind.get("Host", []), gone.get("Host", []), p)
        self._tenants(by_kind.get("Tenant", []), gone.get("Tenant", []), p)
        self._workloads(by_kind.get("Workload", []), gone.get("Workload", []), p)
        self._groups(by_kind.get("Group", []), gone.get("Group", []), p)
        self._services(by_kind.get("Service", []), gone.get("Service", []), p)
        self._policies(by_kind.get("Policy", []), gone.get("Policy", []), p)
        self._recompile(p, initial)
        if initial:
            self.span.rank()  # every rule is in: the lists of every vNIC follow, sorted by int
        self._union_nets()

        # Address sets: flush each stale IRSet once; the SetUpdate is shared by every host holding it.
        set_changes: dict[str, SetUpdate] = {}
        memo = self._set_memo
        for name, a in sorted(self.registry.items()):
            upd = a.flush()
            if upd is not None:
                set_changes[name] = upd
            if name in memo:
                memo[name] = a.current()
        self.registry.clear()

        # Workloads whose placement may have changed (at the first build, all of them: already touched).
        if not initial:
            for wid in self.groups.dirty_wids:
                if wid in self.wl:
                    self._touch(p, wid)
        self.groups.dirty_wids.clear()
        self.groups.track_dirty = True
        self.groups.lits_changed.clear()

        self._defaults.clear()
        host_sets: dict[str, tuple[str, ...]] = {}  # host -> changed sets it holds, sorted
        for s in set_changes:
            one = (s,)
            if not host_sets:
                host_sets = dict.fromkeys(self._set_hosts(s), one)
                continue
            for h in self._set_hosts(s):
                have = host_sets.get(h)
                host_sets[h] = one if have is None else (*have, s)
        rule_touched: set[str] = set()
        for i in p.changed_ids:
            rule_touched.update(self.rule_hosts.get(i, ()))
        touched = set(p.new_hosts) | rule_touched | host_sets.keys()
        touched.update(h for h, wids in p.host_wids.items() if wids and h in self.hosts)

        # Built per update, not kept: a bound method stored on self would make the compiler a reference
        # cycle, which only the cyclic GC frees (and a frozen one never; see _gc_paused).
        globals_ = Globals(
            self.rule_by_id,
            self._set_current,
            self.rule_hosts,
            self.rule_sets,
            self._set_memo,
            self._old_rules,
        )
        out: dict[str, HostDelta] = {}
        if emit and host_sets:
            # Hosts touched only through set content (env or quarantine changes reach every host): one
            # delta each, their SetUpdates shared, made for all of them at once (C-level maps), nothing
            # else done per host. Inserted first, in host order: the final sort finds them in one run.
            fast = host_sets.keys() - rule_touched - p.new_hosts
            fast.difference_update(h for h, wids in p.host_wids.items() if wids)
            if fast:
                fast_hosts = sorted(fast)
                names_of = list(map(host_sets.__getitem__, fast_hosts))
                shared = {names: tuple(map(set_changes.__getitem__, names)) for names in set(names_of)}
                out = dict(
                    zip(
                        fast_hosts,
                        sets_changed(
                            list(map(self.hosts.__getitem__, fast_hosts)),
                            list(map(shared.__getitem__, names_of)),
                            revision,
                        ),
                        strict=True,
                    )
                )
                touched -= fast
        for h in sorted(touched):
            hs = self.hosts[h]
            wids = p.host_wids.get(h)
            entries = {wid: self._vnics_of(wid, h) for wid in wids or ()}
            if not hs.vnics and not hs.claims:
                # Holds nothing yet (no vNIC means no rule and no set): count in bulk, diff against empty.
                prev = hs.revision
                hs.fill(globals_, entries)
                delta = None
                if emit and hs.vnics:
                    hs.revision = revision
                    delta = diff(empty_state(h, prev), hs.state())
            else:
                delta = hs.update(globals_, entries, p.changed_ids, set_changes, revision, emit)
            if h in p.new_hosts and emit:
                hs.revision = revision
                delta = diff(empty_state(h, 0), hs.state())
            if delta is not None:
                out[h] = delta
        for h, last in sorted(p.gone_hosts.items()):
            if emit:
                out[h] = diff(last, empty_state(h, revision))
        self.revision = revision
        self._old_rules.clear()
        # (sorting the keys alone: nearly sorted already, timsort merges the runs in ~one pass)
        order = sorted(out)
        return dict(zip(order, map(out.__getitem__, order), strict=True))

    def _vnics_of(self, wid: int, host: str) -> list[tuple[ClaimKey, IRVnic]]:
        w = self.wl.get(wid)
        if w is None:
            return []
        if w.host == host:
            rank = 0
        elif self.extra.get(wid) == host:
            rank = 1  # placed: the host's own workloads win a shared ifname
        else:
            return []
        tenant = w.key[0]
        egress, ingress = self.span.lists(tenant, self.groups.groups_of.get(wid, ()))
        defaults = self._defaults.get(tenant)
        if defaults is None:
            spec = self._tenant_spec(tenant)
            limit = effective_limit(spec, self._tenant_spec(PROVIDER_TENANT))
            action = spec.defaultAction
            did = default_rule_id(tenant, action)
            defaults = self._defaults[tenant] = (action, spec.mode == Mode.MONITOR, limit, did)
        default_action, monitor, (conn_limit, conn_rate), did = defaults
        label = w.label
        key = w.key
        # make_vnic: the IRVnic, ~3x cheaper than its dataclass __init__ (one per vNIC)
        return [
            (
                (rank, key, i),
                make_vnic(
                    ifname,
                    label,
                    tenant,
                    addrs,
                    egress,
                    ingress,
                    default_action,
                    monitor,
                    mac,
                    conn_limit,
                    conn_rate,
                    did,
                ),
            )
            for i, (ifname, addrs, mac) in enumerate(w.vnics)
        ]

    # ------------------------------------------------------------------------------------ placement
    def _hosts_of(self, wid: int) -> tuple[str, ...]:
        """The hosts where a workload's vNICs are compiled: its own, and its placement's."""
        host = self.wl[wid].host
        x = self.extra.get(wid)
        return (host,) if x is None or x == host else (host, x)

    def _touch(self, p: _Pending, wid: int, hosts: Iterable[str] | None = None) -> None:
        for h in self._hosts_of(wid) if hosts is None else hosts:
            p.host_wids.setdefault(h, set()).add(wid)

    def _rehost(self, wid: int, before: tuple[str, ...], p: _Pending) -> None:
        """The workload was on `before`; index and touch it where it is now, and where it left."""
        after = self._hosts_of(wid)
        for h in before:
            if h not in after:
                self.host_wids[h].discard(wid)
        for h in after:
            self.host_wids.setdefault(h, set()).add(wid)
        self._touch(p, wid, {*before, *after})

    def _place(self, placements: Mapping[Key, str], p: _Pending) -> None:
        new = dict(placements)
        for key in sorted(self.placements.keys() | new.keys()):
            host = new.get(key)
            if self.placements.get(key) == host:
                continue
            wid = self.groups.wid_of.get(key)
            if wid is None or wid not in self.wl:
                continue  # no such workload (yet): `_workloads` reads the placement when it comes
            before = self._hosts_of(wid)
            if host is None:
                self.extra.pop(wid, None)
            else:
                self.extra[wid] = host
            self._rehost(wid, before, p)
        self.placements = new

    # ------------------------------------------------------------------------------------ per kind
    def _hosts(self, changed: list[object], removed: list[Removed], p: _Pending) -> None:
        put = {h.metadata.name for h in changed if isinstance(h, Host)}
        for _, _, name in removed:
            if name in put:
                continue  # removed and put again in one batch: it never stopped existing
            hs = self.hosts.pop(name, None)
            self.host_res.pop(name, None)
            if hs is None:
                continue
            p.gone_hosts[name] = hs.state()
            for i in hs.rules:
                s = self.rule_hosts.get(i)
                if s is not None:
                    s.discard(name)
                    if not s:
                        del self.rule_hosts[i]
        for h in changed:
            assert isinstance(h, Host)
            name = h.metadata.name
            self.host_res[name] = h
            if name not in self.hosts:
                self.hosts[name] = HostState(name, self.revision, self.rule_by_id, self._set_memo)
                p.gone_hosts.pop(name, None)
                p.new_hosts.add(name)
                p.host_wids.setdefault(name, set()).update(self.host_wids.get(name, ()))

    def _tenants(self, changed: list[object], removed: list[Removed], p: _Pending) -> None:
        news: dict[str, Tenant | None] = {name: None for _, _, name in removed}
        for t in changed:
            assert isinstance(t, Tenant)
            news[t.metadata.name] = t
        for name, t in news.items():
            old = self._tenant_spec(name)
            if t is None:
                self.tenants.pop(name, None)
            else:
                self.tenants[name] = t
            new = self._tenant_spec(name)
            if old.mode != new.mode:
                p.rules |= self.rules_by_tenant.get(name, set())
            if old.mode != new.mode or old.defaultAction != new.defaultAction:
                for wid in self.tenant_wids.get(name, ()):
                    self._touch(p, wid)
            if old.connectionLimit != new.connectionLimit:
                # the provider's limit is every tenant's default and ceiling
                tenants = self.tenant_wids if name == PROVIDER_TENANT else (name,)
                for tn in tenants:
                    for wid in self.tenant_wids.get(tn, ()):
                        self._touch(p, wid)

    def _workloads(self, changed: list[object], removed: list[Removed], p: _Pending) -> None:
        g = self.groups
        bulk = not self.wl  # the first build: every workload is new, touched in one pass at the end
        for _, tenant, name in removed:
            key = (tenant, name)
            if self.workloads.pop(key, None) is None:
                continue
            wid = g.wid_of[key]
            hosts = self._hosts_of(wid)
            self.wl.pop(wid)
            self.extra.pop(wid, None)
            self.labels.remove_workload(wid)
            g.remove_workload(wid)
            self.tenant_wids[tenant].discard(wid)
            for h in hosts:
                self.host_wids[h].discard(wid)
            self._touch(p, wid, hosts)
        for res in changed:
            assert isinstance(res, Workload)
            key = (res.metadata.tenant, res.metadata.name)
            old = self.workloads.get(key)
            self.workloads[key] = res
            facts = facts_of(res.metadata.labels, res.spec.attributes)
            if old is None:
                wid = self._next_wid
                self._next_wid += 1
                w = _workload_info(wid, res)
                self.wl[wid] = w
                self.tenant_wids.setdefault(key[0], set()).add(wid)
                if key in self.placements:
                    self.extra[wid] = self.placements[key]
                for h in self._hosts_of(wid):
                    self.host_wids.setdefault(h, set()).add(wid)
                changes = self.labels.add_workload(wid, key[0], facts)
                g.add_workload(wid, key, w.ips)
                g.selector_changes(changes)
            else:
                wid = g.wid_of[key]
                before = self._hosts_of(wid)
                w = _workload_info(wid, res)
                self.wl[wid] = w
                g.change_ips(wid, w.ips)
                if old.metadata.labels != res.metadata.labels or old.spec.attributes != res.spec.attributes:
                    g.selector_changes(self.labels.update_workload(wid, facts))
                self._rehost(wid, before, p)
                continue
            if not bulk:
                self._touch(p, wid)
        if bulk:  # what `_touch` does for each, one C-level set update per host
            for h, ws in self.host_wids.items():
                p.host_wids.setdefault(h, set()).update(ws)

    def _groups(self, changed: list[object], removed: list[Removed], p: _Pending) -> None:
        g = self.groups
        put = {(r.metadata.tenant, r.metadata.name) for r in changed if isinstance(r, Group)}
        for _, tenant, name in removed:
            key = (tenant, name)
            if key in put:
                # Removed and put again in one batch: an edit. Re-creating the node would replace its
                # AddrSet by one without an IRSet, and hosts holding the set would keep stale content.
                continue
            if self.group_res.pop(key, None) is None:
                continue
            node = g.remove_group(key)
            if node is not None:
                self._set_memo.pop(node.addr.name, None)
            p.rules |= self.rules_by_group.get(key, set())
        for res in changed:
            assert isinstance(res, Group)
            key = (res.metadata.tenant, res.metadata.name)
            old = self.group_res.get(key)
            self.group_res[key] = res
            if old is not None and old.spec == res.spec:
                continue
            g.upsert_group(key, res.spec)
            p.groups.add(key)
            if old is None or old.spec.shareWith != res.spec.shareWith:
                p.rules |= self.rules_by_group.get(key, set())
        if removed or p.groups:
            p.groups |= g.refresh_edges()
        for key in g.topo_order(k for k in p.groups if k in g.nodes):
            g.recompute(key)

    def _services(self, changed: list[object], removed: list[Removed], p: _Pending) -> None:
        for _, tenant, name in removed:
            if self.services.pop((tenant, name), None) is not None:
                p.rules |= self.rules_by_service.get((tenant, name), set())
        for res in changed:
            assert isinstance(res, Service)
            key = (res.metadata.tenant, res.metadata.name)
            old = self.services.get(key)
            self.services[key] = res
            if old is None or old.spec != res.spec:
                p.rules |= self.rules_by_service.get(key, set())

    def _policies(self, changed: list[object], removed: list[Removed], p: _Pending) -> None:
        for _, tenant, name in removed:
            key = (tenant, name)
            if self.policies.pop(key, None) is not None:
                p.rules.update(self.policy_rules.pop(key, ()))
        for res in changed:
            assert isinstance(res, Policy)
            key = (res.metadata.tenant, res.metadata.name)
            old = self.policies.get(key)
            self.policies[key] = res
            if old is not None and old == res:
                continue
            p.rules.update(self.policy_rules.get(key, ()))
            keys = tuple((key[0], key[1], r.name) for r in res.spec.rules if not r.disabled)
            self.policy_rules[key] = keys
            p.rules.update(keys)

    # ------------------------------------------------------------------------------------ rules
    def _compile(self, rk: RuleKey) -> CompiledRule | None:
        pol = self.policies.get((rk[0], rk[1]))
        if pol is None:
            return None
        for index, rule in enumerate(pol.spec.rules):
            if rule.name == rk[2]:
                if rule.disabled:
                    return None
                return compile_rule(
                    pol,
                    index,
                    rule,
                    group_exists=self._group_exists,
                    services=self.services,
                    mode_of=self._mode,
                )
        return None

    def _span_wids(self, cr: CompiledRule) -> set[int]:
        out: set[int] = set()
        for gk, _ in cr.span_groups:
            node = self.groups.nodes.get(gk)
            if node is not None:
                out |= node.wids
        if cr.any_dirs:
            if cr.tenant == PROVIDER_TENANT:
                out.update(self.wl)
            else:
                out |= self.tenant_wids.get(cr.tenant, set())
        return out

    def _recompile(self, p: _Pending, initial: bool = False) -> None:
        """`initial`: the first build, where every workload is new and touched already: the spans of
        the rules placed need not be collected (a provider `any` rule's span is every workload)."""
        if not p.rules:
            return
        compiled = {rk: self._compile(rk) for rk in sorted(p.rules)}
        added = [rk for rk, cr in compiled.items() if cr is not None and rk not in self.rules]
        gone = [rk for rk, cr in compiled.items() if cr is None and rk in self.rules]
        old_ids = {rk: self.rule_ids[rk] for rk in compiled if rk in self.rules}
        moved = self.rule_ids.update(added, gone)
        for rk, old_id in moved.items():
            old_ids[rk] = old_id
            if rk not in compiled:
                compiled[rk] = self.rules[rk]  # same rule, new id
        dirty: set[int] = set()
        # Two phases, so that an id freed by one rule and taken by another in this batch is never
        # clobbered: every old version leaves the span index and `rule_by_id` before any new one enters.
        changes: list[tuple[RuleKey, CompiledRule | None, CompiledRule | None, bool]] = []
        for rk, new in compiled.items():
            old = self.rules.get(rk)
            if old is None and new is None:
                continue
            old_id = old_ids.get(rk)
            new_id = self.rule_ids.get(rk) if new is not None else None
            if new is not None:
                assert new_id is not None
                new = stamped(new, new_id)
            ir_changed = old is None or new is None or old_id != new_id or old.ir != new.ir
            if ir_changed and old_id is not None:
                p.changed_ids.add(old_id)
                if old is not None:
                    self._old_rules.setdefault(old.ir.id, old.ir)
            if ir_changed and new_id is not None:
                p.changed_ids.add(new_id)
            placement = old is None or new is None or old.span_key() != new.span_key() or old_id != new_id
            changes.append((rk, old, new, placement))
            if old is not None:
                self.rule_by_id.pop(old.ir.id, None)
                for s in self.rule_sets.pop(old.ir.id, ()):
                    _index(self.rules_by_set, s, old.ir.id, False)
                if placement:
                    self.span.remove(old)
                    dirty |= self._span_wids(old)
        for rk, old, new, placement in changes:
            if new is not None:
                self.rule_by_id[new.ir.id] = new.ir
                names = self.rule_sets[new.ir.id] = rule_sets(new.ir)
                for s in names:
                    _index(self.rules_by_set, s, new.ir.id, True)
                if placement:
                    self.span.add(new)
                    if not initial:
                        dirty |= self._span_wids(new)
            self._reindex(old, new)
            if new is None:
                del self.rules[rk]
            else:
                self.rules[rk] = new
        self._drop_idle_unions()
        for wid in dirty:
            self._touch(p, wid)

    def _reindex(self, old: CompiledRule | None, new: CompiledRule | None) -> None:
        rk = (old or new).key  # type: ignore[union-attr]
        for cr, add in ((old, False), (new, True)):
            if cr is None:
                continue
            for gk in cr.group_refs:
                _index(self.rules_by_group, gk, rk, add)
            for sk in cr.service_refs:
                _index(self.rules_by_service, sk, rk, add)
            _index(self.rules_by_tenant, cr.tenant, rk, add)
        for u in new.unions if new else ():
            self._acquire_union(u)
        for u in old.unions if old else ():
            self._release_union(u.name)

    def _acquire_union(self, spec: UnionSpec) -> None:
        """A rule takes a reference on a union set; the first creates it, listening to its groups."""
        u = self.unions.get(spec.name)
        if u is None:
            a = AddrSet(spec.name, self.registry)
            u = self.unions[spec.name] = _Union(spec, a)
            # A new AddrSet has no IRSet and no listener yet: its counts are all `inc` would do.
            parts: list[Iterable[str]] = [spec.addresses]
            for gk in spec.groups:
                self.unions_by_group.setdefault(gk, set()).add(spec.name)
                node = self.groups.nodes[gk]
                node.addr.listeners.append(a)
                parts.append(node.addr.counts)
            a.counts = dict(Counter(chain.from_iterable(parts)))
            a.set_nets(self._union_net_list(spec))
        u.refs += 1

    def _release_union(self, name: str) -> None:
        """Drops a reference. An unused union lives on until the batch's rules are all reindexed
        (`_drop_idle_unions`): a rule added later in the same batch may take it over, and then it must be
        the same AddrSet. A fresh one would have no IRSet, so its content changes would never be flushed,
        while hosts that held the set through the removed rule keep holding it through the new one."""
        u = self.unions[name]
        u.refs -= 1
        if not u.refs:
            self._idle_unions.add(name)

    def _drop_idle_unions(self) -> None:
        for name in sorted(self._idle_unions):
            u = self.unions.get(name)
            if u is None or u.refs:
                continue
            self._drop_union(name, u)
        self._idle_unions.clear()

    def _drop_union(self, name: str, u: _Union) -> None:
        for gk in u.spec.groups:
            _index(self.unions_by_group, gk, name, False)
            node = self.groups.nodes.get(gk)
            if node is not None and u.addr in node.addr.listeners:
                node.addr.listeners.remove(u.addr)
        del self.unions[name]
        self.registry.pop(name, None)
        self._set_memo.pop(name, None)

    def _union_net_list(self, spec: UnionSpec) -> list[str]:
        nets = list(spec.nets)
        for gk in spec.groups:
            node = self.groups.nodes.get(gk)
            if node is not None:
                nets.extend(n for _, n in map(split_literal, node.lits) if n)
        return nets

    def _union_nets(self) -> None:
        if not self.groups.lits_changed:
            return
        for u in self.unions.values():
            if any(gk in self.groups.lits_changed for gk in u.spec.groups):
                u.addr.set_nets(self._union_net_list(u.spec))


# A build that leaves more young container objects than this freezes them (see _gc_paused).
FREEZE_AFTER = 200_000


@contextmanager
def _gc_paused(build: bool = False) -> Iterator[None]:
    """The build allocates millions of sets, dicts and tuples, none of them garbage; the cyclic collector
    would traverse them over and over (a third of the build's CPU). Paused while we run, restored after
    (if the caller had it on). Objects we drop are freed by reference counting anyway.

    After a large initial build (`build`), the new objects are moved to the permanent generation
    (`gc.freeze`) before the collector is turned back on. Otherwise the next young collection traverses
    every object of the build, then the middle one, then a full one: three passes over millions of
    long-lived objects, a fifth of the compile at 100k workloads, and memory-bound, so it grew faster
    than the build. The compiler holds no reference cycle, so a frozen compiler that is dropped is still
    freed by reference counting. Small builds (tests) are left alone: freezing also pins whatever else
    the process holds at that moment (cyclic garbage not yet collected then is never freed: bounded by
    what one collection would have found, once per long-lived compiler)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if build and gc.get_count()[0] > FREEZE_AFTER:
            gc.freeze()
        if was:
            gc.enable()


def _index(table: dict, key: object, rk: object, add: bool) -> None:  # type: ignore[type-arg]
    if add:
        table.setdefault(key, set()).add(rk)
    else:
        s = table.get(key)
        if s is not None:
            s.discard(rk)
            if not s:
                del table[key]
