"""PURE: the hop index (identity.py) as nftables objects, for a full table and as a difference.

Per indexed hop and family, chain `<hop>_x4`/`_x6` (entered from the hop's entry chain instead of the
linear `<hop>_0v4`): TCP/UDP to/from one of the vNIC's own addresses looks the remote address up in the
ipcache (goto the identity chain), anything else goes to the linear chains. An identity chain looks up
`ifname . l4proto . dport` in its map (goto a path chain); an identity the hop never names goes to the
hop's any-remote chains `<hop>_a0`, `<hop>_a1`, ... (the rules that match every remote address, in their
category segments, ending in the hop's default).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from omniwall.compiler.ir import HostDesiredState, IRRule, IRVnic
from omniwall.dataplane.nft.expr import Json, T
from omniwall.dataplane.nft.expr import goto as _goto
from omniwall.dataplane.nft.expr import match as _match
from omniwall.dataplane.nft.expr import meta as _meta
from omniwall.dataplane.nft.expr import payload as _payload
from omniwall.dataplane.nft.expr import rule as _rule
from omniwall.dataplane.nft.names import (
    IPCACHE,
    IPCACHE_CHAIN,
    MAP_ANY,
    identity_chain,
    identity_map,
    path_chain,
    vnic_chain,
)
from omniwall.dataplane.nft.set_signatures import (
    INDEXED_PROTOS,
    HopPlan,
    IndexPlan,
    Key,
    Path,
    identity_tag,
    plan_index,
)

DIRECTIONS = ("egress", "ingress")
_IFKEY = {"egress": "iifname", "ingress": "oifname"}


def linear_chain(direction: str, ifname: str, fam: int) -> str:
    return vnic_chain(direction, ifname, f"0v{fam}")


def index_chain(direction: str, ifname: str, fam: int) -> str:
    return vnic_chain(direction, ifname, f"x{fam}")


def any_chain(direction: str, ifname: str, k: int) -> str:
    return vnic_chain(direction, ifname, f"a{k}")


# --------------------------------------------------------------------------------- per-vNIC chains


def hop_chains(
    plan: HopPlan, render_rule: Any, shapes: Any, log_group: int, flow_group: int | None = None
) -> dict[str, list[Json]]:
    """The index chains of one hop: `<hop>_x<fam>` per indexed family, and the any-remote segments.
    `render_rule(rule, next_chain, shapes, log_group)` is render.render_rule (passed in: no cycle)."""
    v, d = plan.vnic, plan.direction
    chains: dict[str, list[Json]] = {}
    local_field = "saddr" if d == "egress" else "daddr"
    for fam in plan.families:
        ip = "ip" if fam == 4 else "ip6"
        own = sorted(a for a in v.addresses if (":" in a) == (fam == 6))
        lin = linear_chain(d, v.ifname, fam)
        # one own address: a plain compare (no set lookup: every lookup is an indirect call)
        mine: Any = own[0] if len(own) == 1 else {"set": own}
        chains[index_chain(d, v.ifname, fam)] = [
            _rule([_match(_payload(ip, local_field), mine, "!="), _goto(lin)], "foreign"),
            # two compares, not `!= { tcp, udp }`: an anonymous set per hop costs the kernel a walk of
            # the whole transaction when a rule binds it (quadratic in a full load)
            _rule([*(_match(_meta("l4proto"), p, "!=") for p in INDEXED_PROTOS), _goto(lin)], "other"),
            _rule([_goto(IPCACHE_CHAIN[(d, fam)])], "ipcache"),
        ]  # fmt: skip
    if plan.families:
        segs = plan.any_segments
        tail = vnic_chain(d, v.ifname, "d")
        names = [any_chain(d, v.ifname, k) for k in range(max(1, len(segs)))]
        for k, name in enumerate(names):
            nxt = names[k + 1] if k + 1 < len(names) else tail
            body: list[Json] = []
            for h in segs[k] if segs else []:
                body += render_rule(_bare(h.rule), nxt, shapes, log_group, hop=d, flow_group=flow_group)
            body.append(_rule([_goto(nxt)], "next"))
            chains[name] = body
    return chains


def _bare(rule: IRRule) -> IRRule:
    """The rule with both address sides gone (decided at compile time at this hop)."""
    return replace(rule, src_set=None, dst_set=None)


# ------------------------------------------------------------------------------------- host objects


@dataclass
class IndexObjects:
    """Everything the index adds to the table beside the per-vNIC chains."""

    maps: dict[str, Json] = field(default_factory=dict)  # name -> declaration body
    chains: dict[str, list[Json]] = field(default_factory=dict)  # identity and path chains
    elements: dict[str, dict[Any, str]] = field(default_factory=dict)  # map -> {key: goto target}


def map_decl(name: str, keytype: Any, interval: bool) -> Json:
    body: Json = {**T, "name": name, "type": keytype, "map": "verdict"}
    if interval:
        body["flags"] = ["interval"]
    return body


def _path_rules(path: Path, vnic: IRVnic, rmap: Mapping[int, IRRule], render_rule: Any,
                render_default: Any, log_group: int, hop: str,
                flow_group: int | None) -> list[Json]:  # fmt: skip
    out: list[Json] = []
    for kind, rid in path:
        if kind == "pass":
            out.append(_rule([{"counter": None}], str(rid)))
        elif kind == "rule":
            rule = replace(_bare(rmap[rid]), services=())
            out += render_rule(rule, "", {}, log_group, hop=hop, flow_group=flow_group)
        else:
            out += render_default(vnic, log_group, hop=hop, flow_group=flow_group)
    return out


def _digest(rules: list[Json]) -> str:
    return hashlib.sha256(json.dumps(rules, sort_keys=True).encode()).hexdigest()[:16]


def _int_to_addr(fam: int, value: int) -> str:
    return str(ipaddress.IPv4Address(value) if fam == 4 else ipaddress.IPv6Address(value))


@dataclass
class HopObjects:
    """What one indexed hop adds to the index: its elements in MAP_ANY and in the identity maps (all
    keyed by its ifname), the path chains they point at (shared by digest with other hops), and the
    identities it names."""

    elements: dict[str, dict[Any, str]] = field(default_factory=dict)
    chains: dict[str, list[Json]] = field(default_factory=dict)
    keys: frozenset[Key] = frozenset()


def hop_objects(
    hp: HopPlan,
    rmap: Mapping[int, IRRule],
    render_rule: Any,
    render_default: Any,
    log_group: int,
    flow_group: int | None = None,
) -> HopObjects:
    ifname, d = hp.vnic.ifname, hp.direction
    out = HopObjects(elements={MAP_ANY[d]: {ifname: any_chain(d, ifname, 0)}})
    path_names: dict[Path, str] = {}

    def chain_of(path: Path) -> str:
        chain = path_names.get(path)
        if chain is None:
            rules = _path_rules(path, hp.vnic, rmap, render_rule, render_default, log_group, d, flow_group)
            chain = path_chain(_digest(rules))
            out.chains.setdefault(chain, rules)
            path_names[path] = chain
        return chain

    for key, rows in hp.entries.items():
        tag = identity_tag(key)
        maps = {k: out.elements.setdefault(identity_map(d, tag, k), {}) for k in MAP_KINDS}
        for proto in INDEXED_PROTOS:
            mine = [(lo, hi, path) for p, lo, hi, path in rows if p == proto]
            fallback = _most_ports(mine)
            maps["f"][("cat", ifname, proto)] = chain_of(fallback)
            for lo, hi, path in mine:
                if path == fallback:
                    continue  # the fallback map has it
                if lo == hi:
                    maps["h"][("cat", ifname, proto, lo)] = chain_of(path)
                else:
                    maps["r"][("cat", ifname, proto, (lo, hi))] = chain_of(path)
    out.keys = frozenset(hp.entries)
    return out


def identity_objects(direction: str, key: Key) -> tuple[dict[str, Json], str, list[Json]]:
    """An identity's three maps (declarations) and its chain (name, rules) in one direction."""
    d = direction
    tag = identity_tag(key)
    ifkey = _meta(_IFKEY[d])
    port_key = {"concat": [ifkey, _meta("l4proto"), _payload("th", "dport")]}
    proto_key = {"concat": [ifkey, _meta("l4proto")]}
    h, r, f = (identity_map(d, tag, k) for k in MAP_KINDS)
    maps = {
        h: map_decl(h, ["ifname", "inet_proto", "inet_service"], False),
        r: map_decl(r, ["ifname", "inet_proto", "inet_service"], True),
        f: map_decl(f, ["ifname", "inet_proto"], False),
    }
    # hash lookups first: an interval (pipapo) lookup costs in proportion to its entries
    rules = [
        _rule([{"vmap": {"key": port_key, "data": f"@{h}"}}], "port"),
        _rule([{"vmap": {"key": port_key, "data": f"@{r}"}}], "ports"),
        _rule([{"vmap": {"key": proto_key, "data": f"@{f}"}}], "other ports"),
        _rule([{"vmap": {"key": ifkey, "data": f"@{MAP_ANY[d]}"}}], "any"),
        _rule([{"counter": None}, {"drop": None}], "unindexed"),  # never reached: fail closed
    ]
    return maps, identity_chain(d, tag), rules


