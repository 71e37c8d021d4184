"""Addresses follow the workload, end to end: a managed lab (manager + agents), a workload that may reach
two services through its group membership changes its IP inside its namespace; the agent sees the new
host route, the manager re-addresses the Workload (audited as `agent:<host>`), every host's sets follow,
the flow works from the new IP, and the old IP no longer matches at the destination side.

Needs root (network namespaces, nftables); skipped, visibly, otherwise.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from labhelpers import NEEDS_ROOT

pytestmark = NEEDS_ROOT

OLD_IP = "10.78.0.1"
NEW_IP = "10.78.0.9"
SVC_IP = "10.78.0.2"
GUARD_IP = "10.78.0.3"

INVENTORY = f"""
kind: Host
metadata: {{name: h1}}
---
kind: Host
metadata: {{name: h2}}
---
kind: Tenant
metadata: {{name: t1}}
---
kind: Workload
metadata: {{name: cli, tenant: t1, labels: {{role: client}}}}
spec: {{host: h1, vnics: [{{name: eth0, ips: [{OLD_IP}]}}]}}
---
kind: Workload
metadata: {{name: svc, tenant: t1}}
spec: {{host: h2, vnics: [{{name: eth0, ips: [{SVC_IP}]}}], lab: {{servers: [tcp/80]}}}}
---
kind: Workload
metadata: {{name: guard, tenant: t1}}
spec: {{host: h2, vnics: [{{name: eth0, ips: [{GUARD_IP}]}}], lab: {{servers: [tcp/80]}}}}
---
kind: Group
metadata: {{name: clients, tenant: t1}}
spec: {{selector: 'role == "client"'}}
---
kind: Group
metadata: {{name: svc, tenant: t1}}
spec: {{workloads: [svc]}}
---
kind: Group
metadata: {{name: guard, tenant: t1}}
spec: {{workloads: [guard]}}
---
kind: Policy
metadata: {{name: access, tenant: t1}}
spec:
  rules:
  - {{name: to-svc, sources: [clients], destinations: [svc], services: [tcp/80], action: allow}}
  - {{name: to-guard, sources: [clients], destinations: [guard], services: [tcp/80], action: allow}}
