"""Propagation benchmark: how fast a change made through the API is enforced (BENCHMARKS.md "Propagation").

    sudo .venv/bin/python bench/propagation.py                 # a, b and c
    sudo .venv/bin/python bench/propagation.py --only a --changes 200
    .venv/bin/python bench/propagation.py --only b,c --agents 1000 --procs 4   # no root needed
    sudo .venv/bin/python bench/propagation.py --stores sqlite,etcd --only a,b,c,d   # HA (docs/ha.md)

(a) **Label change -> kernel of every affected lab host.** A managed lab (examples/three-tier: a manager
    process, one agent process per host namespace, nftables). Each change toggles the `tier` label of
    tenant-a/web-1 between `web` and `app` with a PUT; that moves web-1's address between two address
    sets and changes the rules at web-1's vNIC, on all three hosts. `nft monitor` runs in every host
    namespace; a host has enforced revision R when the transaction that writes R into the table's `_rev`
    quota commits (the monitor's "new generation" line: one transaction carries the policy change and
    the revision). Latency = PUT sent -> the last affected host's commit. Affected hosts = those whose
    desired revision became R (GET /v1/status afterwards). Every 10th change is also checked with real
    traffic (web-1 -> db-1 tcp/5432 must be allowed exactly when web-1 is in the app tier).
(b) **One change fanned out to N agents.** A manager process (SQLite) with N hosts, one workload each,
    and a provider policy on every vNIC; N agents (`omniwall.agent.main.Agent`, sim backend) spread over
    several processes, each process one asyncio loop and one shared HTTP client. A change = PUT the policy
    with another port: every host gets a delta. Latencies, PUT sent -> the last host: applied and acked
    on the agents' clocks (their processes write them), the ack recorded by the manager (each host's
    `realizedAt` in GET /v1/status, the manager's clock), and seen by polling GET /v1/status (first
    `--poll-after` s after the PUT, then every `--poll` s: the poll only says when the change is done;
    a look costs the managers CPU, so none comes within the 1 s target). Before the changes, the CPU
    of the idle control plane is measured for `--idle-seconds` (heartbeats, leases, watches).
(c) **API throughput.** Against the manager of (b) (N hosts, N workloads, the agents connected): K
    client threads PUT workload labels (a label no selector mentions: the write, its audit entry, the
    model update, no data-plane change) for S seconds, then GET workloads for S seconds.

(d) **Manager failover** (root; etcd only): the MOBILITY lab (lab/streams.py) with 3 managers on a
    3-member etcd. Each round: an allowed TCP stream cli -> srv, two denied-flow probers, and a write burst
    over all managers run while the manager of cli's agent is killed (SIGKILL); re-attach time = kill ->
    the agent's `feed connected to` (its log) for every agent that was attached there; then every
    acknowledged write is looked up, the stream's bytes checked and the probers' successes counted, and
    the manager is started again.

`--stores sqlite,etcd`: (a), (b) and (c) run once per store in the same run: `sqlite` is one manager on
SQLite (as before), `etcd` three managers on a three-member etcd cluster (loopback), the agents spread over
the managers and the API calls of (c) too (thread k talks to manager k mod 3). In (a) the changes are
made through the first manager, whichever one the hosts' agents are attached to.

Results go to stdout and, with --json FILE, to a JSON file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "three-tier"


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def summary(ms: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 2),
        "p90_ms": round(pct(ms, 90), 2),
        "p99_ms": round(pct(ms, 99), 2),
        "max_ms": round(max(ms), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }


def machine() -> dict[str, Any]:
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "kernel": platform.release(),
        "nftables": nft,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],  # other work on the box skews it
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


# ------------------------------------------------------------------------------------- (a) lab -> kernel

GEN_RE = re.compile(r"^# new generation (\d+)")
# The revision is written in the same transaction as the change: a quota object `_rev` whose byte count
# is the revision (older backends: a rule comment in chain `_rev`).
REV_RE = re.compile(
    r'^add (?:quota inet omniwall _rev \{ (\d+) bytes|rule inet omniwall _rev .*comment "(\d+)")'
)


class KernelWatch:
    """`nft monitor` in one host namespace: the commit time of every revision written to `_rev`."""

    def __init__(self, host: str, netns: str) -> None:
        self.host = host
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "nft", "monitor"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self.commits: queue.Queue[tuple[int, float]] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        pending: int | None = None
        for line in self.proc.stdout:
            now = time.perf_counter()
            m = REV_RE.match(line)
            if m:
                pending = int(m.group(1) or m.group(2))
            elif GEN_RE.match(line) and pending is not None:
                self.commits.put((pending, now))
                pending = None

    def wait_for(self, revision: int, timeout: float) -> float | None:
        """perf_counter() of the commit that wrote `revision` (skipping older ones), or None."""
        deadline = time.perf_counter() + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            try:
                rev, t = self.commits.get(timeout=left)
            except queue.Empty:
                return None
            if rev == revision:
                return t
            if rev > revision:
                return None

    def drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.commits.get_nowait()

    def close(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def topology(store: str) -> dict[str, int]:
    """`managed_lab`/`ControlPlane` options of a store arm."""
    return {"managers": 3, "etcd": 3} if store == "etcd" else {"managers": 1, "etcd": 0}


def bench_lab(changes: int, store: str = "sqlite") -> dict[str, Any]:
    from omniwall.lab.managed import managed_lab

    out: dict[str, Any] = {"changes": changes, "store": store, **topology(store)}
    with managed_lab([EXAMPLE], **topology(store)) as (lab, cp):
        watches = {h.name: KernelWatch(h.name, h.netns) for h in lab.plan.hosts}
        try:
            client = cp.client()
            path, params = "/v1/workloads/web-1", {"tenant": "tenant-a"}
            obj = cp.api("GET", path, params=params)
            obj = _warm_up(client, path, params, obj, watches)
            latencies, put_ms, first_ms, affected_counts, probes_ok, probes = [], [], [], [], 0, 0
            tier = obj["metadata"]["labels"].get("tier", "web")
            for i in range(changes):
                tier = "app" if tier == "web" else "web"
                obj["metadata"]["labels"]["tier"] = tier
                t0 = time.perf_counter()
                resp = client.put(path, params=params, json=obj)
                t_put = time.perf_counter()
                resp.raise_for_status()
                obj = resp.json()
                rev = int(obj["metadata"]["revision"])
                commits = {h: w.wait_for(rev, timeout=10.0) for h, w in watches.items()}
                status = cp.wait_in_sync(revision=rev, timeout=10.0)
                affected = [h for h, s in status["hosts"].items() if s["desiredRevision"] == rev]
                missing = [h for h in affected if commits.get(h) is None]
                if missing:
                    raise RuntimeError(f"change {i}: revision {rev} not seen in the kernel of {missing}")
                times = [commits[h] for h in affected]  # type: ignore[misc]
                latencies.append((max(times) - t0) * 1000)  # type: ignore[arg-type]
                first_ms.append((min(times) - t0) * 1000)  # type: ignore[arg-type]
                put_ms.append((t_put - t0) * 1000)
                affected_counts.append(len(affected))
                if i % 10 == 0:
                    probes += 1
                    allowed = lab.probe("tenant-a/web-1", "tenant-a/db-1", "tcp", 5432)
                    probes_ok += allowed == (tier == "app")
                for w in watches.values():
                    w.drain()
            out["kernel_all_affected_hosts"] = summary(latencies)
            out["kernel_first_host"] = summary(first_ms)
            out["put_response"] = summary(put_ms)
            out["affected_hosts"] = {"min": min(affected_counts), "max": max(affected_counts)}
            out["traffic_checks"] = f"{probes_ok}/{probes} agreed"
        finally:
            for w in watches.values():
                w.close()
    return out


def _warm_up(
    client: httpx.Client,
    path: str,
    params: dict[str, str],
    obj: dict[str, Any],
    watches: dict[str, KernelWatch],
) -> dict[str, Any]:
    """Untimed changes until every monitor has reported one: `nft monitor` subscribes a little after
    it starts (later on a busy machine), and a change it missed would count as lost."""
    for _ in range(20):
        labels = obj["metadata"]["labels"]
        labels["tier"] = "app" if labels.get("tier", "web") == "web" else "web"
        resp = client.put(path, params=params, json=obj)
        resp.raise_for_status()
        obj = resp.json()
        rev = int(obj["metadata"]["revision"])
        seen = [w.wait_for(rev, timeout=3.0) is not None for w in watches.values()]
        for w in watches.values():
            w.drain()
        if all(seen):
            return obj
    raise RuntimeError("nft monitor never reported a change in every host namespace")


# ------------------------------------------------------------------------------------- (b) fan-out


def fanout_resources(n: int, port: int) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [
        {"kind": "Tenant", "metadata": {"name": "infra"}, "spec": {"defaultAction": "drop"}},
        {"kind": "Tenant", "metadata": {"name": "fan"}, "spec": {"defaultAction": "drop"}},
    ]
    for i in range(n):
        docs.append({"kind": "Host", "metadata": {"name": f"h{i:04d}"}})
        docs.append(
            {
                "kind": "Workload",
                "metadata": {"name": f"w{i:04d}", "tenant": "fan", "labels": {"tier": "web"}},
                "spec": {
                    "host": f"h{i:04d}",
                    "vnics": [
                        {"name": "eth0", "ips": [f"10.{100 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"]}
                    ],
                },
            }
        )
    docs.append(fanout_policy(port))
    return docs


def fanout_policy(port: int) -> dict[str, Any]:
    return {
        "kind": "Policy",
        "metadata": {"name": "fanout", "tenant": "infra"},
        "spec": {
            "category": "infrastructure",
            "priority": 100,
            "rules": [
                {
                    "name": "svc",
                    "sources": ["any"],
                    "destinations": ["any"],
                    "services": [f"tcp/{port}"],
                    "action": "allow",
                }
            ],
        },
    }


def worker_main(spec_file: str) -> None:  # spec["url"]: one manager URL or a list (failover)
    """One fan-out process: many Agents (sim backend) on one loop, one shared HTTP client."""
    from omniwall.agent.main import Agent, agent_limits
    from omniwall.dataplane.memory_backend import MemoryBackend

    spec = json.loads(Path(spec_file).read_text())
    hosts: list[list[str]] = spec["hosts"]
    applied: dict[int, float] = {}  # revision -> wall time the last agent of this process applied it
    acked: dict[int, float] = {}  # revision -> wall time the manager answered the last agent's ack

    class TimedSim(MemoryBackend):
        def apply(self, base: Any, delta: Any, target: Any) -> Any:
            out = super().apply(base, delta, target)
            applied[delta.to_revision] = time.time()
            return out

    async def main() -> None:
        # One client per agent, as on real hosts (each agent process owns one). A single client shared by
        # all the agents of a process would make the bench measure httpcore's pool instead: it scans
        # every pooled connection on each request and each response close, O(agents) per request. One
        # SSL context for all (a context per client costs ~10 ms and memory even for http://).
        ssl_ctx = httpx.create_ssl_context()
        clients = [httpx.AsyncClient(verify=ssl_ctx, limits=agent_limits()) for _ in hosts]
        async with contextlib.AsyncExitStack() as stack:
            for c in clients:
                await stack.enter_async_context(c)
            agents = [
                Agent(
                    spec["url"],
                    host,
                    token,
                    TimedSim(host=host),
                    client=client,
                    watch_addresses=False,
                    counters_interval=3600.0,
                )
                for (host, token), client in zip(hosts, clients, strict=True)
            ]
            for a in agents:
                a.reporter._post = _timed_post(a.reporter._post, acked)  # type: ignore[method-assign]
                if hasattr(a.reporter, "_stream"):  # a status stream: acked = the line written on it
                    a.reporter._stream = _timed_post(a.reporter._stream, acked)  # type: ignore[method-assign]
            tasks = [asyncio.create_task(a.run()) for a in agents]
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            import signal

            loop.add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()
            for a in agents:
                a.stop()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    Path(spec["applied_file"]).write_text(json.dumps({"applied": applied, "acked": acked}))


def _timed_post(post: Any, acked: dict[int, float]) -> Any:
    """Wrap Reporter._post: the POST of a realized revision returned 200 = the manager recorded it. On a
    status stream (`Reporter._stream`) no line is answered: the time is the line's write (the manager
    records it on arrival; the polling of GET /v1/status checks that it did)."""

    async def timed(body: dict[str, Any]) -> bool:
        ok = await post(body)
        if ok:
            rev = int(body["realized_revision"])
            acked[rev] = time.time()
        return bool(ok)

    return timed


def bench_fanout(
    n: int,
    procs: int,
    changes: int,
    api_seconds: float,
    api_threads: int,
    store: str = "sqlite",
    poll: float = 1.0,
    poll_after: float = 1.5,
    idle: float = 15.0,
) -> dict[str, Any]:
    from omniwall.lab.managed import ControlPlane, stop_control_plane

    out: dict[str, Any] = {
        "agents": n,
        "processes": procs,
        "changes": changes,
        "store": store,
        **topology(store),
    }
    prefix = f"owbench{os.getpid()}{store[0]}-"
    cp = ControlPlane(prefix, **topology(store))
    workers: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="ow-bench-"))
    sent: dict[int, float] = {}  # revision -> wall time the PUT was sent
    try:
        cp.save()  # before any process: the teardown finds what started
        cp.start_etcd()
        for i in range(cp.managers):
            cp.start_manager(index=i)
        t = time.perf_counter()
        port = 1000
        cp.apply(fanout_resources(n, port))
        out["apply_inventory_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        tokens = []
        for i in range(n):
            r = cp.api("POST", "/v1/tokens", json={"role": "agent", "host": f"h{i:04d}"})
            tokens.append([f"h{i:04d}", r["token"]])
        out["create_tokens_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        for k in range(procs):
            spec = tmp / f"worker-{k}.json"
            applied_file = str(tmp / f"applied-{k}.json")
            spec.write_text(
                json.dumps({"url": cp.urls, "hosts": tokens[k::procs], "applied_file": applied_file})
            )
            log = open(tmp / f"worker-{k}.log", "wb")  # noqa: SIM115 - closed with the process
            workers.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", str(spec)], stdout=log, stderr=subprocess.STDOUT
                )
            )
        hosts = [h for h, _ in tokens]
        cp.wait_in_sync(hosts, timeout=300)
        out["all_connected_and_in_sync_s"] = round(time.perf_counter() - t, 2)
        time.sleep(1.0)
        lat = []
        client = cp.client()
        pids = {
            "manager": [cp.manager_pid(i) for i in range(cp.managers)],
            "agents": [w.pid for w in workers],
        }
        if cp.record.etcd:
            pids["etcd"] = [m.pid for m in cp.etcd_members]
        # the control plane's CPU with nothing changing (leases, the store's watch, and the feeds'
        # heartbeats: one per agent after 15 s without a line, so none during the changes below, which
        # come every few seconds; this is the idle fleet's cost, not a part of each change's)
        cpu0, etcd0 = {k: _cpu_seconds(v) for k, v in pids.items()}, _etcd_revision(cp)
        time.sleep(idle)
        if etcd0 is not None and idle > 0:
            out["idle_etcd_txns_per_s"] = round((_etcd_revision(cp) - etcd0) / idle, 1)  # type: ignore[operator]
        out["idle_cpu_s_per_s"] = (
            {k: round((_cpu_seconds(v) - cpu0[k]) / idle, 3) for k, v in pids.items()} if idle > 0 else None
        )
        cpu0 = {k: _cpu_seconds(v) for k, v in pids.items()}
        loop0, etcd0 = time.perf_counter(), _etcd_revision(cp)
        recorded: list[float] = []
        for i in range(changes):
            port += 1
            t0, wall0 = time.perf_counter(), time.time()
            resp = client.put("/v1/policies/fanout", params={"tenant": "infra"}, json=fanout_policy(port))
            resp.raise_for_status()
            rev = int(resp.json()["metadata"]["revision"])
            sent[rev] = wall0
            # Done when GET /v1/status shows every host at `rev`. Polled slowly: with N hosts the call
            # is not free (each manager builds and serializes N host statuses, this process parses and
            # merges them), and a look while the
            # change is still fanning out takes that CPU from the acks it waits for. The latencies
            # themselves are the managers' `realizedAt` and the agents' clocks, not the polling's, so
            # the first look waits `poll_after` (past the 1 s target): a change acked sooner is
            # measured without any look competing with it.
            first = True
            while True:
                # the first look after `poll_after`, then every `poll`
                time.sleep(poll_after if first else poll)
                first = False
                # several managers: merged, each host as the manager its agent is attached to sees it
                hs = client.get("/v1/status").json()["hosts"] if cp.managers == 1 else cp.status()["hosts"]
                if all(hs[h]["realizedRevision"] >= rev for h in hosts):
                    break
                if time.perf_counter() - t0 > 120:
                    raise RuntimeError(f"change {i}: not all agents acked revision {rev} within 120 s")
            lat.append((time.perf_counter() - t0) * 1000)
            # when the manager recorded each host's ack (`realizedAt`, its clock; managers without it:
            # None): the last one is the change acknowledged, whenever the polling happened to look
            at = [hs[h].get("realizedAt") for h in hosts]
            if all(at):
                last_at = max(datetime.fromisoformat(a.replace("Z", "+00:00")).timestamp() for a in at)
                recorded.append((last_at - wall0) * 1000)
            time.sleep(0.5)
        out["all_acked_seen_by_polling"] = summary(lat) if lat else None
        out["all_acked_recorded_by_manager"] = summary(recorded) if recorded else None
        if changes:  # CPU time per change (incl. the status polling, and leases and watches in the pauses)
            cycle = (time.perf_counter() - loop0) / changes
            out["seconds_per_change"] = round(cycle, 3)
            if etcd0 is not None:  # every etcd txn (store writes, acks, heartbeats) is one revision
                out["etcd_txns_per_change"] = round((_etcd_revision(cp) - etcd0) / changes, 1)  # type: ignore[operator]
            out["cpu_s_per_change"] = {
                k: round((_cpu_seconds(v) - cpu0[k]) / changes, 3) for k, v in pids.items()
            }
        out["api"] = bench_api(cp, n, api_seconds, api_threads) if api_seconds > 0 else None
        _stop_workers(workers)  # they write the times their agents applied each revision
        last: dict[str, dict[int, float]] = {"applied": {}, "acked": {}}
        for f in tmp.glob("applied-*.json"):
            for what, times in json.loads(f.read_text()).items():
                for rev, t in times.items():
                    last[what][int(rev)] = max(last[what].get(int(rev), 0.0), t)
        # PUT sent -> the last agent applied the delta / got its ack answered (one machine, one clock)
        for what, key in (("applied", "all_applied"), ("acked", "all_acked")):
            if sent and all(r in last[what] for r in sent):
                out[key] = summary([(last[what][r] - t) * 1000 for r, t in sent.items()])
    finally:
        _stop_workers(workers)
        stop_control_plane(prefix)
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return out


def _etcd_revision(cp: Any) -> int | None:
    """etcd's current revision (None without etcd)."""
    if not cp.record.etcd:
        return None
    m = cp.etcd_members[0]
    r = httpx.post(f"{m.client_url}/v3/kv/range", json={"key": "AA==", "count_only": True}, timeout=5)
    return int(r.json()["header"]["revision"])


