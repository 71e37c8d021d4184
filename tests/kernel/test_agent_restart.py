"""A real agent process with the nftables backend, killed with SIGKILL and restarted: it adopts the table.

Topology (created here with a unique prefix, removed on exit, nothing in the root namespace):

    ns A (10.99.0.1) --veth-- [va  host ns  vb] --veth-- ns B (10.99.0.2)
                               routed, /32 per workload, gateway 169.254.1.1

The agent runs in the root namespace (it reaches the stand-in manager on 127.0.0.1) and programs the host
namespace through `NftBackend(netns=...)`. A TCP stream A -> B:5201 runs through the host namespace the
whole time. Checks: the policy is enforced; after SIGKILL the table stays (fail-static); the restarted
agent — answered with an identical snapshot — writes nothing (`nft monitor` sees no event, rule handles
unchanged); the stream never stalls; a later revision *is* written (so the monitor can see writes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from doubles.fake_manager import FakeManager
from omniwall.compiler.ir import HostDesiredState, IRRule, IRSet, IRVnic, ServiceMatch

pytestmark = pytest.mark.kernel

if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None:
    pytest.skip("needs root, iproute2 and nft (network namespaces)", allow_module_level=True)
try:
    from omniwall.dataplane.nft.backend import NftBackend  # noqa: F401  (the agent process imports it)
except ImportError as e:  # pragma: no cover - only while the nft backend is being written
    pytest.skip(f"nft backend not available: {e}", allow_module_level=True)

HOST = "h1"
TOKEN = "kernel-test-token"
A_IP, B_IP, PORT = "10.99.0.1", "10.99.0.2", 5201

SERVER = (
    f"PORT = {PORT}\n"
    """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", PORT)); s.listen(4)
while True:
    c, _ = s.accept()
    while True:
        data = c.recv(65536)
        if not data:
            break
        c.sendall(data)
    c.close()
"""
)

# Sends 1 KiB every 20 ms and reads it back; any error or a 2 s stall ends it with exit code 1.
CLIENT = (
    f"ADDR = {(B_IP, PORT)!r}\n"
    + """
import socket, sys, time
s = socket.create_connection(ADDR, timeout=3); s.settimeout(2)
n = 0
while True:
    s.sendall(b"x" * 1024)
    got = 0
    while got < 1024:
        chunk = s.recv(1024 - got)
        if not chunk:
            print("closed", flush=True); sys.exit(1)
        got += len(chunk)
    n += 1
    print(n, flush=True)
    time.sleep(0.02)
