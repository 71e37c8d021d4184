"""Helpers for tests that use the lab: the marks every lab test module starts with, small inventories
and inventory fragments, and kernel-state checks (a test helper, so it lives under tests/, importable as
`labhelpers` through tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from omniwall.lab.standalone import standalone_available

# A lab test module's `pytestmark`: `LAB_MARKS` (root: namespaces, nftables), `STANDALONE_MARKS` when
# the lab programs its own policy (compiler + nftables backend); a module's own skips: `[*LAB_MARKS, ...]`.
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)")
LAB_MARKS = [pytest.mark.kernel, NEEDS_ROOT]
NEEDS_STANDALONE = pytest.mark.skipif(
    not standalone_available(), reason="compiler or nftables backend not installed"
)
STANDALONE_MARKS = [*LAB_MARKS, NEEDS_STANDALONE]


def yaml_docs(*parts: str) -> str:
    """One multi-document YAML text of `parts` (each one or more documents)."""
    return "\n---\n".join(part.strip("\n") for part in parts) + "\n"


def closed_tenants(*names: str) -> str:
    """Tenants whose default action is drop: what a workload's policy does not allow is refused."""
    tenant = "kind: Tenant\nmetadata: {{name: {}}}\nspec: {{defaultAction: drop}}"
    return yaml_docs(*(tenant.format(n) for n in names))


def hosts(*names: str) -> str:
    return yaml_docs(*(f"kind: Host\nmetadata: {{name: {n}}}" for n in names))


# app=client workloads of t1 may reach app=web ones on tcp/80, and nothing else
CLIENTS_TO_WEB = """
kind: Group
metadata: {name: web, tenant: t1}
spec: {selector: app == "web"}
---
kind: Group
metadata: {name: clients, tenant: t1}
spec: {selector: app == "client"}
---
kind: Policy
metadata: {name: p, tenant: t1}
spec:
  rules:
    - {name: clients-to-web, sources: [clients], destinations: [web], services: [tcp/80], action: allow}
"""

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


def processes_naming(marker: str) -> list[int]:
    """PIDs whose command line names `marker` (a lab's control directory: its agents, managers, etcd)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmdline = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            out.append(int(p.name))
    return out
