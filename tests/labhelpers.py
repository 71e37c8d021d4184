"""Helpers for tests that use the lab: a small two-host inventory and kernel-state checks (a test
helper, so it lives under tests/, importable as `labhelpers` through tests/conftest.py)."""

from __future__ import annotations

import subprocess

TWO_HOSTS = """
kind: Host
metadata: {name: h1}
---
kind: Host
metadata: {name: h2}
---
kind: Workload
metadata: {name: a, tenant: t1}
spec:
  host: h1
  vnics: [{name: eth0, ips: [10.77.0.1, "fd00:77::1"]}]
  lab: {servers: [tcp/80, udp/53]}
---
kind: Workload
metadata: {name: b, tenant: t1}
spec:
  host: h1
  vnics: [{name: eth0, ips: [10.77.0.2, "fd00:77::2"]}]
  lab: {servers: [tcp/80]}
---
kind: Workload
metadata: {name: c, tenant: t1}
spec:
  host: h2
  vnics: [{name: eth0, ips: [10.77.0.3, "fd00:77::3"]}]
  lab: {servers: [tcp/80, udp/53]}
"""


def netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
