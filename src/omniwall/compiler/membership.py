"""Group membership: a group's workloads and addresses (docs/semantics.md §2).

- workloads(g) = selector matches + static workloads (existing ones) + workloads of nested groups;
- literals(g)  = own CIDRs + literals of nested groups;
- addresses(g) = vNIC IPs of workloads(g) + host-length literals; networks(g) = the other literals.

Workloads are wids (see labelindex). Every group keeps its wid set, an `AddrSet` (address reference counts)
and, per workload, the groups containing it (`groups_of`, transitive through nesting: it is what span
needs). Changes are pushed, never recomputed from scratch: a selector membership flip, a static list
naming a workload that appears, or a nested group gaining a member re-checks only that workload in only
the groups that could contain it, and climbs to parents only when the answer changed.

Nesting edges that would form a cycle (validation rejects them) are ignored inside their strongly
connected component, so membership stays well defined and independent of the order of changes. A nested
group that is missing or not visible to the nesting group's tenant contributes nothing.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import chain, repeat

from omniwall import PROVIDER_TENANT
from omniwall.compiler.labelindex import Change, LabelIndex
from omniwall.compiler.sets import AddrSet, group_set_name, split_literal
from omniwall.model.catalog import is_address_literal, split_ref
from omniwall.model.resources import GroupSpec

Key = tuple[str, str]


@dataclass(slots=True)
class GroupNode:
    key: Key
    addr: AddrSet
    gid: int = -1  # Groups.gid(key)
    sid: int | None = None
    selector: str | None = None
    static: frozenset[Key] = frozenset()
    nested: tuple[Key, ...] = ()  # declared, resolved to keys
    own_lits: frozenset[str] = frozenset()
    share: frozenset[str] = frozenset()
    eff_nested: tuple[Key, ...] = ()  # existing, visible, cycle-free
    wids: set[int] = field(default_factory=set)
    lits: frozenset[str] = frozenset()


def visible(referrer_tenant: str, target: GroupNode) -> bool:
    """May a `referrer_tenant` object reference `target`? (same rule as Catalog.group_visible)."""
    tenant = target.key[0]
    if tenant == referrer_tenant or referrer_tenant == PROVIDER_TENANT:
        return True
    return tenant == PROVIDER_TENANT and ("*" in target.share or referrer_tenant in target.share)


class Groups:
    def __init__(self, labels: LabelIndex, set_registry: dict[str, AddrSet]) -> None:
        self.labels = labels
        self.registry = set_registry
        self.nodes: dict[Key, GroupNode] = {}
        self.set_by_name: dict[str, AddrSet] = {}
        self.by_sid: dict[int, set[Key]] = {}
        self.static_idx: dict[Key, set[Key]] = {}  # workload key -> groups listing it
        self.declared_parents: dict[Key, set[Key]] = {}  # group key (may be missing) -> groups nesting it
        self.eff_parents: dict[Key, set[Key]] = {}
        self.wid_of: dict[Key, int] = {}
        self.key_of: dict[int, Key] = {}
        self.ips_of: dict[int, tuple[str, ...]] = {}
        # wid -> gids (`gid`) of the groups containing it. Ints, not keys: a (tenant, name) tuple's hash
        # is recomputed at every set insertion and lookup (Σ group sizes of them in the build, and every
        # workload's span signature hashes its groups twice), an int's is itself.
        self.groups_of: dict[int, set[int]] = {}
        self.gids: dict[Key, int] = {}
        self.gkeys: list[Key] = []  # gid -> key
        # Out, drained by the caller: workloads whose group set changed; groups whose literals changed.
        self.dirty_wids: set[int] = set()
        # False while the compiler's first build runs: every workload is new and placed anyway, so the
        # build drops `dirty_wids` unread (collecting it cost Σ group sizes insertions into a set of
        # every workload, cache misses at 1M workloads)
        self.track_dirty = True
        self.lits_changed: set[Key] = set()

    def gid(self, key: Key) -> int:
        """The group's int id, stable for the compiler's lifetime (kept when the group goes and comes
        back, so the span index may hold ids of groups that are gone). Never freed: bounded by the
        distinct group keys ever named."""
        i = self.gids.get(key)
        if i is None:
            i = self.gids[key] = len(self.gkeys)
            self.gkeys.append(key)
        return i

    # ---------------------------------------------------------------------------------- membership test
    def _contains(self, g: GroupNode, w: int) -> bool:
        if w not in self.ips_of:
            return False
        if g.sid is not None and w in self.labels.members(g.sid):
            return True
        if self.key_of[w] in g.static:
            return True
        return any(w in self.nodes[n].wids for n in g.eff_nested)

    def _toggle(self, g: GroupNode, w: int, member: bool) -> None:
        if member:
            g.wids.add(w)
            self.groups_of[w].add(g.gid)
            for ip in self.ips_of[w]:
                g.addr.inc(ip)
        else:
            g.wids.discard(w)
            self.groups_of[w].discard(g.gid)
            for ip in self.ips_of[w]:
                g.addr.dec(ip)
        if self.track_dirty:
            self.dirty_wids.add(w)

    def recheck(self, key: Key, cands: Iterable[int]) -> None:
        g = self.nodes[key]
        flipped = set()
        for w in cands:
            now = self._contains(g, w)
            if now != (w in g.wids):
                self._toggle(g, w, now)
                flipped.add(w)
        if flipped:
            for p in self.eff_parents.get(key, ()):
                self.recheck(p, flipped)

    def recompute(self, key: Key) -> None:
        """Recompute one group from its parts (after an edit), then push the difference upwards."""
        g = self.nodes[key]
        new: set[int] = set(self.labels.members(g.sid)) if g.sid is not None else set()
        new.update(self.wid_of[k] for k in g.static if k in self.wid_of)
        for n in g.eff_nested:
            new |= self.nodes[n].wids
        a = g.addr
        if not g.wids and not a.counts and a.irset is None and not a.listeners:
            # A fresh group (the initial build): fill it in bulk, nobody is watching its addresses yet.
            flipped = g.wids = new  # (built above for this group alone: no copy; parents only read it)
            # C-level iteration (map, chain, Counter): Σ group sizes is millions at 1M workloads
            deque(map(set.add, map(self.groups_of.__getitem__, new), repeat(g.gid)), maxlen=0)
            a.counts = dict(Counter(chain.from_iterable(map(self.ips_of.__getitem__, new))))
            if self.track_dirty:
                self.dirty_wids |= new
        else:
            flipped = new ^ g.wids
            for w in flipped:
                self._toggle(g, w, w in new)
        self._recompute_lits(g)
        if flipped:
            for p in sorted(self.eff_parents.get(key, ())):
                self.recheck(p, flipped)

    def _recompute_lits(self, g: GroupNode) -> None:
        lits = set(g.own_lits)
        for n in g.eff_nested:
            lits |= self.nodes[n].lits
        new = frozenset(lits)
        if new == g.lits:
            return
        old_hosts = {a for a, _ in map(split_literal, g.lits) if a}
        new_hosts = {a for a, _ in map(split_literal, new) if a}
        for a in sorted(new_hosts - old_hosts):
            g.addr.inc(a)
        for a in sorted(old_hosts - new_hosts):
            g.addr.dec(a)
        g.lits = new
        g.addr.set_nets(n for _, n in map(split_literal, new) if n)
        self.lits_changed.add(g.key)
        for p in sorted(self.eff_parents.get(g.key, ())):
            self._recompute_lits(self.nodes[p])

    # ---------------------------------------------------------------------------------- workloads
    def add_workload(self, wid: int, key: Key, ips: tuple[str, ...]) -> None:
        self.wid_of[key] = wid
        self.key_of[wid] = key
        self.ips_of[wid] = ips
        self.groups_of.setdefault(wid, set())
        for g in self.static_idx.get(key, ()):
            self.recheck(g, (wid,))

    def selector_changes(self, changes: list[Change]) -> None:
        for sid, wid, _ in changes:
            for g in self.by_sid.get(sid, ()):
                self.recheck(g, (wid,))

    def change_ips(self, wid: int, ips: tuple[str, ...]) -> None:
        old = self.ips_of[wid]
        if old == ips:
            return
        nodes, gkeys = self.nodes, self.gkeys
        for gi in self.groups_of.get(wid, ()):
            g = nodes[gkeys[gi]]
            for ip in ips:
                g.addr.inc(ip)
            for ip in old:
                g.addr.dec(ip)
        self.ips_of[wid] = ips

    def remove_workload(self, wid: int) -> None:
        """Call after the label index dropped it (its selector memberships are already gone)."""
        key = self.key_of[wid]
        groups = sorted(map(self.gkeys.__getitem__, self.groups_of.get(wid, ())))
        # Out of existence first, so `_contains` is false everywhere; then flip it out of every group.
        ips = self.ips_of.pop(wid)
        for gk in groups:
            g = self.nodes[gk]
            if wid in g.wids:
                g.wids.discard(wid)
                for ip in ips:
                    g.addr.dec(ip)
        self.groups_of.pop(wid, None)
        del self.wid_of[key]
        del self.key_of[wid]
        self.dirty_wids.discard(wid)

    # ---------------------------------------------------------------------------------- groups
    def upsert_group(self, key: Key, spec: GroupSpec) -> None:
        tenant = key[0]
        g = self.nodes.get(key)
        if g is None:
            name = group_set_name(*key)
            g = self.nodes[key] = GroupNode(key, AddrSet(name, self.registry), self.gid(key))
            self.set_by_name[name] = g.addr
        # selector
        if g.selector != spec.selector or (spec.selector is not None and g.sid is None):
            if g.sid is not None:
                self.by_sid[g.sid].discard(key)
                self.labels.release(g.sid)
                g.sid = None
            if spec.selector is not None:
                scope = None if tenant == PROVIDER_TENANT else tenant
                g.sid = self.labels.acquire(scope, spec.selector)
                self.by_sid.setdefault(g.sid, set()).add(key)
            g.selector = spec.selector
        # static workloads: own tenant only (the provider may name `tenant/name`)
        static = set()
        for ref in spec.workloads:
            wk = split_ref(ref, tenant)
            if wk[0] == tenant or tenant == PROVIDER_TENANT:
                static.add(wk)
        for wk in g.static - static:
            self.static_idx[wk].discard(key)
        for wk in static - g.static:
            self.static_idx.setdefault(wk, set()).add(key)
        g.static = frozenset(static)
        # nested groups (declared)
        nested = tuple(sorted({split_ref(r, tenant) for r in spec.groups}))
        for n in set(g.nested) - set(nested):
            self.declared_parents[n].discard(key)
        for n in set(nested) - set(g.nested):
            self.declared_parents.setdefault(n, set()).add(key)
        g.nested = nested
        g.share = frozenset(spec.shareWith)
        g.own_lits = frozenset(c for c in spec.cidrs if is_address_literal(c))  # junk never crashes

    def remove_group(self, key: Key) -> GroupNode | None:
        """Empties the group (pushing removals to parents and listeners) and forgets it."""
        g = self.nodes.get(key)
        if g is None:
            return None
        if g.sid is not None:
            self.by_sid[g.sid].discard(key)
            self.labels.release(g.sid)
            g.sid = None
        for wk in g.static:
            self.static_idx[wk].discard(key)
        g.static = frozenset()
        for n in g.nested:
            self.declared_parents[n].discard(key)
        g.nested = ()
        for n in g.eff_nested:
            self.eff_parents[n].discard(key)
        g.eff_nested = ()
        g.own_lits = frozenset()
        self.recompute(key)
        # Detach from parents now: a parent recomputed later in the same update (e.g. when its other
        # nested groups go too) must not look this group up any more.
        for p in self.eff_parents.pop(key, set()):
            parent = self.nodes.get(p)
            if parent is not None:
                parent.eff_nested = tuple(n for n in parent.eff_nested if n != key)
        del self.nodes[key]
        del self.set_by_name[g.addr.name]
        self.registry.pop(g.addr.name, None)
        return g

    def refresh_edges(self) -> set[Key]:
        """Recompute effective nesting edges (existence, visibility, cycles); the groups whose edges
        changed (to be recomputed by the caller)."""
        edges: dict[Key, list[Key]] = {}
        for g in self.nodes.values():
            if g.nested:
                edges[g.key] = [n for n in g.nested if n in self.nodes and visible(g.key[0], self.nodes[n])]
        comp = _scc(edges)
        changed: set[Key] = set()
        for g in self.nodes.values():
            es = edges.get(g.key, [])
            eff = tuple(n for n in es if n != g.key and not (g.key in comp and comp.get(n) == comp[g.key]))
            if eff != g.eff_nested:
                for n in g.eff_nested:
                    self.eff_parents[n].discard(g.key)
                for n in eff:
                    self.eff_parents.setdefault(n, set()).add(g.key)
                g.eff_nested = eff
                changed.add(g.key)
        return changed

    def topo_order(self, keys: Iterable[Key]) -> list[Key]:
        """`keys` with nested groups before the groups containing them."""
        want = set(keys)
        out: list[Key] = []
        seen: set[Key] = set()

        def visit(k: Key) -> None:
            stack = [(k, iter(self.nodes[k].eff_nested))]
            seen.add(k)
            while stack:
                node, it = stack[-1]
                child = next(it, None)
                if child is None:
                    stack.pop()
                    if node in want:
                        out.append(node)
                elif child not in seen:
                    seen.add(child)
                    stack.append((child, iter(self.nodes[child].eff_nested)))

        for k in sorted(want):
            if k not in seen:
                visit(k)
        return out


def _scc(edges: dict[Key, list[Key]]) -> dict[Key, int]:
    """Component number of every node on a cycle (Tarjan, iterative). Nodes not on a cycle are absent."""
    index: dict[Key, int] = {}
    low: dict[Key, int] = {}
    on: set[Key] = set()
    stack: list[Key] = []
    comp: dict[Key, int] = {}
    counter = 0
    ncomp = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(edges.get(root, ())))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(edges.get(w, ()))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                members = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    members.append(x)
                    if x == v:
                        break
                if len(members) > 1 or v in edges.get(v, ()):
                    for x in members:
                        comp[x] = ncomp
                    ncomp += 1
    return comp
