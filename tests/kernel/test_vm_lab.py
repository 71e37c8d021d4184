"""VM workloads (QEMU guests on taps) behind Omniwall, next to namespace workloads (docs/vms.md).

One lab for the module (guests boot once: ~2 s each idle, 10-30 s on a loaded 2-core machine): two
guests and two namespaces on two hosts, policy programmed by the nftables backend (standalone).
The agent's data plane sees a guest's tap exactly as a veth: both hops, anti-spoofing, state, counters.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator

import pytest

from omniwall.lab import Lab
from omniwall.lab import guest as lab_guest
from omniwall.lab import vm as lab_vm
from omniwall.lab.standalone import standalone_available
from omniwall.vm import image, qemu

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, QEMU taps)"),
    pytest.mark.skipif(not standalone_available(), reason="compiler or nftables backend not installed"),
    pytest.mark.skipif(shutil.which(qemu.QEMU) is None, reason="qemu-system-x86 missing (make install)"),
]

# front = {vm-a, ns-d}, back = {vm-b, ns-c}; only front -> back is allowed (tcp/80, ping).
# vm-a and ns-c share h1; ns-d and vm-b share h2: same-host and cross-host paths, VM and namespace ends.
LAB = """
kind: Tenant
metadata: {name: t1}
spec: {defaultAction: drop}
---
kind: Host
metadata: {name: h1}
---
kind: Host
metadata: {name: h2}
---
kind: Workload
metadata: {name: vm-a, tenant: t1, labels: {side: front}}
spec:
  host: h1
  vnics: [{name: eth0, ips: [10.78.0.1, "fd00:78::1"]}]
  lab: {kind: vm, servers: [tcp/80]}
---
kind: Workload
metadata: {name: vm-b, tenant: t1, labels: {side: back}}
spec:
  host: h2
  vnics: [{name: eth0, ips: [10.78.0.2, "fd00:78::2"]}]
  lab: {kind: vm, servers: [tcp/80]}
---
kind: Workload
metadata: {name: ns-c, tenant: t1, labels: {side: back}}
spec:
  host: h1
  vnics: [{name: eth0, ips: [10.78.0.3, "fd00:78::3"]}]
  lab: {servers: [tcp/80]}
---
kind: Workload
metadata: {name: ns-d, tenant: t1, labels: {side: front}}
spec:
  host: h2
  vnics: [{name: eth0, ips: [10.78.0.4, "fd00:78::4"]}]
  lab: {servers: [tcp/80]}
---
kind: Group
metadata: {name: front, tenant: t1}
spec: {selector: side == "front"}
---
kind: Group
metadata: {name: back, tenant: t1}
spec: {selector: side == "back"}
---
kind: Policy
metadata: {name: p, tenant: t1}
spec:
  rules:
    - {name: front-to-back, sources: [front], destinations: [back], services: [tcp/80, icmp, icmpv6],
       action: allow}
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    try:
        image.load()
    except image.VmImageError as e:
        pytest.skip(str(e))
    with Lab.up(LAB, policy=True) as lab:
        yield lab


def _counters(lab: Lab, host: str) -> dict[str, int]:
    """Packets per rule comment (rule id, or "spoof") in `host`'s table."""
    out = lab.exec_host(host, ["nft", "-j", "list", "table", "inet", "omniwall"]).stdout
    found: dict[str, int] = {}
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if not rule or "comment" not in rule:
            continue
        for e in rule["expr"]:
            if isinstance(e.get("counter"), dict):
                found[rule["comment"]] = found.get(rule["comment"], 0) + e["counter"]["packets"]
    return found


def test_guests_run_on_taps_in_their_hosts(lab: Lab) -> None:
    for key, host in (("t1/vm-a", "h1"), ("t1/vm-b", "h2")):
        w = lab.plan.workload(key)
        assert w.kind == "vm"
        assert qemu.pid_of(lab_guest.rundir(w.netns)) is not None
        tap = w.vnics[0].host_ifname
        link = lab.exec_host(host, ["ip", "-d", "link", "show", tap]).stdout
        assert "tun type tap" in link and lab_vm.GATEWAY_MAC in link
        assert "10.78.0." in lab.exec_host(host, ["ip", "route", "show", "dev", tap]).stdout
        # The guest has its /32 and the lab's gateway, as a namespace workload does.
        res = lab.exec(key, ["ip", "-4", "addr", "show", "eth0"])
        assert res.returncode == 0 and f"{w.ips[0]}/32" in res.stdout
        assert "default via 169.254.1.1" in lab.exec(key, ["ip", "route"]).stdout
    assert lab.exec("vm-a", ["sh", "-c", "exit 3"]).returncode == 3


def test_vm_policy_enforced_both_ways(lab: Lab) -> None:
    before = _counters(lab, "h2")
    # Allowed: VM -> VM across hosts, VM -> namespace on the same host, namespace -> VM on the same host.
    assert lab.probe("vm-a", "vm-b", "tcp", 80, timeout=3)
    assert lab.probe("vm-a", "ns-c", "tcp", 80, timeout=3)
    assert lab.probe("ns-d", "vm-b", "tcp", 80, timeout=3)
    assert lab.probe("vm-a", "vm-b", "icmp", timeout=3)
    # Denied: the reverse directions and front -> front / back -> back, at a VM's egress or ingress hop.
    assert not lab.probe("vm-b", "vm-a", "tcp", 80, timeout=1)
    assert not lab.probe("ns-c", "vm-a", "tcp", 80, timeout=1)
    assert not lab.probe("vm-b", "ns-c", "tcp", 80, timeout=1)
    assert not lab.probe("ns-d", "vm-a", "tcp", 80, timeout=1)
    # The allowed connections into vm-b were counted by the rule at its tap (h2: ingress hop).
    after = _counters(lab, "h2")
    grown = [c for c, n in after.items() if c != "spoof" and n > before.get(c, 0)]
    assert grown, f"no rule counter grew on h2: {before} -> {after}"


def test_matrix_agrees_with_the_policy(lab: Lab) -> None:
    families = [4, 6] if lab.state.ipv6 else [4]
    for family in families:
        entries = lab.matrix("tcp/80,icmp", family=family, expect=True, timeout=2)
        assert len(entries) == 4 * 3 * 2
        wrong = [e for e in entries if not e.agrees]
        assert not wrong, "\n".join(f"{e.json_line()} ({e.detail})" for e in wrong)
        assert any(e.allowed for e in entries) and any(not e.allowed for e in entries)


def test_guest_spoofing_another_address_is_dropped_and_counted(lab: Lab) -> None:
    # vm-a claims ns-d's address (ns-d may reach vm-b: only anti-spoofing stops it) and pings from it.
    assert lab.probe("vm-a", "vm-b", "icmp", timeout=3)
    before = _counters(lab, "h1").get("spoof", 0)
    assert lab.exec("vm-a", ["ip", "addr", "add", "10.78.0.4/32", "dev", "eth0"]).returncode == 0
    try:
        res = lab.exec("vm-a", ["ping", "-c", "2", "-W", "1", "-I", "10.78.0.4", "10.78.0.2"])
        assert res.returncode != 0, res.stdout
    finally:
        lab.exec("vm-a", ["ip", "addr", "del", "10.78.0.4/32", "dev", "eth0"])
    assert _counters(lab, "h1").get("spoof", 0) >= before + 2
    # The guest's own address still passes.
    assert lab.probe("vm-a", "vm-b", "icmp", timeout=3)
