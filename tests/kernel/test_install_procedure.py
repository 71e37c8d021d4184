"""docs/install.md, end to end, without the lab helpers: what an operator and a hypervisor do on a real
host, played in network namespaces.

A namespace `<p>h` is the host (the agent runs with `--netns` for it; on a real host it runs without).
Two workload namespaces hang off it on routed veths (`/32` addresses, default route via 169.254.1.1
answered by the host, proxy ARP: Calico's model). The steps are the document's: a manager from its
config file on loopback, a Host, an agent token, the agent from its config file, workloads registered
through the API as a hypervisor's hook would (`POST /v1/workloads` with `hostIfname`), a policy, and
real TCP connections that the kernel lets through or drops. Every process started here ends by its PID;
every namespace is deleted, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from omniwall.lab.control import free_port

BIN = Path(sys.executable).parent
OMNIWALL = str(BIN / "omniwall")
CLIENT_IP, SERVER_IP = "10.77.0.1", "10.77.0.2"


def ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    subprocess.run(argv, check=True, capture_output=True, timeout=20)


def sysctl(ns: str, key: str, value: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"], check=True, timeout=20)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End a process we started, by its PID; kill it when SIGTERM is not enough."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def connects(ns: str, dst: str, port: int) -> bool:
    res = subprocess.run(
        ["ip", "netns", "exec", ns, "nc", "-z", "-w", "2", dst, str(port)], capture_output=True, timeout=20
    )
    return res.returncode == 0


@pytest.fixture
def host_with_workloads() -> Iterator[tuple[str, dict[str, str], str]]:
    """The hypervisor's part: a host namespace and two workloads on routed veths named `<p>c`/`<p>s`."""
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root (network namespaces, nftables)")
    p = "oi" + secrets.token_hex(3)
    host, made = f"{p}h", []
    try:
        ip("netns", "add", host)
        made.append(host)
        ip("link", "set", "lo", "up", ns=host)
        ip("addr", "add", "169.254.1.1/32", "dev", "lo", ns=host)  # every workload's gateway
        sysctl(host, "net.ipv4.ip_forward", "1")
        sysctl(host, "net.ipv4.conf.all.rp_filter", "0")
        ifnames = {}
        for role, addr in (("c", CLIENT_IP), ("s", SERVER_IP)):
            wl, hostif = f"{p}w{role}", f"{p}{role}"
            ip("netns", "add", wl)
            made.append(wl)
            ip("link", "set", "lo", "up", ns=wl)
            ip("link", "add", hostif, "type", "veth", "peer", "name", "eth0", "netns", wl, ns=host)
            sysctl(host, f"net.ipv4.conf.{hostif}.proxy_arp", "1")
            ip("link", "set", hostif, "up", ns=host)
            ip("route", "add", f"{addr}/32", "dev", hostif, ns=host)
            ip("addr", "add", f"{addr}/32", "dev", "eth0", ns=wl)
            ip("link", "set", "eth0", "up", ns=wl)
            ip("route", "add", "169.254.1.1/32", "dev", "eth0", "scope", "link", ns=wl)
            ip("route", "add", "default", "via", "169.254.1.1", "dev", "eth0", ns=wl)
            ifnames[role] = hostif
        yield host, ifnames, p
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def test_install_procedure_end_to_end(
    host_with_workloads: tuple[str, dict[str, str], str], tmp_path: Path
) -> None:
    host_ns, ifnames, prefix = host_with_workloads
    procs: list[subprocess.Popen[bytes]] = []
    port = free_port()
    server_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(tmp_path)}
    for k in ("OMNIWALL_SERVER", "OMNIWALL_TOKEN", "OMNIWALL_CONFIG", "OMNIWALL_CONTEXT"):
        env.pop(k, None)
    try:
        # 1. the manager, from its configuration file (install.md "The manager")
        (tmp_path / "manager.yaml").write_text(
            f"db: {tmp_path}/omniwall.db\nlisten: 127.0.0.1:{port}\nlog-format: json\n"
        )
        log = (tmp_path / "manager.log").open("wb")
        procs.append(
            subprocess.Popen(
                [OMNIWALL, "manager", "--config", str(tmp_path / "manager.yaml")], stderr=log, env=env
            )
        )
        wait_for("the manager", lambda: httpx.get(f"{server_url}/healthz", timeout=2).status_code == 200)
        admin = (tmp_path / "omniwall.db.admin-token").read_text().strip()
        api = httpx.Client(base_url=server_url, headers={"Authorization": f"Bearer {admin}"}, timeout=30)

        # 2. the host, and its agent's token (install.md "Register the host")
        hostname = f"{prefix}-host"
        r = api.post(
            "/v1/hosts",
            json={
                "kind": "Host",
                "metadata": {"name": hostname},
                "spec": {"vnicInterfaces": [f"{prefix}*"]},
            },
        )
        assert r.status_code in (200, 201), r.text
        out = subprocess.run(
            [
                OMNIWALL,
                "token",
                "create",
                "--role",
                "agent",
                "--host",
                hostname,
                "--server",
                server_url,
                "--token",
                admin,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        token_file = tmp_path / "agent.token"
        token_file.write_text(out.stdout.strip() + "\n")
        token_file.chmod(0o600)

        # 3. the agent, from its configuration file (install.md "The agent")
        (tmp_path / "agent.yaml").write_text(
            f"manager: {server_url}\nhost: {hostname}\ntoken-file: {token_file}\n"
            f'vnic-interfaces: "{prefix}*"\nstate-dir: {tmp_path}/agent\nlog-format: json\n'
        )
        alog = (tmp_path / "agent.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    OMNIWALL,
                    "agent",
                    "--config",
                    str(tmp_path / "agent.yaml"),
                    "--netns",
                    host_ns,
                    "--no-flows",
                ],
                stderr=alog,
                env=env,
            )
        )
        wait_for("the agent", lambda: api.get("/v1/status").json()["hosts"][hostname]["connected"])

        # 4. the hypervisor registers its workloads (install.md "Register workloads")
        resources = [
            ("tenants", {"kind": "Tenant", "metadata": {"name": "shop"}}),
            *[
                (
                    "workloads",
                    {
                        "kind": "Workload",
                        "metadata": {"name": name, "tenant": "shop", "labels": {"tier": name}},
                        "spec": {"host": hostname, "vnics": [{"ips": [addr], "hostIfname": ifnames[role]}]},
                    },
                )
                for name, addr, role in (("client", CLIENT_IP, "c"), ("server", SERVER_IP, "s"))
            ],
            *[
                (
                    "groups",
                    {
                        "kind": "Group",
                        "metadata": {"name": g, "tenant": "shop"},
                        "spec": {"selector": f'tier == "{g}"'},
                    },
                )
                for g in ("client", "server")
            ],
            (
                "policies",
                {
                    "kind": "Policy",
                    "metadata": {"name": "client-to-server", "tenant": "shop"},
                    "spec": {
                        "rules": [
                            {
                                "name": "http",
                                "sources": ["client"],
                                "destinations": ["server"],
                                "services": ["tcp/8080"],
                                "action": "allow",
                            }
                        ]
                    },
                },
            ),
        ]
        for kinds, body in resources:
            r = api.post(f"/v1/{kinds}", json=body)
            assert r.status_code in (200, 201), f"{kinds}: {r.text}"
        revision = api.get("/v1/status").json()["revision"]
        wait_for(
            "the host to realize the policy",
            lambda: api.get("/v1/status").json()["hosts"][hostname]["realizedRevision"] >= revision,
        )

        # 5. real traffic: allowed on 8080, dropped on 9090 (both ports listen)
        listeners = [
            subprocess.Popen(
                ["ip", "netns", "exec", f"{prefix}ws", "nc", "-lk", SERVER_IP, str(port_)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for port_ in (8080, 9090)
        ]
        procs.extend(listeners)
        wait_for("the listeners", lambda: connects(f"{prefix}ws", SERVER_IP, 9090), timeout=20)
        assert connects(f"{prefix}wc", SERVER_IP, 8080)
        assert not connects(f"{prefix}wc", SERVER_IP, 9090)

        # 6. the workload goes away (the hypervisor's hook on shutdown): its vNIC is detached
        assert api.delete("/v1/policies/client-to-server", params={"tenant": "shop"}).status_code == 200
        revision = api.get("/v1/status").json()["revision"]
        wait_for(
            "the policy removal",
            lambda: api.get("/v1/status").json()["hosts"][hostname]["realizedRevision"] >= revision,
        )
        assert not connects(f"{prefix}wc", SERVER_IP, 8080)
        # log-format: json, uvicorn's lines included: every line of both logs is one JSON object
        for name in ("manager.log", "agent.log"):
            lines = (tmp_path / name).read_text().splitlines()
            assert lines and all(json.loads(line)["level"] for line in lines), name
    finally:
        for proc in reversed(procs):
            stop(proc)
