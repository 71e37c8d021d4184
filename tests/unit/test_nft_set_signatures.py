"""The hop index's plan (nft/set_signatures.py) held to the judge of a hop (the sim's).

The property test builds random host states, plans the index (`render.index_plan`) and, for every
indexed hop, remote address, protocol and boundary port, follows the path the kernel would take
(ipcache hash entry, then network entry, then the any-remote chains; then the identity's port interval)
and compares it with the judge: `sim.evaluate.judge_hop` (verdict, rule) and the sim's hop walk
(`HopIndex.decide`: the `pass` rules met on the way), on states hypothesis draws. Focused tests pin
`port_table`, `plan_hop`'s local-side resolution, `build_identities` and `IndexPlan.member_moves`/`move`.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from omniwall.compiler.ir import CATEGORIES, HostDesiredState, IRRule, IRSet, IRVnic, ServiceMatch
from omniwall.dataplane.nft.names import IPCACHE, MAP_ANY, identity_chain, identity_map
from omniwall.dataplane.nft.render import hop_segments, index_objects_of, index_plan, segments
from omniwall.dataplane.nft.render_index import any_chain, diff_index
from omniwall.dataplane.nft.set_signatures import (
    PORT_MAX,
    HopPlan,
    HopRule,
    IndexPlan,
    Key,
    Move,
    Path,
    SetMembership,
    build_identities,
    identity_tag,
    plan_hop,
    plan_index,
    port_ranges,
    port_table,
)
from omniwall.sim.evaluate import judge_hop
from omniwall.sim.match import StateIndex
from omniwall.sim.packet import Packet

# ------------------------------------------------------------------------------------------- builders


def R(
    rid: int,
    action: str = "allow",
    src: str | None = None,
    dst: str | None = None,
    services: tuple[ServiceMatch, ...] = (),
    category: str = "application",
    **kw: bool,
) -> IRRule:
    return IRRule(rid, "t", "p", f"r{rid}", category, action, src, dst, services, **kw)  # type: ignore[arg-type]


def V(ifname: str, *addresses: str, egress=(), ingress=(), default="drop", monitor=False) -> IRVnic:
    return IRVnic(
        ifname,
        f"t/{ifname}",
        "t",
        addresses,
        tuple(egress),
        tuple(ingress),
        default,  # type: ignore[arg-type]
        monitor,
    )


def state(vnics: Sequence[IRVnic], rules: Sequence[IRRule], sets: Sequence[IRSet] = ()) -> HostDesiredState:
    return HostDesiredState(
        "h",
        1,
        tuple(sorted(vnics, key=lambda v: v.ifname)),
        tuple(sorted(rules, key=lambda r: r.id)),
        tuple(sorted(sets, key=lambda s: s.name)),
    )


def TCP(*ranges: tuple[int, int]) -> ServiceMatch:
    return ServiceMatch("tcp", tuple(ranges))


def UDP(*ranges: tuple[int, int]) -> ServiceMatch:
    return ServiceMatch("udp", tuple(ranges))


# ------------------------------------------------------------------------------------ random states

V4_POOL = [f"10.0.0.{i}" for i in range(1, 13)] + ["10.1.2.3", "10.1.9.9", "10.2.0.1"]
V6_POOL = [f"fd00::{i:x}" for i in range(1, 9)] + ["fd00:1::5", "fd00:2::1"]
CIDRS = [
    "10.0.0.0/29",
    "10.0.0.4/30",  # inside the one above
    "10.0.0.8/29",  # adjacent to it
    "10.1.0.0/16",
    "10.1.2.0/24",  # inside 10.1.0.0/16
    "fd00::/125",
    "fd00::/64",  # holds fd00::/125
    "fd00:1::/64",
]
OUTSIDE = ["192.0.2.9", "2001:db8::9"]  # in no set, ever
PORTS = [0, 1, 22, 53, 79, 80, 443, 1000, 1023, 8000, 8080, 65534, 65535]


def _ports(rng: random.Random) -> tuple[tuple[int, int], ...]:
    """One port, one range, or a list of both (ranges may overlap)."""

    def one() -> tuple[int, int]:
        if rng.random() < 0.5:
            p = rng.choice(PORTS) if rng.random() < 0.7 else rng.randrange(65536)
            return (p, p)
        a, b = sorted((rng.choice(PORTS), rng.choice(PORTS)))
        return (a, b)

    return tuple(one() for _ in range(rng.choice((1, 1, 2, 3))))


def _services(rng: random.Random) -> tuple[ServiceMatch, ...]:
    kind = rng.randrange(10)
    if kind == 0:
        return ()
    if kind == 1:
        return (ServiceMatch("any"),)
    if kind == 2:
        return (ServiceMatch("icmp", (), 8),)
    if kind == 3:
        return (ServiceMatch("icmp"), TCP(*_ports(rng)))
    if kind == 4:
        return (TCP(),)  # every tcp port
    if kind == 5:
        return (TCP(*_ports(rng)), UDP(*_ports(rng)))
    if kind == 6:
        return (UDP(*_ports(rng)),)
    if kind == 7:
        return (TCP(*_ports(rng)), TCP(*_ports(rng)))  # two services of one protocol
    return (TCP(*_ports(rng)),)


def random_state(rng: random.Random) -> HostDesiredState:
    sets = []
    for k in range(rng.randint(2, 6)):
        addrs: set[str] = set(rng.sample(V4_POOL, rng.randint(0, 5)))
        if rng.random() < 0.5:
            addrs.update(rng.sample(V6_POOL, rng.randint(1, 3)))
        cidrs = set(rng.sample(CIDRS, rng.randint(1, 2))) if rng.random() < 0.4 else set()
        sets.append(IRSet(f"g{k}", tuple(sorted(addrs)), tuple(sorted(cidrs))))
    names = [s.name for s in sets]

    def side() -> str | None:
        return rng.choice(names) if rng.random() < 0.6 else None

    rules: list[IRRule] = []
    for cat in CATEGORIES:
        for _ in range(rng.choice((0, 1, 2, 3, 4))):
            action = rng.choice(("allow", "allow", "drop", "reject", "pass", "pass"))
            rules.append(
                R(
                    len(rules) + 1,
                    action,
                    side(),
                    side(),
                    _services(rng),
                    cat,
                    monitor=rng.random() < 0.2,
                    log=rng.random() < 0.2,
                    stateful=rng.random() > 0.1,
                )
            )
    vnics = []
    v4s = rng.sample(V4_POOL, 4)
    v6s = rng.sample(V6_POOL, 4)
    for k in range(rng.randint(1, 4)):
        shape = rng.random()
        if shape < 0.1:
            addresses: tuple[str, ...] = (v6s[k],)
        elif shape < 0.5:
            addresses = (v4s[k], v6s[k])
        elif shape < 0.6:
            addresses = (v4s[k], rng.choice(V4_POOL))
        else:
            addresses = (v4s[k],)

        def pick() -> tuple[int, ...]:
            return tuple(r.id for r in rules if rng.random() < 0.6)  # category order kept

        vnics.append(
            V(
                f"ow{k}",
                *sorted(set(addresses)),
                egress=pick(),
                ingress=pick(),
                default=rng.choice(("allow", "drop", "reject")),
                monitor=rng.random() < 0.3,
            )
        )
    used = {i for v in vnics for i in (*v.egress, *v.ingress)}
    rules = [r for r in rules if r.id in used]
    named = {n for r in rules for n in (r.src_set, r.dst_set) if n is not None}
    return state(vnics, rules, [s for s in sets if s.name in named])


# ------------------------------------------------------------------------------------ index lookup


def used_keys(plan: IndexPlan) -> dict[str, set[Key]]:
    """Identities with chains per direction (as render_index.index_objects gives them ipcache entries)."""
    out: dict[str, set[Key]] = {"egress": set(), "ingress": set()}
    for (_, d), hp in plan.hops.items():
        out[d].update(hp.entries)
    return out


def index_table(plan: IndexPlan, used: dict[str, set[Key]], hp: HopPlan, remote: str, proto: str):
    """The port table the kernel's index gives `remote` at hop `hp`: the ipcache's hash entry (only
    identities with chains in that direction have one), else its network entry, else the any-remote
    chains; an identity chain without an entry for this hop also goes to the any-remote chains."""
    ids = plan.identities
    used_d = used[hp.direction]
    key: Key | None = ids.exact.get(remote)
    if key is None or key not in used_d:
        key = ids.coverage(remote)
        if key not in used_d:
            key = None
    rows = hp.entries.get(key) if key is not None else None
    if rows is None:
        return port_table(hp.any_segments, proto, None)
    return [(lo, hi, path) for pr, lo, hi, path in rows if pr == proto]


def check_table(table: list[tuple[int, int, Path]]) -> None:
    """Disjoint, sorted, covering 0..65535, adjacent intervals with the same path merged."""
    assert table[0][0] == 0
    assert table[-1][1] == PORT_MAX
    for (_, hi, path), (lo2, _, path2) in itertools.pairwise(table):
        assert lo2 == hi + 1
        assert path != path2
    for lo, hi, path in table:
        assert lo <= hi
        assert path and all(k == "pass" for k, _ in path[:-1]) and path[-1][0] in ("rule", "default")


def path_at(table: list[tuple[int, int, Path]], port: int) -> Path:
    hits = [path for lo, hi, path in table if lo <= port <= hi]
    assert len(hits) == 1, (port, table)
    return hits[0]


def sample_remotes(st: HostDesiredState) -> list[str]:
    out = {*V4_POOL, *V6_POOL, *OUTSIDE}
    for s in st.sets:
        out.update(s.addresses)
        for c in s.cidrs:
            n = ipaddress.ip_network(c, strict=False)
            out.update(str(a) for a in (n.network_address, n.broadcast_address, n.network_address + 3))
    return sorted(out)


def sample_ports(st: HostDesiredState) -> list[int]:
    out = {0, PORT_MAX}
    for r in st.rules:
        for s in r.services:
            for lo, hi in s.ports:
                out.update((lo - 1, lo, hi, hi + 1))
    return sorted(p for p in out if 0 <= p <= PORT_MAX)


# -------------------------------------------------------------------------------- property: the sim


def _expected_verdict(rule: IRRule) -> str:
    return "allow" if rule.action == "allow" or rule.monitor else rule.action


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=hst.integers(min_value=0, max_value=2**32 - 1))
def test_index_paths_match_the_judge(seed: int) -> None:
    """Property: every indexed hop, remote address and boundary port of a random host state: the
    index's precomputed path is the judge's (the sim's hop walk, `HopIndex.decide`): the same passes,
    then the same rule with the same verdict, or the default."""
    rng = random.Random(seed)
    st = random_state(rng)
    sim_index = StateIndex(st)
    plan = index_plan(st)
    used = used_keys(plan)
    vmap, rmap = st.vnic_map(), st.rule_map()
    remotes = sample_remotes(st)
    ports = sample_ports(st)
    checked = 0
    for (ifname, d), hp in sorted(plan.hops.items()):
        v = vmap[ifname]
        assert hp.vnic == v and hp.direction == d and hp.families
        for fam in hp.families:
            own = [a for a in v.addresses if ipaddress.ip_address(a).version == fam]
            assert own, "an indexed family needs an own address"
            for remote in remotes:
                if ipaddress.ip_address(remote).version != fam:
                    continue
                local = rng.choice(own)
                src, dst = (local, remote) if d == "egress" else (remote, local)
                for proto in ("tcp", "udp"):
                    table = index_table(plan, used, hp, remote, proto)
                    check_table(table)
                    for port in ports:
                        p = Packet(src, dst, proto, 40000, port)
                        path = path_at(table, port)
                        hop = (
                            sim_index.vnic(ifname).egress if d == "egress" else sim_index.vnic(ifname).ingress
                        )
                        met, hit = hop.decide(p)
                        passes = [cr.rule.id for cr in met]
                        terminal = None if hit is None else hit.rule.id
                        hv = judge_hop(sim_index, ifname, d, p)  # type: ignore[arg-type]
                        where = (seed, ifname, d, p.describe(), path)
                        assert [rid for kind, rid in path[:-1]] == passes, where
                        kind, rid = path[-1]
                        if kind == "default":
                            assert terminal is None and hv.default and hv.rule is None, where
                            assert hv.verdict == ("allow" if v.default_monitor else v.default_action), where
                        else:
                            assert kind == "rule" and rid == terminal, where
                            assert hv.rule is not None and hv.rule.id == rid, where
                            assert rmap[rid].action != "pass", where
                            assert hv.verdict == _expected_verdict(rmap[rid]), where
                        checked += 1
    # an indexed hop always has an own address and samples of its family (a degenerate generator is
    # caught by test_random_states_index_some_hops)
    assert checked or not plan.hops


def test_random_states_index_some_hops() -> None:
    """The generator is not degenerate: most states have indexed hops with identity entries."""
    with_hops = with_entries = 0
    for seed in range(60):
        plan = index_plan(random_state(random.Random(seed)))
        with_hops += bool(plan.hops)
        with_entries += any(hp.entries for hp in plan.hops.values())
    assert with_hops >= 50
    assert with_entries >= 30


# ------------------------------------------------------------------------- render_index: the objects


def _verdict_of(rules: list[dict]) -> str:
    """The verdict statement ending a path chain (its last rule)."""
    last = rules[-1]["expr"]
    for name in ("return", "drop", "reject"):
        if any(name in e for e in last):
            return "allow" if name == "return" else name
    raise AssertionError(f"no verdict in {last}")


@pytest.mark.parametrize("seed", range(0, 60, 3))
def test_index_objects_realize_the_plan(seed: int) -> None:
    """The kernel objects are the lookups `index_table` models: ipcache entries only for identities
    with chains in that direction, one map element per hop and port interval, path chains counting the
    passed rules and ending in the terminal's verdict."""
    st = random_state(random.Random(seed))
    plan = index_plan(st)
    used = used_keys(plan)
    objs = index_objects_of(st, 1)
    rmap, vmap = st.rule_map(), st.vnic_map()
    ids = plan.identities

    def fam_of(a: str) -> int:
        return ipaddress.ip_address(a).version

    for d in ("egress", "ingress"):
        for fam in (4, 6):
            assert objs.elements[IPCACHE[(d, fam, False)]] == {
                a: identity_chain(d, identity_tag(k))
                for a, k in ids.exact.items()
                if k in used[d] and fam_of(a) == fam
            }
            ranges = objs.elements[IPCACHE[(d, fam, True)]]
            assert sorted(ranges.values()) == sorted(
                identity_chain(d, identity_tag(k)) for _, _, k in ids.nets[fam] if k in used[d]
            )
            for _net, lo, hi in ranges:
                assert fam_of(lo) == fam_of(hi) == fam
        assert objs.elements[MAP_ANY[d]] == {i: any_chain(d, i, 0) for (i, dd) in plan.hops if dd == d}
        for key in used[d]:
            chain = identity_chain(d, identity_tag(key))
            assert chain in objs.chains
            want = {
                (i, proto, lo, hi): path
                for (i, dd), hp in plan.hops.items()
                if dd == d and key in hp.entries
                for proto, lo, hi, path in hp.entries[key]
            }
            h, r, f = (objs.elements[identity_map(d, identity_tag(key), k)] for k in ("h", "r", "f"))
            # every decided interval: its exact (one port) or interval entry, else the hop's fallback
            got = {}
            for i, proto, lo, hi in want:
                exact = h.get(("cat", i, proto, lo)) if lo == hi else None
                got[(i, proto, lo, hi)] = exact or r.get(("cat", i, proto, (lo, hi))) or f[("cat", i, proto)]
            assert len(h) + len(r) <= len(want)
            for elem, pc in got.items():
                ifname, path = elem[0], want[elem]
                rules = objs.chains[pc]
                comments = [r["comment"] for r in rules]
                collapsed = [c for k, c in enumerate(comments) if k == 0 or comments[k - 1] != c]
                assert collapsed == [str(rid) if kind != "default" else "default" for kind, rid in path]
                kind, rid = path[-1]
                if kind == "default":
                    v = vmap[ifname]
                    expect = "allow" if v.default_monitor else v.default_action
                else:
                    expect = _expected_verdict(rmap[rid])
                assert _verdict_of(rules) == expect, (path, rules)
    # identical objects: nothing to change
    diff = diff_index(objs, objs)
    assert not (diff.early or diff.create or diff.late or diff.cleanup)


# ------------------------------------------------------------------------------------------- decide


def H(rid: int, action: str = "allow", remote: str | None = None, tcp=None, udp=None) -> HopRule:
    ports = {}
    if tcp is not None:
        ports["tcp"] = list(tcp)
    if udp is not None:
        ports["udp"] = list(udp)
    return HopRule(R(rid, action), remote, ports)


def test_decide_pass_skips_the_rest_of_its_segment() -> None:
    segs = [
        [H(1, "pass", tcp=[(80, 90)]), H(2, "drop", tcp=[(0, PORT_MAX)])],
        [H(3, "allow", tcp=[(85, 100)])],
    ]
    assert port_table(segs, "tcp", None) == [
        (0, 79, (("rule", 2),)),
        (80, 84, (("pass", 1), ("default", 0))),
        (85, 90, (("pass", 1), ("rule", 3))),
        (91, PORT_MAX, (("rule", 2),)),
    ]
    # udp: no rule has udp ports, everything is the default
    assert port_table(segs, "udp", None) == [(0, PORT_MAX, (("default", 0),))]


def test_decide_later_segment_catches_what_earlier_ones_leave() -> None:
    segs = [
        [H(1, "allow", tcp=[(22, 22)])],
        [H(2, "pass", tcp=[(1000, 2000)])],
        [H(3, "reject", tcp=[(0, 1500)]), H(4, "allow", tcp=[(0, PORT_MAX)])],
    ]
    assert port_table(segs, "tcp", None) == [
        (0, 21, (("rule", 3),)),
        (22, 22, (("rule", 1),)),
        (23, 999, (("rule", 3),)),
        (1000, 1500, (("pass", 2), ("rule", 3))),
        (1501, 2000, (("pass", 2), ("rule", 4))),
        (2001, PORT_MAX, (("rule", 4),)),
    ]


def test_decide_two_passes_then_default() -> None:
    segs = [[H(1, "pass", tcp=[(10, 20)])], [H(2, "pass", tcp=[(15, 30)])], []]
    assert port_table(segs, "tcp", None) == [
        (0, 9, (("default", 0),)),
        (10, 14, (("pass", 1), ("default", 0))),
        (15, 20, (("pass", 1), ("pass", 2), ("default", 0))),
        (21, 30, (("pass", 2), ("default", 0))),
        (31, PORT_MAX, (("default", 0),)),
    ]


def test_decide_merges_adjacent_intervals_with_the_same_path() -> None:
    segs = [[H(1, "allow", tcp=[(10, 20), (21, 30)]), H(2, "allow", tcp=[(31, 40)])]]
    assert port_table(segs, "tcp", None) == [
        (0, 9, (("default", 0),)),
        (10, 30, (("rule", 1),)),
        (31, 40, (("rule", 2),)),
        (41, PORT_MAX, (("default", 0),)),
    ]
    # a rule whose whole range an earlier one took leaves no trace, and the default around it merges
    segs = [[H(1, "drop", tcp=[(100, 200)]), H(2, "allow", tcp=[(150, 160)])]]
    assert port_table(segs, "tcp", None) == [
        (0, 99, (("default", 0),)),
        (100, 200, (("rule", 1),)),
        (201, PORT_MAX, (("default", 0),)),
    ]


def test_decide_remote_side_follows_the_identity() -> None:
    segs = [[H(1, "drop", remote="bad", tcp=[(0, PORT_MAX)]), H(2, "allow", tcp=[(443, 443)])]]
    allow443 = [
        (0, 442, (("default", 0),)),
        (443, 443, (("rule", 2),)),
        (444, PORT_MAX, (("default", 0),)),
    ]
    assert port_table(segs, "tcp", None) == allow443
    assert port_table(segs, "tcp", frozenset({"good"})) == allow443
    assert port_table(segs, "tcp", frozenset({"good", "bad"})) == [(0, PORT_MAX, (("rule", 1),))]


@pytest.mark.parametrize("seed", range(20))
def test_decide_covers_the_port_space_and_matches_a_port_by_port_walk(seed: int) -> None:
    rng = random.Random(1000 + seed)
    segs: list[list[HopRule]] = []
    rid = 0
    for _ in range(rng.randint(1, 4)):
        seg = []
        for _ in range(rng.randint(0, 5)):
            rid += 1
            ranges = port_ranges(_services(rng), "tcp")
            if ranges is None:
                continue
            remote = rng.choice((None, "a", "b"))
            seg.append(H(rid, rng.choice(("allow", "drop", "reject", "pass")), remote, tcp=ranges))
        segs.append(seg)
    for key in (None, frozenset({"a"}), frozenset({"a", "b"})):
        table = port_table(segs, "tcp", key)
        check_table(table)
        bounds = {0, PORT_MAX}
        for seg in segs:
            for h in seg:
                for lo, hi in h.ports["tcp"]:
                    bounds.update(p for p in (lo - 1, lo, hi, hi + 1) if 0 <= p <= PORT_MAX)
        for port in sorted(bounds):
            want: list[tuple[str, int]] = []
            for seg in segs:
                hit = next(
                    (
                        h
                        for h in seg
                        if (h.remote is None or (key is not None and h.remote in key))
                        and any(lo <= port <= hi for lo, hi in h.ports["tcp"])
                    ),
                    None,
                )
                if hit is None:
                    continue
                if hit.rule.action == "pass":
                    want.append(("pass", hit.rule.id))
                    continue
                want.append(("rule", hit.rule.id))
                break
            else:
                want.append(("default", 0))
            assert path_at(table, port) == tuple(want), (seed, key, port)


def test_port_ranges() -> None:
    assert port_ranges((), "tcp") == [(0, PORT_MAX)]
    assert port_ranges((ServiceMatch("any"),), "udp") == [(0, PORT_MAX)]
    assert port_ranges((ServiceMatch("icmp"),), "tcp") is None
    assert port_ranges((UDP((53, 53)),), "tcp") is None
    assert port_ranges((TCP((80, 80)), TCP()), "tcp") == [(0, PORT_MAX)]
    assert port_ranges((TCP((80, 90), (85, 100), (101, 101), (200, 300)),), "tcp") == [(80, 101), (200, 300)]


# ----------------------------------------------------------------------------- plan_hop: local side

OWN = ("10.0.0.1", "10.0.0.2", "fd00::1")
SETS = [
    IRSet("all", ("10.0.0.1", "10.0.0.2", "fd00::1")),
    IRSet("all_net", (), ("10.0.0.0/24", "fd00::/64")),  # holds them through networks
    IRSet("none", ("10.0.0.9", "fd00::9")),
    IRSet("some4", ("10.0.0.1", "fd00::1")),  # one of the two IPv4 addresses
    IRSet("only4", ("10.0.0.1", "10.0.0.2")),  # every IPv4 address, no IPv6 one
    IRSet("peer", ("10.0.0.7", "fd00::7")),
]


def _plan(direction: str, rules: list[IRRule]) -> HopPlan:
    v = V("ow0", *OWN)
    return plan_hop(v, direction, rules, segments(rules), SetMembership(SETS))


def _kept(hp: HopPlan) -> list[tuple[int, str | None]]:
    return [(h.rule.id, h.remote) for seg in hp.segments for h in seg]


@pytest.mark.parametrize("direction", ["egress", "ingress"])
def test_plan_hop_local_side_always_true_keeps_never_true_drops(direction: str) -> None:
    def rule(rid: int, local: str | None, remote: str | None) -> IRRule:
        src, dst = (local, remote) if direction == "egress" else (remote, local)
        return R(rid, "allow", src, dst, (TCP((80, 80)),))

    rules = [
        rule(1, "all", "peer"),
        rule(2, "none", "peer"),
        rule(3, "all_net", None),
        rule(4, None, "peer"),
        rule(5, "peer", None),
    ]
    hp = _plan(direction, rules)
    assert hp.families == (4, 6)
    assert _kept(hp) == [(1, "peer"), (3, None), (4, "peer")]


@pytest.mark.parametrize("direction", ["egress", "ingress"])
def test_plan_hop_partial_local_side_leaves_that_family_linear(direction: str) -> None:
    def rule(rid: int, local: str | None) -> IRRule:
        src, dst = (local, None) if direction == "egress" else (None, local)
        return R(rid, "drop", src, dst)

    # some4 holds 10.0.0.1 but not 10.0.0.2: IPv4 stays linear; it holds fd00::1: IPv6 keeps the rule
    hp = _plan(direction, [rule(1, "all"), rule(2, "some4")])
    assert hp.families == (6,)
    assert _kept(hp) == [(1, None), (2, None)]
    # the local side's answer differs between families (true for IPv4, false for IPv6): the second
    # family cannot share the decision tables and stays linear
    hp = _plan(direction, [rule(1, "only4")])
    assert hp.families == (4,)
    assert _kept(hp) == [(1, None)]
    # partial for IPv4 first, then a rule whose answer differs between families: IPv6 alone indexed
    hp = _plan(direction, [rule(2, "some4"), rule(1, "only4")])
    assert hp.families == (6,)
    assert _kept(hp) == [(2, None)]
    # a vNIC with only IPv4 addresses, one of them outside the local set: nothing indexed
    v = V("ow1", "10.0.0.1", "10.0.0.2")
    rules = [rule(1, "some4")]
    hp = plan_hop(v, direction, rules, segments(rules), SetMembership(SETS))
    assert hp.families == () and hp.segments == []


# regression: an aborted IPv4 pass once left its verdicts behind and un-indexed IPv6 as well
@pytest.mark.parametrize("direction", ["egress", "ingress"])
def test_plan_hop_family_resolution_does_not_depend_on_rule_order(direction: str) -> None:
    def rule(rid: int, local: str) -> IRRule:
        src, dst = (local, None) if direction == "egress" else (None, local)
        return R(rid, "drop", src, dst)

    # only4: true for IPv4, false for IPv6; some4: partial for IPv4, true for IPv6 (fd00::1). In the
    # order (some4, only4) this gives ((6,), [(2, None)]) (see the test above), and so here
    hp = _plan(direction, [rule(1, "only4"), rule(2, "some4")])
    assert (hp.families, _kept(hp)) == ((6,), [(2, None)])


def test_plan_hop_rules_without_tcp_udp_stay_out() -> None:
    rules = [
        R(1, "allow", None, "peer", (ServiceMatch("icmp"),)),
        R(2, "allow", None, "peer", (UDP((53, 53)),)),
    ]
    hp = _plan("egress", rules)
    assert _kept(hp) == [(2, "peer")]
    assert hp.segments[0][0].ports == {"udp": [(53, 53)]}


# ------------------------------------------------------------------------------------- identities


def test_host_address_inside_a_network_has_both_groups() -> None:
    ids = build_identities(
        [IRSet("a", ("10.0.0.5", "10.9.0.1")), IRSet("n", (), ("10.0.0.0/24",))], frozenset({"a", "n"})
    )
    assert ids.exact["10.0.0.5"] == {"a", "n"}
    assert ids.exact_sets["10.0.0.5"] == {"a"}
    assert ids.exact["10.9.0.1"] == {"a"}
    assert ids.coverage("10.0.0.77") == {"n"}
    assert ids.coverage("10.0.1.0") == frozenset()
    assert ids.keys == {frozenset({"a", "n"}), frozenset({"a"}), frozenset({"n"})}


def test_networks_split_at_overlaps() -> None:
    def ip(a: str) -> int:
        return int(ipaddress.ip_address(a))

    ids = build_identities(
        [
            IRSet("big", (), ("10.0.0.0/16", "fd00::/64")),
            IRSet("small", (), ("10.0.1.0/24", "fd00::/64")),
            IRSet("halves", (), ("10.5.0.0/25", "10.5.0.128/25")),  # adjacent: one range
        ],
        frozenset({"big", "small", "halves"}),
    )
    assert ids.nets[4] == [
        (ip("10.0.0.0"), ip("10.0.0.255"), {"big"}),
        (ip("10.0.1.0"), ip("10.0.1.255"), {"big", "small"}),
        (ip("10.0.2.0"), ip("10.0.255.255"), {"big"}),
        (ip("10.5.0.0"), ip("10.5.0.255"), {"halves"}),
    ]
    assert ids.nets[6] == [(ip("fd00::"), ip("fd00::ffff:ffff:ffff:ffff"), {"big", "small"})]
    assert ids.coverage("10.0.1.9") == {"big", "small"}
    assert ids.coverage("10.0.2.0") == {"big"}
    assert ids.coverage("fd00::1") == {"big", "small"}
    assert ids.exact == {}


def test_identities_only_use_relevant_sets() -> None:
    sets = [
        IRSet("a", ("10.0.0.1", "10.0.0.2")),
        IRSet("x", ("10.0.0.1", "10.0.0.3"), ("10.0.0.0/24",)),
    ]
    ids = build_identities(sets, frozenset({"a"}))
    assert ids.exact == {"10.0.0.1": {"a"}, "10.0.0.2": {"a"}}
    assert ids.nets == {4: [], 6: []}
    assert ids.keys == {frozenset({"a"})}
    assert all(k <= {"a"} for k in ids.keys)


# --------------------------------------------------------------------------------- member moves


def _moves_state(a: tuple[str, ...], b: tuple[str, ...], cidr: tuple[str, ...] = ()) -> HostDesiredState:
    """One vNIC whose ingress names `a` and `b` (and `n`) on the remote side; `other` is named by no
    rule at a remote side (only as the local side, which its own address is in)."""
    rules = [
        R(1, "allow", "a", None, (TCP((80, 80)),)),
        R(2, "drop", "b", None),
        R(3, "allow", "n", None),
        R(4, "allow", None, "other"),
    ]
    sets = [IRSet("a", a), IRSet("b", b), IRSet("n", (), cidr), IRSet("other", ("10.9.0.1",))]
    return state([V("ow0", "10.9.0.1", ingress=(1, 2, 3, 4))], rules, sets)


def _fresh_plan(st: HostDesiredState) -> IndexPlan:
    return plan_index(st, hop_segments(st))  # not the render cache: `move` changes the plan in place


A, B = frozenset({"a"}), frozenset({"b"})


def test_move_to_an_existing_identity() -> None:
    plan = _fresh_plan(_moves_state(("10.0.0.1", "10.0.0.2"), ("10.0.0.3",)))
    assert plan.identities.refs[A] == 2 and plan.identities.refs[B] == 1
    moves = plan.member_moves({"10.0.0.1": ({"b"}, {"a"})})
    assert moves == [Move("10.0.0.1", A, B, B)]
    plan.move(moves)
    ids = plan.identities
    assert ids.exact["10.0.0.1"] == B
    assert ids.exact_sets["10.0.0.1"] == B
    assert ids.refs[A] == 1 and ids.refs[B] == 2


def test_move_out_of_every_set_and_into_an_irrelevant_one() -> None:
    plan = _fresh_plan(_moves_state(("10.0.0.1", "10.0.0.2"), ("10.0.0.3",)))
    # joining a set no hop names at the remote side changes no identity
    assert plan.member_moves({"10.0.0.5": ({"other"}, set())}) == []
    moves = plan.member_moves({"10.0.0.2": (set(), {"a"})})
    assert moves == [Move("10.0.0.2", A, None, frozenset())]
    plan.move(moves)
    ids = plan.identities
    assert "10.0.0.2" not in ids.exact and "10.0.0.2" not in ids.exact_sets
    assert ids.refs[A] == 1


def test_move_into_a_network_identity() -> None:
    """Host addresses inside `n`'s network carry `n` in their identity through every move."""
    plan = _fresh_plan(_moves_state(("10.0.0.1", "10.0.0.2"), ("10.0.0.3",), ("10.0.0.0/30",)))
    an = frozenset({"a", "n"})
    assert plan.identities.exact["10.0.0.1"] == an
    moves = plan.member_moves({"10.0.0.3": ({"a"}, {"b"})})
    assert moves is None  # 10.0.0.3 was b's only holder ({b, n}): that identity would be retired
    moves = plan.member_moves({"10.0.0.2": ({"b"}, {"a"})})
    assert moves == [Move("10.0.0.2", an, frozenset({"b", "n"}), B)]


def test_move_needing_a_new_identity_returns_none() -> None:
    plan = _fresh_plan(_moves_state(("10.0.0.1", "10.0.0.2"), ("10.0.0.3",)))
    assert plan.member_moves({"10.0.0.1": ({"b"}, set())}) is None  # {a, b}: no such identity
    assert plan.member_moves({"10.0.0.7": ({"a", "b"}, set())}) is None
    assert plan.identities.exact["10.0.0.1"] == A  # nothing recorded


def test_move_leaving_an_identity_without_holders_returns_none() -> None:
    plan = _fresh_plan(_moves_state(("10.0.0.1", "10.0.0.2"), ("10.0.0.3",)))
    assert plan.member_moves({"10.0.0.3": ({"a"}, {"b"})}) is None  # b's only holder
    assert plan.member_moves({"10.0.0.3": (set(), {"b"})}) is None
    # both holders of a at once
    assert plan.member_moves({"10.0.0.1": ({"b"}, {"a"}), "10.0.0.2": ({"b"}, {"a"})}) is None
    # one of them is fine
    assert plan.member_moves({"10.0.0.1": ({"b"}, {"a"})}) is not None


def test_moved_plan_still_matches_the_sim() -> None:
    """After `move`, the plan (carried to the new state, as the backend does) gives the new state's
    sim verdicts."""
    old = _moves_state(("10.0.0.1", "10.0.0.2"), ("10.0.0.3",))
    new = _moves_state(("10.0.0.2",), ("10.0.0.1", "10.0.0.3"))
    plan = _fresh_plan(old)
    moves = plan.member_moves({"10.0.0.1": ({"b"}, {"a"})})
    assert moves is not None
    plan.move(moves)
    used = used_keys(plan)
    hp = plan.hops[("ow0", "ingress")]
    for remote in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"):
        for port in (79, 80, 81):
            p = Packet(remote, "10.9.0.1", "tcp", 40000, port)
            path = path_at(index_table(plan, used, hp, remote, "tcp"), port)
            hv = judge_hop(new, "ow0", "ingress", p)
            want = ("default", 0) if hv.rule is None else ("rule", hv.rule.id)
            assert path[-1] == want, (remote, port, path, hv)
    fresh = _fresh_plan(new)
    assert plan.identities.exact == fresh.identities.exact
    assert plan.identities.exact_sets == fresh.identities.exact_sets
    assert +plan.identities.refs == +fresh.identities.refs
