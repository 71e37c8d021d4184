"""The manager's CPU per host per change (issue 16 item 3): a real manager, N simulated hosts.

    .venv/bin/python bench/manager_hosts.py --hosts 1000,10000 --changes 10
    .venv/bin/python bench/manager_hosts.py --hosts 1000 --src /tmp/base/src    # another tree's manager

A manager process (`omniwall manager`, SQLite, plain HTTP on loopback) with N hosts, one workload each,
and a policy on every vNIC (bench/propagation.py's fan-out inventory). N simulated hosts in `--procs`
processes, each one asyncio loop speaking the agents' wire protocol on raw sockets: per host one feed
stream (`GET /v1/hosts/{host}/feed`, the host's own token) and the acks the agent's reporter posts
(`POST /v1/hosts/{host}/status` with `{"realized_revision": R, "error": null}`), each host on its own
keep-alive connection (above 9,000 hosts two hosts share one ack connection: the manager may hold
20,000 descriptors). No kernel, no agent code: a host acks a revision as soon as its feed line is read.
When the feed advertises status streams (`X-Omniwall-Status-Stream: 1`, agent/upstream.py) a host
writes its acks as lines on its own `POST /v1/hosts/{host}/status/stream` instead, as the agent does
(`--acks post` keeps the POSTs); its ack then counts when written (the stream answers only refusals,
which fail the run). The manager and the workers get a descriptor limit of 65,536 (root).

A change = PUT of the policy with another port: every host gets a delta. Measured per change:
- wall: PUT sent -> the last host's ack answered (the simulated hosts' clock, same machine);
- manager CPU (user + system, /proc/PID/stat) from before the PUT until the last ack, and after it has
  settled (`--settle` seconds later, so deferred work is counted).
Arms, in one sitting, alternating (`--arms`):
- `hosts`: the N hosts connected and acking;
- `idle`: the same manager, the same changes, no host connected (the compile and the write alone).
Per host per change = (CPU of `hosts` - CPU of `idle`) / N: the feed line, the ack, the bookkeeping.

Prints one JSON object per arm and round, then a summary; `--json FILE` writes it all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from propagation import fanout_policy, fanout_resources  # noqa: E402

SHARE_ABOVE = 9000  # hosts: above this, two hosts share one ack connection (descriptor limit)


def cpu_seconds(pid: int, which: str = "both") -> float:
    """User + system CPU time of `pid` (or `which` = "user" / "system" alone)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    user, system = int(fields[11]), int(fields[12])
    ticks = {"user": user, "system": system}.get(which, user + system)
    return ticks / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------ simulated hosts


