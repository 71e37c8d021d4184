"""Per-vNIC connection limits (docs/conntrack-limits.md) against the kernel, with real connections.

One host, three workloads: `f` (the flooder), `b` (its neighbour), `s` (the server). Over the limit,
the flooder's new connections are dropped and counted by its named counter `cl_<if>`; the neighbour,
with the same limits, still connects. The limits are changed in place (incremental apply) and removed.
"""

from __future__ import annotations

import json
import random
import socket
import time
from dataclasses import replace

from topo import Server, nsexec, open_stream, rule, state, tcp_connect, vnic

from omniwall.agent.conntrack_usage import ConntrackUsageReader
from omniwall.dataplane.netns import in_netns
from omniwall.dataplane.nft.names import connlimit_counter

PORT = 7100


def _counter(host: str, ifname: str) -> int:
    res = nsexec(host, ["nft", "-j", "list", "counter", "inet", "omniwall", connlimit_counter(ifname)])
    for obj in json.loads(res.stdout)["nftables"]:
        if "counter" in obj:
            return int(obj["counter"]["packets"])
    raise AssertionError("no counter in the listing")


def _udp_flows(ns: str, dst: str, port: int, n: int) -> list[socket.socket]:
    """`n` new UDP flows (one datagram from each of `n` source ports), sent as fast as Python can."""
    socks = []
    with in_netns(ns):
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            socks.append(s)
    for s in socks:
        s.sendto(b"x", (dst, port))
    return socks


def _echoes(socks: list[socket.socket], wait: float = 0.5) -> int:
    time.sleep(wait)
    got = 0
    for s in socks:
        try:
            s.recv(16)
            got += 1
        except BlockingIOError:
            pass
        s.close()
    return got


def test_concurrent_limit_drops_the_flooders_excess_and_the_neighbour_connects(
    topo, backends, root_untouched
):
    h = topo.add_host("h1")
    f, b, s = (topo.add_workload(h, n, i) for i, n in enumerate(("f", "b", "s"), 1))
    server = Server(s.ns, PORT, v6=False)
    limit = 8
    vf = replace(vnic(f, default="allow"), conn_limit=limit)
    vb = replace(vnic(b, default="allow"), conn_limit=limit)
    be = backends(h)
    st = state(1, [vf, vb, vnic(s, default="allow")], [])
    be.sync(st)
    held = []
    try:
        results = []
        for _ in range(limit + 6):  # held open: each one stays a tracked connection
            try:
                held.append(open_stream(f.ns, s.ip4, PORT, timeout=0.3))
                results.append("open")
            except OSError:
                results.append("dropped")
        assert results.count("open") == limit, results
        # the agent's alarm reader sees this namespace's table (its own count, not the root's)
        usage = ConntrackUsageReader(h).read()
        assert usage is not None and limit <= usage.count < usage.max
        dropped_packets = _counter(h, f.ifname)
        assert dropped_packets >= 6  # at least each refused SYN (retransmissions add more)
        # the neighbour has its own count: its connections pass while the flooder is at its limit
        assert [tcp_connect(b.ns, s.ip4, PORT, timeout=1.0) for _ in range(3)] == ["open"] * 3
        assert _counter(h, b.ifname) == 0
        # a policy change re-renders the flooder's chains but not its limit chain: the count holds
        allow = rule(1, "allow")
        st_pol = replace(
            st, revision=2, rules=(allow,), vnics=tuple(replace(v, egress=(1,)) for v in st.vnics)
        )
        be.sync(st_pol)
        assert tcp_connect(f.ns, s.ip4, PORT, timeout=0.5) == "timeout"
        assert tcp_connect(b.ns, s.ip4, PORT, timeout=1.0) == "open"
        # raising the limit (incremental apply) lets the flooder connect again
        st2 = replace(
            st_pol,
            revision=3,
            vnics=tuple(replace(v, conn_limit=None) if v.ifname == f.ifname else v for v in st_pol.vnics),
        )
        be.sync(st2)
        assert tcp_connect(f.ns, s.ip4, PORT, timeout=1.0) == "open"
        res = nsexec(h, ["nft", "list", "counters", "table", "inet", "omniwall"])
        assert connlimit_counter(f.ifname) not in res.stdout  # the counter left with the limit
    finally:
        for c in held:
            c.close()
        server.close()


