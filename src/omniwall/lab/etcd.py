"""The managed lab's etcd cluster: N members of Debian's `etcd` (3.4) on free loopback ports, data in the
lab's control directory, started and stopped by PID (docs/ha.md).

Members are plain processes in their own session, like the lab's manager and agents (lab/control.py):
each command line names its data directory, inside the control directory, which is what `stop_pid`
checks before it signals (a recycled PID is never hit, and an etcd the lab did not start never is).
"""

from __future__ import annotations

import base64
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from omniwall.lab.errors import LabError

LOOPBACK = "127.0.0.1"
READY_TIMEOUT = 30.0
# Loopback, but a busy shared box: 50 ms heartbeats and a 500 ms election timeout elect a new leader
# within about a second of a kill, without spurious elections when a member misses a few ticks.
HEARTBEAT_MS = 50
ELECTION_MS = 500
MAX_TXN_OPS = 100_000
MAX_REQUEST_BYTES = 64 * 1024 * 1024


class EtcdError(LabError):
    """An etcd member did not start, or the binary is missing."""


def etcd_binary() -> str:
    path = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    if path is None:
        raise EtcdError("etcd is not installed (make install as root installs Debian's etcd-server)")
    return path


@dataclass
class EtcdMember:
    """One member as managed.json records it."""

    name: str
    client_port: int
    peer_port: int
    pid: int | None = None

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.peer_port}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "client_port": self.client_port,
            "peer_port": self.peer_port,
            "pid": self.pid,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EtcdMember:
        return cls(d["name"], int(d["client_port"]), int(d["peer_port"]), d.get("pid"))


def store_spec(members: list[EtcdMember]) -> str:
    """`--store` for a manager: every member, so the store moves on when one is gone."""
    return "etcd://" + ",".join(m.endpoint for m in members)


def member_argv(m: EtcdMember, members: list[EtcdMember], data_dir: Path, cluster_token: str) -> list[str]:
    """The command line of member `m`; `data_dir` (inside the control directory) is the PID check's marker.
    `--initial-cluster-state new` also on a restart: etcd ignores it when the data directory exists."""
    return [
        etcd_binary(),
        "--name", m.name,
        "--data-dir", str(data_dir),
        "--listen-client-urls", m.client_url,
        "--advertise-client-urls", m.client_url,
        "--listen-peer-urls", m.peer_url,
        "--initial-advertise-peer-urls", m.peer_url,
        "--initial-cluster", ",".join(f"{x.name}={x.peer_url}" for x in members),
        "--initial-cluster-token", cluster_token,
        "--initial-cluster-state", "new",
        "--heartbeat-interval", str(HEARTBEAT_MS),
        "--election-timeout", str(ELECTION_MS),
        # one `POST /v1/apply` is one etcd transaction: etcd's defaults (128 operations, 1.5 MiB) refuse
        # an inventory of a few hundred objects (the fan-out benchmark applies 2,000 at once)
        "--max-txn-ops", str(MAX_TXN_OPS),
        "--max-request-bytes", str(MAX_REQUEST_BYTES),
    ]  # fmt: skip


def _post(m: EtcdMember, path: str, body: dict[str, Any], timeout: float = 1.0) -> dict[str, Any]:
    r = httpx.post(f"{m.client_url}{path}", json=body, timeout=timeout)
    r.raise_for_status()
    return dict(r.json())


def ready(m: EtcdMember) -> bool:
    """A linearizable read answers: the member is up and the cluster has a leader."""
    try:
        return "header" in _post(m, "/v3/kv/range", {"key": base64.b64encode(b"\0").decode()})
    except (httpx.HTTPError, ValueError):
        return False


def wait_ready(members: list[EtcdMember], alive: Any, timeout: float = READY_TIMEOUT) -> None:
    """Until every member answers a linearizable read; `alive(member)` says whether its process runs."""
    deadline = time.monotonic() + timeout
    for m in members:
        while not ready(m):
            if not alive(m):
                raise EtcdError(f"etcd member {m.name} exited at start")
            if time.monotonic() > deadline:
                raise EtcdError(f"etcd member {m.name} not ready within {timeout:g} s")
            time.sleep(0.05)


def leader(members: list[EtcdMember]) -> EtcdMember | None:
    """The member that is the leader now (as the first member that answers sees it), or None."""
    ids: dict[int, EtcdMember] = {}
    lead = None
    for m in members:
        try:
            st = _post(m, "/v3/maintenance/status", {})
        except (httpx.HTTPError, ValueError):
            continue
        ids[int(st["header"]["member_id"])] = m
        lead = lead or int(st.get("leader", 0))
    return ids.get(lead) if lead else None


__all__ = [
    "EtcdError",
    "EtcdMember",
    "etcd_binary",
    "leader",
    "member_argv",
    "ready",
    "store_spec",
    "wait_ready",
]
