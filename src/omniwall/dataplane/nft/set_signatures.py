"""PURE: set-membership signatures for the hop index: remote-address identities and per-hop tables.

A linear hop walks its rules one by one, each a set lookup or two: ~0.25 us a rule, paid by every new
connection. The index makes a TCP/UDP connection's judgment cost independent of the rule count, the way
Cilium's ipcache + per-endpoint policy map do, in nftables terms:

- **identity** of a remote address = the set of IR sets (groups) that contain it, the only thing any
  rule can ask about it. Addresses with the same memberships share one identity; its kernel name is a
  digest of the member set names, so it is stable across restarts and independent of other identities.
- **ipcache**: per direction, a verdict map `address -> goto x<d>_<identity>` (a hash map for host
  addresses, an interval map for the networks of CIDR groups).
- **identity chain** `x<d>_<identity>`: one lookup in its map `ifname . l4proto . dport -> goto <path>`,
  whose entries hold, per hop where the identity matters, the first-match outcome precomputed for every
  port interval (category segments and `pass` included).
- **path chain**: the rules the packet would have hit (each `pass` on the way, then the terminal rule or
  the vNIC's default), as counters and the verdict; so counters, ct mark, logs and verdicts are those of
  the linear walk.

The local side of each rule (the source set at egress, the destination set at ingress) is decided at
compile time from the vNIC's own addresses: always true (dropped from the match), never true (the rule
cannot match at this hop), or true for some of its addresses only (that family of the hop is not
indexed). The index is only entered by TCP/UDP packets whose local address is one of the vNIC's own;
everything else takes the linear chains, which stay complete.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby

from omniwall.compiler.ir import HostDesiredState, IRRule, IRSet, IRVnic, ServiceMatch
from omniwall.sim.match import walk

Key = frozenset[str]  # an identity: names of the IR sets holding the address
PORT_MAX = 65535
INDEXED_PROTOS = ("tcp", "udp")
# a terminal step of a path: ("rule", id) for allow/drop/reject (and monitor-mode would-drops),
# ("default", 0) for the vNIC's default action; passes before it: ("pass", id)
Step = tuple[str, int]
Path = tuple[Step, ...]


def identity_tag(key: Key) -> str:
    """Stable short digest of an identity (kernel object names)."""
    return hashlib.sha256("\n".join(sorted(key)).encode()).hexdigest()[:14]


def local_side(rule: IRRule, direction: str) -> str | None:
    return rule.src_set if direction == "egress" else rule.dst_set


def remote_side(rule: IRRule, direction: str) -> str | None:
    return rule.dst_set if direction == "egress" else rule.src_set


# ----------------------------------------------------------------------------------------- membership


class SetMembership:
    """Which IR sets hold an address (host addresses, and the networks of CIDR sets), for local-side
    resolution and identities."""

    def __init__(self, sets: Iterable[IRSet]) -> None:
        self.exact: dict[str, set[str]] = {}
        self.nets: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = []
        for s in sets:
            for a in s.addresses:
                self.exact.setdefault(a, set()).add(s.name)
            for c in s.cidrs:
                with contextlib.suppress(ValueError):  # the kernel refuses the batch carrying it
                    self.nets.append((ipaddress.ip_network(c, strict=False), s.name))

    def of(self, address: str) -> set[str]:
        out = set(self.exact.get(address, ()))
        if self.nets:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return out
            out.update(name for net, name in self.nets if ip.version == net.version and ip in net)
        return out


# ------------------------------------------------------------------------------------------ identities


@dataclass
class Identities:
    """Remote-address identities of one host, restricted to the sets some indexed hop asks about.
    Mutable only through `IndexPlan.move` (the agent's fast path, after the kernel took the change)."""

    exact: dict[str, Key]  # host address -> identity (host addresses of the sets, plus CIDR coverage)
    nets: dict[int, list[tuple[int, int, Key]]]  # family -> disjoint [first, last] ranges (as ints)
    keys: frozenset[Key]
    exact_sets: dict[str, Key] = field(default_factory=dict)  # host address -> sets naming it as such
    refs: Counter[Key] = field(default_factory=Counter)  # identity -> addresses and ranges holding it

    def coverage(self, address: str) -> Key:
        """The sets whose networks hold `address`."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:  # not an address: the kernel refuses the batch that carries it
            return frozenset()
        rs = self.nets.get(ip.version, [])
        i = bisect.bisect_right(rs, (int(ip), 1 << 129)) - 1
        return rs[i][2] if i >= 0 and rs[i][0] <= int(ip) <= rs[i][1] else frozenset()


def _net_ranges(nets: Sequence[tuple[int, int, str]]) -> list[tuple[int, int, Key]]:
    """Disjoint ranges, each with the set names of every network covering it (adjacent equal merged)."""
    bounds = sorted({b for lo, hi, _ in nets for b in (lo, hi + 1)})
    out: list[tuple[int, int, Key]] = []
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k], bounds[k + 1] - 1
        key = frozenset(n for a, b, n in nets if a <= lo and hi <= b)
        if not key:
            continue
        if out and out[-1][2] == key and out[-1][1] + 1 == lo:
            out[-1] = (out[-1][0], hi, key)
        else:
            out.append((lo, hi, key))
    return out


def build_identities(sets: Iterable[IRSet], relevant: frozenset[str]) -> Identities:
    exact_sets: dict[str, set[str]] = {}
    raw_nets: dict[int, list[tuple[int, int, str]]] = {4: [], 6: []}
    for s in sets:
        if s.name not in relevant:
            continue
        for a in s.addresses:
            exact_sets.setdefault(a, set()).add(s.name)
        for c in s.cidrs:
            try:
                n = ipaddress.ip_network(c, strict=False)
            except ValueError:  # the kernel refuses the batch carrying it
                continue
            raw_nets[n.version].append((int(n.network_address), int(n.broadcast_address), s.name))
    nets = {fam: _net_ranges(v) for fam, v in raw_nets.items()}
    ids = Identities(exact={}, nets=nets, keys=frozenset())
    any_nets = any(nets.values())
    for a, names in exact_sets.items():
        own = frozenset(names)
        ids.exact_sets[a] = own
        # a host address inside a CIDR group's network is in that group too
        ids.exact[a] = own | ids.coverage(a) if any_nets else own
    ids.refs.update(ids.exact.values())
    for rs in nets.values():
        ids.refs.update(k for _, _, k in rs)
    ids.keys = frozenset(ids.refs)
    return ids


# ------------------------------------------------------------------------------------------- hop plans


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted disjoint ranges, overlapping and adjacent ones merged (nft refuses overlapping intervals)."""
    out: list[list[int]] = []
    for lo, hi in sorted((min(a, b), max(a, b)) for a, b in ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(a, b) for a, b in out]


def port_ranges(services: tuple[ServiceMatch, ...], proto: str) -> list[tuple[int, int]] | None:
    """Destination port ranges of `proto` the services match: [(0, 65535)] for every port, None: none."""
    if not services or any(s.protocol == "any" for s in services):
        return [(0, PORT_MAX)]
    svcs = [s for s in services if s.protocol == proto]
    if not svcs:
        return None
    if any(not s.ports for s in svcs):
        return [(0, PORT_MAX)]
    return merge_ranges(r for s in svcs for r in s.ports)


@dataclass(frozen=True)
class HopRule:
    """A rule as the index sees it at one hop: local side already decided true."""

    rule: IRRule
    remote: str | None  # remote set, None = any remote address
    ports: dict[str, list[tuple[int, int]]]  # per indexed protocol it matches; absent: not that protocol


@dataclass
class HopPlan:
    vnic: IRVnic
    direction: str
    families: tuple[int, ...]  # families whose TCP/UDP traffic takes the index (others: linear only)
    segments: list[list[HopRule]]  # the hop's category segments, rules the index can meet, in order
    entries: dict[Key, list[tuple[str, int, int, Path]]] = field(default_factory=dict)

    @property
    def any_segments(self) -> list[list[HopRule]]:
        """The same segments, only rules that match any remote address (an identity the hop never asks
        about meets only these)."""
        return [[h for h in seg if h.remote is None] for seg in self.segments]


def _own(vnic: IRVnic, fam: int) -> list[str]:
    return [a for a in vnic.addresses if (":" in a) == (fam == 6)]


def plan_hop(
    vnic: IRVnic,
    direction: str,
    rules: Sequence[IRRule],
    segs: Sequence[Sequence[IRRule]],
    mem: SetMembership,
) -> HopPlan:
    """Resolve the local side of every rule of one hop; `segs` are `rules` cut into category segments."""
    fams: list[int] = []
    keep: dict[int, bool] | None = None  # rule id -> local side always true (False: never true)
    for fam in (4, 6):
        own = _own(vnic, fam)
        if not own:
            continue
        mine: dict[int, bool] | None = {}
        for r in rules:
            ls = local_side(r, direction)
            hits = [True] if ls is None else [ls in mem.of(a) for a in own]
            if any(hits) and not all(hits):  # true for some addresses only: this family stays linear
                mine = None
                break
            assert mine is not None
            mine[r.id] = all(hits)
        # both families share the index chains: they must agree on every rule
        if mine is not None and (keep is None or keep == mine):
            keep = mine
            fams.append(fam)
    if not fams:
        return HopPlan(vnic, direction, (), [])
    out_segs: list[list[HopRule]] = []
    assert keep is not None
    for seg in segs:
        cur: list[HopRule] = []
        for r in seg:
            if not keep.get(r.id, False):
                continue
            ports = {p: pr for p in INDEXED_PROTOS if (pr := port_ranges(r.services, p)) is not None}
            if ports:
                cur.append(HopRule(r, remote_side(r, direction), ports))
        out_segs.append(cur)
    return HopPlan(vnic, direction, tuple(fams), out_segs)


def port_table(segs: Sequence[Sequence[HopRule]], proto: str, key: Key | None) -> list[tuple[int, int, Path]]:
    """The hop's outcome over the whole port space of `proto` for a remote address of identity `key`
    (None: an identity no rule of the hop names): disjoint [lo, hi] ranges covering 0..65535, each with
    its path; adjacent ranges with the same path merged.

    The semantics is not written here: on each elementary port interval (between two rule bounds) the
    rules that match there are handed to the sim's first-match walk (`sim.match.walk`: first match wins,
    `pass` goes on at the next category segment), the one judge of a hop. What is precomputed is only
    which rules match: this identity's remote side, the protocol, the port interval."""
    cands: list[tuple[int, HopRule, list[tuple[int, int]]]] = []
    for si, seg in enumerate(segs):
        for h in seg:
            ranges = h.ports.get(proto)
            if ranges is None or (h.remote is not None and (key is None or h.remote not in key)):
                continue
            cands.append((si, h, ranges))
    opens: dict[int, list[int]] = {}
    closes: dict[int, list[int]] = {}
    for pos, (_, _, ranges) in enumerate(cands):
        for lo, hi in ranges:  # disjoint per rule (port_ranges merges them)
            opens.setdefault(lo, []).append(pos)
            if hi < PORT_MAX:
                closes.setdefault(hi + 1, []).append(pos)
    bounds = sorted({0, *opens, *closes})
    active: list[int] = []  # positions of the rules matching on the current interval, in hop order
    out: list[tuple[int, int, Path]] = []
    for k, lo in enumerate(bounds):
        for pos in closes.get(lo, ()):
            del active[bisect.bisect_left(active, pos)]
        for pos in opens.get(lo, ()):
            bisect.insort(active, pos)
        hi = bounds[k + 1] - 1 if k + 1 < len(bounds) else PORT_MAX
        segments = [[cands[p][1] for p in grp] for _, grp in groupby(active, key=lambda p: cands[p][0])]
        passes, hit = walk(segments, _always)
        path: Path = (
            *(("pass", h.rule.id) for h in passes),
            ("default", 0) if hit is None else ("rule", hit.rule.id),
        )
        if out and out[-1][2] == path:
            out[-1] = (out[-1][0], hi, path)
        else:
            out.append((lo, hi, path))
    return out


def _always(_: HopRule) -> bool:
    return True


def hop_entries(plan: HopPlan, keys: Iterable[Key]) -> None:
    """Fill `plan.entries` for every identity among `keys` that some rule of the hop names."""
    named = {h.remote for seg in plan.segments for h in seg if h.remote is not None}
    if not named:
        return
    for key in keys:
        if key.isdisjoint(named):
            continue
        rows: list[tuple[str, int, int, Path]] = []
        for proto in INDEXED_PROTOS:
            rows += [(proto, lo, hi, path) for lo, hi, path in port_table(plan.segments, proto, key)]
        plan.entries[key] = rows


@dataclass(frozen=True)
class IndexPlan:
    identities: Identities
    hops: dict[tuple[str, str], HopPlan]  # (ifname, direction) -> plan (only hops with an index)

    _named: dict[str, frozenset[str]] = field(default_factory=dict, compare=False, repr=False)

    def named(self, direction: str) -> frozenset[str]:
        """The remote sets the hops of `direction` name: an identity with one of them has a chain."""
        got = self._named.get(direction)
        if got is None:
            got = self._named[direction] = self._names(direction)
        return got

    def _names(self, direction: str) -> frozenset[str]:
        return frozenset(
            h.remote
            for (_, d), hp in self.hops.items()
            if d == direction
            for seg in hp.segments
            for h in seg
            if h.remote is not None
        )

    def member_moves(self, changes: Mapping[str, tuple[set[str], set[str]]]) -> list[Move] | None:
        """Host addresses joining/leaving sets (`address -> (sets joined, sets left)`, networks
        unchanged) as identity moves, when every new identity already has its chains and no old one is
        left without holders (nothing to create or delete); None otherwise (render the delta)."""
        ids = self.identities
        relevant = self.named("egress") | self.named("ingress")
        moves: list[Move] = []
        refs = Counter[Key]()
        for addr, (joined, left) in changes.items():
            old_sets = ids.exact_sets.get(addr, frozenset())
            new_sets = (old_sets | (joined & relevant)) - left
            if new_sets == old_sets:
                continue
            old = ids.exact.get(addr)
            new = (new_sets | ids.coverage(addr)) if new_sets else None
            if new is not None and new not in ids.keys:
                return None
            if old is not None:
                refs[old] -= 1
            if new is not None:
                refs[new] += 1
            moves.append(Move(addr, old, new, new_sets))
        if any(ids.refs[k] + d <= 0 for k, d in refs.items()):
            return None
        return moves

    def move(self, moves: Sequence[Move]) -> None:
        """Record `member_moves`' result (after the kernel took it)."""
        ids = self.identities
        for m in moves:
            if m.sets:
                ids.exact_sets[m.address] = m.sets
            else:
                ids.exact_sets.pop(m.address, None)
            if m.old is not None:
                ids.refs[m.old] -= 1
            if m.new is None:
                ids.exact.pop(m.address, None)
            else:
                ids.exact[m.address] = m.new
                ids.refs[m.new] += 1


@dataclass(frozen=True)
class Move:
    """One host address changing identity: `old`/`new` None = no host-address ipcache entry."""

    address: str
    old: Key | None
    new: Key | None
    sets: Key  # the relevant sets naming it as a host address, after the move


def plan_index(
    state: HostDesiredState,
    segments_of: Mapping[tuple[str, str], tuple[Sequence[IRRule], Sequence[Sequence[IRRule]]]],
) -> IndexPlan:
    """The index of a whole host. `segments_of[(ifname, direction)]`: the hop's rules and segments."""
    mem = SetMembership(state.sets)
    hops: dict[tuple[str, str], HopPlan] = {}
    relevant: set[str] = set()
    for v in state.vnics:
        for d in ("egress", "ingress"):
            rules, segs = segments_of[(v.ifname, d)]
            plan = plan_hop(v, d, rules, segs, mem)
            if plan.families:
                hops[(v.ifname, d)] = plan
                relevant.update(h.remote for seg in plan.segments for h in seg if h.remote is not None)
    ids = build_identities(state.sets, frozenset(relevant))
    for plan in hops.values():
        hop_entries(plan, ids.keys)
    return IndexPlan(ids, hops)


__all__ = [
    "INDEXED_PROTOS",
    "HopPlan",
    "HopRule",
    "Identities",
    "IndexPlan",
    "Key",
    "Move",
    "Path",
    "SetMembership",
    "build_identities",
    "hop_entries",
    "identity_tag",
    "local_side",
    "merge_ranges",
    "plan_hop",
    "plan_index",
    "port_ranges",
    "port_table",
]
