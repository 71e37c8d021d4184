"""Verdicts with real traffic: both hops judged, anti-spoofing, reject types, stateless, monitor."""

from __future__ import annotations

import time

import pytest
from topo import (
    icmp,
    nsexec,
    ping,
    rule,
    state,
    tcp,
    tcp_connect,
    udp,
    udp_probe,
    vnic,
)

from omniwall.compiler.ir import IRSet
from omniwall.dataplane.conntrack import ConntrackTable

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("root_untouched")]


@pytest.fixture
def pair(one_host):
    """One host, workloads a (10.0.0.1) and b (10.0.0.2), echo servers on b:8080/9090 and a:8080."""
    return one_host("a", "b", serve=(("b", 8080), ("b", 9090), ("a", 8080)))


def test_both_hops_judged_same_host(pair, backends):
    h, a, b = pair
    be = backends(h)
    allow_out = rule(10, "allow")  # a may send anything
    s1 = state(1, [vnic(a, egress=(10,)), vnic(b)], [allow_out])  # b: ingress default drop
    be.sync(s1)
    assert tcp_connect(a.ns, b.ip4, 8080) == "timeout"  # egress allowed, ingress dropped
    assert tcp_connect(a.ns, b.ip6, 8080) == "timeout"
    allow_in = rule(20, "allow", services=(tcp(8080),))
    be.sync(state(2, [vnic(a, egress=(10,)), vnic(b, ingress=(20,))], [allow_out, allow_in]))
    assert tcp_connect(a.ns, b.ip4, 8080) == "open"
    assert tcp_connect(a.ns, b.ip6, 8080) == "open"
    assert tcp_connect(a.ns, b.ip4, 9090) == "timeout"  # other port: still the default
    # the egress hop alone denies too
    be.sync(state(3, [vnic(a), vnic(b, ingress=(20,))], [allow_in]))
    assert tcp_connect(a.ns, b.ip4, 8080) == "timeout"


def test_both_hops_judged_cross_host(topo, backends, servers):
    h1, h2 = topo.add_host("h1"), topo.add_host("h2")
    topo.link_hosts(h1, h2)
    a = topo.add_workload(h1, "a", 1)
    c = topo.add_workload(h2, "c", 3)
    servers(c.ns, 8080)
    be1, be2 = backends(h1), backends(h2)
    be1.sync(state(1, [vnic(a, egress=(10,))], [rule(10, "allow")], host="h1"))
    be2.sync(state(1, [vnic(c)], [], host="h2"))  # c: ingress default drop
    assert tcp_connect(a.ns, c.ip4, 8080) == "timeout"
    be2.sync(state(2, [vnic(c, ingress=(20,))], [rule(20, "allow", services=(tcp(8080),))], host="h2"))
    assert tcp_connect(a.ns, c.ip4, 8080) == "open"
    assert tcp_connect(a.ns, c.ip6, 8080) == "open"
    be1.sync(state(2, [vnic(a)], [], host="h1"))  # now the source host's egress denies
    assert tcp_connect(a.ns, c.ip4, 8080) == "timeout"


def test_anti_spoofing(pair, backends):
    h, a, b = pair
    be = backends(h)
    be.sync(state(1, [vnic(a, egress=(1,)), vnic(b, ingress=(1,))], [rule(1, "allow")]))
    assert tcp_connect(a.ns, b.ip4, 8080) == "open"
    # a claims another address and sends from it: dropped before any rule
    nsexec(a.ns, ["ip", "addr", "add", "10.0.0.99/32", "dev", "eth0"])
    nsexec(h, ["ip", "route", "add", "10.0.0.99/32", "dev", a.ifname])  # replies could come back
    res = nsexec(a.ns, ["ping", "-n", "-c", "1", "-W", "1", "-I", "10.0.0.99", b.ip4], check=False)
    assert res.returncode != 0
    spoof = sum(
        e.get("counter", {}).get("packets", 0)
        for r in be.nft.list_table("inet", "omniwall", terse=True)
        if "rule" in r and r["rule"].get("comment") == "spoof"
        for e in r["rule"]["expr"]
        if isinstance(e.get("counter"), dict)
    )
    assert spoof >= 1
    assert ping(a.ns, b.ip4) == "open"
    # a vNIC without IPv6 addresses may send no IPv6 at all
    be.sync(state(2, [vnic(a, egress=(1,), addresses=(a.ip4,)), vnic(b, ingress=(1,))], [rule(1, "allow")]))
    assert tcp_connect(a.ns, b.ip6, 8080) == "timeout"
    assert tcp_connect(a.ns, b.ip4, 8080) == "open"
    counters = {c.rule_id: c for c in be.counters()}
    assert counters[1].packets > 0


