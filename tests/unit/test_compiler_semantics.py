"""IR-level semantics of the compiler (docs/semantics.md §2-4): span, order, monitor, defaults, tenancy,
fail-closed. Verdicts are the sim's business; here we check what lands where."""

from __future__ import annotations

from typing import Any

import pytest

from omniwall.compiler.build import compile_catalog
from omniwall.compiler.ir import HostDesiredState, IRRule, IRVnic, ServiceMatch
from omniwall.compiler.testing import group, host, md, policy, service, tenant, workload
from omniwall.model.catalog import Catalog
from omniwall.model.resources import (
    Group,
    GroupSpec,
    Rule,
    Service,
    ServiceSpec,
    Vnic,
    Workload,
)


def wl(tenant: str, name: str, hostname: str, ip: str, **labels: str) -> Workload:
    return workload(tenant, name, hostname, [Vnic(ips=[ip], hostIfname=f"{tenant}-{name}")], labels)


def rule(name: str, src: list[str] | None = None, dst: list[str] | None = None, **kw: Any) -> Rule:
    return Rule(name=name, sources=src or ["any"], destinations=dst or ["any"], **kw)


def base() -> list[Any]:
    """Two tenants on two hosts, a provider DNS workload."""
    return [
        host("h1"),
        host("h2"),
        tenant("a"),
        tenant("b"),
        wl("a", "web", "h1", "10.0.0.1", tier="web"),
        wl("a", "db", "h2", "10.0.0.2", tier="db"),
        wl("b", "web", "h1", "10.1.0.1", tier="web"),
        wl("infra", "dns", "h2", "10.9.0.53", role="dns"),
        group("a", "web", 'tier == "web"'),
        group("a", "db", 'tier == "db"'),
        group("b", "web", 'tier == "web"'),
        group("infra", "dns", 'role == "dns"', shareWith=["*"]),
        group("infra", "webs", 'tier == "web"'),
    ]


def compile_(resources: list[Any], revision: int = 0) -> dict[str, HostDesiredState]:
    return compile_catalog(Catalog.of(resources), revision)


def vnic(states: dict[str, HostDesiredState], ifname: str) -> tuple[HostDesiredState, IRVnic]:
    for s in states.values():
        v = s.vnic_map().get(ifname)
        if v is not None:
            return s, v
    raise KeyError(ifname)


def labels(states: dict[str, HostDesiredState], ifname: str, direction: str) -> list[str]:
    s, v = vnic(states, ifname)
    rules = s.rule_map()
    return [rules[i].label for i in getattr(v, direction)]


def the_rule(states: dict[str, HostDesiredState], label: str) -> IRRule:
    for s in states.values():
        for r in s.rules:
            if r.label == label:
                return r
    raise KeyError(label)


# ---------------------------------------------------------------------------------------------- span


def test_derived_span_sources_egress_destinations_ingress() -> None:
    st = compile_([*base(), policy("a", "p", rule("r", ["web"], ["db"], action="allow"))])
    assert labels(st, "a-web", "egress") == ["a/p/r"]
    assert labels(st, "a-web", "ingress") == []
    assert labels(st, "a-db", "ingress") == ["a/p/r"]
    assert labels(st, "a-db", "egress") == []


@pytest.mark.parametrize(
    ("direction", "egress", "ingress"), [("in", False, True), ("out", True, False), ("both", True, True)]
)
def test_direction_limits_hops(direction: str, egress: bool, ingress: bool) -> None:
    st = compile_(
        [*base(), policy("a", "p", rule("r", ["web"], ["db"], action="allow", direction=direction))]
    )
    assert labels(st, "a-web", "egress") == (["a/p/r"] if egress else [])
    assert labels(st, "a-db", "ingress") == (["a/p/r"] if ingress else [])


def test_applied_to_overrides_derived_span_rule_level_over_policy_level() -> None:
    st = compile_(
        [
            *base(),
            policy("a", "p", rule("r", ["web"], ["db"], action="allow"), appliedTo=["db"]),
            policy("a", "q", rule("r", ["web"], ["db"], action="allow", appliedTo=["web"]), appliedTo=["db"]),
        ]
    )
    # policy-level appliedTo: both directions on db only, nothing on web
    assert labels(st, "a-db", "egress") == ["a/p/r"]
    assert labels(st, "a-db", "ingress") == ["a/p/r"]
    # rule-level appliedTo wins over the policy's
    assert labels(st, "a-web", "egress") == ["a/q/r"]
    assert labels(st, "a-web", "ingress") == ["a/q/r"]


