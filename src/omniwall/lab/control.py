"""The managed lab's control plane: a real manager and agents for the lab's hosts (`omniwall lab up
--managed`, `make demo`); `managed_lab()` (lab/managed.py) wraps a whole lab around it.

`Managed` is a `PolicyDriver` (lab/standalone.py). Instead of programming the host namespaces itself it
starts, per lab:
- one `omniwall manager` process on 127.0.0.1 (a free port) with a SQLite store in the lab's control
  directory `<state dir>/<prefix>managed/` (e.g. /run/omniwall/lab/ow1a2b3-managed/): `omniwall.db`,
  the bootstrap admin token `omniwall.db.admin-token`, one agent token file per host, logs, and
  `managed.json` (URL, PIDs);
- one `omniwall agent --netns <host ns> --backend nft` process per lab host. The agent *process* stays
  in the root namespace, where the manager's 127.0.0.1 is; only its nftables context and its netlink
  sockets live in the host namespace (NftBackend(netns=...), the address watcher's setns'd thread);
- one lab hypervisor (`python -m omniwall.lab.hypervisor`, lab/hypervisor.py): it watches the manager's
  migrations and moves a workload's vNIC when the manager orders the switch, so `omniwall migrate`
  works in the lab as on hosts with a real hypervisor.

It applies every resource of the lab (inventory and policy) through `POST /v1/apply` with the admin
token, creates one agent token per host through `POST /v1/tokens`, and returns only when every host's
agent reports realized revision == desired (`GET /v1/status`). The processes run in their own session,
so they outlive a `lab up` command; `stop()` (lab down) ends them by PID, and only after checking that
the PID still runs a command line naming this lab's control directory (a recycled PID is never hit).

High availability (`omniwall lab up --managed --managers 3 --etcd 3`, `make demo-ha`, docs/ha.md): an
etcd cluster of N members on loopback ports (lab/etcd.py; data in `etcd-<i>/` of the control directory)
and M managers on it, manager i working in `manager-<i>/` (its flow records, and for manager 1 the
bootstrap admin token `omniwall.admin-token`); every agent gets all the manager URLs and fails over
between them. SQLite is single-manager: more than one manager needs etcd.

`ControlPlane` is the handle tests, the demo and the benchmark use: `url`, `admin_token`, `api()`,
`apply()`, `wait_in_sync()`, and `kill_agent()/start_agent()/stop_manager()/start_manager()` for the
fail-static checks. API calls go through `omniwall.client`, as the CLI's do.

TLS (on for the lab and the demo, `Managed(tls=True)`; `ControlPlane(prefix)` alone keeps plain HTTP on
loopback for the fan-out benchmark's simulated agents): the control directory gets a throwaway CA under
`pki/` (omniwall.pki), a manager certificate for 127.0.0.1/localhost, and one client certificate per
host. The manager runs with `--tls-cert/--tls-key/--client-ca`, each agent with `--ca/--cert/--key`,
so agents are bound to their hosts exactly as in production. `cp.verify` is the SSL context a client of
the lab's manager needs; `cp.ca_file` the CA to hand to the CLI (`OMNIWALL_CA`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from omniwall.client import Client, ClientError, Retry
from omniwall.lab import etcd as lab_etcd
from omniwall.lab import state as lab_state
from omniwall.lab.errors import LabError
from omniwall.lab.plan import LabPlan
from omniwall.model.catalog import Catalog

LOOPBACK = "127.0.0.1"
DB_NAME = "omniwall.db"
RECORD_NAME = "managed.json"
START_TIMEOUT = 30.0  # manager answering /healthz (a cold Python start on a busy 2-core box: ~2 s)
SYNC_TIMEOUT = 60.0  # every agent connected and in sync
STOP_GRACE = 5.0  # SIGTERM, then SIGKILL


class ManagedError(LabError):
    """The control plane did not come up, or the API refused a call (the message says which)."""


def control_dir(prefix: str) -> Path:
    """`<lab state dir>/<prefix>managed`: everything the lab's control plane keeps (the lab's state dir
    is a tmpfs under /run by default, like the namespaces it describes)."""
    return lab_state.STATE_DIR / f"{prefix}managed"


@dataclass
class Record:
    """managed.json: what a later process (lab down, a test, the demo) needs to find the processes."""

    prefix: str
    port: int
    manager_pid: int | None = None
    agents: dict[str, int] = field(default_factory=dict)  # host -> pid
    netns: dict[str, str] = field(default_factory=dict)  # host -> host namespace
    tls: bool = False  # HTTPS with client certificates (pki/ in the control directory)
    hypervisor_pid: int | None = None  # lab/hypervisor.py: moves vNICs when a migration switches
    # managers 2..N (manager 1 is `port`/`manager_pid`): {"port": int, "pid": int | None} each
    replicas: list[dict[str, Any]] = field(default_factory=list)
    etcd: list[dict[str, Any]] = field(default_factory=list)  # lab_etcd.EtcdMember.to_json() each

    @property
    def url(self) -> str:
        return self.url_of(self.port)

    def url_of(self, port: int) -> str:
        return f"{'https' if self.tls else 'http'}://{LOOPBACK}:{port}"


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports. The sockets are held until all are bound: ports picked one at a
    time can repeat (the kernel may hand out a just-closed port again), and an etcd member whose client and
    peer URLs share a port fails to start."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind((LOOPBACK, 0))
        return [int(s.getsockname()[1]) for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


# ------------------------------------------------------------------------------------------ processes


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running (a zombie counts as gone; reap it when it is our child)."""
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _ours(pid: int, marker: str) -> bool:
    return _alive(pid) and marker in _cmdline(pid)