def index_objects(
    state: HostDesiredState,
    plan: IndexPlan,
    render_rule: Any,
    render_default: Any,
    log_group: int,
    flow_group: int | None = None,
    hops: dict[tuple[str, str], HopObjects] | None = None,
) -> IndexObjects:
    """The whole index of a host. `hops` (filled when given): each hop's own contribution, so a later
    change can replace just the hops it touches (planner.py)."""
    out = IndexObjects()
    for (_d, fam, nets), name in IPCACHE.items():
        keytype = "ipv4_addr" if fam == 4 else "ipv6_addr"
        out.maps[name] = map_decl(name, keytype, nets)
        out.elements[name] = {}
    for d in DIRECTIONS:
        out.maps[MAP_ANY[d]] = map_decl(MAP_ANY[d], "ifname", False)
        out.elements[MAP_ANY[d]] = {}
    out.chains.update(ipcache_chains())
    rmap = state.rule_map()
    used: dict[str, set[Key]] = {d: set() for d in DIRECTIONS}
    for (ifname, d), hp in sorted(plan.hops.items()):
        ho = hop_objects(hp, rmap, render_rule, render_default, log_group, flow_group)
        if hops is not None:
            hops[(ifname, d)] = ho
        used[d] |= ho.keys
        for name, kv in ho.elements.items():
            out.elements.setdefault(name, {}).update(kv)
        for name, rules in ho.chains.items():
            out.chains.setdefault(name, rules)
    for d in DIRECTIONS:
        for key in sorted(used[d], key=identity_tag):
            maps, chain, rules = identity_objects(d, key)
            out.maps.update(maps)
            out.chains[chain] = rules
        out.elements.update(ipcache_elements(plan, d))
    return out


