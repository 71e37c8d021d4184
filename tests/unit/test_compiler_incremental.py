"""Property tests: after any sequence of resource changes, the incremental compiler's per-host states
equal a fresh `compile_catalog` of the same resources, every delta applied to the previous state gives
the new one (and equals `ir.diff`), and hosts without a delta did not change. Also: IR JSON round trip,
determinism under input order."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omniwall.compiler.build import compile_catalog
from omniwall.compiler.incremental import IncrementalCompiler
from omniwall.compiler.ir import HostDesiredState, apply_delta, diff, empty_state
from omniwall.model.catalog import Catalog
from omniwall.model.resources import (
    Group,
    GroupSpec,
    Host,
    Metadata,
    Policy,
    PolicySpec,
    Rule,
    Service,
    ServiceSpec,
    Tenant,
    TenantSpec,
    Vnic,
    Workload,
    WorkloadSpec,
)

TENANTS = ["infra", "a", "b"]
HOSTS = ["h1", "h2", "h3"]
NAMES = ["n0", "n1", "n2", "n3"]
SELECTORS = [
    'tier == "web"',
    'tier == "db"',
    'env == "prod" && tier in {"web", "db"}',
    "all()",
    "!has(env)",
    'user == "alice"',
    'tier != "web" || env == "dev"',
]
IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.1.1", "2001:db8::1", "2001:db8::2"]
CIDRS = ["192.168.0.0/24", "10.0.0.0/30", "10.0.0.3/32", "2001:db8::/64", "172.16.0.0/12"]


def md(name: str, tenant: str, labels: dict[str, str] | None = None) -> Metadata:
    return Metadata(name=name, tenant=tenant, labels=labels or {})


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    t = draw(st.sampled_from(TENANTS))
    labels = {}
    if draw(st.booleans()):
        labels["tier"] = draw(st.sampled_from(["web", "db", "cache"]))
    if draw(st.booleans()):
        labels["env"] = draw(st.sampled_from(["prod", "dev"]))
    attrs: dict[str, Any] = {}
    if draw(st.booleans()):
        attrs["user"] = draw(st.sampled_from(["alice", "bob", ["alice", "carol"], ["bob"]]))
    nv = draw(st.integers(0, 2))
    vnics = [
        Vnic(name=f"eth{i}", ips=draw(st.lists(st.sampled_from(IPS), max_size=2, unique=True)))
        for i in range(nv)
    ]
    return Workload(
        metadata=md(draw(st.sampled_from(NAMES)), t, labels),
        spec=WorkloadSpec(host=draw(st.sampled_from([*HOSTS, "h9"])), vnics=vnics, attributes=attrs),
    )


def refs(t: str) -> st.SearchStrategy[str]:
    own = st.sampled_from([f"g{i}" for i in range(3)])
    other = st.sampled_from(["infra/g0", "infra/g1", "a/g0", "b/g1"])
    return st.one_of(own, own, other)


@st.composite
def groups(draw: st.DrawFn) -> Group:
    t = draw(st.sampled_from(TENANTS))
    return Group(
        metadata=md(draw(st.sampled_from(["g0", "g1", "g2"])), t),
        spec=GroupSpec(
            selector=draw(st.none() | st.sampled_from(SELECTORS)),
            workloads=draw(st.lists(st.sampled_from([*NAMES, "a/n0"]), max_size=2, unique=True)),
            groups=draw(st.lists(refs(t), max_size=2, unique=True)),
            cidrs=draw(st.lists(st.sampled_from(CIDRS), max_size=2, unique=True)),
            shareWith=draw(st.sampled_from([[], ["*"], ["a"]])) if t == "infra" else [],
        ),
    )


@st.composite
def peers(draw: st.DrawFn, t: str) -> list[str]:
    if draw(st.integers(0, 3)) == 0:
        return ["any"]
    return draw(
        st.lists(st.one_of(refs(t), st.sampled_from(CIDRS + IPS[:2])), min_size=1, max_size=2, unique=True)
    )


@st.composite
def rules(draw: st.DrawFn, t: str, name: str) -> Rule:
    return Rule(
        name=name,
        sources=draw(peers(t)),
        destinations=draw(peers(t)),
        services=draw(
            st.lists(st.sampled_from(["tcp/80", "udp/53", "icmp/8", "any", "s0", "infra/s0"]), max_size=2)
        ),
        action=draw(st.sampled_from(["allow", "drop", "reject", "pass"])),
        direction=draw(st.sampled_from(["in", "out", "both"])),
        appliedTo=draw(st.sampled_from([[], [], ["g0"], ["g1", "infra/g0"]])),
        log=draw(st.booleans()),
        disabled=draw(st.integers(0, 5)) == 0,
    )


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    t = draw(st.sampled_from(TENANTS))
    names = draw(st.lists(st.sampled_from(["r0", "r1", "r2"]), max_size=3, unique=True))
    cats = ["emergency", "infrastructure"] if t == "infra" else ["environment", "application"]
    return Policy(
        metadata=md(draw(st.sampled_from(["p0", "p1"])), t),
        spec=PolicySpec(
            category=draw(st.sampled_from(cats)),
            priority=draw(st.sampled_from([0, 10, 1000])),
            appliedTo=draw(st.sampled_from([[], ["g2"]])),
            stateful=draw(st.booleans()),
            rules=[draw(rules(t, n)) for n in names],
        ),
    )


@st.composite
def services(draw: st.DrawFn) -> Service:
    return Service(
        metadata=md("s0", draw(st.sampled_from(TENANTS))),
        spec=draw(
            st.sampled_from(
                [ServiceSpec(protocol="tcp", ports=[443]), ServiceSpec(protocol="udp", ports=["1000-2000"])]
            )
        ),
    )


tenants = st.builds(
    lambda n, mode, d: Tenant(metadata=md(n, "infra"), spec=TenantSpec(mode=mode, defaultAction=d)),
    st.sampled_from(TENANTS),
    st.sampled_from(["enforce", "monitor"]),
    st.sampled_from(["drop", "allow", "reject"]),
)
hosts = st.builds(lambda n: Host(metadata=md(n, "infra")), st.sampled_from([*HOSTS, "h9"]))
resources = st.one_of(
    workloads(),
    workloads(),
    workloads(),
    groups(),
    groups(),
    policies(),
    policies(),
    services(),
    tenants,
    hosts,
)


def key_of(r: Any) -> tuple[str, str, str]:
    return r.key


@st.composite
def ops(draw: st.DrawFn) -> tuple[str, Any]:
    if draw(st.integers(0, 4)) == 0:
        return ("del", draw(st.integers(0, 10_000)))
    return ("put", draw(resources))


def normalized(s: HostDesiredState) -> HostDesiredState:
    return dataclasses.replace(s, revision=0)


def group_view(ic: IncrementalCompiler) -> dict[Any, Any]:
    """Every group's members (as workload keys), addresses and networks: what span and sets are made of,
    compared even where no rule shows it."""
    g = ic.groups
    return {
        k: (sorted(g.key_of[w] for w in n.wids), sorted(n.addr.counts.items()), n.addr.nets)
        for k, n in g.nodes.items()
    }


def check_against_full(ic: IncrementalCompiler, world: dict[Any, Any], revision: int) -> None:
    fresh = IncrementalCompiler(Catalog.of(world.values()), revision)
    full = fresh.states()
    assert full == compile_catalog(Catalog.of(world.values()), revision)
    assert sorted(ic.hosts) == sorted(full)
    for h, s in full.items():
        assert normalized(ic.state(h)) == normalized(s), h
    assert group_view(ic) == group_view(fresh)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(
    initial=st.lists(resources, max_size=25),
    steps=st.lists(st.lists(ops(), min_size=1, max_size=3), max_size=8),
)
def test_incremental_equals_full_compile_and_deltas_chain(initial: list[Any], steps: list[list[Any]]) -> None:
    world = {key_of(r): r for r in [Host(metadata=md("h1", "infra")), *initial]}
    ic = IncrementalCompiler(Catalog.of(world.values()), revision=1)
    check_against_full(ic, world, 1)
    revision = 1
    for batch in steps:
        revision += 1
        before = {h: ic.state(h) for h in ic.hosts}
        changed: dict[Any, Any] = {}
        removed: list[tuple[str, str, str]] = []
        for op, arg in batch:
            if op == "put":
                world[key_of(arg)] = arg
                changed[key_of(arg)] = arg
            elif world:
                k = sorted(world)[arg % len(world)]
                del world[k]
                changed.pop(k, None)
                if k[0] == "Tenant":
                    k = ("Tenant", k[1], k[2])
                removed.append(k)
        # a resource removed and then put again in the same batch is sent as both: removals apply first
        deltas = ic.update(list(changed.values()), removed, revision)
        for h, d in deltas.items():
            base = before.get(h, empty_state(h, 0))
            if h in ic.hosts:
                new = ic.state(h)
                assert apply_delta(base, d) == new
                assert d == diff(base, new)
                assert new.revision == revision
            else:
                assert apply_delta(base, d) == empty_state(h, revision)
        for h in ic.hosts:
            if h not in deltas:
                assert ic.state(h) == before[h]
        check_against_full(ic, world, revision)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(resources, max_size=30), seed=st.integers(0, 2**32))
def test_same_resources_in_any_order_give_identical_json(items: list[Any], seed: int) -> None:
    world = {key_of(r): r for r in [Host(metadata=md("h1", "infra")), *items]}
    a = list(world.values())
    b = list(a)
    random.Random(seed).shuffle(b)
    sa, sb = compile_catalog(Catalog.of(a), 3), compile_catalog(Catalog.of(b), 3)
    assert {h: s.dumps() for h, s in sa.items()} == {h: s.dumps() for h, s in sb.items()}
    for s in sa.values():
        assert HostDesiredState.loads(s.dumps()) == s


def test_label_change_reaches_only_hosts_that_hold_the_sets() -> None:
    def w(name: str, h: str, ip: str, tier: str) -> Workload:
        return Workload(
            metadata=md(name, "a", {"tier": tier}), spec=WorkloadSpec(host=h, vnics=[Vnic(ips=[ip])])
        )

    res = [
        Host(metadata=md("h1", "infra")),
        Host(metadata=md("h2", "infra")),
        Host(metadata=md("h3", "infra")),
        w("web", "h1", "10.0.0.1", "web"),
        w("db", "h2", "10.0.0.2", "db"),
        w("other", "h3", "10.0.0.3", "cache"),
        Group(metadata=md("web", "a"), spec=GroupSpec(selector='tier == "web"')),
        Group(metadata=md("db", "a"), spec=GroupSpec(selector='tier == "db"')),
        Policy(
            metadata=md("p", "a"),
            spec=PolicySpec(rules=[Rule(name="r", sources=["web"], destinations=["db"], action="allow")]),
        ),
    ]
    ic = IncrementalCompiler(Catalog.of(res), 1)
    # `other` changes a label no selector's result depends on: nothing to send anywhere
    assert ic.update([w("other", "h3", "10.0.0.3", "queue")], [], 2) == {}
    # `other` becomes web: its own host (new rule placement) and the hosts holding g.a.web change
    deltas = ic.update([w("other", "h3", "10.0.0.3", "web")], [], 3)
    assert sorted(deltas) == ["h1", "h2", "h3"]
    assert [u.added_addresses for u in deltas["h2"].set_updates] == [("10.0.0.3",)]
    assert deltas["h2"].rule_updates == () and deltas["h2"].vnic_updates == ()
    # an IP change touches set elements only
    deltas = ic.update([w("web", "h1", "10.0.0.9", "web")], [], 4)
    assert deltas["h2"].set_updates[0].removed_addresses == ("10.0.0.1",)
    assert deltas["h2"].set_updates[0].added_addresses == ("10.0.0.9",)
    assert deltas["h2"].rule_updates == () and deltas["h2"].vnic_updates == ()


def test_rule_content_change_rerenders_vnics_that_use_it_and_hosts_come_and_go() -> None:
    res = [
        Host(metadata=md("h1", "infra")),
        Workload(metadata=md("w", "a"), spec=WorkloadSpec(host="h1", vnics=[Vnic(ips=["10.0.0.1"])])),
        Policy(
            metadata=md("base", "infra"),
            spec=PolicySpec(
                category="infrastructure", rules=[Rule(name="r", action="drop", services=["tcp/23"])]
            ),
        ),
    ]
    ic = IncrementalCompiler(Catalog.of(res), 1)
    before = ic.state("h1")
    # The provider goes to monitor mode: its rule's content changes, tenant a's vNIC does not, but the
    # vNIC's chains must be re-rendered.
    deltas = ic.update([Tenant(metadata=md("infra", "infra"), spec=TenantSpec(mode="monitor"))], [], 2)
    d = deltas["h1"]
    assert [u.rule.monitor for u in d.rule_updates] == [True]
    assert [u.vnic.workload for u in d.vnic_updates] == ["a/w"]
    assert d == diff(before, ic.state("h1"))
    # A new host appears with a workload already pointing at it; then a host disappears.
    w2 = Workload(metadata=md("w2", "a"), spec=WorkloadSpec(host="h2", vnics=[Vnic(ips=["10.0.0.2"])]))
    assert ic.update([w2], [], 3) == {}
    deltas = ic.update([Host(metadata=md("h2", "infra"))], [], 4)
    assert apply_delta(empty_state("h2", 0), deltas["h2"]) == ic.state("h2")
    assert [v.workload for v in ic.state("h2").vnics] == ["a/w2"]
    last = ic.state("h1")
    deltas = ic.update([], [("Host", "infra", "h1")], 5)
    assert apply_delta(last, deltas["h1"]) == empty_state("h1", 5)
    assert sorted(ic.hosts) == ["h2"]
    # The workload moves to h2... and h1 comes back empty-handed for it.
    moved = Workload(metadata=md("w", "a"), spec=WorkloadSpec(host="h2", vnics=[Vnic(ips=["10.0.0.1"])]))
    deltas = ic.update([moved], [], 6)
    assert sorted(v.workload for v in ic.state("h2").vnics) == ["a/w", "a/w2"]


def test_group_removed_and_recreated_in_one_update_keeps_unions_current() -> None:
    def w(tier: str) -> Workload:
        return Workload(
            metadata=md("w", "a", {"tier": tier}),
            spec=WorkloadSpec(host="h1", vnics=[Vnic(ips=["10.0.0.1"])]),
        )

    g = Group(metadata=md("web", "a"), spec=GroupSpec(selector='tier == "web"'))
    pol = Policy(
        metadata=md("p", "a"),
        spec=PolicySpec(
            rules=[Rule(name="r", sources=["web", "10.9.0.0/16"], destinations=["any"], action="allow")]
        ),
    )
    world = {r.key: r for r in [Host(metadata=md("h1", "infra")), w("web"), g, pol]}
    ic = IncrementalCompiler(Catalog.of(world.values()), 1)
    ic.update([g], [g.key], 2)
    check_against_full(ic, world, 2)
    world[w("db").key] = w("db")
    ic.update([w("db")], [], 3)
    check_against_full(ic, world, 3)
