"""PURE: what to write to `table inet omniwall`, and what to revoke after it; no I/O (the applier,
backend.py, executes a `Plan`). Unit-tested without root against the strict fake table
(tests/unit/nft_fake.py).

- `read_back(listing)`: the IR from a libnftables listing of the table (None: not adoptable/drifted).
- `full(state, exists)`: the whole table; a bulk load (structure by libnftables, then the members and
  the revision as one raw batch) when none exists and the sets are big.
- `sync(current, state)`: the minimal transaction from `current` (read back) to `state`.
- `change(base, delta, target)`: what the delta names, and nothing else:
  - members-only (host addresses join/leave existing sets, no identity created or retired): one raw
    netlink batch of set elements, ipcache entries and the revision; revocation only for the
    addresses whose connections may have tightened;
  - rules/vNICs only (no set changes): the touched vNICs' chains, their hops' index entries (the
    identities stay), port sets by reference count, the stored IR's buckets of the objects named, the
    revision; revocation by `after_change`;
  - anything else (set changes with rule changes, identities created or retired): the whole-state
    difference (render.render_delta) with the cached index of the base.

The planner keeps a `Book` of derived data (index plan, per-hop index objects with reference counts,
port-set reference counts) for the state it last planned, and moves it to the plan's target once the
applier reports the commit (`committed`). A plan for a base the book does not describe builds the
book from the base first (correct, just slower).
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from typing import Any, Literal

import msgspec

from omniwall.compiler.ir import HostDelta, HostDesiredState, IRRule, IRSet, IRVnic, ServiceMatch, plain
from omniwall.dataplane.nft import blob
from omniwall.dataplane.nft.expr import Json, T
from omniwall.dataplane.nft.names import (
    FWD_CHAIN,
    IPCACHE,
    KNOWN_IF,
    MAP_ANY,
    RAW_CHAIN,
    REV_OBJ,
    STATE_BUCKETS,
    STATE_CHAIN,
    addr_set,
)
from omniwall.dataplane.nft.nlbatch import ElemOp, KeyType, MapElemOp, Op, QuotaOp
from omniwall.dataplane.nft.render import (
    MatchMemo,
    RawLayoutChanged,
    VnicChange,
    _hop_rules,
    index_plan,
    port_set_name,
    render_bookkeeping,
    render_delta,
    render_port_set,
    render_table,
    render_vnic_chains,
    render_vnic_changes,
    renderers,
    segments,
    shapes_of,
    split_families,
)
from omniwall.dataplane.nft.render import _proto_ranges as proto_ranges
from omniwall.dataplane.nft.render_index import (
    DIRECTIONS,
    HopObjects,
    IndexObjects,
    carry_plan,
    diff_index,
    hop_objects,
    identity_objects,
    index_objects,
    ipcache_target,
    map_decl,
)
from omniwall.dataplane.nft.set_signatures import (
    HopPlan,
    IndexPlan,
    Key,
    Move,
    hop_entries,
    local_side,
    plan_hop,
)

log = logging.getLogger(__name__)

# member changes per delta sent as one raw element batch (any size fits one batch: nlbatch.py grows
# the socket buffer); the bound only keeps a runaway delta from building a multi-GB message
FAST_PATH_MAX_ELEMENTS = 4_000_000
# a table built from nothing with more address-set members than this: structure via libnftables, then
# the members as one raw batch (libnftables parses JSON element by element: ~4 s per 1M, raw ~1-2 s)
BULK_LOAD_MIN_ELEMENTS = 10_000

Revoke = Literal["none", "involving", "after_change"]
HopKey = tuple[str, str]


@dataclass
class Plan:
    """One write: `commands` (one libnftables transaction, may be empty), then `ops` (one raw netlink
    batch, may be empty); `fallback`: the whole table, to transact if `commands` fail (sync only).
    Then revocation: `after_change(base, target)`, or `involving(target, suspects)`, or none."""

    base: HostDesiredState | None
    target: HostDesiredState
    commands: list[Json] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    fallback: list[Json] | None = None
    revoke: Revoke = "after_change"
    suspects: set[str] = field(default_factory=set)
    kind: str = "delta"  # "fast" | "delta" | "diff" | "table" | "bulk" | "none" (tests, logs)
    book: Book | None = None  # the target's derived data, adopted on commit
    step: BookStep | None = None  # or the change to the current book, applied on commit
    moves: list[Move] = field(default_factory=list)  # the fast path's identity moves
    index: IndexPlan | None = None  # the fast path's index plan (moved on commit)
    # chains `commands` flush and fill again -> their old rules: the applier may turn that into an
    # edit of the rules that differ (it needs the kernel's rule handles, which a pure plan has not)
    rewrites: dict[str, list[Json]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.commands and not self.ops


# ----------------------------------------------------------------------------------------- the book


def _names_of(hp: HopPlan) -> Counter[str]:
    return Counter({h.remote for seg in hp.segments for h in seg if h.remote is not None})


def _port_sets_of(rule: IRRule) -> dict[str, list[tuple[int, int]]]:
    """The named port sets one rule's nft rules use, name -> ranges (render.port_sets, per rule)."""
    protos = {s.protocol for s in rule.services}
    if not rule.services or "any" in protos:
        return {}
    out = {}
    for proto in ("tcp", "udp"):
        if proto in protos:
            ranges = proto_ranges(rule.services, proto)
            if ranges is not None and len(ranges) > 1:
                out[port_set_name(ranges)] = ranges
    return out