def _cpu_seconds(pids: list[int | None]) -> float:
    """User + system CPU time of these processes (Linux /proc)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for w in workers:
        if w.poll() is None:
            w.terminate()
    for w in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.wait(timeout=30)
        if w.poll() is None:
            w.kill()
            w.wait()


# ------------------------------------------------------------------------------------- (c) API


def bench_api(cp: Any, n: int, seconds: float, threads: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {cp.admin_token}"}

    def run(kind: str) -> tuple[list[float], float]:
        lat: list[list[float]] = [[] for _ in range(threads)]
        errors: list[str] = []
        stop_at = time.perf_counter() + seconds

        def loop(k: int) -> None:
            url = cp.urls[k % len(cp.urls)]  # several managers: the threads spread over them
            with httpx.Client(base_url=url, headers=headers, timeout=30, verify=cp.verify) as c:
                i = k
                while time.perf_counter() < stop_at:
                    name = f"w{i % n:04d}"
                    t0 = time.perf_counter()
                    if kind == "write":
                        obj = c.get(f"/v1/workloads/{name}", params={"tenant": "fan"}).json()
                        obj["metadata"]["labels"]["bench"] = str(i)
                        t0 = time.perf_counter()  # time the write alone
                        r = c.put(f"/v1/workloads/{name}", params={"tenant": "fan"}, json=obj)
                    else:
                        r = c.get(f"/v1/workloads/{name}", params={"tenant": "fan"})
                    if r.status_code >= 400:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                    lat[k].append((time.perf_counter() - t0) * 1000)
                    i += threads

        start = time.perf_counter()
        ts = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errors:
            raise RuntimeError(f"API {kind}s failed: {errors[:3]}")
        return [x for xs in lat for x in xs], time.perf_counter() - start

    writes, w_elapsed = run("write")
    reads, r_elapsed = run("read")
    return {
        "threads": threads,
        "managers": len(cp.urls),
        "seconds": seconds,
        "writes_per_s": round(len(writes) / w_elapsed, 1),
        "write_latency": summary(writes),
        "reads_per_s": round(len(reads) / r_elapsed, 1),
        "read_latency": summary(reads),
    }


# ------------------------------------------------------------------------------------- (d) failover


def bench_failover(rounds: int) -> dict[str, Any]:
    """Kill -9 the manager of cli's agent `rounds` times under traffic and a write burst (see (d))."""
    import signal

    sys.path.insert(0, str(ROOT / "tests"))  # the fault tests' writer and traffic (tests/hahelpers.py)
    from hahelpers import TENANT, Traffic, Writer, missing, wait_attached_elsewhere
    from omniwall.lab.managed import managed_lab
    from omniwall.lab.streams import MOBILITY

    reattach: list[float] = []
    out: dict[str, Any] = {"rounds": rounds, "managers": 3, "etcd": 3}
    acked = lost = denied_ok = denied_tries = broken = 0
    with managed_lab(MOBILITY, ipv6=False, managers=3, etcd=3) as (lab, cp):
        cli_host = lab.plan.workload(f"{TENANT}/cli").host
        for r in range(rounds):
            victim_url = cp.attached(cli_host)[0]  # type: ignore[index]
            victim = cp.urls.index(victim_url)
            moving = [h for h in sorted(cp.record.agents) if (cp.attached(h) or ("",))[0] == victim_url]
            traffic = Traffic(lab)
            writer = Writer(cp.urls, cp.admin_token, cp.verify, prefix=f"fo{r}").start()
            try:
                time.sleep(1.0)
                killed = time.time()
                cp.stop_manager(signal.SIGKILL, index=victim)
                took = wait_attached_elsewhere(cp, moving, victim_url, killed, timeout=30)
                time.sleep(1.0)
            finally:
                writer.stop()
                res = traffic.stop()
            reattach += [t * 1000 for t in took.values()]
            acked += len(writer.acked)
            lost += len(missing(cp, [a.name for a in writer.acked], avoid={victim}))
            broken += not res["stream"]["ok"]
            for k in ("intruder", "wrong-port"):
                denied_ok += res[k]["successes"]
                denied_tries += res[k]["attempts"]
            cp.start_manager(index=victim)
            cp.wait_in_sync()
    out["reattach"] = summary(reattach)
    out["acknowledged_writes"] = acked
    out["acknowledged_writes_lost"] = lost
    out["denied_probe_attempts"] = denied_tries
    out["denied_probe_successes"] = denied_ok
    out["allowed_streams_broken"] = f"{broken}/{rounds}"
    return out


