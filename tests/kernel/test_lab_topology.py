"""The lab's topology without policy: namespaces, routing, responders, probes, matrix, exec."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from labhelpers import LAB_MARKS, TWO_HOSTS, netns_list, root_links
from omniwall.lab import Lab
from omniwall.lab.probe import Probe, run_probes

pytestmark = LAB_MARKS


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab.up(TWO_HOSTS, policy=False) as lab:
        yield lab


def test_namespaces_and_interfaces(lab: Lab) -> None:
    names = netns_list()
    assert set(lab.namespaces()) <= names
    assert all(n.startswith(lab.prefix) for n in lab.namespaces())
    assert lab.host_netns("h1") == f"{lab.prefix}h-h1"
    assert lab.workload_netns("t1/a") == f"{lab.prefix}w-t1-a"
    # Host-side vNIC interfaces carry the compiler's names, and none of them is in the root namespace.
    host_links = lab.exec_host("h1", ["ip", "-o", "link"]).stdout
    for w in lab.plan.workloads:
        for v in w.vnics:
            assert v.host_ifname not in root_links()
            assert (v.host_ifname in host_links) == (w.host == "h1")
    assert "eth0" in lab.exec("a", ["ip", "-o", "link"]).stdout


def test_forwarding_only_inside_the_host_namespace(lab: Lab) -> None:
    assert lab.exec_host("h1", ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "1"
    assert lab.exec("a", ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "0"


def test_workload_routes(lab: Lab) -> None:
    routes = lab.exec("a", ["ip", "route"]).stdout
    assert "default via 169.254.1.1 dev eth0" in routes
    addrs = lab.exec("a", ["ip", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert "10.77.0.1/32" in addrs
    h1 = lab.exec_host("h1", ["ip", "route"]).stdout
    assert "10.77.0.3 via 172.31.255.2 dev fabric0" in h1  # remote workload via its host


@pytest.mark.parametrize(
    ("src", "dst", "proto", "port"),
    [
        ("a", "b", "tcp", 80),  # same host
        ("a", "b", "icmp", None),
        ("b", "a", "udp", 53),
        ("a", "c", "tcp", 80),  # across the fabric
        ("a", "c", "udp", 53),
        ("c", "a", "icmp", None),
        ("c", "b", "tcp", 80),
    ],
)
def test_connectivity_without_policy(lab: Lab, src: str, dst: str, proto: str, port: int | None) -> None:
    r = lab.probe_result(src, dst, proto, port)
    assert r.allowed, r.detail


def test_ipv6_connectivity(lab: Lab) -> None:
    if not lab.state.ipv6:
        pytest.skip("IPv6 is not available in this kernel")
    assert lab.probe("a", "c", "tcp", 80, family=6)
    assert lab.probe("c", "b", "icmp", family=6)
    assert lab.probe("a", "b", "udp", 53, family=6) is False  # b serves no UDP


def test_closed_port_is_refused_quickly(lab: Lab) -> None:
    r = lab.probe_result("a", "c", "tcp", 81)
    assert not r.allowed
    assert r.detail == "refused"
    assert r.elapsed < 0.5


def test_responder_answers_a_plain_client(lab: Lab) -> None:
    out = lab.exec("a", ["nc", "-w", "1", "10.77.0.3", "80"]).stdout
    assert out.strip() == "omniwall-lab t1/c tcp/80"
    udp = lab.exec("b", ["sh", "-c", "echo hi | nc -u -w 1 10.77.0.1 53"]).stdout
    assert udp.startswith("omniwall-lab t1/a udp/53")


def test_matrix_json_lines(lab: Lab) -> None:
    start = time.monotonic()
    entries = lab.matrix()
    assert time.monotonic() - start < 5
    lines = [json.loads(e.json_line()) for e in entries]
    # Every ordered pair of distinct workloads x the destination's responders: a->b 1, a->c 2, b->a 2,
    # b->c 2, c->a 2, c->b 1.
    assert len(lines) == 10
    assert all(set(d) == {"from", "to", "proto", "port", "result"} for d in lines)
    assert {"from": "t1/a", "to": "t1/c", "proto": "udp", "port": 53, "result": "allowed"} in lines
    assert all(d["result"] == "allowed" for d in lines)
    assert not any(d["from"] == d["to"] for d in lines)


def test_matrix_explicit_ports(lab: Lab) -> None:
    entries = lab.matrix("tcp/80,udp/53,icmp")
    assert len(entries) == 6 * 3
    by = {(e.src, e.dst, e.proto, e.port): e.allowed for e in entries}
    assert by[("t1/a", "t1/b", "udp", 53)] is False  # b runs no UDP responder
    assert by[("t1/a", "t1/b", "icmp", None)] is True


def test_exec_passes_the_exit_code(lab: Lab) -> None:
    assert lab.exec("a", ["sh", "-c", "exit 3"]).returncode == 3
    assert lab.exec("t1/b", ["true"]).returncode == 0


def test_unknown_workload(lab: Lab) -> None:
    with pytest.raises(KeyError, match="no workload"):
        lab.workload_netns("nope")


def test_second_vnic_answers_through_itself() -> None:
    two_vnics = TWO_HOSTS.replace(
        'vnics: [{name: eth0, ips: [10.77.0.3, "fd00:77::3"]}]',
        'vnics: [{name: eth0, ips: [10.77.0.3, "fd00:77::3"]}, {name: eth1, ips: [10.78.0.3, "fd00:78::3"]}]',
    )
    with Lab.up(two_vnics, policy=False) as lab:
        a, c = lab.plan.workload("a"), lab.plan.workload("c")
        assert [v.name for v in c.vnics] == ["eth0", "eth1"]
        probes = [
            Probe(a.netns, ip, proto, port, a.key, c.key, a.address(6 if ":" in ip else 4), c.key)
            for ip in c.ips
            if lab.state.ipv6 or ":" not in ip
            for proto, port in (("tcp", 80), ("udp", 53))
        ]
        results = run_probes(probes)
        assert all(r.allowed for r in results), [(r.probe.addr, r.probe.proto, r.detail) for r in results]
        # Replies from the second vNIC's address leave through it (source-address rule, own table).
        assert "from 10.78.0.3 lookup 101" in lab.exec("c", ["ip", "rule"]).stdout
