"""The three-tier example with its policy programmed (standalone: compiler + nftables backend): every
probe of the matrix gives the result the sim expects from the same policy."""

from __future__ import annotations

import time
from pathlib import Path

from labhelpers import STANDALONE_MARKS, TWO_HOSTS, netns_list
from omniwall.lab import Lab

pytestmark = STANDALONE_MARKS

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "three-tier"


def test_three_tier_matrix_matches_the_policy() -> None:
    with Lab.up([EXAMPLE], policy=True) as lab:
        prefix = lab.prefix
        assert lab.state.policy == "standalone"
        start = time.monotonic()
        entries = lab.matrix(expect=True)
        assert time.monotonic() - start < 15
        assert len(entries) >= 50
        wrong = [e for e in entries if not e.agrees]
        assert not wrong, "\n".join(f"{e.json_line()} ({e.detail})" for e in wrong)
        # The policy is not trivial: both outcomes occur.
        assert any(e.allowed for e in entries) and any(not e.allowed for e in entries)
        # The nftables table lives in the host namespaces, never in the root namespace.
        assert "omniwall" in lab.exec_host("host-1", ["nft", "list", "tables"]).stdout
    assert not {n for n in netns_list() if n.startswith(prefix)}


POLICY = """
kind: Group
metadata: {name: front, tenant: t1}
spec: {workloads: [a]}
---
kind: Group
metadata: {name: back, tenant: t1}
spec: {workloads: [c]}
---
kind: Policy
metadata: {name: p, tenant: t1}
spec:
  rules:
    - name: front-to-back
      sources: [front]
      destinations: [back]
      services: [tcp/80, icmp, icmpv6]
      action: allow
"""


def test_two_hosts_policy_ipv4_and_ipv6() -> None:
    with Lab.up(TWO_HOSTS + "---" + POLICY, policy=True) as lab:
        families = [4, 6] if lab.state.ipv6 else [4]
        for family in families:
            assert lab.probe("a", "c", "tcp", 80, family=family)
            assert lab.probe("a", "c", "icmp", family=family)
            # No rule the other way: the default action (drop).
            assert not lab.probe("c", "a", "tcp", 80, family=family, timeout=0.5)
            assert not lab.probe("a", "b", "tcp", 80, family=family, timeout=0.5)
            assert not lab.probe("a", "c", "udp", 53, family=family, timeout=0.5)
            entries = lab.matrix("tcp/80,udp/53,icmp", family=family, expect=True)
            wrong = [e for e in entries if not e.agrees]
            assert not wrong, "\n".join(f"{e.json_line()} ({e.detail})" for e in wrong)