class Hosts:
    """One worker's hosts: feed streams, acks, and the count of hosts that acked each revision."""

    def __init__(self, port: int, hosts: list[list[str]], share: int, acks: str = "stream") -> None:
        self.port = port
        self.acks = acks
        self.hosts = hosts
        self.share = share
        self.acked: dict[int, int] = {}
        self.errors = 0
        self.ready = 0
        self._ack_locks: list[asyncio.Lock] = []
        self._ack_conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = []

    def _done(self, rev: int) -> None:
        n = self.acked.get(rev, 0) + 1
        self.acked[rev] = n
        if n == len(self.hosts):
            print(f"acked {rev} {time.time():.6f}", flush=True)

    async def _ack(self, slot: int, host: str, token: str, rev: int) -> None:
        body = b'{"realized_revision":%d,"error":null}' % rev
        req = (
            f"POST /v1/hosts/{host}/status HTTP/1.1\r\nHost: manager\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        async with self._ack_locks[slot]:
            conn = self._ack_conns[slot]
            if conn is None:
                conn = await asyncio.open_connection("127.0.0.1", self.port)
                self._ack_conns[slot] = conn
            r, w = conn
            w.write(req)
            head = await r.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await r.readexactly(length)
        if status != 200:
            self.errors += 1
            print(f"error ack {host} {rev}: HTTP {status}", file=sys.stderr, flush=True)
            return
        self._done(rev)

    async def _stream_refusals(self, host: str, r: asyncio.StreamReader) -> None:
        """The status stream's answer: only refusals and its end come back; any is an error here."""
        head = await r.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"status stream of {host}: {head[:200]!r}")
        data = await r.read(65536)
        if data:
            self.errors += 1
            print(f"error stream {host}: {data[:300]!r}", file=sys.stderr, flush=True)

    async def _open_stream(self, host: str, token: str) -> asyncio.StreamWriter:
        r, w = await asyncio.open_connection("127.0.0.1", self.port)
        w.write(
            f"POST /v1/hosts/{host}/status/stream HTTP/1.1\r\nHost: manager\r\nAuthorization: Bearer {token}"
            "\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        self._readers.append(asyncio.create_task(self._stream_refusals(host, r)))
        return w

    async def _host(self, i: int, host: str, token: str, gate: asyncio.Semaphore) -> None:
        slot = i // self.share
        await gate.acquire()  # a few hosts connect at a time (the snapshot costs the most)
        held = True
        try:
            r, w = await asyncio.open_connection("127.0.0.1", self.port)
            w.write(
                f"GET /v1/hosts/{host}/feed?from=0&heartbeat=300 HTTP/1.1\r\nHost: manager\r\n"
                f"Authorization: Bearer {token}\r\nAccept: application/x-ndjson\r\n\r\n".encode()
            )
            head = await r.readuntil(b"\r\n\r\n")
            if int(head.split(b" ", 2)[1]) != 200:
                raise RuntimeError(f"feed of {host}: {head[:200]!r}")
            stream = None
            if self.acks == "stream" and b"\r\nx-omniwall-status-stream: 1\r\n" in head.lower():
                stream = await self._open_stream(host, token)
            buf = b""
            while True:
                size = int((await r.readuntil(b"\r\n"))[:-2], 16)
                if size == 0:
                    raise RuntimeError(f"feed of {host} ended")
                buf += (await r.readexactly(size + 2))[:-2]
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    msg = json.loads(line)
                    t = msg["type"]
                    if t == "snapshot":
                        rev = int(msg["revision"])
                    elif t == "delta":
                        rev = int(msg["delta"]["to_revision"])
                    else:
                        continue
                    if stream is not None:
                        line = b'{"realized_revision":%d,"error":null}\n' % rev
                        stream.write(b"%x\r\n%s\r\n" % (len(line), line))
                        await stream.drain()
                        self._done(rev)
                    else:
                        await self._ack(slot, host, token, rev)
                    if held:
                        held = False
                        self.ready += 1
                        gate.release()
        finally:
            if held:
                gate.release()

    async def run(self) -> None:
        self._readers: list[asyncio.Task[None]] = []
        n_slots = (len(self.hosts) + self.share - 1) // self.share
        self._ack_locks = [asyncio.Lock() for _ in range(n_slots)]
        self._ack_conns = [None] * n_slots
        gate = asyncio.Semaphore(100)
        tasks = [asyncio.create_task(self._host(i, h, t, gate)) for i, (h, t) in enumerate(self.hosts)]
        while self.ready < len(self.hosts):
            done = [t for t in tasks if t.done()]
            for t in done:
                t.result()  # raises
            await asyncio.sleep(0.1)
        print("ready", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception():
                raise t.exception()  # type: ignore[misc]
            t.cancel()


def worker_main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(Hosts(spec["port"], spec["hosts"], spec["share"], spec.get("acks", "stream")).run())


def more_descriptors() -> None:
    """preexec_fn: 65,536 descriptors (a manager with 10,000 hosts holds two connections per host), or
    the hard limit when raising it is not allowed (no CAP_SYS_RESOURCE: see `descriptor_room`)."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))
        return
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def descriptor_room(n: int, acks: str) -> None:
    """With status streams the manager holds two connections per host (feed, stream): more than its
    descriptor limit, and libuv accepts and closes the excess (the hosts see resets). Said up front."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))
        hard = 65536
    need = 2 * n + 64
    if acks == "stream" and need > hard:
        raise SystemExit(
            f"--hosts {n}: with status streams the manager needs ~{need} descriptors, its limit here is "
            f"{hard} (raising it needs CAP_SYS_RESOURCE): at most {(hard - 64) // 2} hosts, or --acks post"
        )


# ------------------------------------------------------------------------------ the manager


class ManagerProcess:
    def __init__(self, tmp: Path, n: int, src: str | None) -> None:
        self.db = tmp / "store.db"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        if src:
            env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        env["OMNIWALL_MAX_OBJECTS_PER_TENANT"] = str(max(10_000, 2 * n))
        env["OMNIWALL_MAX_RULE_EXPANSION"] = str(max(500_000, 20 * n))
        env["OMNIWALL_MAX_APPLY_BYTES"] = str(256 * 1024 * 1024)
        self.log = open(tmp / "manager.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "omniwall.cli.main",
                "manager",
                "--db",
                str(self.db),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--flows-db",
                ":memory:",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp,
            preexec_fn=more_descriptors,
        )
        token_file = Path(str(self.db) + ".admin-token")
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"manager exited: {(tmp / 'manager.log').read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200 and token_file.exists():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("manager did not start")
            time.sleep(0.1)
        self.client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token_file.read_text().strip()}"},
            timeout=600,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self, which: str = "both") -> float:
        return cpu_seconds(self.pid, which)

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def agent_tokens(db: Path, hosts: list[str]) -> list[list[str]]:
    """One agent token per host, written straight into the store in a few txns (the manager's watch
    picks them up), instead of N POST /v1/tokens."""
    from omniwall.manager.objects import TOKEN_PREFIX
    from omniwall.manager.tokens import TokenRecord, _digest
    from omniwall.store import Put, open_store

    store = open_store(str(db))
    out: list[list[str]] = []
    now = datetime.now(UTC).replace(microsecond=0).isoformat(timespec="seconds")
    try:
        for i in range(0, len(hosts), 1000):
            puts = []
            for h in hosts[i : i + 1000]:
                tid, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
                rec = TokenRecord(
                    id=tid, name=f"agent-{h}", role="agent", tenant=None, host=h,
                    sha256=_digest(secret), created=now, created_by=None, expires=None,
                )  # fmt: skip
                puts.append(Put(TOKEN_PREFIX + tid, json.dumps(asdict(rec))))
                out.append([h, f"ow.{tid}.{secret}"])
            store.txn([], puts)
    finally:
        with contextlib.suppress(Exception):
            store.close()  # type: ignore[attr-defined]
    return out