# ------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="a,b,c", help="which parts: a (lab -> kernel), b (fan-out), c (API)")
    ap.add_argument("--changes", type=int, default=200, help="(a) label changes")
    ap.add_argument("--agents", type=int, default=1000, help="(b) agents")
    ap.add_argument("--procs", type=int, default=4, help="(b) agent processes")
    ap.add_argument("--fanout-changes", type=int, default=30, help="(b) changes")
    ap.add_argument(
        "--poll",
        type=float,
        default=1.0,
        help="(b) s between GET /v1/status looks (each costs CPU; the managers' realizedAt times the acks)",
    )
    ap.add_argument(
        "--poll-after",
        type=float,
        default=1.5,
        help="(b) s before the first look (main had 0.5: the look then competed with the acks it waits for)",
    )
    ap.add_argument(
        "--idle-seconds",
        type=float,
        default=15.0,
        help="(b) s of CPU measured with nothing changing (15: one period of the feeds' heartbeats)",
    )
    ap.add_argument("--api-seconds", type=float, default=10.0, help="(c) seconds per phase")
    ap.add_argument("--api-threads", type=int, default=4, help="(c) client threads")
    ap.add_argument(
        "--stores", default="sqlite", help="(a, b, c) per store: sqlite (1 manager) and/or etcd (3 on 3)"
    )
    ap.add_argument("--failover-rounds", type=int, default=10, help="(d) manager kills")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    parts = {p.strip() for p in args.only.split(",")}
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if not stores or set(stores) - {"sqlite", "etcd"}:
        ap.error(f"--stores: {args.stores!r}: a list of sqlite and etcd")
    results: dict[str, Any] = {"machine": machine()}

    def key(name: str, store: str) -> str:  # one store: the keys as before
        return name if len(stores) == 1 and store == "sqlite" else f"{name}_{store}"

    for store in stores:
        if "a" in parts:
            if os.geteuid() != 0:
                print("(a) needs root (network namespaces, nftables); skipped", file=sys.stderr)
            else:
                k = key("a_label_to_kernel", store)
                results[k] = bench_lab(args.changes, store)
                print(json.dumps({k: results[k]}, indent=1), flush=True)
        if "b" in parts or "c" in parts:
            fan = bench_fanout(
                args.agents,
                args.procs,
                args.fanout_changes if "b" in parts else 0,
                args.api_seconds if "c" in parts else 0,
                args.api_threads,
                store,
                args.poll,
                args.poll_after,
                args.idle_seconds,
            )
            api = fan.pop("api", None)
            if "b" in parts:
                results[key("b_fanout", store)] = fan
            if "c" in parts:
                results[key("c_api", store)] = api
            print(json.dumps({k: v for k, v in results.items() if k.endswith(store)}, indent=1), flush=True)
    if "d" in parts:
        if os.geteuid() != 0:
            print("(d) needs root (network namespaces, nftables); skipped", file=sys.stderr)
        else:
            results["d_failover"] = bench_failover(args.failover_rounds)
            print(json.dumps({"d_failover": results["d_failover"]}, indent=1), flush=True)
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