def _stateless_in(v: IRVnic, rmap: Mapping[int, IRRule]) -> bool:
    return any(not rmap[i].stateful for i in v.ingress if i in rmap)


def _stateless_any(v: IRVnic, rmap: Mapping[int, IRRule]) -> bool:
    return any(not rmap[i].stateful for i in (*v.egress, *v.ingress) if i in rmap)


class Membership:
    """Which IR sets hold an address, for the local side of the touched hops only: a binary search
    per set in its sorted addresses, instead of SetMembership's index of every member (1-2 s at 100k
    members). Sets whose addresses are not sorted are searched linearly."""

    def __init__(self, sets: Iterable[IRSet], known: dict[str, tuple[tuple[str, ...], bool]]) -> None:
        """`known`: name -> (addresses, sorted?) from earlier calls (the caller's cache: only sets whose
        addresses tuple changed are checked again)."""
        self.sets = list(sets)
        self._seen: dict[str, set[str]] = {}
        self.sorted: dict[str, bool] = {}
        for s in self.sets:
            hit = known.get(s.name)
            if hit is None or hit[0] is not s.addresses:
                hit = known[s.name] = (s.addresses, _is_sorted(s.addresses))
            self.sorted[s.name] = hit[1]
        self.nets: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = []
        for s in self.sets:
            for c in s.cidrs:
                try:
                    self.nets.append((ipaddress.ip_network(c, strict=False), s.name))
                except ValueError:  # the kernel refuses the batch carrying it
                    continue

    def of(self, address: str) -> set[str]:
        got = self._seen.get(address)
        if got is None:
            got = self._seen[address] = self._of(address)
        return set(got)

    def _of(self, address: str) -> set[str]:
        out = set()
        for s in self.sets:
            a = s.addresses
            if self.sorted[s.name]:
                i = bisect.bisect_left(a, address)
                if i < len(a) and a[i] == address:
                    out.add(s.name)
            elif address in a:
                out.add(s.name)
        if self.nets:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return out
            out.update(n for net, n in self.nets if ip.version == net.version and ip in net)
        return out


def _is_sorted(xs: Sequence[str]) -> bool:
    return list(xs) == sorted(xs)  # in C: ~50x faster than a Python loop over 100k members


def _strictly_increasing(xs: list[int]) -> bool:
    return len(set(xs)) == len(xs) and xs == sorted(xs)


@dataclass
class Book:
    """Derived data of one state: its index plan, each hop's index contribution, each vNIC's rendered
    chains, and reference counts (path chains and identities by hops, remote set names by hops, port
    sets by rules)."""

    state: HostDesiredState
    plan: IndexPlan
    hops: dict[HopKey, HopObjects]
    chains: dict[str, dict[str, list[Json]]]
    chain_refs: Counter[str]
    key_refs: dict[str, Counter[Key]]
    named_refs: dict[str, Counter[str]]
    port_refs: Counter[str]
    stateless_in: frozenset[str]
    objs: IndexObjects | None = None  # the whole index, when built (full renders)
    stateless_any: frozenset[str] = frozenset()  # vNICs with a stateless rule at either hop


@dataclass
class BookStep:
    """A change's effect on the book, applied once the kernel took the change (`NftPlanner.committed`):
    small deltas, so planning copies nothing of the size of the host."""

    target: HostDesiredState
    plan: IndexPlan
    hops: dict[HopKey, HopObjects | None]  # None: the hop has no index any more
    chains: dict[str, dict[str, list[Json]] | None]  # None: the vNIC is gone
    chain_refs: Counter[str]
    key_refs: dict[str, Counter[Key]]
    named_refs: dict[str, Counter[str]]
    port_refs: Counter[str]
    stateless_in: frozenset[str]
    stateless_any: frozenset[str] = frozenset()

    def apply(self, book: Book) -> None:
        book.state, book.plan, book.stateless_in = self.target, self.plan, self.stateless_in
        book.stateless_any = self.stateless_any
        for hk, ho in self.hops.items():
            if ho is None:
                book.hops.pop(hk, None)
            else:
                book.hops[hk] = ho
        for name, ch in self.chains.items():
            if ch is None:
                book.chains.pop(name, None)
            else:
                book.chains[name] = ch
        _add(book.chain_refs, self.chain_refs)
        for d in DIRECTIONS:
            _add(book.key_refs[d], self.key_refs[d])
            _add(book.named_refs[d], self.named_refs[d])
        _add(book.port_refs, self.port_refs)


