"""Moving a workload to another host: its vNIC follows, every host's routes follow, its namespace and
responder stay; with policy, the matrix still matches the expectation afterwards."""

from __future__ import annotations

from pathlib import Path

from labhelpers import LAB_MARKS, NEEDS_STANDALONE, TWO_HOSTS
from omniwall.lab import Lab

pytestmark = LAB_MARKS

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "three-tier"


def test_move_without_policy() -> None:
    with Lab.up(TWO_HOSTS, policy=False) as lab:
        pid = lab.state.responders["t1/c"]
        ifname = lab.plan.workload("c").vnics[0].host_ifname
        lab.move("c", "h1")
        assert lab.plan.workload("c").host == "h1"
        assert ifname in lab.exec_host("h1", ["ip", "-o", "link"]).stdout
        assert ifname not in lab.exec_host("h2", ["ip", "-o", "link"]).stdout
        assert "10.77.0.3 via 172.31.255.1 dev fabric0" in lab.exec_host("h2", ["ip", "route"]).stdout
        assert lab.state.responders["t1/c"] == pid  # same process, same sockets
        for src in ("a", "b"):
            assert lab.probe(src, "c", "tcp", 80)
            assert lab.probe(src, "c", "udp", 53)
        assert lab.probe("c", "a", "icmp")
        # The state file follows, so a later CLI call sees the new host.
        assert Lab.attach(lab.name).plan.workload("c").host == "h1"


@NEEDS_STANDALONE
def test_move_with_policy_keeps_the_expectation() -> None:
    with Lab.up([EXAMPLE], policy=True) as lab:
        web = lab.plan.workload("tenant-a/web-1")
        target = next(h.name for h in lab.plan.hosts if h.name != web.host)
        lab.move(web.key, target)
        entries = lab.matrix(expect=True)
        wrong = [e for e in entries if not e.agrees]
        assert not wrong, "\n".join(f"{e.json_line()} ({e.detail})" for e in wrong)
        assert any(e.allowed and e.src == web.key for e in entries)