"""
)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


@dataclass
class Lab:
    tag: str
    host: str
    a: str
    b: str
    va: str
    vb: str
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def spawn(self, argv: list[str], **kw: object) -> subprocess.Popen[str]:
        p = subprocess.Popen(argv, text=True, **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p


@pytest.fixture
def lab() -> Iterator[Lab]:
    tag = uuid.uuid4().hex[:6]
    lab = Lab(tag, f"owr{tag}h", f"owr{tag}a", f"owr{tag}b", f"owr{tag}va", f"owr{tag}vb")
    try:
        for ns in (lab.host, lab.a, lab.b):
            sh("ip", "netns", "add", ns)
        sh("ip", "netns", "exec", lab.host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("ip", "netns", "exec", lab.host, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
        for vnic, ns, addr in ((lab.va, lab.a, A_IP), (lab.vb, lab.b, B_IP)):
            # created inside the host namespace with its peer straight in the workload's: never in root
            sh("ip", "-n", lab.host, "link", "add", vnic, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", lab.host, "addr", "add", "169.254.1.1/32", "dev", vnic)
            sh("ip", "-n", lab.host, "link", "set", vnic, "up")
            sh("ip", "-n", lab.host, "route", "add", f"{addr}/32", "dev", vnic)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/32", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "route", "add", "169.254.1.1", "dev", "eth0")
            sh("ip", "-n", ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
        yield lab
    finally:
        for p in lab.procs:  # only what this test started, by PID
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for ns in (lab.a, lab.b, lab.host):
            sh("ip", "netns", "del", ns, check=False)


def desired(lab: Lab, revision: int, extra_b_ip: str | None = None) -> HostDesiredState:
    b_addrs = tuple(sorted({B_IP, *([extra_b_ip] if extra_b_ip else [])}))
    allow = IRRule(
        id=4242,
        tenant="t",
        policy="p",
        rule="a-to-b",
        category="application",
        action="allow",
        src_set="grp-a",
        dst_set="grp-b",
        services=(ServiceMatch("tcp", ((PORT, PORT),)),),
    )
    return HostDesiredState(
        host=HOST,
        revision=revision,
        vnics=tuple(
            sorted(
                (
                    IRVnic(ifname=lab.va, workload="t/a", tenant="t", addresses=(A_IP,), egress=(4242,)),
                    IRVnic(ifname=lab.vb, workload="t/b", tenant="t", addresses=(B_IP,), ingress=(4242,)),
                ),
                key=lambda v: v.ifname,
            )
        ),
        rules=(allow,),
        sets=(IRSet("grp-a", addresses=(A_IP,)), IRSet("grp-b", addresses=b_addrs)),
    )


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def table(lab: Lab) -> list[tuple[str, str, int]]:
    """(kind, chain or set, handle) of every rule, chain and set: a rewritten object gets a new handle.
    (Counters move with the traffic, so whole rules cannot be compared.)"""
    out = sh("ip", "netns", "exec", lab.host, "nft", "-a", "-j", "list", "table", "inet", "omniwall").stdout
    objs = json.loads(out)["nftables"]
    return sorted(
        (kind, str(o[kind].get("chain", o[kind].get("name"))), int(o[kind]["handle"]))
        for o in objs
        for kind in ("rule", "chain", "set", "map")
        if kind in o
    )


def tcp_ok(lab: Lab, src_ns: str, dst: str, port: int) -> bool:
    code = f"import socket; socket.create_connection(({dst!r}, {port}), timeout=1).close()"
    return sh("ip", "netns", "exec", src_ns, sys.executable, "-c", code, check=False).returncode == 0


def start_agent(lab: Lab, fm: FakeManager, workdir: Path) -> subprocess.Popen[str]:
    token = workdir / "token"
    token.write_text(TOKEN + "\n")
    log = open(workdir / "agent.log", "a")  # noqa: SIM115 - closed with the process
    argv = [sys.executable, "-m", "omniwall.agent.cli", "--manager", fm.url, "--host", HOST]
    argv += ["--token-file", str(token), "--netns", lab.host, "--backend", "nft", "--state-dir", str(workdir)]
    argv += ["--counters-interval", "1"]
    return lab.spawn(argv, stdout=log, stderr=subprocess.STDOUT)


def test_sigkill_restart_adopts_without_writes_and_keeps_the_stream(lab: Lab, tmp_path: Path) -> None:
    fm = FakeManager(tokens={HOST: TOKEN}, heartbeat=0.5, snapshot_always=True)
    fm.start()
    try:
        s5 = desired(lab, 5)
        fm.publish(s5)

        def acks() -> list[dict[str, object]]:
            return [
                s for s in fm.statuses.get(HOST, []) if s.get("realized_revision") == 5 and not s.get("error")
            ]

        agent = start_agent(lab, fm, tmp_path)
        wait_for(lambda: bool(acks()), "first ack of revision 5")
        # the policy is in force: A -> B:5201 allowed, B -> A refused by A's ingress default drop
        lab.spawn(["ip", "netns", "exec", lab.b, sys.executable, "-c", SERVER])
        wait_for(lambda: tcp_ok(lab, lab.a, B_IP, PORT), "A -> B:5201 allowed")
        lab.spawn(["ip", "netns", "exec", lab.a, sys.executable, "-c", SERVER])
        time.sleep(0.3)
        assert not tcp_ok(lab, lab.b, A_IP, PORT), "B -> A must be dropped"
        # the vNIC addresses were reported from the host routes
        wait_for(
            lambda: any(
                s.get("addresses") == {lab.va: [A_IP], lab.vb: [B_IP]} for s in fm.statuses.get(HOST, [])
            ),
            "address report",
        )

        progress = tmp_path / "client.out"
        client = lab.spawn(
            ["ip", "netns", "exec", lab.a, sys.executable, "-c", CLIENT],
            stdout=open(progress, "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )

        def rounds() -> int:
            lines = progress.read_text().split()
            return int(lines[-1]) if lines and lines[-1].isdigit() else 0

        wait_for(lambda: rounds() > 10, "stream running")
        before = table(lab)
        monitor_out = tmp_path / "monitor.out"
        lab.spawn(
            ["ip", "netns", "exec", lab.host, "nft", "monitor", "ruleset"],
            stdout=open(monitor_out, "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        time.sleep(0.5)

        os.kill(agent.pid, signal.SIGKILL)  # our own child, by PID
        agent.wait(timeout=10)
        r = rounds()
        time.sleep(1.0)
        assert rounds() > r, "the stream goes on with no agent at all (fail-static)"
        assert table(lab) == before

        n_acks, n_feeds = len(acks()), len(fm.feed_requests)
        agent = start_agent(lab, fm, tmp_path)
        wait_for(lambda: len(acks()) > n_acks, "ack after restart")
        assert (HOST, 5) in fm.feed_requests[n_feeds:], "resumed from the adopted revision"
        time.sleep(1.5)  # room for any late write to show up
        assert monitor_out.read_text().strip() == "", (
            f"restart wrote to the kernel:\n{monitor_out.read_text()}"
        )
        assert table(lab) == before, "rules were rewritten"
        r = rounds()
        time.sleep(0.5)
        assert client.poll() is None and rounds() > r, f"the stream broke: {progress.read_text()[-200:]}"

        # the monitor does see writes: a new revision (B gets a second address) goes in
        fm.publish(desired(lab, 6, extra_b_ip="10.99.0.3"))
        wait_for(
            lambda: (fm.last_status(HOST) or {}).get("realized_revision") == 6,
            "ack of revision 6",
            timeout=20,
        )
        wait_for(
            lambda: monitor_out.read_text().strip() != "", "monitor shows the revision 6 write", timeout=5
        )
        assert client.poll() is None, f"the stream broke: {progress.read_text()[-200:]}"

        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=10) == 0
        assert table(lab), "SIGTERM leaves the table in place"
    finally:
        fm.stop()
