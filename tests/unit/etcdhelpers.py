"""Real etcd servers for tests: Debian's `etcd` binary on free loopback ports, data under a tmp dir.

Each server has a unique name per run, is stopped by its PID at the end (also when the test fails), and
touches nothing but its own data dir and ports. Tests skip only when the binary is missing (`make
install` installs `etcd-server`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ETCD = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)

needs_etcd = pytest.mark.skipif(ETCD is None, reason="etcd binary missing (apt-get install etcd-server)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass
class Cluster:
    members: list[Member] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        return [f"http://{m.endpoint}" for m in self.members]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(m.endpoint for m in self.members)

    def start(self, m: Member, state: str = "new") -> None:
        assert ETCD is not None
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        cmd = [
            ETCD,
            "--name", m.name,
            "--data-dir", str(m.data_dir),
            "--listen-client-urls", f"http://{m.endpoint}",
            "--advertise-client-urls", f"http://{m.endpoint}",
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-token", m.name.rsplit("-", 1)[0],
            "--initial-cluster-state", state,
            # fast elections on loopback: tests wait for a leader, not for a WAN timeout
            "--heartbeat-interval", "20",
            "--election-timeout", "200",
        ]  # fmt: skip
        with m.log.open("ab") as log:
            m.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, m: Member) -> None:
        """SIGKILL one member (by PID) and reap it."""
        if m.proc is not None and m.proc.poll() is None:
            os.kill(m.proc.pid, signal.SIGKILL)
            m.proc.wait(timeout=10)

    def stop_all(self) -> None:
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                os.kill(m.proc.pid, signal.SIGTERM)
        for m in self.members:
            if m.proc is None:
                continue
            try:
                m.proc.wait(timeout=2)  # a member whose peers are gone may linger: its data is scratch
            except subprocess.TimeoutExpired:
                os.kill(m.proc.pid, signal.SIGKILL)
                m.proc.wait(timeout=5)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until a linearizable read succeeds on every running member (so a leader exists)."""
        deadline = time.monotonic() + timeout
        for m in self.members:
            if m.proc is None or m.proc.poll() is not None:
                continue
            while True:
                try:
                    r = httpx.post(f"http://{m.endpoint}/v3/kv/range", json={"key": "AA=="}, timeout=1)
                    if r.status_code == 200 and "header" in r.json():
                        break
                except httpx.HTTPError:
                    pass
                if m.proc.poll() is not None:
                    raise RuntimeError(f"etcd {m.name} exited: {m.log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"etcd {m.name} not ready: {m.log.read_text()[-2000:]}")
                time.sleep(0.05)


@contextmanager
def etcd_cluster(tmp: Path, size: int = 1) -> Iterator[Cluster]:
    run = f"owtest-{uuid.uuid4().hex[:8]}"
    cluster = Cluster()
    for i in range(size):
        d = tmp / f"etcd-{run}-{i}"
        d.mkdir(parents=True)
        cluster.members.append(Member(f"{run}-{i}", free_port(), free_port(), d / "data", d / "etcd.log"))
    try:
        for m in cluster.members:
            cluster.start(m)
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop_all()