def test_any_is_every_vnic_of_the_tenant_or_every_vnic_for_the_provider() -> None:
    st = compile_(
        [
            *base(),
            policy("a", "p", rule("r", action="drop")),
            policy("infra", "i", rule("r", action="drop"), category="infrastructure"),
        ]
    )
    assert labels(st, "a-web", "egress") == ["infra/i/r", "a/p/r"]
    assert labels(st, "a-db", "ingress") == ["infra/i/r", "a/p/r"]
    # tenant b and the provider's own workload: provider rule only
    for ifname in ("infra-dns",):
        assert labels(st, ifname, "egress") == ["infra/i/r"]
    assert labels(st, "b-web", "egress") == ["infra/i/r"]


def test_tenant_rule_never_lands_on_another_tenants_vnic() -> None:
    # tenant a names the provider group `infra/webs` (not shared -> fail closed), and `infra/dns` (shared)
    st = compile_([*base(), policy("a", "p", rule("r", ["web"], ["infra/dns"], action="allow"))])
    assert labels(st, "infra-dns", "ingress") == []  # provider vNIC: a tenant rule never lands there
    assert labels(st, "a-web", "egress") == ["a/p/r"]
    assert the_rule(st, "a/p/r").dst_set == "g.infra.dns"


def test_provider_rule_follows_group_across_tenants() -> None:
    st = compile_(
        [
            *base(),
            policy("infra", "i", rule("r", ["webs"], ["dns"], action="allow"), category="infrastructure"),
        ]
    )
    assert labels(st, "a-web", "egress") == ["infra/i/r"]
    assert labels(st, "b-web", "egress") == ["infra/i/r"]
    assert labels(st, "infra-dns", "ingress") == ["infra/i/r"]
    webs = st["h1"].set_map()["g.infra.webs"]
    assert webs.addresses == ("10.0.0.1", "10.1.0.1")


def test_tenant_group_selector_matches_only_own_tenant() -> None:
    st = compile_([*base(), policy("a", "p", rule("r", ["web"], ["db"], action="allow"))])
    assert st["h1"].set_map()["g.a.web"].addresses == ("10.0.0.1",)


def test_disabled_rules_are_not_installed() -> None:
    st = compile_([*base(), policy("a", "p", rule("r", ["web"], ["db"], action="allow", disabled=True))])
    assert all(not s.rules for s in st.values())


def test_literals_add_no_span_and_make_a_union_set() -> None:
    st = compile_([*base(), policy("a", "p", rule("r", ["10.7.0.0/16"], ["db"], action="allow"))])
    assert labels(st, "a-db", "ingress") == ["a/p/r"]
    assert labels(st, "a-web", "egress") == []
    r = the_rule(st, "a/p/r")
    assert r.src_set is not None and r.src_set.startswith("u.")
    assert st["h2"].set_map()[r.src_set].cidrs == ("10.7.0.0/16",)


# ---------------------------------------------------------------------------------------------- order


def test_order_category_priority_tenant_policy_rule_index() -> None:
    st = compile_(
        [
            *base(),
            policy("a", "zz", rule("r2", action="allow"), rule("r1", action="allow"), priority=10),
            policy("a", "aa", rule("r", action="allow"), priority=10),
            policy("infra", "aa0", rule("r", action="allow"), priority=10),  # same slot: tenant before name
            policy("a", "first", rule("r", action="allow"), priority=5),
            policy("a", "env", rule("r", action="allow"), category="environment", priority=999),
            policy("infra", "emg", rule("r", action="drop"), category="emergency", priority=1000),
            policy("infra", "inf", rule("r", action="pass"), category="infrastructure", priority=0),
        ]
    )
    assert labels(st, "a-web", "egress") == [
        "infra/emg/r",
        "infra/inf/r",
        "a/env/r",
        "a/first/r",
        "a/aa/r",
        "a/zz/r2",
        "a/zz/r1",
        "infra/aa0/r",
    ]


