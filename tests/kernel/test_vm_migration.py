"""Live migration of a running VM (docs/vms.md): `omniwall migrate` on a VM workload of a managed lab
drives a real QEMU migration through the lab's hypervisor (lab/hypervisor.py -> lab/vm.py
`migrate_guest`): the destination host programmed and holding the guest's connections first, the
destination QEMU started with `-incoming` inside the destination host's namespace, routes switched on its
RESUME, the source QEMU stopped and its tap gone. A TCP stream to the guest and a UDP flow from it
survive, denied probers never get through. A destination QEMU that cannot start rolls the migration
back with the guest still running, untouched, on its source.

One managed lab for the module (one guest: TCG boots in ~2 s idle, up to 30 s on a loaded machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from omniwall.vm import qemu

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, QEMU taps)"),
    pytest.mark.skipif(shutil.which(qemu.QEMU) is None, reason="qemu-system-x86 missing (make install)"),
]

# srv is the VM; cli talks to it (TCP stream in, UDP flow out), bad may not.
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
kind: Host
metadata: {name: h3}
---
kind: Workload
metadata: {name: cli, tenant: t1, labels: {role: client}}
spec: {host: h1, vnics: [{name: eth0, ips: [10.77.0.1]}]}
---
kind: Workload
metadata: {name: srv, tenant: t1, labels: {role: server}}
spec: {host: h2, vnics: [{name: eth0, ips: [10.77.0.2]}], lab: {kind: vm, servers: [tcp/7001]}}
---
kind: Workload
metadata: {name: bad, tenant: t1, labels: {role: intruder}}
spec: {host: h3, vnics: [{name: eth0, ips: [10.77.0.3]}]}
---
kind: Group
metadata: {name: clients, tenant: t1}
spec: {selector: 'role == "client"'}
---
kind: Group
metadata: {name: servers, tenant: t1}
spec: {selector: 'role == "server"'}
---
kind: Policy
metadata: {name: vm-mobility, tenant: t1}
spec:
  category: application
  rules:
  - {name: to-srv, sources: [clients], destinations: [servers], services: [tcp/5001, icmp],
     action: allow}
  - {name: from-srv, sources: [servers], destinations: [clients], services: [udp/5003], action: allow}
"""
CLI, SRV, BAD = "10.77.0.1", "10.77.0.2", "10.77.0.3"


@pytest.fixture(scope="module")
def managed() -> Iterator[tuple[Any, Any]]:
    from omniwall.lab.managed import managed_lab
    from omniwall.vm import image

    try:
        image.load()
    except image.VmImageError as e:
        pytest.skip(str(e))
    with managed_lab(LAB, ipv6=False) as (lab, cp):
        yield lab, cp


def _ruleset(lab: Any, host: str) -> str:
    out = lab.exec_host(host, ["nft", "list", "table", "inet", "omniwall"])
    return out.stdout if out.returncode == 0 else ""


def _netns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _host_ns_inode(lab: Any, host: str) -> int:
    return os.stat(f"/run/netns/{lab.host_netns(host)}").st_ino


def _omniwall(cp: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMNIWALL_SERVER": cp.url, "OMNIWALL_TOKEN": cp.admin_token}
    if cp.ca_file:
        env["OMNIWALL_CA"] = str(cp.ca_file)
    exe = Path(sys.executable).with_name("omniwall")
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=300)


def _elsewhere(lab: Any) -> str:
    here = lab.plan.workload("t1/srv").host
    return "h3" if here != "h3" else "h2"