def ipcache_chains() -> dict[str, list[Json]]:
    """The shared lookup chains `ipx_<d><fam>`, entered by goto from every indexed hop's `<hop>_x<fam>`
    once the local side and the protocol are known: the remote address's identity chain (ipcache, then
    the networks' ipcache), else the hop's any-remote chains (MAP_ANY: every indexed hop has an entry,
    keyed by its ifname). Why shared and not in each hop's chain: when a transaction adds a rule with a
    verdict or a goto element, the kernel checks the table for loops at commit, walking every verdict
    map once per chain that references it; ~34k ipcache entries referenced by 200 hops made that
    ~400 ms per commit, one reference per map makes it ~1/100 of that."""
    out: dict[str, list[Json]] = {}
    for (d, fam), name in IPCACHE_CHAIN.items():
        ip = "ip" if fam == 4 else "ip6"
        remote = _payload(ip, "daddr" if d == "egress" else "saddr")
        out[name] = [
            _rule([{"vmap": {"key": remote, "data": f"@{IPCACHE[(d, fam, False)]}"}}], "ipcache"),
            _rule([{"vmap": {"key": remote, "data": f"@{IPCACHE[(d, fam, True)]}"}}], "ipcache"),
            _rule([{"vmap": {"key": _meta(_IFKEY[d]), "data": f"@{MAP_ANY[d]}"}}], "any"),
            _rule([{"counter": None}, {"drop": None}], "unindexed"),  # never reached: fail closed
        ]
    return out