def stop_pid(pid: int, marker: str, *, sig: int = signal.SIGTERM, grace: float = STOP_GRACE) -> bool:
    """Signal `pid` if it still runs a command naming `marker` (our control directory); SIGKILL after
    `grace` s. Returns whether it was ours and running."""
    if not _ours(pid, marker):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    start = time.monotonic()
    killed = False
    while _alive(pid):
        waited = time.monotonic() - start
        if waited > grace and not killed and marker in _cmdline(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed = True
        if waited > 2 * grace:  # unkillable (D state): give up rather than hang the teardown
            break
        time.sleep(0.02)
    return True


def _spawn(argv: Sequence[str], log_path: Path, cwd: Path | None = None) -> int:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives `lab up`; Ctrl-C in the demo's terminal is the demo's
            close_fds=True,
        )
    return proc.pid


# ------------------------------------------------------------------------------------------ control plane


class ControlPlane:
    """A lab's manager and agents: start, stop, talk to the API."""

    def __init__(self, prefix: str, *, tls: bool | None = None, managers: int = 1, etcd: int = 0) -> None:
        """`tls`, `managers`, `etcd` (members; 0: SQLite): for a new control plane (an existing one keeps
        what its record says)."""
        check_topology(managers, etcd)
        self.prefix = prefix
        self.dir = control_dir(prefix)
        self.marker = str(self.dir)  # appears in every command line we start
        self.record = self._load() or Record(
            prefix=prefix,
            port=0,
            tls=bool(tls),
            replicas=[{"port": 0, "pid": None} for _ in range(managers - 1)],
            etcd=[lab_etcd.EtcdMember(f"{prefix}etcd{i + 1}", 0, 0).to_json() for i in range(etcd)],
        )
        self._client: Client | None = None
        self._clients: dict[int, Client] = {}  # managers 2..N
        self._verify: Any = None

    # ---- record
    @property
    def record_path(self) -> Path:
        return self.dir / RECORD_NAME

    def _load(self) -> Record | None:
        try:
            d = json.loads((self.dir / RECORD_NAME).read_text())
        except (OSError, ValueError):
            return None
        return Record(
            prefix=d["prefix"],
            port=int(d["port"]),
            manager_pid=d.get("manager_pid"),
            agents={k: int(v) for k, v in d.get("agents", {}).items()},
            netns=dict(d.get("netns", {})),
            tls=bool(d.get("tls", False)),
            hypervisor_pid=d.get("hypervisor_pid"),
            replicas=list(d.get("replicas", [])),
            etcd=list(d.get("etcd", [])),
        )

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.record), indent=1))
        os.replace(tmp, self.record_path)

    @property
    def exists(self) -> bool:
        return self.record_path.exists()

    @property
    def db(self) -> Path:
        return self.dir / DB_NAME

    @property
    def url(self) -> str:
        return self.record.url

    @property
    def admin_token_file(self) -> Path:
        if self.record.etcd:  # written by manager 1 in its working directory (api/server.py)
            return self.manager_dir(0) / "omniwall.admin-token"
        return Path(str(self.db) + ".admin-token")

    # ---- several managers (index 0 is the first; docs/ha.md)
    @property
    def managers(self) -> int:
        return 1 + len(self.record.replicas)

    def manager_port(self, i: int) -> int:
        return self.record.port if i == 0 else int(self.record.replicas[i - 1]["port"])

    def manager_pid(self, i: int) -> int | None:
        return self.record.manager_pid if i == 0 else self.record.replicas[i - 1]["pid"]

    def _set_manager(self, i: int, port: int, pid: int | None) -> None:
        if i == 0:
            self.record.port, self.record.manager_pid = port, pid
        else:
            self.record.replicas[i - 1] = {"port": port, "pid": pid}

    def manager_url(self, i: int) -> str:
        return self.record.url_of(self.manager_port(i))

    @property
    def urls(self) -> list[str]:
        """Every manager's URL (what the agents get)."""
        return [self.manager_url(i) for i in range(self.managers)]

    def manager_dir(self, i: int) -> Path:
        """Manager i's working directory: the control directory itself with SQLite (one manager)."""
        return self.dir / f"manager-{i + 1}" if self.record.etcd else self.dir

    def manager_log(self, i: int) -> Path:
        return self.dir / ("manager.log" if i == 0 else f"manager-{i + 1}.log")

    def manager_alive(self, i: int) -> bool:
        pid = self.manager_pid(i)
        return pid is not None and _ours(pid, self.marker)

    # ---- etcd (lab/etcd.py)
    @property
    def etcd_members(self) -> list[lab_etcd.EtcdMember]:
        return [lab_etcd.EtcdMember.from_json(d) for d in self.record.etcd]

    @property
    def store_spec(self) -> str | None:
        """The managers' `--store` with etcd; None with SQLite."""
        return lab_etcd.store_spec(self.etcd_members) if self.record.etcd else None

    def etcd_data_dir(self, i: int) -> Path:
        return self.dir / f"etcd-{i + 1}"

    def start_etcd(self) -> None:
        """Start every member (free ports on first start, the same ones after) and wait for a leader."""
        members = self.etcd_members
        if not members:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        fresh = [m for m in members if not m.client_port]
        ports = free_ports(2 * len(fresh))
        for i, m in enumerate(fresh):
            m.client_port, m.peer_port = ports[2 * i], ports[2 * i + 1]
        self.record.etcd = [m.to_json() for m in members]
        for i in range(len(members)):
            self.start_etcd_member(i, wait=False)
        lab_etcd.wait_ready(self.etcd_members, lambda m: m.pid is not None and _alive(m.pid))

    def start_etcd_member(self, i: int, *, wait: bool = True) -> int:
        members = self.etcd_members
        m = members[i]
        argv = lab_etcd.member_argv(m, members, self.etcd_data_dir(i), f"{self.prefix}etcd")
        m.pid = _spawn(argv, self.dir / f"etcd-{i + 1}.log")
        self.record.etcd[i] = m.to_json()
        self.save()
        if wait:
            lab_etcd.wait_ready([m], lambda x: x.pid is not None and _alive(x.pid))
        return m.pid

    def stop_etcd_member(self, i: int, sig: int = signal.SIGTERM) -> None:
        pid = self.record.etcd[i].get("pid")
        if pid is not None:
            stop_pid(int(pid), self.marker, sig=sig)
            self.record.etcd[i]["pid"] = None
            self.save()

    def etcd_alive(self, i: int) -> bool:
        pid = self.record.etcd[i].get("pid")
        return pid is not None and _ours(int(pid), self.marker)

    def etcd_leader(self) -> int | None:
        """The index of the etcd leader now, or None."""
        lead = lab_etcd.leader(self.etcd_members)
        return None if lead is None else [m.name for m in self.etcd_members].index(lead.name)

    @property
    def admin_token(self) -> str:
        return self.admin_token_file.read_text().strip()

    def agent_token_file(self, host: str) -> Path:
        return self.dir / f"agent-{_safe(host)}.token"

    # ---- TLS
    @property
    def pki_dir(self) -> Path:
        return self.dir / "pki"

    @property
    def ca_file(self) -> Path | None:
        return self.pki_dir / "ca.crt" if self.record.tls else None

    @property
    def verify(self) -> Any:
        """What an httpx client of this manager passes as `verify`: the lab CA's context, or True."""
        if not self.record.tls:
            return True
        if self._verify is None:
            from omniwall.tls import client_context

            self._verify = client_context(self.pki_dir / "ca.crt").context
        return self._verify

    def _ensure_pki(self) -> None:
        """A throwaway CA and manager certificate, once per control directory."""
        from omniwall import pki

        if not (self.pki_dir / "ca.key").exists():
            pki.init_ca(self.pki_dir, name=f"Omniwall lab CA {self.prefix}")
            self._verify = None
        if not (self.pki_dir / "manager.crt").exists():
            pki.issue_manager(self.pki_dir, [LOOPBACK, "localhost"])

    def host_cert(self, host: str) -> tuple[Path, Path]:
        """`host`'s client certificate and key (issued on first use)."""
        from omniwall import pki

        paths = pki.host_paths(self.pki_dir, _safe(host))
        if not paths.cert.exists():
            pki.issue_host(self.pki_dir, host, out=paths)
        return paths.cert, paths.key

    def rotate_host_cert(self, host: str) -> tuple[Path, Path]:
        """A new key and certificate for `host` in place (the agent picks them up on reconnect/SIGHUP)."""
        from omniwall import pki

        paths = pki.host_paths(self.pki_dir, _safe(host))
        pki.issue_host(self.pki_dir, host, out=paths)
        return paths.cert, paths.key

    # ---- HTTP
    def api_client(self, i: int = 0) -> Client:
        """The admin's API client of manager i (one retry on a refused connection: the lab's callers
        poll)."""
        if i:
            if i not in self._clients:
                self._clients[i] = Client(
                    self.manager_url(i),
                    self.admin_token,
                    verify=self.verify,
                    timeout=30.0,
                    retry=Retry(attempts=2),
                )
            return self._clients[i]
        if self._client is None:
            self._client = Client(
                self.url, self.admin_token, verify=self.verify, timeout=30.0, retry=Retry(attempts=2)
            )
        return self._client

    def client(self) -> httpx.Client:
        """The admin's raw HTTP connection (benchmarks time requests on it), the API client's own."""
        return self.api_client().http

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        for c in self._clients.values():
            c.close()
        self._clients.clear()

    def api(self, method: str, path: str, *, manager: int | None = None, **kwargs: Any) -> Any:
        """One admin API call; raises ManagedError with the server's message on an HTTP error.
        `manager`: that manager only; default: manager 1, or with several the first one running (a
        manager that does not answer at all passes the call to the next: they share one store)."""
        order = (
            [manager] if manager is not None else [i for i in range(self.managers) if self.manager_alive(i)]
        )
        for n, i in enumerate(order or [0]):
            try:
                return self.api_client(i).request(method, path, **kwargs)
            except ClientError as e:
                if e.status is None and n + 1 < len(order):
                    continue
                raise ManagedError(f"manager at {self.manager_url(i)}: {method} {path}: {e}") from e
        raise AssertionError("unreachable")

    def apply(self, resources: Catalog | Iterable[dict[str, Any]]) -> int:
        """POST /v1/apply every resource (all or nothing); returns the store revision."""
        docs = _dump(resources)
        text = yaml.safe_dump_all(docs, sort_keys=False)
        out = self.api(
            "POST",
            "/v1/apply",
            content=text.encode(),
            headers={"Content-Type": "application/yaml", "X-Omniwall-Source": "lab"},
        )
        return int(out["revision"])

    def status(self) -> dict[str, Any]:
        """GET /v1/status; with several managers, their answers merged: the lowest revision, and each
        host as the manager that has its agent connected sees it (each manager knows the agents attached
        to it; docs/ha.md)."""
        if self.managers == 1:
            return dict(self.api("GET", "/v1/status"))
        answers = []
        for i in range(self.managers):
            if self.manager_alive(i):
                with contextlib.suppress(ManagedError):
                    answers.append(dict(self.api("GET", "/v1/status", manager=i)))
        if not answers:
            raise ManagedError(f"no manager of the lab answers; logs in {self.dir}")
        merged = dict(answers[0])
        merged["revision"] = min(int(a.get("revision", 0)) for a in answers)
        hosts: dict[str, Any] = {}
        for a in answers:
            for h, st in (a.get("hosts") or {}).items():
                old = hosts.get(h)
                if old is None or (st.get("connected"), st.get("inSync")) > (
                    old.get("connected"),
                    old.get("inSync"),
                ):
                    hosts[h] = st
        merged["hosts"] = hosts
        return merged

    def wait_in_sync(
        self, hosts: Iterable[str] | None = None, *, revision: int = 0, timeout: float = SYNC_TIMEOUT
    ) -> dict[str, Any]:
        """Until every host (default: every host with an agent) has a connected agent whose realized
        revision equals the desired one, with the manager at `revision` or later. Returns the status."""
        want = sorted(hosts if hosts is not None else self.record.agents)
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while True:
            with contextlib.suppress(ManagedError):
                last = self.status()
                hs = last.get("hosts") or {}
                if last.get("revision", 0) >= revision and all(
                    h in hs and hs[h]["connected"] and hs[h]["inSync"] for h in want
                ):
                    return last
            if time.monotonic() > deadline:
                lagging = {h: (last.get("hosts") or {}).get(h) for h in want if not _in_sync(last, h)}
                raise ManagedError(
                    f"hosts not in sync after {timeout:g} s: {json.dumps(lagging)}; logs in {self.dir}"
                )
            time.sleep(0.02)

    # ---- manager
    def start_manager(self, *, port: int | None = None, index: int = 0) -> None:
        """Start manager `index` (same port as before when restarting) and wait for /healthz."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)  # tokens (and the lab CA's key) live here
        tls_args: list[str] = []
        if self.record.tls:
            self._ensure_pki()
            tls_args = [
                "--tls-cert",
                str(self.pki_dir / "manager.crt"),
                "--tls-key",
                str(self.pki_dir / "manager.key"),
                "--client-ca",
                str(self.pki_dir / "ca.crt"),
            ]
        store_args = ["--db", str(self.db)]
        spec = self.store_spec
        mdir = self.manager_dir(index)
        if spec is not None:  # etcd: flow records stay local to each manager (docs/etcd.md)
            mdir.mkdir(parents=True, exist_ok=True)
            store_args = ["--store", spec, "--flows-db", str(mdir / "omniwall.flows")]
        known = port or self.manager_port(index)
        attempts = 1 if known else 3
        for attempt in range(attempts):
            chosen = known or free_port()
            argv = [
                sys.executable,
                "-m",
                "omniwall.cli.main",
                "manager",
                *store_args,
                "--listen",
                f"{LOOPBACK}:{chosen}",
                *tls_args,
            ]
            self._set_manager(index, chosen, _spawn(argv, self.manager_log(index), cwd=mdir))
            self.save()
            try:
                self._wait_healthy(index)
                break
            except ManagedError:
                self.stop_manager(index=index)
                if attempt == attempts - 1:
                    raise
                # the free port was taken meanwhile: pick another
        self.close()  # a restarted manager: new connections

    def _wait_healthy(self, index: int = 0) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        pid = self.manager_pid(index)
        log = self.manager_log(index)
        url = self.manager_url(index)
        while time.monotonic() < deadline:
            if pid is None or not _alive(pid):
                raise ManagedError(f"manager exited at start: {_tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                ok = httpx.get(f"{url}/healthz", timeout=1.0, verify=self.verify).status_code == 200
                if ok and self.admin_token_file.exists():
                    return
            time.sleep(0.05)
        raise ManagedError(f"manager did not answer within {START_TIMEOUT:g} s: {_tail(log)}")

    def stop_manager(self, sig: int = signal.SIGTERM, *, index: int = 0) -> None:
        self.close()
        pid = self.manager_pid(index)
        if pid is not None:
            stop_pid(pid, self.marker, sig=sig)
            self._set_manager(index, self.manager_port(index), None)
            self.save()

    @property
    def manager_running(self) -> bool:
        pid = self.record.manager_pid
        return pid is not None and _ours(pid, self.marker)

    # ---- agents
    def issue_agent_token(self, host: str) -> None:
        """An agent token scoped to `host`, written to the host's token file (0600)."""
        path = self.agent_token_file(host)
        if path.exists():
            return
        out = self.api("POST", "/v1/tokens", json={"role": "agent", "host": host, "name": f"lab-{host}"})
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(out["token"] + "\n")

    def start_agent(self, host: str, netns: str | None = None) -> int:
        """Start `omniwall agent` for `host`, programming namespace `netns` (default: as recorded)."""
        ns = netns or self.record.netns.get(host)
        if ns is None:
            raise ManagedError(f"no namespace known for host {host!r}")
        self.issue_agent_token(host)
        tls_args: list[str] = []
        if self.record.tls:
            cert, key = self.host_cert(host)
            tls_args = ["--ca", str(self.pki_dir / "ca.crt"), "--cert", str(cert), "--key", str(key)]
        state_dir = self.dir / f"agent-{_safe(host)}"
        argv = [
            sys.executable,
            "-m",
            "omniwall.agent.cli",
            "--manager",
            ",".join(self.urls),  # several: the agent fails over between them (agent/managers.py)
            "--host",
            host,
            "--token-file",
            str(self.agent_token_file(host)),
            "--netns",
            ns,
            "--backend",
            "nft",
            "--state-dir",
            str(state_dir),
            *tls_args,
        ]
        pid = _spawn(argv, self.dir / f"agent-{_safe(host)}.log")
        self.record.agents[host] = pid
        self.record.netns[host] = ns
        self.save()
        return pid

    def kill_agent(self, host: str, sig: int = signal.SIGKILL) -> None:
        """End `host`'s agent (SIGKILL by default: the crash case; the kernel keeps its table)."""
        pid = self.record.agents.pop(host, None)
        if pid is not None:
            stop_pid(pid, self.marker, sig=sig)
        self.save()

    def attached(self, host: str) -> tuple[str, float] | None:
        """The manager URL `host`'s agent last attached to and when (epoch seconds), from its log's
        `feed connected to URL` lines (the agent's own account: any manager may report the host)."""
        last = None
        try:
            with open(self.dir / f"agent-{_safe(host)}.log", errors="replace") as f:
                for line in f:
                    if "feed connected to " in line:
                        last = line
        except OSError:
            return None
        if last is None:
            return None
        stamp, _, rest = last.partition(" INFO ")
        url = rest.split("feed connected to ", 1)[1].split()[0]
        try:
            when = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:23]) / 1000
        except ValueError:
            when = 0.0
        return url, when

    def agent_running(self, host: str) -> bool:
        pid = self.record.agents.get(host)
        return pid is not None and _ours(pid, self.marker)

    # ---- hypervisor
    @property
    def hypervisor_token_file(self) -> Path:
        return self.dir / "hypervisor.token"

    def start_hypervisor(self) -> int:
        """Start the lab's hypervisor (lab/hypervisor.py) with a token of its own (its `switched` calls
        are audited as `lab-hypervisor`)."""
        if not self.hypervisor_token_file.exists():
            out = self.api("POST", "/v1/tokens", json={"role": "provider-admin", "name": "lab-hypervisor"})
            fd = os.open(self.hypervisor_token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(out["token"] + "\n")
        argv = [sys.executable, "-m", "omniwall.lab.hypervisor", "--control-dir", str(self.dir)]
        self.record.hypervisor_pid = _spawn(argv, self.dir / "hypervisor.log")
        self.save()
        return self.record.hypervisor_pid

    @property
    def hypervisor_running(self) -> bool:
        pid = self.record.hypervisor_pid
        return pid is not None and _ours(pid, self.marker)

    def stop_hypervisor(self) -> None:
        if self.record.hypervisor_pid is not None:
            stop_pid(self.record.hypervisor_pid, self.marker)
            self.record.hypervisor_pid = None
            self.save()

    # ---- whole
    def stop_all(self) -> None:
        """The hypervisor and the agents first (they would only log reconnect attempts), then the
        managers, then etcd. Idempotent."""
        self.stop_hypervisor()
        for host in sorted(self.record.agents):
            self.kill_agent(host, sig=signal.SIGTERM)
        for i in range(self.managers):
            self.stop_manager(index=i)
        for i in range(len(self.record.etcd)):
            self.stop_etcd_member(i)


def check_topology(managers: int, etcd: int) -> None:
    """Refuse what cannot work: several managers on SQLite (one process owns the file)."""
    if managers < 1:
        raise ManagedError(f"--managers: {managers}: at least one manager")
    if etcd < 0:
        raise ManagedError(f"--etcd: {etcd}: a number of etcd members (0: SQLite)")
    if managers > 1 and etcd == 0:
        raise ManagedError(
            f"--managers {managers}: several managers need a shared store; SQLite is single-manager. "
            "Add --etcd 3 (an etcd cluster in the lab)"
        )


def _in_sync(status: dict[str, Any], host: str) -> bool:
    h = (status.get("hosts") or {}).get(host)
    return bool(h and h["connected"] and h["inSync"])


def _safe(host: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in host)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def _dump(resources: Catalog | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(resources, Catalog):
        from omniwall.lab.inputs import dump_catalog

        return dump_catalog(resources)
    return list(resources)


# ------------------------------------------------------------------------------------------ the driver


class Managed:
    """PolicyDriver: manager + one agent per host, resources applied through the API.

    `start()` is also how a later change reaches the lab (e.g. `Lab.move` calls it with the new
    catalog): with the control plane already up it only applies the catalog and waits for the hosts."""

    mode = "managed"

    def __init__(
        self, *, sync_timeout: float = SYNC_TIMEOUT, tls: bool = True, managers: int = 1, etcd: int = 0
    ) -> None:
        check_topology(managers, etcd)
        self.sync_timeout = sync_timeout
        self.tls = tls
        self.managers = managers
        self.etcd = etcd
        self.control: ControlPlane | None = None

    def start(self, plan: LabPlan, catalog: Catalog, hosts: Sequence[str] | None = None) -> None:
        cp = ControlPlane(plan.prefix, tls=self.tls, managers=self.managers, etcd=self.etcd)
        self.control = cp
        fresh = not cp.manager_running
        try:
            if fresh:
                cp.save()  # before any process: a failed start finds and stops what did start
                cp.start_etcd()
                for i in range(cp.managers):  # one at a time: manager 1 bootstraps the admin token
                    cp.start_manager(index=i)
            revision = cp.apply(catalog)
            for h in plan.hosts:
                if not cp.agent_running(h.name):
                    cp.start_agent(h.name, h.netns)
            if not cp.hypervisor_running:
                cp.start_hypervisor()
            wanted = [h.name for h in plan.hosts if hosts is None or h.name in hosts]
            cp.wait_in_sync(wanted, revision=revision, timeout=self.sync_timeout)
        except BaseException:
            if fresh:  # Lab.up tears the lab down on failure; our processes must not outlive it
                with contextlib.suppress(Exception):
                    self.stop(plan)
            raise

    def stop(self, plan: LabPlan) -> None:
        stop_control_plane(plan.prefix)


def live_expected(prefix: str, probes: Sequence[Any]) -> list[bool]:
    """What the lab's manager says of each probe right now (`GET /v1/explain` from the probe's source
    address to its destination): `lab matrix --expect` of a managed lab follows the live policy."""
    import ipaddress

    cp = ControlPlane(prefix)
    try:
        out = []
        for p in probes:
            proto = p.proto
            if proto == "icmp" and ipaddress.ip_address(p.addr).version == 6:
                proto = "icmpv6"
            params = {"from": p.src_addr or p.src, "to": p.addr, "proto": proto}
            if p.port is not None and proto in ("tcp", "udp"):
                params["port"] = p.port
            out.append(bool(cp.api("GET", "/v1/explain", params=params)["allowed"]))
        return out
    finally:
        cp.close()


def stop_control_plane(prefix: str) -> None:
    """Stop a lab's manager and agents by PID and remove its control directory. Idempotent."""
    cp = ControlPlane(prefix)
    if cp.exists:
        cp.stop_all()
    if cp.dir.is_dir():
        for p in sorted(cp.dir.rglob("*"), reverse=True):
            with contextlib.suppress(OSError):
                p.rmdir() if p.is_dir() else p.unlink()
        with contextlib.suppress(OSError):
            cp.dir.rmdir()


__all__ = [
    "ControlPlane",
    "Managed",
    "ManagedError",
    "Record",
    "control_dir",
    "live_expected",
    "stop_control_plane",
]