def test_rate_limit_drops_new_flows_over_the_rate_not_the_neighbours(topo, backends, root_untouched):
    h = topo.add_host("h1")
    f, b, s = (topo.add_workload(h, n, i) for i, n in enumerate(("f", "b", "s"), 1))
    server = Server(s.ns, PORT, v6=False)
    rate = 20  # new connections per second; burst max(5, rate // 10) = 5
    be = backends(h)
    be.sync(
        state(
            1,
            [
                replace(vnic(f, default="allow"), conn_rate=rate),
                replace(vnic(b, default="allow"), conn_rate=rate),
                vnic(s, default="allow"),
            ],
            [],
        )
    )
    try:
        t0 = time.monotonic()
        flood = _udp_flows(f.ns, s.ip4, PORT, 400)
        elapsed = time.monotonic() - t0
        passed = _echoes(flood)
        assert passed <= 5 + rate * (elapsed + 0.1) + 2, (passed, elapsed)
        assert _counter(h, f.ifname) >= 400 - passed
        neighbour = _udp_flows(b.ns, s.ip4, PORT, 4)  # within its own burst
        assert _echoes(neighbour) == 4
    finally:
        server.close()


PAIRS = [("a", "b"), ("b", "a"), ("a", "c"), ("c", "b")]
KINDS = ("tcp4", "tcp6", "udp4", "ping4", "ping6")


def _verdict_lab(topo, backends, servers):  # type: ignore[no-untyped-def]
    h1, h2 = topo.add_host("h1"), topo.add_host("h2")
    topo.link_hosts(h1, h2)
    wl = {n: topo.add_workload(h, n, i) for i, (n, h) in enumerate((("a", h1), ("b", h1), ("c", h2)), 1)}
    hosts = {"a": h1, "b": h1, "c": h2}
    for w in wl.values():
        servers(w.ns, 8080)
        servers(w.ns, 9090)
    # Neighbour caches first (fabric and each workload's veth, both families): the first IPv6 packet
    # across the fabric otherwise waits for neighbour discovery past a probe's timeout, and that probe
    # reads as refused whatever the rules say.
    for h, peer4, peer6 in ((h1, "192.168.255.2", "fd99::2"), (h2, "192.168.255.1", "fd99::1")):
        nsexec(h, ["ping", "-c1", "-W1", peer4], check=False)
        nsexec(h, ["ping", "-6", "-c1", "-W1", peer6], check=False)
    for w in wl.values():
        nsexec(hosts[w.name], ["ping", "-c1", "-W1", w.ip4], check=False)
        nsexec(hosts[w.name], ["ping", "-6", "-c1", "-W1", w.ip6], check=False)
    return wl, hosts, {h1: backends(h1), h2: backends(h2)}


def test_limits_do_not_change_verdicts(topo, backends, servers, root_untouched):
    """Limits well above the traffic change no verdict: on the differential test's random policies
    (stateless rules included) the kernel answers every probe the same with and without them."""
    from test_nft_differential import _kernel, _states

    wl, hosts, be = _verdict_lab(topo, backends, servers)
    rnd = random.Random(11)
    disagreements, outcomes = [], set()
    for round_ in range(2):
        plain = _states(rnd, wl, hosts, stateless=True)
        limited = {
            h: replace(st, vnics=tuple(replace(v, conn_limit=1000, conn_rate=10_000) for v in st.vnics))
            for h, st in plain.items()
        }
        got: dict[str, dict[tuple[str, str, str], bool]] = {}
        for arm, states in (("plain", plain), ("limited", limited)):
            for h, st in states.items():
                be[h].sync(st)
            got[arm] = {
                (s, d, kind): _kernel(wl[s], wl[d], kind) for s, d in PAIRS for kind in KINDS
            }  # fmt: skip
        outcomes.update(got["limited"].values())
        for key, verdict in got["limited"].items():
            if verdict != got["plain"][key]:
                disagreements.append(f"{round_}: {key}: with limits {verdict}, without {got['plain'][key]}")
    assert not disagreements, "\n".join(disagreements)
    assert outcomes == {True, False}