def _add(into: Counter[Any], delta: Counter[Any]) -> None:
    for k, n in delta.items():
        if n:
            v = into[k] + n
            if v > 0:
                into[k] = v
            else:
                del into[k]


def build_book(
    state: HostDesiredState,
    log_group: int,
    flow_group: int | None,
    memo: MatchMemo | None = None,
    shapes: dict[str, tuple[bool, bool]] | None = None,
) -> Book:
    plan = index_plan(state)
    hops: dict[HopKey, HopObjects] = {}
    rmap = state.rule_map()
    stateless_any = frozenset(v.ifname for v in state.vnics if _stateless_any(v, rmap))
    ct_new = flow_group is not None and not stateless_any  # render.allowed_from_conntrack
    rr, rd = renderers(ct_new)
    objs = index_objects(state, plan, rr, rd, log_group, flow_group, hops=hops)
    chain_refs: Counter[str] = Counter()
    key_refs: dict[str, Counter[Key]] = {d: Counter() for d in DIRECTIONS}
    for (_, d), ho in hops.items():
        chain_refs.update(ho.chains.keys())
        key_refs[d].update(ho.keys)
    named_refs: dict[str, Counter[str]] = {d: Counter() for d in DIRECTIONS}
    for (_, d), hp in plan.hops.items():
        named_refs[d].update(_names_of(hp))
    port_refs: Counter[str] = Counter()
    for r in state.rules:
        port_refs.update(_port_sets_of(r).keys())
    stateless = frozenset(v.ifname for v in state.vnics if _stateless_in(v, rmap))
    shapes = shapes_of(state) if shapes is None else shapes
    chains = {
        v.ifname: render_vnic_chains(
            v, rmap, shapes, log_group, plan, bool(stateless), flow_group, memo, ct_new
        )
        for v in state.vnics
    }
    return Book(
        state, plan, hops, chains, chain_refs, key_refs, named_refs, port_refs, stateless, objs, stateless_any
    )


class RulesById(Mapping[int, IRRule]):
    """A state's rules by id, looked up by binary search in its id-sorted rules: no 10,000-entry dict
    built per change (the IR keeps rules sorted by id; an unsorted tuple gets a dict)."""

    def __init__(self, rules: tuple[IRRule, ...], like: RulesById | None = None) -> None:
        self.rules = rules
        self.by: dict[int, IRRule] | None = None
        if like is not None and like.by is None:
            self.ids = like.ids  # the same ids, sorted (never mutated)
            return
        self.ids = [r.id for r in rules]
        if not _strictly_increasing(self.ids):
            self.by = {r.id: r for r in rules}

    def in_bucket(self, k: int, buckets: int) -> list[IRRule]:
        """The rules whose id is k modulo `buckets` (blob.rule_bucket), in id order."""
        got = [r for r in self.rules if r.id % buckets == k]
        return got if self.by is None else sorted(got, key=lambda r: r.id)

    def __getitem__(self, rid: int) -> IRRule:
        if self.by is not None:
            return self.by[rid]
        i = bisect.bisect_left(self.ids, rid)
        if i < len(self.ids) and self.ids[i] == rid:
            return self.rules[i]
        raise KeyError(rid)

    def __contains__(self, rid: object) -> bool:
        try:
            self[rid]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def _all_on_wire(*types: type) -> bool:
    return all(f.metadata.get("wire", True) for t in types for f in dataclass_fields(t))


# `ir.plain` of a rule is its fields as builtins; msgspec makes the same (tuples where plain makes
# lists: the same JSON) ~5x faster (10k rules: 0.2 -> 0.04 s), as long as no field of a rule is kept
# off the wire (`wire: False`), which plain would drop
_plain_rule: Callable[[IRRule], Any] = (
    msgspec.to_builtins if _all_on_wire(IRRule, ServiceMatch) else plain  # type: ignore[assignment]
)


class PlainRules:
    """`ir.plain(rule)` by rule id, reused while the rule is the same object: a change re-encodes the
    stored IR's buckets it touches (~160 rules each on a 10k-rule host), and their other rules are
    unchanged (encoding them again was a third of a one-rule change's planning). Filled by full plans."""

    def __init__(self) -> None:
        self._by: dict[int, tuple[IRRule, Any]] = {}

    def __call__(self, rule: IRRule) -> Any:
        got = self._by.get(rule.id)
        if got is None or got[0] is not rule:
            got = self._by[rule.id] = (rule, _plain_rule(rule))
        return got[1]

    def clear(self) -> None:
        self._by.clear()


