"""Kernel vs sim, connection by connection: random policies on two hosts, real traffic, and the sim's
`judge_connection` must predict every outcome (DESIGN §1: the differential test keeps them honest)."""

from __future__ import annotations

import random

import pytest
from topo import Workload, ping, rule, state, tcp_connect, udp_probe, vnic

from omniwall.compiler.ir import HostDesiredState, IRSet, ServiceMatch

sim = pytest.importorskip("omniwall.sim.evaluate")
from omniwall.sim.packet import Packet  # noqa: E402

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("root_untouched")]

SERVICES = [
    (),
    (ServiceMatch("tcp", ((8080, 8080),)),),
    (ServiceMatch("tcp", ((9000, 9100),)), ServiceMatch("udp", ((8080, 8080),))),
    (ServiceMatch("icmp", (), 8),),
    (ServiceMatch("icmpv6", (), 128),),
    (ServiceMatch("udp"),),
]


def _states(rnd: random.Random, wl: dict[str, Workload], hosts: dict[str, str], stateless: bool):
    names = sorted(wl)
    sets = [
        IRSet(f"g{i}", tuple(sorted(a for n in rnd.sample(names, 2) for a in wl[n].addresses)))
        for i in range(3)
    ]
    rules = [
        rule(
            rid,
            rnd.choice(["allow", "allow", "drop", "reject", "pass"]),
            rnd.choice([None, "g0", "g1", "g2"]),
            rnd.choice([None, "g0", "g1", "g2"]),
            rnd.choice(SERVICES),
            category=rnd.choice(["emergency", "environment", "application"]),
            monitor=rnd.random() < 0.1,
            stateful=not (stateless and rnd.random() < 0.3),
        )
        for rid in range(1, 9)
    ]
    order = {"emergency": 0, "environment": 2, "application": 3}

    def hop() -> tuple[int, ...]:
        ids = rnd.sample(range(1, 9), rnd.randint(0, 5))
        return tuple(sorted(ids, key=lambda i: (order[rules[i - 1].category], i)))

    out: dict[str, HostDesiredState] = {}
    for host in sorted(set(hosts.values())):
        vnics = [
            vnic(wl[n], hop(), hop(), rnd.choice(["allow", "drop", "reject"]), rnd.random() < 0.1)
            for n in names
            if hosts[n] == host
        ]
        used = {i for v in vnics for i in (*v.egress, *v.ingress)}
        used_rules = [r for r in rules if r.id in used]
        used_sets = {x for r in used_rules for x in (r.src_set, r.dst_set) if x}
        out[host] = state(1, vnics, used_rules, [s for s in sets if s.name in used_sets], host=host)
    return out


def _kernel(src: Workload, dst: Workload, kind: str) -> bool:
    if kind == "tcp4":
        return tcp_connect(src.ns, dst.ip4, 8080, timeout=0.5) == "open"
    if kind == "tcp6":
        return tcp_connect(src.ns, dst.ip6, 9090, timeout=0.5) == "open"
    if kind == "udp4":
        return udp_probe(src.ns, dst.ip4, 8080, timeout=0.5) == "open"
    if kind == "ping4":
        return ping(src.ns, dst.ip4) == "open"
    return ping(src.ns, dst.ip6) == "open"


def _packet(src: Workload, dst: Workload, kind: str) -> Packet:
    return {
        "tcp4": lambda: Packet(src.ip4, dst.ip4, "tcp", 40000, 8080),
        "tcp6": lambda: Packet(src.ip6, dst.ip6, "tcp", 40000, 9090),
        "udp4": lambda: Packet(src.ip4, dst.ip4, "udp", 40000, 8080),
        "ping4": lambda: Packet(src.ip4, dst.ip4, "icmp"),
        "ping6": lambda: Packet(src.ip6, dst.ip6, "icmpv6"),
    }[kind]()


@pytest.mark.parametrize("stateless", [False, True], ids=["stateful", "with-stateless"])
def test_kernel_agrees_with_sim(topo, backends, servers, stateless):
    h1, h2 = topo.add_host("h1"), topo.add_host("h2")
    topo.link_hosts(h1, h2)
    wl = {
        "a": topo.add_workload(h1, "a", 1),
        "b": topo.add_workload(h1, "b", 2),
        "c": topo.add_workload(h2, "c", 3),
    }
    hosts = {"a": h1, "b": h1, "c": h2}
    for w in wl.values():
        servers(w.ns, 8080)
        servers(w.ns, 9090)
    be = {h1: backends(h1), h2: backends(h2)}
    rnd = random.Random(7 if stateless else 3)
    disagreements = []
    outcomes = set()
    for round_ in range(2):
        states = _states(rnd, wl, hosts, stateless)
        for host, st in states.items():
            be[host].sync(st)
        for s_name, d_name in [("a", "b"), ("b", "a"), ("a", "c"), ("c", "b")]:
            for kind in ("tcp4", "tcp6", "udp4", "ping4", "ping6"):
                src, dst = wl[s_name], wl[d_name]
                want = sim.judge_connection(states, _packet(src, dst, kind)).allowed
                got = _kernel(src, dst, kind)
                outcomes.add(got)
                if got != want:
                    disagreements.append(
                        f"round {round_}: {s_name}->{d_name} {kind}: kernel {got}, sim {want}"
                    )
    assert not disagreements, "\n".join(disagreements)
    assert outcomes == {True, False}  # the random policies both allowed and denied something