def ipcache_elements(plan: IndexPlan, d: str) -> dict[str, dict[Any, str]]:
    """The ipcache maps of direction `d`: address (or network range) -> its identity's chain."""
    out: dict[str, dict[Any, str]] = {IPCACHE[(d, fam, nets)]: {} for fam in (4, 6) for nets in (False, True)}
    ids = plan.identities
    targets: dict[Key, str | None] = {}  # many addresses share an identity: its chain once

    def target(key: Key | None) -> str | None:
        if key is None:
            return None
        if key not in targets:
            targets[key] = ipcache_target(plan, key, d)
        return targets[key]

    for addr, key in ids.exact.items():
        if (chain := target(key)) is not None:
            fam = 6 if ":" in addr else 4
            out[IPCACHE[(d, fam, False)]][addr] = chain
    for fam, ranges in ids.nets.items():
        for lo, hi, key in ranges:
            if (chain := target(key)) is not None:
                rk = ("net", _int_to_addr(fam, lo), _int_to_addr(fam, hi))
                out[IPCACHE[(d, fam, True)]][rk] = chain
    return out


def ipcache_target(plan: IndexPlan, key: Key | None, direction: str) -> str | None:
    """The identity chain `direction`'s ipcache sends an address of identity `key` to; None: no entry
    (no hop of that direction names one of its sets, so it has no chain there)."""
    if key is None or key.isdisjoint(plan.named(direction)):
        return None
    return identity_chain(direction, identity_tag(key))


MAP_KINDS = ("h", "r", "f")


def _most_ports(rows: Sequence[tuple[int, int, Path]]) -> Path:
    """The path covering most ports (ties: the first): it goes to the fallback map, so the exact and
    interval maps only hold the exceptions."""
    span: dict[Path, int] = {}
    for lo, hi, path in rows:
        span[path] = span.get(path, 0) + hi - lo + 1
    return max(span, key=lambda p: span[p])


def element_json(key: Any) -> Any:
    """A map key as libnftables JSON: an address or ifname (str), ("net", first, last), or
    ("cat", part, ...) where a part (lo, hi) is a port range."""
    if isinstance(key, str):
        return key
    if key[0] == "net":
        return {"range": [key[1], key[2]]}
    return {"concat": [{"range": list(p)} if isinstance(p, tuple) else p for p in key[1:]]}


def render_index_full(objs: IndexObjects) -> tuple[list[Json], list[Json]]:
    """(declarations and chains, elements): chains must exist before elements point at them, and the
    per-vNIC chains (targets of MAP_ANY) are declared between the two by the caller."""
    # chains before maps: libnftables 1.0.6 fails (ENOENT) on an interval map declared before the chain
    # its element's verdict names, within one batch
    decl: list[Json] = [{"add": {"chain": {**T, "name": n}}} for n in objs.chains]
    decl += [{"add": {"map": body}} for body in objs.maps.values()]
    for n, rules in objs.chains.items():
        decl += [{"add": {"rule": {**T, "chain": n, **r}}} for r in rules]
    elems: list[Json] = []
    for name, kv in objs.elements.items():
        if kv:
            items = [[element_json(k), _goto(v)] for k, v in sorted(kv.items(), key=lambda x: str(x[0]))]
            elems.append({"add": {"element": {**T, "name": name, "elem": items}}})
    return decl, elems


@dataclass
class IndexDiff:
    early: list[Json]  # element deletes (before chains they point at go away)
    create: list[Json]  # new maps, new chains and their rules
    late: list[Json]  # element adds (after every chain they point at exists)
    cleanup: list[Json]  # obsolete chains flushed and deleted, then obsolete maps