# -------------------------------------------------------------------------------------- the planner


class NftPlanner:
    def __init__(self, log_group: int, flow_group: int | None, prefixes: Sequence[str]) -> None:
        self.log_group = log_group
        self.flow_group = flow_group
        self.prefixes = tuple(prefixes)
        self.plain = PlainRules()  # the stored IR's encoding of each rule (blob.py)
        self.matches: MatchMemo = {}  # each rule's nft matches (render.render_vnic_chains)
        self.book: Book | None = None
        self._roles: tuple[tuple[IRRule, ...], frozenset[str], frozenset[str]] | None = None
        self._own: tuple[tuple[IRVnic, ...], tuple[IRRule, ...], dict[str, frozenset[str]]] | None = None
        self._sorted: dict[str, tuple[tuple[str, ...], bool]] = {}
        self._by_id: list[RulesById] = []  # the last two rule tuples' lookups (base and target)
        self._shape_cache: tuple[tuple[IRSet, ...], dict[str, tuple[bool, bool]]] | None = None

    def _shapes(self, state: HostDesiredState) -> dict[str, tuple[bool, bool]]:
        if self._shape_cache is None or self._shape_cache[0] is not state.sets:
            self._shape_cache = (state.sets, shapes_of(state))
        return self._shape_cache[1]

    # ---------------------------------------------------------------------------------- read back
    def read_back(self, listing: list[dict[str, Any]]) -> HostDesiredState | None:
        """The IR a listing of the table realizes (stored structure + revision + kernel set elements),
        or None when it is not ours, is corrupt, or drifted from what we would render for it."""
        chunks: list[str] = []
        buckets: dict[int, list[str]] = {}
        revision: int | None = None
        elements: dict[str, list[str]] = {}
        counts: Counter[str] = Counter()
        base_comments: dict[str, list[str]] = {RAW_CHAIN: [], FWD_CHAIN: []}
        sets: set[str] = set()
        prefix = STATE_CHAIN + "_"
        for obj in listing:
            if "rule" in obj:
                r = obj["rule"]
                chain = r["chain"]
                counts[chain] += 1
                if chain == STATE_CHAIN:
                    chunks.append(r.get("comment", ""))
                elif chain.startswith(prefix) and chain[len(prefix) :].isdigit():
                    buckets.setdefault(int(chain[len(prefix) :]), []).append(r.get("comment", ""))
                elif chain in base_comments:
                    base_comments[chain].append(str(r.get("comment", "")))
            elif "quota" in obj:
                if obj["quota"].get("name") == REV_OBJ:
                    revision = int(obj["quota"].get("bytes", 0))
            elif "set" in obj:
                s = obj["set"]
                sets.add(s["name"])
                elements[s["name"]] = [k for k in map(_elem_key, s.get("elem", [])) if k is not None]
            elif "map" in obj:
                sets.add(obj["map"]["name"])
        struct = blob.decode_buckets(chunks, buckets)
        if struct is None or revision is None:
            return None
        try:
            addresses = {
                s["name"]: elements.get(addr_set(s["name"], 4), []) + elements.get(addr_set(s["name"], 6), [])
                for s in struct.get("sets", [])
            }
            state = blob.assemble(struct, revision, addresses)
        except (KeyError, ValueError, TypeError):
            return None
        # drift check: the kernel must hold exactly the chains/sets (and rule counts) we would render
        exp_counts: Counter[str] = Counter()
        exp_base: dict[str, list[str]] = {RAW_CHAIN: [], FWD_CHAIN: []}
        exp_sets: set[str] = set()
        for cmd in render_table(state, self.log_group, self.prefixes, self.flow_group):
            add = cmd.get("add", {})
            if "rule" in add:
                exp_counts[add["rule"]["chain"]] += 1
                if add["rule"]["chain"] in exp_base:
                    exp_base[add["rule"]["chain"]].append(add["rule"].get("comment", ""))
            elif "set" in add:
                exp_sets.add(add["set"]["name"])
            elif "map" in add:
                exp_sets.add(add["map"]["name"])
        known = sorted(elements.get(KNOWN_IF, []))
        if (
            +counts != +exp_counts
            or sets != exp_sets
            or base_comments != exp_base  # e.g. the workload prefixes were reconfigured
            or known != sorted(v.ifname for v in state.vnics)
        ):
            log.warning("nft table drifted from its stored state; will rebuild")
            return None
        return state

    # -------------------------------------------------------------------------------- full / sync
    def table(self, state: HostDesiredState, book: Book | None = None) -> list[Json]:
        if book is None:
            return render_table(state, self.log_group, self.prefixes, self.flow_group)
        self.plain.clear()  # a whole table: drop the entries of rules gone since
        return render_table(
            state, self.log_group, self.prefixes, self.flow_group, book.objs, book.chains, self.plain
        )

    def full(self, state: HostDesiredState, *, exists: bool) -> Plan:
        """The whole table (replacing whatever exists); a bulk load when none exists and the sets hold
        many members. In between the bulk load's two steps rules see empty sets: that filters no less
        than the missing table did. The revision quota only exists once the members are in, so a table
        left by a failed second step is not adoptable (read_back: None) and is rebuilt."""
        self.matches.clear()  # a whole table: drop the entries of rules gone since
        book = build_book(state, self.log_group, self.flow_group, self.matches, self._shapes(state))
        cmds = self.table(state, book)
        book.objs = None  # the per-hop parts and counts are what later changes use
        if exists or _members(state) <= BULK_LOAD_MIN_ELEMENTS:
            return Plan(None, state, cmds, kind="table", book=book)
        keytypes: dict[str, KeyType] = {}
        for st in state.sets:
            keytypes[addr_set(st.name, 4)], keytypes[addr_set(st.name, 6)] = "ipv4_addr", "ipv6_addr"
        structure: list[Json] = []
        ops: list[Op] = []
        for cmd in cmds:
            add = cmd.get("add", {})
            el = add.get("element")
            if "quota" in add:  # no revision until the members are in: not adoptable
                continue
            if el is not None and el["name"] in keytypes:
                ops.append(ElemOp("add", el["name"], keytypes[el["name"]], tuple(el["elem"])))
            else:
                structure.append(cmd)
        ops.append(QuotaOp(REV_OBJ, state.revision))
        return Plan(None, state, structure, ops, kind="bulk", book=book)

    def sync(self, current: HostDesiredState, state: HostDesiredState) -> Plan:
        """From `current` (read back, normalized) to `state`: the minimal transaction, the whole table
        as its fallback."""
        try:
            cmds = render_delta(current, state, self.log_group, None, self.flow_group)
            kind = "diff"
        except RawLayoutChanged:  # rare (the host's first or last stateless ingress rule)
            return Plan(current, state, self.table(state), kind="table")
        return Plan(current, state, cmds, fallback=self.table(state), kind=kind)

    # ------------------------------------------------------------------------------------- change
    def change(self, base: HostDesiredState, delta: HostDelta, target: HostDesiredState) -> Plan:
        """The write taking a table that realizes `base` to `target` = apply_delta(base, delta)."""
        fast = self._members_only(base, delta, target)
        if fast is not None:
            return fast
        if not delta.set_updates and not delta.set_removes:
            try:
                plan = self._rules_and_vnics(base, delta, target)
            except RawLayoutChanged:
                return Plan(base, target, self.table(target), kind="table")
            if plan is not None:
                return plan
        hints = {u.name: u for u in delta.set_updates}
        try:
            cmds = render_delta(base, target, self.log_group, hints, self.flow_group)
        except RawLayoutChanged:
            return Plan(base, target, self.table(target), kind="table")
        return Plan(base, target, cmds, kind="diff")

    def committed(self, plan: Plan) -> None:
        """The kernel took `plan`: its target's derived data becomes the book."""
        book = self.book
        if plan.kind == "fast" and plan.index is not None and plan.base is not None:
            plan.index.move(plan.moves)  # the identities, moved in place: the plan describes the target
            carry_plan(plan.base, plan.target, plan.index)
            if book is not None and book.state is plan.base and book.plan is plan.index:
                book.state = plan.target
            else:
                self.book = None
        elif plan.step is not None and book is not None and plan.base is book.state:
            plan.step.apply(book)
            carry_plan(plan.base, plan.target, book.plan)  # render's plan cache: for whole-state diffs
        elif plan.book is not None:
            self.book = plan.book
        else:
            self.book = None  # built on the next change that needs it

    def forget(self) -> None:
        self.book = None

    def _book_for(self, state: HostDesiredState) -> Book:
        if self.book is None or self.book.state is not state:
            self.book = build_book(state, self.log_group, self.flow_group, self.matches, self._shapes(state))
        return self.book

    # ----------------------------------------------------------------------- members-only fast path
    def _members_only(
        self, base: HostDesiredState, delta: HostDelta, target: HostDesiredState
    ) -> Plan | None:
        """A delta that only adds/removes host addresses of existing sets: the raw kernel batch and the
        addresses whose connections may now be refused. None: not such a delta, or one that creates or
        retires an identity or touches a local vNIC's own address (general path)."""
        if (
            delta.rule_updates
            or delta.rule_removes
            or delta.vnic_updates
            or delta.vnic_removes
            or delta.set_removes
            or not delta.set_updates
        ):
            return None
        sets = base.sets
        grants, denies = self._set_roles(base)
        ops: list[Op] = []
        suspects: set[str] = set()
        budget = FAST_PATH_MAX_ELEMENTS
        for u in delta.set_updates:
            name = u.name
            i = bisect.bisect_left(sets, name, key=lambda s: s.name)
            if u.created or u.added_cidrs or u.removed_cidrs or i == len(sets) or sets[i].name != name:
                return None
            budget -= len(u.added_addresses) + len(u.removed_addresses)
            if budget < 0:
                return None
            gone4, gone6 = split_families(u.removed_addresses)
            new4, new6 = split_families(u.added_addresses)
            ops += [
                ElemOp("delete", addr_set(name, 4), "ipv4_addr", tuple(gone4)),
                ElemOp("delete", addr_set(name, 6), "ipv6_addr", tuple(gone6)),
                ElemOp("add", addr_set(name, 4), "ipv4_addr", tuple(new4)),
                ElemOp("add", addr_set(name, 6), "ipv6_addr", tuple(new6)),
            ]
            # set membership is monotone in every rule: a member added can only tighten verdicts
            # through refusing rules, a member removed only through granting ones
            if name in denies:
                suspects.update(u.added_addresses)
            if name in grants:
                suspects.update(u.removed_addresses)
        changes: dict[str, tuple[set[str], set[str]]] = {}
        for u in delta.set_updates:
            for a in u.added_addresses:
                changes.setdefault(a, (set(), set()))[0].add(u.name)
            for a in u.removed_addresses:
                changes.setdefault(a, (set(), set()))[1].add(u.name)
        local = self._local_sets(base)
        for a, (joined, left) in changes.items():
            if a in local and not local[a].isdisjoint(joined | left):
                return None  # the local side of a rule at this address's own vNIC changes: re-render
        book = self.book
        # the book's plan when it describes the base, else render's cached plan (no book built here)
        plan = book.plan if book is not None and book.state is base else index_plan(base)
        moves = plan.member_moves(changes)
        if moves is None:
            return None
        for m in moves:
            fam = 6 if ":" in m.address else 4
            keytype: KeyType = "ipv6_addr" if fam == 6 else "ipv4_addr"
            for d in DIRECTIONS:
                was, now = ipcache_target(plan, m.old, d), ipcache_target(plan, m.new, d)
                if was == now:
                    continue
                name = IPCACHE[(d, fam, False)]
                if was is not None:
                    ops.append(MapElemOp("delete", name, keytype, ((m.address, "goto", was),)))
                if now is not None:
                    ops.append(MapElemOp("add", name, keytype, ((m.address, "goto", now),)))
        ops.append(QuotaOp(REV_OBJ, delta.to_revision))
        return Plan(
            base, target, ops=ops, revoke="involving", suspects=suspects, kind="fast", moves=moves, index=plan
        )

    def _local_sets(self, state: HostDesiredState) -> dict[str, frozenset[str]]:
        """Own address of a vNIC -> the sets its hops' rules test on the local side (the hop index
        decides those at render time), cached while vNICs and rules are the same objects."""
        if self._own is None or self._own[0] is not state.vnics or self._own[1] is not state.rules:
            rmap = state.rule_map()
            out: dict[str, frozenset[str]] = {}
            for v in state.vnics:
                hops = (("egress", v.egress), ("ingress", v.ingress))
                names = {local_side(rmap[i], d) for d, ids in hops for i in ids if i in rmap}
                names.discard(None)
                for a in v.addresses:
                    out[a] = out.get(a, frozenset()) | frozenset(n for n in names if n is not None)
            self._own = (state.vnics, state.rules, out)
        return self._own[2]

    def _set_roles(self, state: HostDesiredState) -> tuple[frozenset[str], frozenset[str]]:
        """(sets a granting rule uses, sets a refusing rule uses), cached while the rules are the same
        object (the fast path keeps them). Granting: allow, or monitor-mode drop/reject (counts as
        allow); refusing: drop/reject; `pass` is both (it skips to the next category)."""
        if self._roles is None or self._roles[0] is not state.rules:
            grants: set[str] = set()
            denies: set[str] = set()
            for r in state.rules:
                used = {x for x in (r.src_set, r.dst_set) if x is not None}
                if r.action == "pass":
                    grants |= used
                    denies |= used
                elif r.action == "allow" or r.monitor:
                    grants |= used
                else:
                    denies |= used
            self._roles = (state.rules, frozenset(grants), frozenset(denies))
        return self._roles[1], self._roles[2]

    # ------------------------------------------------------------------- rules and vNICs, no sets
    def _rules_and_vnics(
        self, base: HostDesiredState, delta: HostDelta, target: HostDesiredState
    ) -> Plan | None:
        """A delta without set changes, rendered from what it names. None: the hop index's identities
        change (a remote set named for the first or the last time): the whole-state difference then."""
        if base.sets is not target.sets and base.sets != target.sets:
            return None  # not the sets the delta says (no set updates): the whole difference decides
        book = self._book_for(base)
        old_rmap = self._rules(base)
        same_ids = not delta.rule_removes and all(u.rule.id in old_rmap for u in delta.rule_updates)
        new_rmap = self._rules(target, old_rmap if same_ids else None)
        changed_rules = {u.rule.id for u in delta.rule_updates} | {r.id for r in delta.rule_removes}
        removed_names = {r.ifname for r in delta.vnic_removes}
        touched_names = {u.vnic.ifname for u in delta.vnic_updates}
        if changed_rules:  # vNICs naming a changed rule (the delta should list them: be sure)
            for v in target.vnics:
                if v.ifname not in touched_names and not changed_rules.isdisjoint((*v.egress, *v.ingress)):
                    touched_names.add(v.ifname)
        new_v = {v.ifname: v for v in target.vnics if v.ifname in touched_names}
        old_v = {v.ifname: v for v in base.vnics if v.ifname in touched_names | removed_names}
        touched = [new_v[n] for n in sorted(touched_names) if n in new_v]
        removed = [old_v[n] for n in sorted(removed_names) if n in old_v and n not in new_v]
        gone_names = touched_names | removed_names

        # the raw chain's destination dispatch: some vNIC has a stateless ingress rule
        stateless = set(book.stateless_in) - gone_names
        stateless |= {v.ifname for v in touched if _stateless_in(v, new_rmap)}
        dispatch = bool(stateless)
        if dispatch != bool(book.stateless_in):
            raise RawLayoutChanged("the raw chain's destination dispatch appears or goes: render the table")
        # where ingress allowed records come from (render.allowed_from_conntrack): the same, or render
        stateless_any = set(book.stateless_any) - gone_names
        stateless_any |= {v.ifname for v in touched if _stateless_any(v, new_rmap)}
        if bool(stateless_any) != bool(book.stateless_any):
            raise RawLayoutChanged("ingress allowed records change source (a first or last stateless rule)")
        ct_new = self.flow_group is not None and not stateless_any
        rr, rd = renderers(ct_new)

        # the hop index: re-plan the touched hops; identities stay when the named remote sets do
        hop_keys = [(n, d) for n in sorted(gone_names) for d in DIRECTIONS]
        mem = Membership(target.sets, self._sorted)
        new_hops = dict(book.plan.hops)
        named_delta: dict[str, Counter[str]] = {d: Counter() for d in DIRECTIONS}
        for hk in hop_keys:
            hp = new_hops.pop(hk, None)
            if hp is not None:
                named_delta[hk[1]].subtract(_names_of(hp))
        for v in touched:
            for d in DIRECTIONS:
                rules = _hop_rules(v, d, new_rmap)
                hp = plan_hop(v, d, rules, segments(rules), mem)  # type: ignore[arg-type]
                if hp.families:
                    new_hops[(v.ifname, d)] = hp
                    named_delta[d].update(_names_of(hp))
        for d in DIRECTIONS:
            for n, c in named_delta[d].items():
                if c and (book.named_refs[d][n] > 0) != (book.named_refs[d][n] + c > 0):
                    return None  # a remote set named for the first or the last time
        ids = book.plan.identities
        for hk in hop_keys:
            if hk in new_hops:
                hop_entries(new_hops[hk], ids.keys)
        new_plan = IndexPlan(ids, new_hops, _named={d: book.plan.named(d) for d in DIRECTIONS})

        # the index's difference, from the touched hops' contributions alone
        old_part, new_part = IndexObjects(), IndexObjects()
        for d in DIRECTIONS:  # always there: element changes in them are deletes and adds, no more
            decl = map_decl(MAP_ANY[d], "ifname", False)
            old_part.maps[MAP_ANY[d]] = new_part.maps[MAP_ANY[d]] = decl
        hop_step: dict[HopKey, HopObjects | None] = {}
        chain_delta: Counter[str] = Counter()
        key_delta: dict[str, Counter[Key]] = {d: Counter() for d in DIRECTIONS}
        keys_seen: dict[str, set[Key]] = {d: set() for d in DIRECTIONS}
        for hk in hop_keys:
            prev = book.hops.get(hk)
            if prev is not None:
                _merge(old_part, prev)
                chain_delta.subtract(prev.chains.keys())
                key_delta[hk[1]].subtract(prev.keys)
                keys_seen[hk[1]] |= prev.keys
            hp = new_hops.get(hk)
            ho = None
            if hp is not None:
                ho = hop_objects(hp, new_rmap, rr, rd, self.log_group, self.flow_group)
                _merge(new_part, ho)
                chain_delta.update(ho.chains.keys())
                key_delta[hk[1]].update(ho.keys)
                keys_seen[hk[1]] |= ho.keys
            hop_step[hk] = ho
        for c, rules in list(old_part.chains.items()):  # still used by another hop: it stays
            if book.chain_refs[c] + chain_delta[c] > 0:
                new_part.chains.setdefault(c, rules)
        for c, rules in list(new_part.chains.items()):  # existed already (another hop's)
            if book.chain_refs[c] > 0:
                old_part.chains.setdefault(c, rules)
        for d in DIRECTIONS:
            for k in keys_seen[d]:
                maps, chain, rules = identity_objects(d, k)
                if book.key_refs[d][k] > 0:
                    old_part.maps.update(maps)
                    old_part.chains[chain] = rules
                if book.key_refs[d][k] + key_delta[d][k] > 0:
                    new_part.maps.update(maps)
                    new_part.chains[chain] = rules
        idiff = diff_index(old_part, new_part)

        # sets: none change; port sets by reference count
        port_delta: Counter[str] = Counter()
        fresh: dict[str, list[tuple[int, int]]] = {}
        for i in changed_rules:
            if i in old_rmap:
                port_delta.subtract(_port_sets_of(old_rmap[i]).keys())
            if i in new_rmap:
                mine = _port_sets_of(new_rmap[i])
                port_delta.update(mine.keys())
                fresh.update((n, r) for n, r in mine.items() if book.port_refs[n] <= 0)
        cmds: list[Json] = []
        for name, ranges in sorted(fresh.items()):
            cmds += render_port_set(name, ranges)
        late = [
            {"delete": {"set": {**T, "name": n}}}
            for n in sorted(port_delta)
            if book.port_refs[n] > 0 and book.port_refs[n] + port_delta[n] <= 0
        ]

        rendered: dict[str, dict[str, list[Json]]] = {}
        rewrites: dict[str, list[Json]] = {}
        shapes = self._shapes(target)
        change = VnicChange(
            base, target, book.plan, new_plan, touched, removed, dispatch, idiff,
            old_rmap, new_rmap, shapes, shapes, book.chains, rendered, rewrites, self.matches, ct_new,
        )  # fmt: skip
        cmds += render_vnic_changes(change, self.log_group, self.flow_group)
        cmds += late
        # the stored IR: the buckets of the rules and vNICs the delta changes
        buckets = {blob.rule_bucket(i) for i in changed_rules}
        buckets |= {blob.name_bucket(n) for n in gone_names if old_v.get(n) != new_v.get(n)}
        rules_in = functools.partial(new_rmap.in_bucket, buckets=STATE_BUCKETS)
        cmds += render_bookkeeping(
            target, structure=bool(buckets), buckets=buckets, rules_in=rules_in, plain_rule=self.plain
        )

        chain_step: dict[str, dict[str, list[Json]] | None] = {n: None for n in removed_names}
        chain_step.update(rendered)
        step = BookStep(
            target, new_plan, hop_step, chain_step, chain_delta, key_delta, named_delta, port_delta,
            frozenset(stateless), frozenset(stateless_any),
        )  # fmt: skip
        return Plan(base, target, cmds, kind="delta", step=step, rewrites=rewrites)

    def _rules(self, state: HostDesiredState, like: RulesById | None = None) -> RulesById:
        """`like`: a lookup of rules with the same ids in the same order (a delta that only updates
        existing rules): its id list is reused instead of read from 10k rules again."""
        for got in self._by_id:
            if got.rules is state.rules:
                return got
        got = RulesById(state.rules, like if like is not None and len(like) == len(state.rules) else None)
        self._by_id = [got, *self._by_id[:1]]
        return got