# ------------------------------------------------------------------------------ one sitting


class Workers:
    def __init__(self, tmp: Path, port: int, tokens: list[list[str]], procs: int, acks: str) -> None:
        share = 2 if len(tokens) > SHARE_ABOVE else 1
        self.procs: list[subprocess.Popen[str]] = []
        self.acked: dict[int, list[float]] = {}
        for k in range(procs):
            spec = tmp / f"worker-{k}.json"
            spec.write_text(
                json.dumps({"port": port, "hosts": tokens[k::procs], "share": share, "acks": acks})
            )
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", str(spec)],
                    stdout=subprocess.PIPE,
                    text=True,
                    bufsize=1,
                    preexec_fn=more_descriptors,
                )
            )
        self._lines: asyncio.Queue[tuple[int, str]] | None = None
        import queue
        import threading

        self.q: queue.Queue[tuple[int, str]] = queue.Queue()
        for k, p in enumerate(self.procs):
            threading.Thread(target=self._read, args=(k, p), daemon=True).start()
        ready = 0
        while ready < procs:
            k, line = self.q.get(timeout=1200)
            if line == "ready":
                ready += 1
            elif line == "":
                raise RuntimeError(f"worker {k} exited before it was ready")

    def _read(self, k: int, p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            self.q.put((k, line.strip()))
        self.q.put((k, ""))

    def wait_acked(self, rev: int, timeout: float) -> float:
        """Wall time (time.time) the last worker had all its hosts ack `rev`."""
        deadline = time.monotonic() + timeout
        while len(self.acked.get(rev, [])) < len(self.procs):
            k, line = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            if line == "":
                raise RuntimeError(f"worker {k} exited")
            parts = line.split()
            if parts[0] == "acked":
                self.acked.setdefault(int(parts[1]), []).append(float(parts[2]))
        return max(self.acked[rev])

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def change(m: ManagerProcess, port: int) -> tuple[int, float]:
    wall0 = time.time()
    r = m.client.put("/v1/policies/fanout", params={"tenant": "infra"}, json=fanout_policy(port))
    r.raise_for_status()
    return int(r.json()["metadata"]["revision"]), wall0


def sitting(
    n: int,
    changes: int,
    procs: int,
    settle: float,
    src: str | None,
    arms: list[str],
    profile: str | None = None,
    acks: str = "stream",
) -> dict[str, Any]:
    """One manager, N hosts; rounds of `changes` changes per arm, alternating."""
    out: dict[str, Any] = {"hosts": n, "changes": changes, "src": src or "worktree", "acks": acks, "arms": {}}
    with tempfile.TemporaryDirectory(prefix="ow-mh-") as tmp_s:
        tmp = Path(tmp_s)
        t = time.perf_counter()
        m = ManagerProcess(tmp, n, src)
        try:
            port = 1000
            docs = "\n---\n".join(json.dumps(d) for d in fanout_resources(n, port))  # YAML: JSON documents
            m.client.post(
                "/v1/apply", content=docs.encode(), headers={"Content-Type": "application/yaml"}
            ).raise_for_status()
            hosts = [f"h{i:04d}" for i in range(n)]
            tokens = agent_tokens(m.db, hosts)
            out["setup_s"] = round(time.perf_counter() - t, 1)
            out["manager_rss_mb_idle"] = _rss_mb(m.pid)
            for arm in arms:
                res: dict[str, Any] = {"cpu_s": [], "wall_ms": [], "cpu_settled_s": [], "sys_settled_s": []}
                workers = None
                if arm == "hosts":
                    t = time.perf_counter()
                    workers = Workers(tmp, m.port, tokens, procs, acks)
                    out["connect_s"] = round(time.perf_counter() - t, 1)
                    out["manager_rss_mb_connected"] = _rss_mb(m.pid)
                time.sleep(1.0)
                spy = None
                if profile and arm == "hosts":  # py-spy's collapsed stacks of the manager, hosts arm only
                    spy = subprocess.Popen(
                        [
                            "py-spy",
                            "record",
                            "--nonblocking",
                            "-p",
                            str(m.pid),
                            "-f",
                            "raw",
                            "-r",
                            "200",
                            "-o",
                            profile,
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    time.sleep(1.0)
                try:
                    port += 1  # one untimed change: first-request work (route tables, caches) is not counted
                    rev, _ = change(m, port)
                    if workers is not None:
                        workers.wait_acked(rev, timeout=600)
                    time.sleep(settle)
                    for _ in range(changes):
                        port += 1
                        c0, s0 = m.cpu(), m.cpu("system")
                        rev, wall0 = change(m, port)
                        res.setdefault("put_at", []).append(round(wall0, 3))
                        if workers is not None:
                            last = workers.wait_acked(rev, timeout=600)
                            res["wall_ms"].append(round((last - wall0) * 1000, 1))
                        res["cpu_s"].append(round(m.cpu() - c0, 3))
                        time.sleep(settle)
                        res["cpu_settled_s"].append(round(m.cpu() - c0, 3))
                        res["sys_settled_s"].append(round(m.cpu("system") - s0, 3))
                    if workers is not None:  # every host's last ack recorded by the manager
                        st = m.client.get("/v1/status").json()
                        res["in_sync"] = st["summary"]["inSync"]
                        res["status_streams"] = st.get("statusStreams")
                finally:
                    if spy is not None:
                        spy.send_signal(signal.SIGINT)
                        spy.wait(timeout=60)
                    if workers is not None:
                        workers.stop()
                out["arms"][arm] = res
                print(json.dumps({"hosts": n, "arm": arm, **res}), flush=True)
        except BaseException:
            log = tmp / "manager.log"
            if log.exists():  # what the manager said, before its directory goes
                lines = [x for x in log.read_text(errors="replace").splitlines() if '" 200 OK' not in x]
                sys.stderr.write("--- manager log (no access lines):\n" + "\n".join(lines[-80:]) + "\n")
            raise
        finally:
            m.stop()
    hosts_arm, idle_arm = out["arms"].get("hosts"), out["arms"].get("idle")
    if hosts_arm:
        med = statistics.median(hosts_arm["cpu_settled_s"])
        out["manager_cpu_s_per_change"] = round(med, 3)
        out["manager_sys_s_per_change"] = round(statistics.median(hosts_arm["sys_settled_s"]), 3)
        out["wall_ms_median"] = statistics.median(hosts_arm["wall_ms"])
        out["wall_ms_max"] = max(hosts_arm["wall_ms"])
        if idle_arm:
            idle = statistics.median(idle_arm["cpu_settled_s"])
            out["idle_cpu_s_per_change"] = round(idle, 3)
            out["ms_per_host_per_change"] = round((med - idle) / n * 1000, 4)
        out["ms_per_host_per_change_total"] = round(med / n * 1000, 4)
    return out


def _rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", default="1000", help="comma-separated host counts")
    ap.add_argument("--changes", type=int, default=10, help="changes per arm")
    ap.add_argument("--procs", type=int, default=2, help="simulated-host processes")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds after the last ack, CPU counted")
    ap.add_argument("--arms", default="idle,hosts", help="idle (no host connected) and/or hosts")
    ap.add_argument("--src", help="run the manager from this source tree (PYTHONPATH), e.g. a baseline")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--py-spy", help="record the manager's stacks during the hosts arm (py-spy, raw format)")
    ap.add_argument(
        "--acks",
        choices=["stream", "post"],
        default="stream",
        help="status streams when advertised, or POSTs",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    results: dict[str, Any] = {
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "runs": [],
    }
    for n in [int(x) for x in args.hosts.split(",")]:
        if not args.src:  # a baseline tree has no status streams: its hosts POST
            descriptor_room(n, args.acks)
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        results["runs"].append(
            sitting(n, args.changes, args.procs, args.settle, args.src, arms, args.py_spy, args.acks)
        )
        print(json.dumps(results["runs"][-1]), flush=True)
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