# ---------------------------------------------------------------------------------------------- flags


def test_monitor_from_owner_tenant_and_default_from_vnic_tenant() -> None:
    res = [
        *base(),
        policy("a", "p", rule("r", ["web"], ["db"], action="drop")),
        policy("infra", "i", rule("r", action="drop"), category="infrastructure"),
    ]
    res[2] = tenant("a", mode="monitor", defaultAction="allow")
    st = compile_(res)
    assert the_rule(st, "a/p/r").monitor is True
    assert the_rule(st, "infra/i/r").monitor is False  # provider rules follow the provider's mode
    _, v = vnic(st, "a-web")
    assert (v.default_action, v.default_monitor) == ("allow", True)
    _, v = vnic(st, "infra-dns")
    assert (v.default_action, v.default_monitor) == ("drop", False)
    _, v = vnic(st, "b-web")
    assert (v.default_action, v.default_monitor) == ("drop", False)


def test_provider_monitor_mode_only_marks_provider_rules() -> None:
    res = [
        *base(),
        tenant("infra", mode="monitor"),
        policy("a", "p", rule("r", ["web"], ["db"], action="drop")),
        policy("infra", "i", rule("r", action="drop"), category="infrastructure"),
    ]
    st = compile_(res)
    assert the_rule(st, "infra/i/r").monitor is True
    assert the_rule(st, "a/p/r").monitor is False


def test_services_inline_named_provider_and_any() -> None:
    res = [
        *base(),
        service("a", "pg", "tcp", [5432, "6000-6001"]),
        service("infra", "dns", "udp", [53]),
        policy(
            "a",
            "p",
            rule("r1", ["web"], ["db"], action="allow", services=["pg", "infra/dns", "icmp/8", "tcp/80,443"]),
            rule("r2", ["web"], ["db"], action="allow", services=["tcp/80", "any"]),
            rule("r3", ["web"], ["db"], action="allow"),
        ),
    ]
    st = compile_(res)
    assert the_rule(st, "a/p/r1").services == (
        ServiceMatch("icmp", (), 8, None),
        ServiceMatch("tcp", ((80, 80), (443, 443))),
        ServiceMatch("tcp", ((5432, 5432), (6000, 6001))),
        ServiceMatch("udp", ((53, 53),)),
    )
    assert the_rule(st, "a/p/r2").services == ()
    assert the_rule(st, "a/p/r3").services == ()
    assert the_rule(st, "a/p/r1").stateful is True


def test_stateless_and_log_carry_over() -> None:
    st = compile_(
        [*base(), policy("a", "p", rule("r", ["web"], ["db"], action="allow", log=True), stateful=False)]
    )
    r = the_rule(st, "a/p/r")
    assert (r.stateful, r.log) == (False, True)


# ---------------------------------------------------------------------------------------------- sets


def test_group_addresses_static_nested_cidrs_host_length_to_addresses() -> None:
    res = [
        *base(),
        group("a", "inner", cidrs=["192.168.1.0/24", "172.16.0.9/32"]),
        group("a", "outer", workloads=["db"], groups=["inner", "web"], cidrs=["2001:db8::1/128"]),
        policy("a", "p", rule("r", ["outer"], ["db"], action="allow")),
    ]
    st = compile_(res)
    s = st["h2"].set_map()["g.a.outer"]
    assert s.addresses == ("10.0.0.1", "10.0.0.2", "172.16.0.9", "2001:db8::1")
    assert s.cidrs == ("192.168.1.0/24",)
    # span: static and nested workloads (CIDRs never add span)
    assert labels(st, "a-db", "egress") == ["a/p/r"]
    assert labels(st, "a-web", "egress") == ["a/p/r"]


