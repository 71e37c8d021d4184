"""Fail closed on unknown vNICs (Felix does the same): while the agent does not know an interface whose
name has a workload prefix, traffic from it and forwarded to it is dropped; known ones are judged by
their policy; a vNIC the state announces before its interface exists (migration) is judged from its
first packet; other interfaces are not ours and pass."""

from __future__ import annotations

import pytest
from topo import Workload, open_stream, rule, state, stream_alive, tcp, tcp_connect, vnic

from omniwall.compiler.ir import diff
from omniwall.dataplane.nft.backend import normalized

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("root_untouched")]


@pytest.fixture
def lan(topo, servers):
    """One host; known workload k (ifname owk0), server s (ows0, tcp/8080 echo), unknown u (owu0)."""
    h = topo.add_host("h1")
    k = topo.add_workload(h, "k", 1, ifname="owk0")
    s = topo.add_workload(h, "s", 2, ifname="ows0")
    u = topo.add_workload(h, "u", 3, ifname="owu0")
    for w in (s, u):
        servers(w.ns, 8080)
    return h, k, s, u


def policy(rev, *workloads, server):
    """Everyone may send anything; the server accepts tcp/8080 only."""
    rules = [rule(1, "allow"), rule(2, "allow", services=(tcp(8080),))]
    vnics = [vnic(w, egress=(1,)) for w in workloads] + [vnic(server, ingress=(2,))]
    return state(rev, vnics, rules)


def test_unknown_workload_interface_is_dropped_both_ways(lan, backends):
    h, k, s, u = lan
    be = backends(h)
    s1 = policy(1, k, server=s)
    be.sync(s1)
    assert tcp_connect(k.ns, s.ip4, 8080) == "open"  # known: judged, allowed
    assert tcp_connect(k.ns, s.ip4, 9090) == "timeout"  # known: judged, refused by the default
    stream = open_stream(k.ns, s.ip4, 8080)
    try:
        assert tcp_connect(u.ns, s.ip4, 8080) == "timeout"  # from the unknown vNIC
        assert tcp_connect(u.ns, s.ip6, 8080) == "timeout"
        assert tcp_connect(k.ns, u.ip4, 8080) == "timeout"  # forwarded to it
        assert tcp_connect(k.ns, u.ip6, 8080) == "timeout"
        assert stream_alive(stream)  # established traffic of known vNICs is untouched
        # the agent learns u: from now on it is judged like any vNIC
        s2 = policy(2, k, u, server=s)
        be.apply(s1, diff(s1, s2), s2)
        assert tcp_connect(u.ns, s.ip4, 8080) == "open"
        assert tcp_connect(u.ns, s.ip4, 9090) == "timeout"
        assert tcp_connect(k.ns, u.ip4, 8080) == "timeout"  # u has no ingress allow: its default drops
        assert stream_alive(stream)
        assert normalized(be.realized()) == normalized(s2)
    finally:
        stream.close()
    counters = {r["rule"]["comment"] for r in be.nft.list_table("inet", "omniwall") if "rule" in r}
    assert "unknown:ow" in counters


def test_vnic_known_before_its_interface_appears(topo, servers, backends):
    """Migration: the destination learns the vNIC first, the interface arrives later."""
    h = topo.add_host("h1")
    k = topo.add_workload(h, "k", 1, ifname="owk0")
    s = topo.add_workload(h, "s", 2, ifname="ows0")
    servers(s.ns, 8080)
    be = backends(h)
    late = Workload("m", f"{topo.prefix}wm", h, "owm0", "10.0.0.4", "fd00::4")
    be.sync(policy(1, k, late, server=s))
    m = topo.add_workload(h, "m", 4, ifname="owm0")
    assert tcp_connect(m.ns, s.ip4, 8080) == "open"
    assert tcp_connect(m.ns, s.ip4, 9090) == "timeout"


def test_workload_prefixes_are_configurable(lan, backends):
    h, k, s, u = lan
    off = backends(h, workload_prefixes=())  # no prefixes: unknown interfaces are not ours, they pass
    off.sync(policy(1, k, server=s))
    assert tcp_connect(u.ns, s.ip4, 8080) == "open"
    off.close()
    other = backends(h, workload_prefixes=("tap", "vnet"))  # a host whose vNICs are tap*/vnet*
    assert other.realized() is None  # the table's prefixes differ from this configuration: rebuild
    other.sync(policy(2, k, server=s))
    assert tcp_connect(u.ns, s.ip4, 8080) == "open"  # owu0 matches neither prefix
    with pytest.raises(ValueError, match=r"workload_prefixes\[0\]"):
        backends(h, workload_prefixes=("ow*",))