"""


@pytest.fixture(scope="module")
def managed() -> Iterator[tuple[Any, Any]]:
    from omniwall.lab.managed import managed_lab

    with managed_lab(INVENTORY, ipv6=False) as (lab, cp):
        yield lab, cp


def _probe(lab: Any, src_ns: str, src_addr: str, dst: str, dst_ip: str) -> Any:
    from omniwall.lab.probe import Probe, probe_once

    return probe_once(Probe(src_ns, dst_ip, "tcp", 80, "probe", dst, src_addr, dst), timeout=1.5)


def _run(result: Any) -> None:
    assert result.returncode == 0, f"{result.args}: {result.stderr}"


def _ips(cp: Any) -> list[str]:
    w = cp.api("GET", "/v1/workloads/cli", params={"tenant": "t1"})
    return list(w["spec"]["vnics"][0]["ips"])


def _has(text: str, ip: str) -> bool:
    return re.search(rf"(?<![\d.]){re.escape(ip)}(?![\d.])", text) is not None


def test_workload_ip_change_is_followed_by_every_set(managed: tuple[Any, Any]) -> None:
    lab, cp = managed
    cli, h1 = lab.plan.workload("t1/cli"), lab.plan.host("h1")
    vnic = cli.vnics[0].host_ifname

    # Before: the client reaches both services from its address; so does that address from outside the
    # inventory (h1's own namespace, judged only at guard's ingress: the rule's source set decides).
    assert _probe(lab, cli.netns, OLD_IP, "t1/svc", SVC_IP).allowed
    _run(lab.exec_host("h1", ["ip", "route", "del", f"{OLD_IP}/32", "dev", vnic]))
    _run(lab.exec_host("h1", ["ip", "addr", "add", f"{OLD_IP}/32", "dev", "lo"]))
    try:
        control = _probe(lab, h1.netns, OLD_IP, "t1/guard", GUARD_IP)
    finally:
        _run(lab.exec_host("h1", ["ip", "addr", "del", f"{OLD_IP}/32", "dev", "lo"]))
    assert control.allowed, control.detail
    # (the agent saw cli's route go; an absent vNIC is "unknown", never "no addresses")
    assert _ips(cp) == [OLD_IP]

    # The workload changes its IP: inside its namespace, and the host's /32 route to it.
    _run(lab.exec("t1/cli", ["ip", "addr", "add", f"{NEW_IP}/32", "dev", "eth0"]))
    _run(lab.exec("t1/cli", ["ip", "addr", "del", f"{OLD_IP}/32", "dev", "eth0"]))
    _run(lab.exec("t1/cli", ["ip", "route", "replace", "169.254.1.1/32", "dev", "eth0", "scope", "link"]))
    _run(lab.exec("t1/cli", ["ip", "route", "replace", "default", "via", "169.254.1.1", "dev", "eth0"]))
    _run(lab.exec_host("h2", ["ip", "route", "replace", f"{NEW_IP}/32", "via", h1.fabric_ip4]))
    _run(lab.exec_host("h1", ["ip", "route", "add", f"{NEW_IP}/32", "dev", vnic, "scope", "link"]))

    # The agent reports it; the manager re-addresses the Workload with no policy edit.
    deadline = time.monotonic() + 20
    while _ips(cp) != [NEW_IP]:
        assert time.monotonic() < deadline, f"manager still has {_ips(cp)}"
        time.sleep(0.1)
    revision = int(cp.api("GET", "/v1/workloads/cli", params={"tenant": "t1"})["metadata"]["revision"])
    cp.wait_in_sync(revision=revision, timeout=30)
    audit = cp.api("GET", "/v1/audit", params={"kind": "Workload", "name": "cli"})["items"]
    assert [e["actor"] for e in audit if e["action"] == "update"] == ["agent:h1"]
    policy = cp.api("GET", "/v1/policies/access", params={"tenant": "t1"})
    assert policy["metadata"]["revision"] < revision  # the policy was not edited

    # h2's kernel: the clients set holds the new address, not the old one.
    ruleset = lab.exec_host("h2", ["nft", "list", "table", "inet", "omniwall"])
    _run(ruleset)
    assert _has(ruleset.stdout, NEW_IP) and not _has(ruleset.stdout, OLD_IP)

    # The flow works from the new IP...
    assert _probe(lab, cli.netns, NEW_IP, "t1/svc", SVC_IP).allowed
    assert _probe(lab, cli.netns, NEW_IP, "t1/guard", GUARD_IP).allowed
    # ...and the old IP no longer matches: the same packet as the control, now dropped at guard's ingress.
    _run(lab.exec_host("h1", ["ip", "addr", "add", f"{OLD_IP}/32", "dev", "lo"]))
    try:
        after = _probe(lab, h1.netns, OLD_IP, "t1/guard", GUARD_IP)
    finally:
        _run(lab.exec_host("h1", ["ip", "addr", "del", f"{OLD_IP}/32", "dev", "lo"]))
    assert not after.allowed and after.detail == "timeout", after.detail

    # The live explain agrees with the kernel, and the policy is realized on both hosts.
    q = {"to": "t1/guard", "proto": "tcp", "port": 80}
    live = cp.api("GET", "/v1/explain", params={"from": "t1/cli", **q})
    assert live["allowed"] and live["request"]["packet"]["src"] == NEW_IP
    old = cp.api("GET", "/v1/explain", params={"from": OLD_IP, **q})
    assert not old["allowed"] and [h["decision"] for h in old["request"]["hops"]] == [
        "default (tenant t1: drop)"
    ]
    realization = cp.api("GET", "/v1/policies/access/realization", params={"tenant": "t1"})
    assert realization["realized"] and all(r["installed"] for r in realization["rules"])