def test_reject_types(pair, backends):
    h, a, b = pair
    be = backends(h)
    be.sync(state(1, [vnic(a, egress=(1,)), vnic(b, ingress=(2,))], [rule(1, "allow"), rule(2, "reject")]))
    t0 = time.monotonic()
    assert tcp_connect(a.ns, b.ip4, 8080, timeout=3) == "refused"  # TCP reset
    assert time.monotonic() - t0 < 1.0
    assert tcp_connect(a.ns, b.ip6, 8080, timeout=3) == "refused"
    assert udp_probe(a.ns, b.ip4, 8080) == "unreachable"  # ICMP admin-prohibited
    assert udp_probe(a.ns, b.ip6, 8080) == "unreachable"
    assert ping(a.ns, b.ip4) == "filtered"
    # default action reject behaves the same
    be.sync(state(2, [vnic(a, egress=(1,)), vnic(b, default="reject")], [rule(1, "allow")]))
    assert tcp_connect(a.ns, b.ip4, 8080, timeout=3) == "refused"
    assert udp_probe(a.ns, b.ip4, 8080) == "unreachable"


def test_drop_and_service_matching(pair, backends):
    h, a, b = pair
    be = backends(h)
    rules = [
        rule(1, "allow"),
        rule(2, "allow", services=(tcp(8080), udp(8080), icmp(8))),
        rule(3, "drop"),
    ]
    be.sync(state(1, [vnic(a, egress=(1,)), vnic(b, ingress=(2, 3), default="allow")], rules))
    assert tcp_connect(a.ns, b.ip4, 8080) == "open"
    assert udp_probe(a.ns, b.ip4, 8080) == "open"
    assert ping(a.ns, b.ip4) == "open"
    assert tcp_connect(a.ns, b.ip4, 9090) == "timeout"  # dropped by rule 3, before the default allow
    assert ping(a.ns, b.ip6) == "timeout"  # icmp (v4) service does not match icmpv6


def test_pass_skips_category(pair, backends):
    h, a, b = pair
    be = backends(h)
    rules = [
        rule(1, "allow"),
        rule(2, "pass", services=(tcp(8080),), category="emergency"),
        rule(3, "drop", category="emergency"),
        rule(4, "allow", services=(tcp(8080, 9090),), category="application"),
    ]
    be.sync(state(1, [vnic(a, egress=(1,)), vnic(b, ingress=(2, 3, 4))], rules))
    assert tcp_connect(a.ns, b.ip4, 8080) == "open"  # pass -> application allow
    assert tcp_connect(a.ns, b.ip4, 9090) == "timeout"  # emergency drop


def test_sets_and_cidrs(pair, backends):
    h, a, b = pair
    be = backends(h)
    sets = [IRSet("web", (a.ip4,), ()), IRSet("nets", (), ("10.0.0.0/30", "fd00::/126"))]
    rules = [
        rule(1, "allow"),
        rule(2, "allow", src="web"),
        rule(3, "allow", src="nets", services=(tcp(9090),)),
    ]
    be.sync(state(1, [vnic(a, egress=(1,)), vnic(b, ingress=(2, 3))], rules, sets))
    assert tcp_connect(a.ns, b.ip4, 8080) == "open"  # a in web (v4)
    assert tcp_connect(a.ns, b.ip6, 8080) == "timeout"  # web has no v6 member
    assert tcp_connect(a.ns, b.ip6, 9090) == "open"  # fd00::1 in fd00::/126


def test_stateless_needs_reply_rule(pair, backends):
    h, a, b = pair
    be = backends(h)
    ab = rule(1, "allow", dst="b", services=(tcp(8080),), stateful=False)
    sets = [IRSet("a", a.addresses), IRSet("b", b.addresses)]
    # only the forward direction allowed: the SYN passes, the SYN-ACK hits b's egress default drop
    be.sync(state(1, [vnic(a, egress=(1,)), vnic(b, ingress=(1,))], [ab], sets))
    assert tcp_connect(a.ns, b.ip4, 8080) == "timeout"
    reply = rule(2, "allow", src="b", dst="a", stateful=False)
    be.sync(
        state(2, [vnic(a, egress=(1,), ingress=(2,)), vnic(b, egress=(2,), ingress=(1,))], [ab, reply], sets)
    )
    assert tcp_connect(a.ns, b.ip4, 8080) == "open"
    assert tcp_connect(a.ns, b.ip6, 8080) == "open"
    ct = ConntrackTable(h)
    try:
        tracked = [e for e in ct.list() if e.protocol == 6 and e.dport == 8080 and e.src == a.ip4]
    finally:
        ct.close()
    assert tracked == []  # untracked: nothing in conntrack
    counters = {c.rule_id: c.packets for c in be.counters()}
    assert counters[1] >= 2 and counters[2] >= 2  # judged every packet, both hops