def test_omniwall_migrate_moves_the_running_guest_with_its_connections(managed: tuple[Any, Any]) -> None:
    from omniwall.lab import guest
    from omniwall.lab.streams import Flow, wait_port

    lab, cp = managed
    srv, cli, bad = (lab.plan.workload(f"t1/{n}") for n in ("srv", "cli", "bad"))
    src, dst = srv.host, _elsewhere(lab)
    tap = srv.vnics[0].host_ifname
    src_pid = qemu.pid_of(guest.rundir(srv.netns))
    assert src_pid is not None and _netns_of(src_pid) == _host_ns_inode(lab, src)
    # A mark in the guest's RAM disk: the same guest (not a reboot) must show it on the destination.
    assert guest.exec_in_guest(srv.netns, ["sh", "-c", "echo before-move > /tmp/mark"]).returncode == 0

    guest.start_tcp_echo(srv.netns, 5001)
    sink = guest.TftpSink(cli.netns, 5003)
    guest.start_udp_put(srv.netns, CLI, 5003)
    wait_port(cli.netns, SRV, 5001, timeout=30)
    flows = {
        "tcp": Flow("tcp-stream", cli.netns, (SRV, "5001")).start(),
        "intruder": Flow("tcp-prober", bad.netns, (SRV, "5001")).start(),
        "wrong-port": Flow("tcp-prober", cli.netns, (SRV, "5009")).start(),
    }
    try:
        time.sleep(1.5)
        out = _omniwall(cp, "migrate", "t1/srv", "--to", dst, "--switch-timeout", "120")
        time.sleep(1.5)
    finally:
        res = {k: f.stop() for k, f in flows.items()}
        udp = sink.stop()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "switching" in out.stdout and out.stdout.strip().endswith("succeeded"), out.stdout
    # The manager may be done (the destination agent saw the route) before the lab's hypervisor has
    # recorded the move in the lab's state (it stops the source QEMU first).
    deadline = time.monotonic() + 30
    while lab.plan.workload("t1/srv").host != dst and time.monotonic() < deadline:
        time.sleep(0.1)
        lab.reload()

    # The guest runs on the destination: one QEMU, in the destination host's namespace; the same guest.
    assert lab.plan.workload("t1/srv").host == dst
    dst_pid = qemu.pid_of(guest.rundir(srv.netns))
    assert dst_pid is not None and dst_pid != src_pid
    assert _netns_of(dst_pid) == _host_ns_inode(lab, dst)
    assert not qemu.is_ours(src_pid, guest.rundir(srv.netns).resolve())  # the source QEMU is gone
    assert not Path(f"/proc/{src_pid}").exists() or "qemu" not in Path(f"/proc/{src_pid}/comm").read_text()
    assert "before-move" in guest.exec_in_guest(srv.netns, ["cat", "/tmp/mark"]).stdout
    # The tap: on the destination, gone from the source; the policy followed it.
    assert lab.exec_host(dst, ["ip", "link", "show", tap]).returncode == 0
    assert lab.exec_host(src, ["ip", "link", "show", tap]).returncode != 0
    assert tap in _ruleset(lab, dst) and tap not in _ruleset(lab, src)
    # Connections carried, policy enforced throughout.
    assert res["tcp"]["ok"] and res["tcp"]["sent"] > 100_000, res["tcp"]
    assert udp["requests"] == 1 and len(udp["peers"]) == 1, udp  # one UDP flow, never restarted
    assert udp["blocks"] > 50 and udp["lastBlockAgoMs"] < 1000, udp  # and still flowing at the end
    for k in ("intruder", "wrong-port"):
        assert res[k]["attempts"] > 10 and res[k]["successes"] == 0, (k, res[k])
    wl = cp.api("GET", "/v1/workloads/srv", params={"tenant": "t1"})
    mig = wl["status"]["migration"]
    assert wl["spec"]["host"] == dst and mig["result"] == "succeeded" and mig["stats"]["imported"] >= 2, mig
    log = (cp.dir / "hypervisor.log").read_text()
    assert f"migrated to {dst}" in log


def _hold_tap(lab: Any, host: str, ifname: str) -> subprocess.Popen[str]:
    """A process in `host` holding a (non-persistent) tap `ifname` open: QEMU cannot attach to it."""
    code = (
        "import fcntl, os, struct, sys, time\n"
        "fd = os.open('/dev/net/tun', os.O_RDWR)\n"
        "fcntl.ioctl(fd, 0x400454CA, struct.pack('16sH', sys.argv[1].encode(), 0x0002 | 0x1000))\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    p = subprocess.Popen(
        ["ip", "netns", "exec", lab.host_netns(host), sys.executable, "-c", code, ifname],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_destination_qemu_failing_rolls_back_with_the_guest_on_its_source(managed: tuple[Any, Any]) -> None:
    from omniwall.lab import guest
    from omniwall.lab.streams import Flow, wait_port

    lab, cp = managed
    srv, cli = lab.plan.workload("t1/srv"), lab.plan.workload("t1/cli")
    src, dst = srv.host, _elsewhere(lab)
    tap = srv.vnics[0].host_ifname
    pid = qemu.pid_of(guest.rundir(srv.netns))
    assert pid is not None
    holder = _hold_tap(lab, dst, tap)  # the destination QEMU will fail: "Device or resource busy"
    try:
        guest.start_tcp_echo(srv.netns, 5001)
        wait_port(cli.netns, SRV, 5001, timeout=30)
        stream = Flow("tcp-stream", cli.netns, (SRV, "5001")).start()
        try:
            out = _omniwall(cp, "migrate", "t1/srv", "--to", dst, "--switch-timeout", "8")
        finally:
            res = stream.stop()
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 1, out.stdout + out.stderr
    assert "switching" in out.stdout and "rolled-back" in out.stdout, out.stdout
    lab.reload()
    # The guest never left: same QEMU, running, on the source; its stream unharmed; policy on the source.
    assert lab.plan.workload("t1/srv").host == src
    assert qemu.pid_of(guest.rundir(srv.netns)) == pid and _netns_of(pid) == _host_ns_inode(lab, src)
    from omniwall.vm.qmp import Qmp

    with Qmp(guest.rundir(srv.netns) / "qmp.sock") as q:
        assert q.execute("query-status")["status"] == "running"
    assert res["ok"] and res["sent"] > 100_000, res
    assert tap in _ruleset(lab, src)
    # Nothing left on the destination: no QEMU, no run directory, no tap, no chains.
    here = guest.rundir(srv.netns).resolve()
    assert [d for d in guest.vm_dir().glob(f"{srv.netns}*") if d.resolve() != here] == []
    assert lab.exec_host(dst, ["ip", "link", "show", tap]).returncode != 0
    deadline = time.monotonic() + 20
    while tap in _ruleset(lab, dst) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tap not in _ruleset(lab, dst)
    wl = cp.api("GET", "/v1/workloads/srv", params={"tenant": "t1"})
    assert wl["spec"]["host"] == src and wl["status"]["migration"]["result"] == "failed"
    log = (cp.dir / "hypervisor.log").read_text()
    assert "the guest still runs on" in log and "Device or resource busy" in log, log[-2000:]
    assert lab.exec("t1/cli", ["ping", "-c", "1", "-W", "5", SRV]).returncode == 0  # reachable there