def _merge(into: IndexObjects, ho: HopObjects) -> None:
    for name, kv in ho.elements.items():
        into.elements.setdefault(name, {}).update(kv)
    for name, rules in ho.chains.items():
        into.chains.setdefault(name, rules)


def _ranges_of(name: str, rule: IRRule) -> list[tuple[int, int]]:
    for proto in ("tcp", "udp"):
        ranges = proto_ranges(rule.services, proto)
        if ranges is not None and port_set_name(ranges) == name:
            return ranges
    raise KeyError(name)


def _members(state: HostDesiredState) -> int:
    return sum(len(s.addresses) for s in state.sets)


def _elem_key(e: Any) -> str | None:
    if isinstance(e, str):
        return e
    if isinstance(e, dict) and "elem" in e:  # element with attributes (counter/timeout/comment)
        return _elem_key(e["elem"].get("val"))
    return None


def normalized(state: HostDesiredState) -> HostDesiredState:
    """Order-insensitive form for comparisons (set members sorted as strings, as read back)."""
    return replace(
        state,
        sets=tuple(
            replace(s, addresses=tuple(sorted(s.addresses)), cidrs=tuple(sorted(s.cidrs))) for s in state.sets
        ),
    )


__all__ = [
    "BULK_LOAD_MIN_ELEMENTS",
    "FAST_PATH_MAX_ELEMENTS",
    "Book",
    "Membership",
    "NftPlanner",
    "Plan",
    "build_book",
    "normalized",
]