def diff_index(old: IndexObjects, new: IndexObjects) -> IndexDiff:
    early: list[Json] = []
    late: list[Json] = []
    for name in sorted(old.elements.keys() | new.elements.keys()):
        o, n = old.elements.get(name, {}), new.elements.get(name, {})
        gone = [k for k, v in o.items() if n.get(k) != v]
        added = [(k, v) for k, v in n.items() if o.get(k) != v]
        if gone and name in new.maps:  # a map that goes away takes its elements with it
            elem = [element_json(k) for k in gone]
            early.append({"delete": {"element": {**T, "name": name, "elem": elem}}})
        if added:
            items = [[element_json(k), _goto(v)] for k, v in added]
            late.append({"add": {"element": {**T, "name": name, "elem": items}}})
    fresh = [c for c in new.chains if c not in old.chains]
    create: list[Json] = [{"add": {"chain": {**T, "name": c}}} for c in fresh]  # before maps: see above
    create += [{"add": {"map": b}} for m, b in new.maps.items() if m not in old.maps]
    for c in fresh:
        create += [{"add": {"rule": {**T, "chain": c, **r}}} for r in new.chains[c]]
    stale = [c for c in old.chains if c not in new.chains]
    # rules referencing stale maps go first, then the maps (and the references their elements hold),
    # then the chains nothing points at any more
    cleanup: list[Json] = [{"flush": {"chain": {**T, "name": c}}} for c in stale]
    cleanup += [{"delete": {"map": {**T, "name": m}}} for m in old.maps if m not in new.maps]
    cleanup += [{"delete": {"chain": {**T, "name": c}}} for c in stale]
    return IndexDiff(early, create, late, cleanup)


# ------------------------------------------------------------------------------------------- plans

_PLAN_CACHE: list[tuple[HostDesiredState, IndexPlan]] = []
_PLAN_LOCK = threading.Lock()  # backends of several namespaces may render in parallel threads


def plan_of(state: HostDesiredState, segments_of: Any) -> IndexPlan:
    """The state's index plan, cached for the last few states (render_delta asks for old and new)."""
    with _PLAN_LOCK:
        for st, plan in _PLAN_CACHE:
            if st is state:
                return plan
    plan = plan_index(state, segments_of(state))
    with _PLAN_LOCK:
        _PLAN_CACHE.append((state, plan))
        del _PLAN_CACHE[:-8]
    return plan


def carry_plan(old: HostDesiredState, new: HostDesiredState, plan: IndexPlan) -> None:
    """`plan` (old's, members moved in place by the caller) is now `new`'s; `old` loses its entry,
    as the plan no longer describes it."""
    with _PLAN_LOCK:
        _PLAN_CACHE[:] = [(st, p) for st, p in _PLAN_CACHE if st is not old and p is not plan]
        _PLAN_CACHE.append((new, plan))
        del _PLAN_CACHE[:-8]


def hop_signature(plan: IndexPlan, ifname: str) -> tuple[Any, ...]:
    """What the per-vNIC index chains of `ifname` depend on (a change: re-render the vNIC)."""
    out: list[Any] = []
    for d in DIRECTIONS:
        hp = plan.hops.get((ifname, d))
        if hp is None:
            out.append(None)
            continue
        segs: Sequence[Sequence[Any]] = hp.any_segments
        out.append((hp.families, tuple(tuple(h.rule.id for h in s) for s in segs)))
    return tuple(out)


__all__ = [
    "MAP_KINDS",
    "HopObjects",
    "IndexDiff",
    "IndexObjects",
    "any_chain",
    "carry_plan",
    "diff_index",
    "element_json",
    "hop_chains",
    "hop_objects",
    "hop_signature",
    "identity_objects",
    "index_chain",
    "index_objects",
    "ipcache_chains",
    "ipcache_elements",
    "ipcache_target",
    "linear_chain",
    "map_decl",
    "plan_of",
    "render_index_full",
]
