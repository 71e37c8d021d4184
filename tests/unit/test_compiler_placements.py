"""Placements (migration) are an input of the compiler: a workload placed on an extra host is compiled
there too. Property: after any sequence of resource changes and placement changes, the incremental
compiler equals a fresh compile with the same placements, its deltas chain, and the result is what the
former manager-side overlay gave (the workload's compiled vNICs, rules and sets copied from its host to
the extra host, a vNIC the extra host already had under that ifname left alone)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_compiler_incremental import key_of, normalized, ops, resources

from omniwall.compiler.build import compile_catalog
from omniwall.compiler.hoststate import rule_sets
from omniwall.compiler.incremental import IncrementalCompiler
from omniwall.compiler.ir import HostDesiredState, apply_delta, empty_state
from omniwall.compiler.testing import host, workload
from omniwall.model.catalog import Catalog
from omniwall.model.resources import Vnic

HOSTS = ["h1", "h2", "h3"]
Placements = dict[tuple[str, str], str]


def overlay_reference(
    states: dict[str, HostDesiredState], world: dict[Any, Any], placements: Placements
) -> None:
    """The former manager/overlay.py, as an oracle: copy each placed workload's vNICs (with the rules and
    sets they reference) from its own host's compiled state into the extra host's, in place."""
    for (t, n), dest in sorted(placements.items()):
        w = world.get(("Workload", t, n))
        if w is None or dest not in states or w.spec.host == dest:
            continue
        # Its vNICs as compiled on its own host with no other workload there: a vNIC that loses its
        # ifname to a neighbour at home still goes to the extra host, where that neighbour is absent.
        # (Moving the neighbours away changes no rule list or set: those do not depend on the host.)
        alone = [
            r.model_copy(update={"spec": r.spec.model_copy(update={"host": "elsewhere"})})
            if r.kind == "Workload" and r.spec.host == w.spec.host and r is not w
            else r
            for r in world.values()
        ]
        src = compile_catalog(Catalog.of([*alone, host(w.spec.host)]))[w.spec.host]
        dst = states[dest]
        have = dst.vnic_map()
        add = [v for v in src.vnics if v.workload == f"{t}/{n}" and v.ifname not in have]
        if not add:
            continue
        rules, src_rules = dst.rule_map(), src.rule_map()
        for v in add:
            for i in (*v.egress, *v.ingress):
                rules.setdefault(i, src_rules[i])
        sets, src_sets = dst.set_map(), src.set_map()
        for r in rules.values():
            for s in rule_sets(r):
                sets.setdefault(s, src_sets.get(s) or sets.get(s))  # type: ignore[arg-type]
        vnics = {**have, **{v.ifname: v for v in add}}
        states[dest] = replace(
            dst,
            vnics=tuple(v for _, v in sorted(vnics.items())),
            rules=tuple(r for _, r in sorted(rules.items())),
            sets=tuple(s for _, s in sorted(sets.items())),
        )


@st.composite
def placement_ops(draw: st.DrawFn) -> tuple[str, Any]:
    t = draw(st.sampled_from(["infra", "a", "b"]))
    n = draw(st.sampled_from(["n0", "n1", "n2", "n3"]))
    return ("place", ((t, n), draw(st.sampled_from([None, *HOSTS]))))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(
    initial=st.lists(resources, max_size=20),
    steps=st.lists(st.lists(st.one_of(ops(), placement_ops()), min_size=1, max_size=3), max_size=8),
)
def test_placements_incremental_equals_full_compile_and_the_overlay(
    initial: list[Any], steps: list[Any]
) -> None:
    world = {key_of(r): r for r in [host("h1"), host("h2"), *initial]}
    placements: Placements = {}
    ic = IncrementalCompiler(Catalog.of(world.values()), revision=1)
    revision = 1
    for batch in steps:
        revision += 1
        before = {h: ic.state(h) for h in ic.hosts}
        changed: dict[Any, Any] = {}
        removed: list[tuple[str, str, str]] = []
        for op, arg in batch:
            if op == "place":
                key, dest = arg
                if dest is None:
                    placements.pop(key, None)
                else:
                    placements[key] = dest
            elif op == "put":
                world[key_of(arg)] = arg
                changed[key_of(arg)] = arg
            elif world:
                k = sorted(world)[arg % len(world)]
                del world[k]
                changed.pop(k, None)
                removed.append(k)
        deltas = ic.update(list(changed.values()), removed, revision, placements=dict(placements))
        for h, d in deltas.items():
            new = ic.state(h) if h in ic.hosts else empty_state(h, revision)
            assert apply_delta(before.get(h, empty_state(h, 0)), d) == new
        for h in ic.hosts:
            if h not in deltas:
                assert ic.state(h) == before[h], h
        full = compile_catalog(Catalog.of(world.values()), revision, placements)
        assert {h: normalized(ic.state(h)) for h in ic.hosts} == {h: normalized(s) for h, s in full.items()}
        for i, holders in ic.rule_hosts.items():  # every entry is exact
            assert holders == {h for h, hs in ic.hosts.items() if i in hs.rule_refs}, i
        plain = compile_catalog(Catalog.of(world.values()), revision)
        overlay_reference(plain, world, placements)
        assert plain == full


def test_placing_a_workload_sends_the_extra_host_its_vnic_rules_and_sets_and_clearing_removes_them() -> None:
    from omniwall.compiler.testing import group, policy
    from omniwall.model.resources import Rule

    world = [
        host("h1"),
        host("h2"),
        workload("a", "web", "h1", [Vnic(name="eth0", ips=["10.0.0.1"])], {"tier": "web"}),
        workload("a", "db", "h2", [Vnic(name="eth0", ips=["10.0.0.2"])], {"tier": "db"}),
        group("a", "web", 'tier == "web"'),
        group("a", "db", 'tier == "db"'),
        policy("a", "p", Rule(name="r", sources=["web"], destinations=["db"], action="allow")),
    ]
    ic = IncrementalCompiler(Catalog.of(world), revision=1)
    h2 = ic.state("h2")
    deltas = ic.update([], [], 2, placements={("a", "web"): "h2"})
    assert sorted(deltas) == ["h2"]  # only the destination changes
    d = deltas["h2"]
    assert [u.vnic.workload for u in d.vnic_updates] == ["a/web"]
    placed = d.vnic_updates[0].vnic
    assert placed == ic.state("h1").vnic_map()[placed.ifname]  # the same vNIC as on its own host
    assert set(placed.egress) and set(placed.egress) <= ic.state("h2").rule_map().keys()
    assert ic.state("h2") == apply_delta(h2, d)
    back = ic.update([], [], 3, placements={})
    assert sorted(back) == ["h2"]
    assert normalized(ic.state("h2")) == normalized(h2)
    assert not back["h2"].vnic_updates and [r.ifname for r in back["h2"].vnic_removes] == [
        u.vnic.ifname for u in d.vnic_updates
    ]


def test_a_set_change_reaches_a_host_holding_the_set_only_through_a_placed_workload() -> None:
    """A placed workload's extra host holds the rules of its vNICs, so a set they name reaches it
    (`rule_hosts`), through the set-only fast path."""
    from omniwall.compiler.testing import group, policy
    from omniwall.model.resources import Rule

    db2 = workload("a", "db2", "h1", [Vnic(name="eth0", ips=["10.0.0.3"])], {"tier": "x"})
    world = [
        host("h1"),
        host("h2"),
        host("h3"),
        workload("a", "web", "h1", [Vnic(name="eth0", ips=["10.0.0.1"])], {"tier": "web"}),
        workload("a", "db", "h3", [Vnic(name="eth0", ips=["10.0.0.2"])], {"tier": "db"}),
        db2,
        group("a", "web", 'tier == "web"'),
        group("a", "db", 'tier == "db"'),
        policy(
            "a", "p", Rule(name="r", sources=["web"], destinations=["db"], action="allow", direction="out")
        ),
    ]
    ic = IncrementalCompiler(Catalog.of(world), revision=1, placements={("a", "web"): "h2"})
    assert "g.a.db" in ic.state("h2").set_map()  # h2 holds the rule and its set through the placed web
    h2 = ic.state("h2")
    moved = workload("a", "db2", "h1", [Vnic(name="eth0", ips=["10.0.0.3"])], {"tier": "db"})
    deltas = ic.update([moved], [], 2)  # db2 joins db: the set changes on h1 and h2, not on h3
    assert sorted(deltas) == ["h1", "h2"]
    assert [u.added_addresses for u in deltas["h2"].set_updates] == [("10.0.0.3",)]
    assert ic.state("h2") == apply_delta(h2, deltas["h2"])
    rid = next(iter(ic.state("h2").rule_map()))
    assert ic.rule_hosts[rid] == {"h1", "h2"}
