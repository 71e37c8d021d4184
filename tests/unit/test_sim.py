"""The sim evaluator against hand-built IR: every clause of docs/semantics.md §4-6, one hop at a time,
then whole paths and request/response exchanges."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omniwall.compiler.ir import HostDesiredState, IRRule, IRSet, IRVnic, ServiceMatch
from omniwall.sim import Packet, judge_connection, judge_hop, judge_path
from omniwall.sim.evaluate import Network, network_of
from omniwall.sim.match import AddressSet, ServiceIndex, StateIndex, service_matches

# ------------------------------------------------------------------------------------------- builders

WEB, APP, DB = "10.0.0.1", "10.0.0.2", "10.0.1.1"
WEB6 = "fd00::1"
OUTSIDE = "192.0.2.9"


def R(
    rid: int,
    action: str,
    src: str | None = None,
    dst: str | None = None,
    services: tuple[ServiceMatch, ...] = (),
    category: str = "application",
    tenant: str = "acme",
    policy: str = "p",
    stateful: bool = True,
    monitor: bool = False,
) -> IRRule:
    return IRRule(
        id=rid,
        tenant=tenant,
        policy=policy,
        rule=f"r{rid}",
        category=category,
        action=action,  # type: ignore[arg-type]
        src_set=src,
        dst_set=dst,
        services=services,
        stateful=stateful,
        monitor=monitor,
    )


def TCP(*ranges: tuple[int, int]) -> ServiceMatch:
    return ServiceMatch("tcp", tuple(ranges))


def V(
    ifname: str,
    *addresses: str,
    egress: tuple[int, ...] = (),
    ingress: tuple[int, ...] = (),
    tenant: str = "acme",
    default: str = "drop",
    default_monitor: bool = False,
) -> IRVnic:
    return IRVnic(
        ifname=ifname,
        workload=f"{tenant}/{ifname}",
        tenant=tenant,
        addresses=addresses,
        egress=egress,
        ingress=ingress,
        default_action=default,  # type: ignore[arg-type]
        default_monitor=default_monitor,
    )


def S(host: str, vnics: list[IRVnic], rules: list[IRRule], sets: list[IRSet] = ()) -> HostDesiredState:  # type: ignore[assignment]
    return HostDesiredState(
        host=host,
        revision=1,
        vnics=tuple(sorted(vnics, key=lambda v: v.ifname)),
        rules=tuple(sorted(rules, key=lambda r: r.id)),
        sets=tuple(sorted(sets, key=lambda s: s.name)),
    )


def tcp(src: str, dst: str, dport: int, sport: int = 40000) -> Packet:
    return Packet(src, dst, "tcp", sport=sport, dport=dport)


SETS = [
    IRSet("web", addresses=(WEB, WEB6)),
    IRSet("app", addresses=(APP,)),
    IRSet("db", addresses=(DB,)),
    IRSet("net0", cidrs=("10.0.0.0/24",)),
]


def one_hop(rules: list[IRRule], *, direction: str = "ingress", **vkw: object) -> HostDesiredState:
    ids = tuple(r.id for r in rules)
    hop = {"egress": ids} if direction == "egress" else {"ingress": ids}
    return S("h1", [V("app", APP, **hop, **vkw)], rules, SETS)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- packet


def test_packet_normalises_and_validates() -> None:
    assert Packet("10.0.0.1", "10.0.0.2", 6, dport=80) == Packet("10.0.0.1", "10.0.0.2", "tcp", dport=80)
    assert Packet("fd00::0:1", "fd00::2", "udp").src == "fd00::1"
    echo = Packet("10.0.0.1", "10.0.0.2", "icmp")
    assert (echo.icmp_type, echo.icmp_code) == (8, 0)
    assert Packet("fd00::1", "fd00::2", "icmpv6").icmp_type == 128
    reply = tcp(WEB, APP, 8080, sport=41000).reply()
    assert (reply.src, reply.dst, reply.sport, reply.dport) == (APP, WEB, 8080, 41000)
    assert echo.reply().icmp_type == 0
    with pytest.raises(ValueError, match="different IP versions"):
        Packet("10.0.0.1", "fd00::1", "tcp")
    with pytest.raises(ValueError, match="icmpv6"):
        Packet("fd00::1", "fd00::2", "icmp")
    with pytest.raises(ValueError, match="not a protocol"):
        Packet("10.0.0.1", "10.0.0.2", "sctpx")
    with pytest.raises(ValueError, match="dport"):
        Packet("10.0.0.1", "10.0.0.2", "tcp", dport=70000)
    with pytest.raises(ValueError, match="icmp_type"):
        Packet("10.0.0.1", "10.0.0.2", "tcp", icmp_type=3)


# ------------------------------------------------------------------------------------------- one hop


def test_first_match_wins() -> None:
    allow, drop = R(1, "allow", "web", "app"), R(2, "drop", "web", "app")
    hv = judge_hop(one_hop([allow, drop]), "app", "ingress", tcp(WEB, APP, 80))
    assert (hv.verdict, hv.rule) == ("allow", allow)
    hv = judge_hop(one_hop([drop, allow]), "app", "ingress", tcp(WEB, APP, 80))
    assert (hv.verdict, hv.rule) == ("drop", drop)
    assert not hv.default and hv.tracked and not hv.antispoof and not hv.monitored


def test_non_matching_rules_are_skipped() -> None:
    st = one_hop([R(1, "drop", "db", "app"), R(2, "drop", "web", "app", (TCP((22, 22)),)), R(3, "allow")])
    hv = judge_hop(st, "app", "ingress", tcp(WEB, APP, 80))
    assert hv.rule is not None and hv.rule.id == 3


def test_pass_skips_rest_of_category() -> None:
    rules = [
        R(1, "pass", "web", None, category="infrastructure", tenant="infra"),
        R(2, "drop", None, None, category="infrastructure", tenant="infra"),
        R(3, "allow", "web", "app", category="application"),
    ]
    hv = judge_hop(one_hop(rules), "app", "ingress", tcp(WEB, APP, 80))
    assert (hv.verdict, hv.rule.id if hv.rule else None) == ("allow", 3)
    # Not matching the pass: the infrastructure drop decides.
    hv = judge_hop(one_hop(rules), "app", "ingress", tcp(DB, APP, 80))
    assert (hv.verdict, hv.rule.id if hv.rule else None) == ("drop", 2)


def test_pass_in_last_category_falls_to_default() -> None:
    rules = [R(1, "pass"), R(2, "drop")]
    hv = judge_hop(one_hop(rules, default="allow"), "app", "ingress", tcp(WEB, APP, 80))
    assert (hv.verdict, hv.rule, hv.default) == ("allow", None, True)


def test_pass_lands_on_next_category_not_next_rule_of_same() -> None:
    rules = [
        R(1, "pass", category="emergency", tenant="infra"),
        R(2, "drop", category="emergency", tenant="infra"),
        R(3, "reject", category="environment"),
        R(4, "allow", category="application"),
    ]
    hv = judge_hop(one_hop(rules), "app", "ingress", tcp(WEB, APP, 80))
    assert (hv.verdict, hv.rule.id if hv.rule else None) == ("reject", 3)


def test_earlier_category_decides_first() -> None:
    rules = [R(1, "drop", "web", None, category="emergency", tenant="infra"), R(2, "allow", "web", "app")]
    hv = judge_hop(one_hop(rules), "app", "ingress", tcp(WEB, APP, 80))
    assert (hv.verdict, hv.rule.id if hv.rule else None) == ("drop", 1)


def test_out_of_order_categories_are_refused() -> None:
    rules = [R(1, "allow", category="application"), R(2, "drop", category="emergency")]
    with pytest.raises(ValueError, match="category"):
        judge_hop(one_hop(rules), "app", "ingress", tcp(WEB, APP, 80))


@pytest.mark.parametrize("default", ["drop", "reject", "allow"])
def test_default_action_of_the_vnic_tenant(default: str) -> None:
    hv = judge_hop(
        one_hop([R(1, "allow", "db", "app")], default=default), "app", "ingress", tcp(WEB, APP, 80)
    )
    assert (hv.verdict, hv.rule, hv.default, hv.tenant) == (default, None, True, "acme")


def test_reject() -> None:
    hv = judge_hop(one_hop([R(1, "reject", "web", "app")]), "app", "ingress", tcp(WEB, APP, 80))
    assert (hv.verdict, hv.allowed) == ("reject", False)


@pytest.mark.parametrize("action", ["drop", "reject"])
def test_monitor_rule_would_drop_but_allows(action: str) -> None:
    rule = R(1, action, "web", "app", monitor=True)
    hv = judge_hop(one_hop([rule]), "app", "ingress", tcp(WEB, APP, 80))
    assert (hv.verdict, hv.rule, hv.monitored, hv.would) == ("allow", rule, True, action)


def test_monitor_does_not_touch_allow_or_non_monitor_rules() -> None:
    hv = judge_hop(one_hop([R(1, "allow", monitor=True)]), "app", "ingress", tcp(WEB, APP, 80))
    assert (hv.verdict, hv.monitored) == ("allow", False)
    # A provider drop (monitor False) still drops at a vNIC whose tenant's default is monitored.
    st = one_hop([R(1, "drop", category="infrastructure", tenant="infra")], default_monitor=True)
    assert judge_hop(st, "app", "ingress", tcp(WEB, APP, 80)).verdict == "drop"


def test_monitor_default() -> None:
    st = one_hop([], default_monitor=True)
    hv = judge_hop(st, "app", "ingress", tcp(WEB, APP, 80))
    assert (hv.verdict, hv.default, hv.monitored, hv.would) == ("allow", True, True, "drop")
    hv = judge_hop(one_hop([], default="allow", default_monitor=True), "app", "ingress", tcp(WEB, APP, 80))
    assert (hv.verdict, hv.monitored) == ("allow", False)


def test_antispoof_on_egress_before_rules() -> None:
    st = one_hop([R(1, "allow")], direction="egress", default="allow")
    hv = judge_hop(st, "app", "egress", tcp(DB, WEB, 80))  # app sending with db's address
    assert (hv.verdict, hv.antispoof, hv.rule) == ("drop", True, None)
    assert judge_hop(st, "app", "egress", tcp(APP, WEB, 80)).verdict == "allow"
    # Ingress has no anti-spoofing: any source may arrive.
    st_in = one_hop([R(1, "allow")], default="allow")
    assert judge_hop(st_in, "app", "ingress", tcp(OUTSIDE, APP, 80)).antispoof is False
    # Even an established packet is anti-spoofed.
    hv = judge_hop(st, "app", "egress", tcp(DB, WEB, 80), established=True)
    assert hv.antispoof


def test_ports_and_ranges() -> None:
    svc = (TCP((8000, 8080), (9000, 9000)),)
    st = one_hop([R(1, "allow", services=svc)])
    for port, ok in [(8000, True), (8080, True), (8050, True), (7999, False), (8081, False), (9000, True)]:
        assert judge_hop(st, "app", "ingress", tcp(WEB, APP, port)).allowed is ok, port
    udp = Packet(WEB, APP, "udp", sport=4000, dport=8000)
    assert not judge_hop(st, "app", "ingress", udp).allowed  # tcp service, udp packet
    # Source ports never matter; tcp without ports matches every port.
    st = one_hop([R(1, "allow", services=(TCP(),))])
    assert judge_hop(st, "app", "ingress", tcp(WEB, APP, 1, sport=1)).allowed


def test_icmp_type_and_code() -> None:
    echo_only = one_hop([R(1, "allow", services=(ServiceMatch("icmp", icmp_type=8),))])
    assert judge_hop(echo_only, "app", "ingress", Packet(WEB, APP, "icmp")).allowed
    ts = Packet(WEB, APP, "icmp", icmp_type=13)
    assert not judge_hop(echo_only, "app", "ingress", ts).allowed
    unreach = one_hop([R(1, "allow", services=(ServiceMatch("icmp", icmp_type=3, icmp_code=4),))])
    # Errors unrelated to a connection are conntrack-invalid unless untracked: use a stateless rule.
    unreach_sl = one_hop(
        [R(1, "allow", services=(ServiceMatch("icmp", icmp_type=3, icmp_code=4),), stateful=False)]
    )
    assert judge_hop(unreach_sl, "app", "ingress", Packet(WEB, APP, "icmp", icmp_type=3, icmp_code=4)).allowed
    assert not judge_hop(
        unreach_sl, "app", "ingress", Packet(WEB, APP, "icmp", icmp_type=3, icmp_code=1)
    ).allowed
    hv = judge_hop(unreach, "app", "ingress", Packet(WEB, APP, "icmp", icmp_type=3, icmp_code=4))
    assert (hv.verdict, hv.invalid) == ("drop", True)
    any_icmp = one_hop([R(1, "allow", services=(ServiceMatch("icmp"),))])
    assert judge_hop(any_icmp, "app", "ingress", Packet(WEB, APP, "icmp", icmp_type=13)).allowed
    assert not judge_hop(any_icmp, "app", "ingress", tcp(WEB, APP, 80)).allowed


def test_icmp_service_does_not_match_icmpv6_and_any_matches_all() -> None:
    st = S(
        "h1",
        [V("app", APP, "fd00::2", ingress=(1, 2))],
        [R(1, "allow", services=(ServiceMatch("icmp"),)), R(2, "reject", services=(ServiceMatch("icmpv6"),))],
    )
    assert judge_hop(st, "app", "ingress", Packet("fd00::1", "fd00::2", "icmpv6")).verdict == "reject"
    st_any = one_hop([R(1, "allow", services=(ServiceMatch("any"),))])
    for p in (
        tcp(WEB, APP, 1),
        Packet(WEB, APP, "udp", dport=53),
        Packet(WEB, APP, "icmp"),
        Packet(WEB, APP, 47),
    ):
        assert judge_hop(st_any, "app", "ingress", p).allowed, p


def test_other_protocol_numbers() -> None:
    st = one_hop([R(1, "allow", services=(TCP(),))], default="reject")
    gre = Packet(WEB, APP, 47)
    assert judge_hop(st, "app", "ingress", gre).verdict == "reject"
    assert judge_hop(one_hop([R(1, "allow")]), "app", "ingress", gre).allowed


def test_cidr_prefix_match_vs_exact_addresses() -> None:
    st = one_hop([R(1, "allow", "net0", None), R(2, "allow", "app", None)])
    assert judge_hop(st, "app", "ingress", tcp("10.0.0.77", APP, 80)).allowed
    assert not judge_hop(st, "app", "ingress", tcp("10.0.1.77", APP, 80)).allowed
    exact = one_hop([R(1, "allow", "web", None)])
    assert judge_hop(exact, "app", "ingress", tcp(WEB, APP, 80)).allowed
    assert not judge_hop(exact, "app", "ingress", tcp("10.0.0.3", APP, 80)).allowed


def test_address_set_families_and_prefixes() -> None:
    s = AddressSet(("10.0.0.1", "fd00::1"), ("10.8.0.0/16", "fd00:1::/64", "0.0.0.0/0"))

    def has(a: str) -> bool:
        ip = ipaddress.ip_address(a)
        return s.contains(ip.version == 6, int(ip))

    assert has("10.0.0.1") and has("fd00::1") and has("fd00:1::abcd") and has("203.0.113.5")
    assert not has("fd00::2") and not has("fd00:2::1")  # 0.0.0.0/0 is IPv4 only
    v6only = AddressSet((), ("::/0",))
    assert v6only.contains(True, 1) and not v6only.contains(False, 1)


def test_ipv6_rules() -> None:
    st = S(
        "h1",
        [V("app", APP, "fd00::2", ingress=(1,))],
        [R(1, "allow", "web", None, (TCP((443, 443)),))],
        SETS,
    )
    assert judge_hop(st, "app", "ingress", tcp(WEB6, "fd00::2", 443)).allowed
    assert not judge_hop(st, "app", "ingress", tcp("fd00::9", "fd00::2", 443)).allowed


def test_missing_set_matches_nothing() -> None:
    st = S("h1", [V("app", APP, ingress=(1,), default="allow")], [R(1, "drop", "ghost", None)])
    assert judge_hop(st, "app", "ingress", tcp(WEB, APP, 80)).allowed


def test_unknown_vnic_and_direction() -> None:
    st = one_hop([])
    with pytest.raises(KeyError, match="nope"):
        judge_hop(st, "nope", "ingress", tcp(WEB, APP, 80))
    with pytest.raises(ValueError, match="direction"):
        judge_hop(st, "app", "in", tcp(WEB, APP, 80))  # type: ignore[arg-type]


def test_stateless_rule_untracks_whatever_its_action_or_position() -> None:
    rules = [R(1, "allow", "web", "app"), R(2, "drop", "web", "app", stateful=False)]
    hv = judge_hop(one_hop(rules), "app", "ingress", tcp(WEB, APP, 80))
    assert (hv.verdict, hv.rule.id if hv.rule else None, hv.tracked) == ("allow", 1, False)
    # Not matching the stateless rule: tracked.
    assert judge_hop(one_hop(rules), "app", "ingress", tcp(DB, APP, 80)).tracked


def test_established_passes_unless_untracked() -> None:
    st = one_hop([R(1, "drop")])
    hv = judge_hop(st, "app", "ingress", tcp(WEB, APP, 80), established=True)
    assert (hv.verdict, hv.established, hv.reason) == ("allow", True, "established")
    st = one_hop([R(1, "drop", stateful=False)])
    hv = judge_hop(st, "app", "ingress", tcp(WEB, APP, 80), established=True)
    assert (hv.verdict, hv.established, hv.tracked) == ("drop", False, False)


def test_tracked_packets_that_cannot_start_a_connection_are_invalid() -> None:
    st = one_hop([], default="allow")
    echo_reply = Packet(WEB, APP, "icmp", icmp_type=0)
    hv = judge_hop(st, "app", "ingress", echo_reply)
    assert (hv.verdict, hv.invalid, hv.reason) == ("drop", True, "invalid")
    assert judge_hop(st, "app", "ingress", Packet(WEB, APP, "icmp")).allowed  # echo request: new
    # Neighbour discovery is never tracked by the kernel: judged by the rules.
    st6 = S("h1", [V("app", "fd00::2", default="allow")], [])
    hv = judge_hop(st6, "app", "ingress", Packet("fd00::1", "fd00::2", "icmpv6", icmp_type=135))
    assert (hv.verdict, hv.tracked) == ("allow", False)


# ---------------------------------------------------------------------------------------------- paths


def two_hosts(
    web_egress: list[IRRule], app_ingress: list[IRRule], *, same_host: bool = False
) -> dict[str, HostDesiredState]:
    web = V("web", WEB, egress=tuple(r.id for r in web_egress))
    app = V("app", APP, ingress=tuple(r.id for r in app_ingress))
    if same_host:
        return {"h1": S("h1", [web, app], [*web_egress, *app_ingress], SETS)}
    return {"h1": S("h1", [web], web_egress, SETS), "h2": S("h2", [app], app_ingress, SETS)}


@pytest.mark.parametrize("same_host", [False, True])
def test_both_hops_must_allow(same_host: bool) -> None:
    out_ok, in_ok = R(1, "allow", "web", "app"), R(2, "allow", "web", "app")
    p = tcp(WEB, APP, 80)
    pv = judge_path(two_hosts([out_ok], [in_ok], same_host=same_host), p)
    assert pv.allowed and [(h.ifname, h.direction) for h in pv.hops] == [
        ("web", "egress"),
        ("app", "ingress"),
    ]
    pv = judge_path(two_hosts([out_ok], [], same_host=same_host), p)
    assert (pv.allowed, pv.verdict, pv.denied_at.ifname if pv.denied_at else None) == (False, "drop", "app")
    pv = judge_path(two_hosts([R(1, "reject", "web", "app")], [in_ok], same_host=same_host), p)
    assert (pv.verdict, pv.hops[0].reached, pv.hops[1].reached) == ("reject", True, False)
    assert pv.hops[1].verdict == "allow"  # still evaluated, for explain


def test_outside_inventory_judged_only_at_inventory_side() -> None:
    states = two_hosts([R(1, "allow", None, None)], [R(2, "allow", None, None)])
    pv = judge_path(states, tcp(WEB, OUTSIDE, 443))
    assert pv.allowed and len(pv.hops) == 1 and pv.dst is None and pv.src and pv.src.workload == "acme/web"
    pv = judge_path(states, tcp(OUTSIDE, APP, 443))
    assert pv.allowed and [h.direction for h in pv.hops] == ["ingress"] and pv.src is None
    pv = judge_path(states, tcp(OUTSIDE, "198.51.100.1", 443))
    assert pv.allowed and not pv.ours


def test_sender_models_spoofing() -> None:
    states = two_hosts([R(1, "allow")], [R(2, "allow")])
    pv = judge_path(states, tcp(OUTSIDE, APP, 80), sender=("h1", "web"))
    assert (pv.verdict, pv.hops[0].antispoof) == ("drop", True)


def test_path_reports_untracked_hosts() -> None:
    states = two_hosts([R(1, "allow", stateful=False)], [R(2, "allow")])
    pv = judge_path(states, tcp(WEB, APP, 80))
    assert pv.untracked_hosts == frozenset({"h1"})
    assert [h.tracked for h in pv.hops] == [False, True]


def test_same_host_untracked_at_one_hop_is_untracked_at_both() -> None:
    # Untracked on h1 (the egress stateless rule) => the ingress hop judges an echo reply instead of
    # dropping it as invalid.
    web_rules = [R(1, "allow", stateful=False)]
    states = two_hosts(web_rules, [R(2, "allow")], same_host=True)
    pv = judge_path(states, Packet(WEB, APP, "icmp", icmp_type=0))
    assert pv.allowed and pv.untracked_hosts == frozenset({"h1"})
    assert pv.hops[1].tracked and not pv.hops[1].invalid
    # On two hosts, h2 tracks the echo reply: invalid there.
    states = two_hosts(web_rules, [R(2, "allow")])
    pv = judge_path(states, Packet(WEB, APP, "icmp", icmp_type=0))
    assert (pv.verdict, pv.hops[1].invalid) == ("drop", True)


# ----------------------------------------------------------------------------------------- connections


def test_stateful_connection_reply_passes_unjudged() -> None:
    states = two_hosts([R(1, "allow", "web", "app")], [R(2, "allow", "web", "app")])
    cv = judge_connection(states, tcp(WEB, APP, 80))
    assert cv.allowed and cv.reply is not None
    assert all(h.established for h in cv.reply.hops)
    assert [(h.ifname, h.direction) for h in cv.reply.hops] == [("app", "egress"), ("web", "ingress")]


def test_denied_request_has_no_reply() -> None:
    cv = judge_connection(two_hosts([R(1, "allow")], []), tcp(WEB, APP, 80))
    assert (cv.allowed, cv.reply, cv.verdict) == (False, None, "drop")


@pytest.mark.parametrize("proto", ["tcp", "icmp"])
def test_stateless_request_needs_stateless_reply(proto: str) -> None:
    def pkt() -> Packet:
        return tcp(WEB, APP, 80) if proto == "tcp" else Packet(WEB, APP, "icmp")

    fwd_out, fwd_in = R(1, "allow", "web", "app", stateful=False), R(2, "allow", "web", "app", stateful=False)
    # No reply rule: the reply is tracked on both hosts, which hold no entry: a SYN-ACK / echo reply is
    # invalid, whatever the default.
    states = two_hosts([fwd_out], [fwd_in])
    states = {
        h: dataclasses.replace(
            s, vnics=tuple(dataclasses.replace(v, default_action="allow") for v in s.vnics)
        )
        for h, s in states.items()
    }
    cv = judge_connection(states, pkt())
    assert cv.request.allowed and not cv.allowed
    assert cv.reply is not None and cv.reply.hops[0].invalid
    # A stateful reply rule does not help either: the reply is still tracked without an entry.
    states = two_hosts([fwd_out], [fwd_in, R(3, "allow", "app", "web")])
    assert not judge_connection(states, pkt()).allowed
    # A stateless reply rule at both hops of the reply: untracked, judged, allowed.
    rep_out, rep_in = R(3, "allow", "app", "web", stateful=False), R(4, "allow", "app", "web", stateful=False)
    states = {
        "h1": S("h1", [V("web", WEB, egress=(1,), ingress=(4,))], [fwd_out, rep_in], SETS),
        "h2": S("h2", [V("app", APP, ingress=(2,), egress=(3,))], [fwd_in, rep_out], SETS),
    }
    cv = judge_connection(states, pkt())
    assert cv.allowed and cv.reply is not None
    assert [h.rule.id if h.rule else None for h in cv.reply.hops] == [3, 4]


def test_stateless_udp_reply_is_judged_as_new() -> None:
    fwd_out, fwd_in = R(1, "allow", "web", "app", stateful=False), R(2, "allow", "web", "app", stateful=False)
    q = Packet(WEB, APP, "udp", sport=5000, dport=53)
    # Reply tracked, no entry, judged by rules: the app's egress default drops it.
    cv = judge_connection(two_hosts([fwd_out], [fwd_in]), q)
    assert not cv.allowed and cv.reply is not None
    assert cv.reply.hops[0].default and not cv.reply.hops[0].invalid
    # A (stateful) reply rule at both hops lets it through.
    states = {
        "h1": S(
            "h1", [V("web", WEB, egress=(1,), ingress=(4,))], [fwd_out, R(4, "allow", "app", "web")], SETS
        ),
        "h2": S(
            "h2", [V("app", APP, ingress=(2,), egress=(3,))], [fwd_in, R(3, "allow", "app", "web")], SETS
        ),
    }
    cv = judge_connection(states, q)
    assert cv.allowed and cv.reply is not None and [h.reason for h in cv.reply.hops] == ["rule", "rule"]


def test_mixed_hosts_tracked_and_untracked() -> None:
    # Stateless only on h2 (app's ingress). h1 tracks the request and passes the reply as established;
    # h2 did not: the reply (tracked there) is a SYN-ACK without an entry: invalid at app's egress.
    states = two_hosts([R(1, "allow", "web", "app")], [R(2, "allow", "web", "app", stateful=False)])
    cv = judge_connection(states, tcp(WEB, APP, 80))
    assert cv.request.untracked_hosts == frozenset({"h2"})
    assert cv.reply is not None
    assert [(h.ifname, h.reason) for h in cv.reply.hops] == [("app", "invalid"), ("web", "established")]
    assert not cv.reply.hops[1].reached


def test_reply_untracked_on_tracking_host_is_judged() -> None:
    # Stateful request; a stateless drop matching the reply at web's ingress untracks the reply on h1,
    # so h1's conntrack entry is never consulted and the drop applies.
    states = {
        "h1": S(
            "h1",
            [V("web", WEB, egress=(1,), ingress=(3,))],
            [R(1, "allow"), R(3, "drop", "app", "web", stateful=False)],
            SETS,
        ),
        "h2": S("h2", [V("app", APP, ingress=(2,))], [R(2, "allow")], SETS),
    }
    cv = judge_connection(states, tcp(WEB, APP, 80))
    assert cv.request.allowed and not cv.allowed
    assert cv.reply is not None
    assert [h.reason for h in cv.reply.hops] == ["established", "rule"]
    assert cv.reply.hops[1].verdict == "drop" and not cv.reply.hops[1].tracked


def test_tcp_ack_invalid_where_syn_tracked_but_syn_ack_not() -> None:
    # Stateful request; a stateless *allow* matching the reply at web's ingress: the SYN-ACK is judged
    # and allowed on h1, but h1's conntrack never saw it, so the ACK meets a SYN_SENT entry: invalid.
    states = {
        "h1": S(
            "h1",
            [V("web", WEB, egress=(1,), ingress=(3,))],
            [R(1, "allow"), R(3, "allow", "app", "web", stateful=False)],
            SETS,
        ),
        "h2": S("h2", [V("app", APP, ingress=(2,))], [R(2, "allow")], SETS),
    }
    cv = judge_connection(states, tcp(WEB, APP, 80))
    assert cv.request.allowed and cv.reply is not None and cv.reply.allowed
    assert cv.ack is not None and not cv.allowed
    assert [h.reason for h in cv.ack.hops] == ["invalid", "established"]
    # UDP has no third packet: the same exchange works.
    cv = judge_connection(states, Packet(WEB, APP, "udp", sport=5000, dport=53))
    assert cv.allowed and cv.ack is None


def test_stateful_tcp_ack_is_established() -> None:
    cv = judge_connection(two_hosts([R(1, "allow")], [R(2, "allow")]), tcp(WEB, APP, 80))
    assert cv.allowed and cv.ack is not None and all(h.established for h in cv.ack.hops)
    assert len(cv.hops) == 6


def test_icmp_without_reply_expected() -> None:
    states = two_hosts([R(1, "allow", stateful=False)], [R(2, "allow", stateful=False)])
    cv = judge_connection(states, Packet(WEB, APP, "icmp", icmp_type=3, icmp_code=4))
    assert cv.allowed and cv.reply is None and not cv.expects_reply


def test_connection_to_outside() -> None:
    states = two_hosts([R(1, "allow")], [])
    cv = judge_connection(states, tcp(WEB, OUTSIDE, 443))
    assert cv.allowed and cv.reply is not None and [h.reason for h in cv.reply.hops] == ["established"]


# --------------------------------------------------------------------------------------- owned indexes


def test_a_network_holds_its_own_indexes_and_a_new_index_reuses_unchanged_sets() -> None:
    states = two_hosts([R(1, "allow", "web", "app")], [R(2, "allow")])
    net = Network(states)
    assert network_of(net) is net  # a Network is used as is; nothing is cached by the module
    assert judge_path(net, tcp(WEB, APP, 80)).allowed
    old = StateIndex(states["h1"])
    same = StateIndex(dataclasses.replace(states["h1"], revision=2), old)
    assert same.address_set("app") is old.address_set("app")
    grown = dataclasses.replace(
        states["h1"],
        sets=tuple(
            dataclasses.replace(s, addresses=(*s.addresses, "10.9.9.9")) if s.name == "app" else s
            for s in states["h1"].sets
        ),
    )
    fresh = StateIndex(grown, old)
    assert fresh.address_set("app") is not old.address_set("app")
    assert fresh.address_set("app").contains(False, int(ipaddress.ip_address("10.9.9.9")))
    lazy = StateIndex(states["h1"], lazy=True)
    assert lazy.vnics == {}
    assert lazy.vnic("web") is lazy.vnic("web")


def test_many_packets_against_a_big_set_and_many_rules() -> None:
    """The differential fuzzer's load shape (a 5,000-address set with a network, 200 rules, thousands of
    packets against one network the caller holds): every verdict is the one the rules give. (Speed is
    a benchmark's business, not a unit test's.)"""
    sets = [
        IRSet(
            "big",
            addresses=tuple(f"10.{i // 250}.{i % 250}.1" for i in range(5000)),
            cidrs=("172.16.0.0/12",),
        )
    ]
    rules = [R(i, "drop", "big", None, (TCP((i, i)),)) for i in range(1, 200)] + [
        R(1000, "allow", "big", None)
    ]
    states = {"h1": S("h1", [V("app", APP, ingress=tuple(r.id for r in rules))], rules, sets)}
    net = Network(states)
    for i in range(2000):
        port = 1 + i % 400
        pv = judge_path(net, tcp("10.3.7.1" if i % 2 else "172.20.0.9", APP, port))
        hop = pv.hops[0]
        assert hop.rule is not None and hop.rule.id == (port if port < 200 else 1000)
    assert not judge_path(net, tcp("10.250.0.1", APP, 1000)).allowed  # in neither: the default


# ------------------------------------------------------------------------ against a naive reference


POOL = ["10.0.0.1", "10.0.0.2", "10.0.1.1", "10.0.0.0/24", "10.0.0.0/23", "0.0.0.0/0", "10.0.1.0/25"]


def naive_in(entries: tuple[str, ...], ip: str) -> bool:
    a = ipaddress.ip_address(ip)
    return any(a in ipaddress.ip_network(e, strict=False) for e in entries)


def naive_hop(rules: list[IRRule], sets: dict[str, IRSet], p: Packet, default: str) -> tuple[str, int | None]:
    """docs/semantics.md §4 read literally, without any index."""
    skip_category = None
    for r in rules:
        if r.category == skip_category:
            continue
        src_ok = r.src_set is None or naive_in(sets[r.src_set].addresses + sets[r.src_set].cidrs, p.src)
        dst_ok = r.dst_set is None or naive_in(sets[r.dst_set].addresses + sets[r.dst_set].cidrs, p.dst)
        svc_ok = not r.services or any(service_matches(s, p) for s in r.services)
        if src_ok and dst_ok and svc_ok:
            if r.action == "pass":
                skip_category = r.category
                continue
            return r.action, r.id
    return default, None


services_st = st.one_of(
    st.builds(
        ServiceMatch,
        st.sampled_from(["tcp", "udp"]),
        st.lists(
            st.tuples(st.integers(1, 30), st.integers(0, 10)).map(lambda t: (t[0], t[0] + t[1])), max_size=3
        ).map(tuple),
    ),
    st.builds(
        lambda t, c: ServiceMatch("icmp", icmp_type=t, icmp_code=c if t is not None else None),
        st.one_of(st.none(), st.sampled_from([0, 3, 8])),
        st.one_of(st.none(), st.sampled_from([0, 1, 4])),
    ),
    st.just(ServiceMatch("any")),
)
packets_st = st.one_of(
    st.builds(
        lambda proto, s, d, port: Packet(s, d, proto, sport=1000, dport=port),
        st.sampled_from(["tcp", "udp"]),
        st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.1.1", "10.0.1.200", "10.9.9.9"]),
        st.sampled_from(["10.0.0.2", "10.0.0.77", "10.0.1.1"]),
        st.integers(0, 45),
    ),
    st.builds(
        lambda s, t, c: Packet(s, "10.0.0.2", "icmp", icmp_type=t, icmp_code=c),
        st.sampled_from(["10.0.0.1", "10.0.1.1"]),
        st.sampled_from([0, 3, 8, 13]),
        st.sampled_from([0, 1, 4]),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(services_st, max_size=3), packets_st)
def test_service_index_equals_service_matches(services: list[ServiceMatch], p: Packet) -> None:
    expect = not services or any(service_matches(s, p) for s in services)
    assert ServiceIndex(tuple(services)).matches(p) is expect


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from(POOL), min_size=1, max_size=3, unique=True), min_size=1, max_size=4),
    st.lists(
        st.tuples(
            st.sampled_from(["allow", "drop", "reject", "pass"]),
            st.one_of(st.none(), st.integers(0, 3)),
            st.one_of(st.none(), st.integers(0, 3)),
            st.lists(services_st, max_size=2),
            st.sampled_from(["emergency", "infrastructure", "environment", "application"]),
        ),
        max_size=8,
    ),
    packets_st,
    st.sampled_from(["allow", "drop", "reject"]),
)
def test_hop_equals_naive_reference(
    set_members: list[list[str]], rule_specs: list[tuple], p: Packet, default: str
) -> None:
    sets = {}
    for i, members in enumerate(set_members):
        hosts = tuple(m for m in members if "/" not in m)
        nets = tuple(m for m in members if "/" in m)
        sets[f"s{i}"] = IRSet(f"s{i}", hosts, nets)
    order = ["emergency", "infrastructure", "environment", "application"]
    rule_specs = sorted(rule_specs, key=lambda t: order.index(t[4]))
    rules = [
        R(
            i + 1,
            action,
            None if src is None else f"s{src % len(sets)}",
            None if dst is None else f"s{dst % len(sets)}",
            tuple(svcs),
            category=cat,
        )
        for i, (action, src, dst, svcs, cat) in enumerate(rule_specs)
    ]
    st_ = S(
        "h1",
        [V("app", "10.0.0.2", ingress=tuple(r.id for r in rules), default=default)],
        rules,
        list(sets.values()),
    )
    hv = judge_hop(st_, "app", "ingress", p)
    if hv.invalid:  # conntrack, not rules: only for ICMP types that cannot start a connection
        assert p.protocol == "icmp" and p.icmp_type in (0, 3)
        return
    assert (hv.verdict, hv.rule.id if hv.rule else None) == naive_hop(rules, sets, p, default)


# ------------------------------------------------------------------------ patched address sets

_POOL = [f"10.0.0.{i}" for i in range(1, 9)] + ["fd00::1", "fd00::2", "0:0::fd00:3", "::ffff:10.0.0.1"]
_NETS = ["10.0.0.0/30", "fd00::/126", "10.0.0.7/32"]


@settings(max_examples=200, deadline=None)
@given(
    old=st.lists(st.sampled_from(_POOL), unique=True),
    new=st.lists(st.sampled_from(_POOL), unique=True),
    cidrs=st.lists(st.sampled_from(_NETS), unique=True, max_size=2),
    probe=st.sampled_from([*_POOL, "10.0.0.3", "10.0.0.9", "fd00::3", "fd00::9"]),
)
def test_a_patched_address_set_equals_one_built_anew(old, new, cidrs, probe) -> None:
    """What the revocation judge relies on: patching a set by its member changes gives the same
    membership as building it (or declines, for a spelling that aliases another address)."""
    a, b = IRSet("s", tuple(old), tuple(cidrs)), IRSet("s", tuple(new), tuple(cidrs))
    patched = AddressSet.of(a).patched(a, b)
    want = AddressSet.of(b)
    ip = ipaddress.ip_address(probe)
    got = (patched or want).contains(ip.version == 6, int(ip))
    assert got == want.contains(ip.version == 6, int(ip))
    if patched is not None:
        assert (patched.hosts4, patched.hosts6) == (want.hosts4, want.hosts6)
