"""The lab's hypervisor half of a migration (`lab.migrate.move_vnics`), without policy: the host end of
the veth moves, the workload's own end, addresses and sockets stay, every host's routes follow, the
source's temporary fallback route is gone afterwards, and a TCP stream through it never breaks."""

from __future__ import annotations

import time

import pytest

from labhelpers import LAB_MARKS, TWO_HOSTS
from omniwall.lab import Lab
from omniwall.lab.migrate import move_vnics
from omniwall.lab.streams import Flow, wait_port

pytestmark = LAB_MARKS


@pytest.mark.parametrize("family", [4, 6])
def test_move_vnics_keeps_the_workload_end_and_the_stream(family: int) -> None:
    from omniwall.lab.netns import ipv6_available

    if family == 6 and not ipv6_available():
        pytest.skip("IPv6 disabled in new namespaces on this kernel")
    with Lab.up(TWO_HOSTS, policy=False, ipv6=family == 6) as lab:
        a, c = lab.plan.workload("t1/a"), lab.plan.workload("t1/c")
        ifname, ip4 = c.vnics[0].host_ifname, c.vnics[0].ips[0]
        ip = c.address(family)
        assert ip is not None
        link_before = lab.exec("t1/c", ["ip", "-o", "link", "show", "eth0"]).stdout.split(":")[0]
        server = Flow("tcp-echo", c.netns, ("6001",)).start()
        try:
            wait_port(a.netns, ip, 6001)
            stream = Flow("tcp-stream", a.netns, (ip, "6001")).start()
            time.sleep(0.3)
            new_plan = move_vnics(lab.plan, "t1/c", "h1", ipv6=family == 6)
            time.sleep(0.7)
            res = stream.stop()
        finally:
            server.stop(timeout=5)
        assert res["ok"] and res["sent"] > 100_000, res
        assert new_plan.workload("t1/c").host == "h1"
        assert ifname in lab.exec_host("h1", ["ip", "-o", "link"]).stdout
        assert ifname not in lab.exec_host("h2", ["ip", "-o", "link"]).stdout
        # the workload's end is the same interface (same index), not a new one
        assert lab.exec("t1/c", ["ip", "-o", "link", "show", "eth0"]).stdout.split(":")[0] == link_before
        h2_routes = lab.exec_host("h2", ["ip", "route", "show", f"{ip4}/32"]).stdout.strip().splitlines()
        assert len(h2_routes) == 1 and "via" in h2_routes[0] and "metric" not in h2_routes[0], h2_routes
        assert f"{ip4} dev {ifname}" in lab.exec_host("h1", ["ip", "route"]).stdout
        assert "PERMANENT" in lab.exec("t1/c", ["ip", "neigh", "show", "169.254.1.1"]).stdout