def test_single_ref_uses_group_set_several_refs_a_union_named_by_refs() -> None:
    res = [
        *base(),
        policy("a", "p", rule("r", ["web", "db"], ["db"], action="allow")),
        policy("a", "q", rule("r", ["db", "web"], ["db"], action="allow")),
    ]
    st = compile_(res)
    r1, r2 = the_rule(st, "a/p/r"), the_rule(st, "a/q/r")
    assert r1.src_set == r2.src_set and r1.src_set is not None and r1.src_set.startswith("u.")
    assert r1.dst_set == "g.a.db"
    u = st["h2"].set_map()[r1.src_set]
    assert u.addresses == ("10.0.0.1", "10.0.0.2")


def test_only_rules_placed_and_sets_referenced_and_every_host_present() -> None:
    res = [*base(), host("h3"), policy("a", "p", rule("r", ["web"], ["db"], action="allow"))]
    st = compile_(res, revision=7)
    assert sorted(st) == ["h1", "h2", "h3"]
    assert st["h3"] == HostDesiredState(host="h3", revision=7)
    for s in st.values():
        used = {i for v in s.vnics for i in v.egress + v.ingress}
        assert {r.id for r in s.rules} == used
        named = {n for r in s.rules for n in (r.src_set, r.dst_set) if n}
        assert {x.name for x in s.sets} == named
    # b/web sits on h1 but no rule of tenant a lands on it
    assert [v.workload for v in st["h1"].vnics] == ["a/web", "b/web"]


# ---------------------------------------------------------------------------------------------- fail closed


def test_missing_peer_group_compiles_to_drop_matching_any() -> None:
    st = compile_([*base(), policy("a", "p", rule("r", ["nope"], ["db"], action="allow"))])
    r = the_rule(st, "a/p/r")
    assert (r.action, r.src_set, r.dst_set) == ("drop", None, "g.a.db")
    assert labels(st, "a-db", "ingress") == ["a/p/r"]


def test_unshared_provider_group_and_other_tenant_group_are_missing() -> None:
    st = compile_(
        [
            *base(),
            policy("a", "p", rule("r", ["web"], ["infra/webs"], action="allow")),
            policy("a", "q", rule("r", ["web"], ["b/web"], action="allow")),
        ]
    )
    assert the_rule(st, "a/p/r").action == "drop"
    assert the_rule(st, "a/q/r").action == "drop"


def test_missing_service_compiles_to_drop_any_service() -> None:
    st = compile_([*base(), policy("a", "p", rule("r", ["web"], ["db"], action="allow", services=["nope"]))])
    r = the_rule(st, "a/p/r")
    assert (r.action, r.services) == ("drop", ())


def test_workload_on_unknown_host_and_invalid_selector_do_not_crash() -> None:
    res = [
        *base(),
        wl("a", "lost", "nowhere", "10.0.0.99", tier="web"),
        group("a", "bad"),
        policy("a", "p", rule("r", ["web"], ["db"], action="allow")),
    ]
    st = compile_(res)
    assert "nowhere" not in st
    assert "10.0.0.99" in st["h1"].set_map()["g.a.web"].addresses


def test_duplicate_ifname_on_a_host_keeps_the_lowest_workload() -> None:
    a = workload("a", "x", "h1", [Vnic(ips=["10.0.0.7"], hostIfname="dup")])
    b = workload("a", "y", "h1", [Vnic(ips=["10.0.0.8"], hostIfname="dup")])
    st = compile_([host("h1"), b, a])
    assert [(v.ifname, v.workload) for v in st["h1"].vnics] == [("dup", "a/x")]


def test_unvalidated_junk_compiles_without_crashing() -> None:
    # Objects built with model_construct skip every validator: the compiler must still not crash.
    bad_svc = Service.model_construct(
        metadata=md("bad", "a"), spec=ServiceSpec.model_construct(ports=["99999-1"])
    )
    bad_group = Group.model_construct(
        metadata=md("junk", "a"), spec=GroupSpec.model_construct(selector="((", cidrs=["not-a-cidr"])
    )
    bad_rule = Rule.model_construct(
        name="r", sources=[], destinations=["junk", "any"], services=["bad", "tcp/0-99999"], action="allow"
    )
    res = [*base(), bad_svc, bad_group, policy("a", "p", bad_rule)]
    st = compile_(res)
    r = the_rule(st, "a/p/r")
    assert (r.action, r.src_set, r.dst_set, r.services) == ("drop", None, None, ())
