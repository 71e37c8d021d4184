"""Identity and posture benchmark: event posted -> enforced, measured with real traffic
(BENCHMARKS.md "Identity and posture"). Needs root; builds its own managed lab (examples/vdi: a manager
process, one agent process per host namespace, nftables).

    sudo .venv/bin/python bench/identity.py                   # 50 iterations, ~8 min
    sudo .venv/bin/python bench/identity.py --iterations 10 --json /tmp/identity.json

Each event is posted with its source's own token (`identity-source`, `posture-source`) and measured from
the moment the POST is sent (t0). One iteration posts every event twice: once measured on *new*
connections, once on an *open* one (a prober's own connections would otherwise share the conntrack
table with the open connection being measured):

- **access** (login; clean report): a prober in corp/vdi-7 (host-1) opens a new TCP connection to the
  target every `--interval` s (2 ms): corp/hr-app-1:443 (host-2) for login, corp/wiki-1:80 (host-1) for
  clean. Latency = start of the first attempt that completes its handshake - t0 (the attempt before it,
  one interval earlier, was still dropped).
- **refused** (logout; infected report): the same prober, running before t0. Latency = start of the
  first refused attempt after the last accepted one - t0.
- **cut** (logout; infected report): a long-lived connection vdi-7 -> hr-app-1:8443 (logout) or
  vdi-7 -> wiki-1:8080 (infected) carries 32 bytes each way every 2 ms. Latency = the last time either
  end received payload - t0. After every host acked the revision and 0.5 s more, nothing else may
  arrive for 0.3 s (checked, else the run fails).
- In quarantine, the remediation server must answer and wiki-1:80 must not (checked every iteration).
- **acked**: POST sent -> every agent acked the resulting revision (GET /v1/status polled every 20 ms).

A prober's attempt is a non-blocking connect with a fresh socket, abandoned after 100 ms and closed with
SO_LINGER 0 (no TIME_WAIT: ~500 attempts a second would otherwise exhaust the ephemeral ports).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import platform
import select
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "vdi"
ATTEMPT_TIMEOUT = 0.1
SETTLE = 0.5
LINGER0 = struct.pack("ii", 1, 0)


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def summary(ms: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 2),
        "p99_ms": round(pct(ms, 99), 2),
        "max_ms": round(max(ms), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }


def machine() -> dict[str, Any]:
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "kernel": platform.release(),
        "nftables": nft,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu": model,
    }


# ------------------------------------------------------------------------------------------ traffic


@dataclass
class Attempt:
    start: float
    ok: bool | None = None  # None: still pending


class Prober:
    """A new TCP connection attempt from `src` to `dst` every `interval` s, in a thread."""

    def __init__(
        self, lab: Any, src: str, dst: str, port: int, interval: float, *, until_ok: bool = False
    ) -> None:
        from omniwall.dataplane.netns import NetnsThread

        s, d = lab.plan.workload(src), lab.plan.workload(dst)
        self.src_addr, self.dst = s.address(4), (d.address(4), port)
        self.interval = interval
        self.until_ok = until_ok  # stop at the first accepted attempt (fewer conntrack entries left)
        self.attempts: list[Attempt] = []
        self._worker = NetnsThread(s.netns, name="bench-prober")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _new_socket(self) -> socket.socket:
        sock = self._worker.call(socket.socket, socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
        sock.bind((self.src_addr, 0))
        return sock

    def _run(self) -> None:
        pending: dict[socket.socket, Attempt] = {}
        next_at = time.monotonic()
        while not self._stop.is_set():
            if self.until_ok and any(a.ok for a in self.attempts):
                break
            now = time.monotonic()
            if now >= next_at:
                sock = self._new_socket()
                a = Attempt(time.monotonic())
                rc = sock.connect_ex(self.dst)
                if rc in (0, errno.EINPROGRESS):
                    pending[sock] = a
                else:
                    a.ok = False
                    sock.close()
                self.attempts.append(a)
                next_at += self.interval
            _, writable, _ = select.select(
                [], list(pending), [], max(0.0, min(next_at - time.monotonic(), 0.005))
            )
            for sock in writable:
                a = pending.pop(sock)
                a.ok = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                sock.close()
            now = time.monotonic()
            for sock, a in list(pending.items()):
                if now - a.start > ATTEMPT_TIMEOUT:
                    a.ok = False
                    del pending[sock]
                    sock.close()
        for sock in pending:
            sock.close()

    def close(self) -> list[Attempt]:
        self._stop.set()
        self._thread.join(timeout=5)
        self._worker.close()
        return [a for a in self.attempts if a.ok is not None]


def first_ok_after(attempts: list[Attempt], t0: float) -> float | None:
    """Start of the first accepted attempt started after t0."""
    return next((a.start for a in attempts if a.start >= t0 and a.ok), None)


def first_refused_for_good(attempts: list[Attempt], t0: float) -> float | None:
    """Start of the first refused attempt after the last accepted one (None: never refused)."""
    last_ok = max((a.start for a in attempts if a.ok), default=t0)
    return next((a.start for a in attempts if a.start > max(last_ok, t0) and not a.ok), None)


class Stream:
    """A long-lived TCP connection src -> dst:port; each end sends 32 bytes every `interval` s and
    records when it last received payload."""

    def __init__(self, lab: Any, src: str, dst: str, port: int, interval: float = 0.002) -> None:
        from omniwall.lab.traffic import tcp_pair

        client, server = tcp_pair(lab, src, dst, port)
        self.ends = [client, server]
        self.last_rx = [time.monotonic(), time.monotonic()]
        self.rx = [0, 0]
        self.interval = interval
        for sock in self.ends:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        dead: set[int] = set()
        while not self._stop.is_set():
            for i, sock in enumerate(self.ends):
                if i not in dead:
                    try:
                        sock.send(b"x" * 32)
                    except BlockingIOError:
                        pass
                    except OSError:
                        dead.add(i)
            live = [s for i, s in enumerate(self.ends) if i not in dead]
            readable, _, _ = select.select(live, [], [], self.interval)
            for sock in readable:
                i = self.ends.index(sock)
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    dead.add(i)
                    continue
                if not data:
                    dead.add(i)
                    continue
                self.rx[i] += len(data)
                self.last_rx[i] = time.monotonic()

    def delivering(self, window: float = 0.2) -> bool:
        before = list(self.rx)
        time.sleep(window)
        return all(a > b for a, b in zip(self.rx, before, strict=True))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for sock in self.ends:
            with contextlib.suppress(OSError):
                sock.close()


# ------------------------------------------------------------------------------------------ the run


class Source:
    def __init__(self, cp: Any, role: str) -> None:
        token = cp.api("POST", "/v1/tokens", json={"role": role, "name": f"bench-{role}"})["token"]
        self.cp = cp
        self.http = httpx.Client(
            base_url=cp.url, headers={"Authorization": f"Bearer {token}"}, timeout=30, verify=cp.verify
        )

    def post(self, path: str, body: dict[str, Any]) -> tuple[float, float]:
        """(t0 = POST sent, t_acked = every agent realized the resulting revision)."""
        t0 = time.monotonic()
        r = self.http.post(path, json=body)
        r.raise_for_status()
        self.cp.wait_in_sync(revision=r.json()["revision"], timeout=30)
        return t0, time.monotonic()


def ms(t: float | None, t0: float) -> float:
    if t is None:
        raise RuntimeError("the expected change never showed in the traffic")
    return max(0.0, (t - t0) * 1000)


def ct_count(lab: Any, host: str) -> int:
    """Conntrack entries in a host namespace (revocation walks them all)."""
    from omniwall.dataplane.netns import NetnsThread

    w = NetnsThread(lab.host_netns(host), name="bench-ct")
    try:
        return int(w.call(Path("/proc/sys/net/netfilter/nf_conntrack_count").read_text))
    finally:
        w.close()


class Run:
    """The lab, the two sources and the figures collected so far."""

    def __init__(self, lab: Any, cp: Any, interval: float) -> None:
        self.lab, self.cp, self.interval = lab, cp, interval
        self.idp, self.scanner = Source(cp, "identity-source"), Source(cp, "posture-source")
        self.res: dict[str, list[float]] = {}
        self.ct: list[int] = []

    def add(self, key: str, value: float) -> None:
        self.res.setdefault(key, []).append(value)

    def post(self, event: str) -> tuple[float, float]:
        if event in ("login", "logout"):
            return self.idp.post("/v1/identity/events", {"workload": VDI, "user": "alice", "action": event})
        return self.scanner.post("/v1/posture/reports", {"workload": VDI, "av.status": event})

    def probed(self, event: str, dst: str, port: int, *, until_ok: bool) -> tuple[list[Attempt], float]:
        """Probe VDI -> dst:port while `event` is posted; the attempts and the post's start time (the
        ack time is recorded as `{event}_acked`)."""
        p = Prober(self.lab, VDI, dst, port, self.interval, until_ok=until_ok)
        try:
            time.sleep(0.05)
            t0, acked = self.post(event)
            time.sleep(SETTLE)
        finally:
            attempts = p.close()
        self.add(f"{event}_acked", ms(acked, t0))
        return attempts, t0

    def access(self, event: str, dst: str, port: int) -> None:
        """`event` opens dst:port to VDI: the first accepted attempt."""
        attempts, t0 = self.probed(event, dst, port, until_ok=True)
        self.add(f"{event}_access", ms(first_ok_after(attempts, t0), t0))

    def refused(self, event: str, dst: str, port: int) -> None:
        """`event` closes dst:port to VDI: the first refused attempt after the last accepted one."""
        attempts, t0 = self.probed(event, dst, port, until_ok=False)
        assert any(a.ok for a in attempts), f"{dst}:{port} was not reachable before {event}"
        self.add(f"{event}_refused", ms(first_refused_for_good(attempts, t0), t0))

    def cut(self, event: str, dst: str, port: int) -> None:
        """`event` cuts an open connection VDI -> dst:port: the last payload delivered either way."""
        s = Stream(self.lab, VDI, dst, port)
        try:
            assert s.delivering(), f"stream to {dst}:{port} not flowing before {event}"
            self.ct.append(ct_count(self.lab, "host-1"))
            t0, acked = self.post(event)
            time.sleep(SETTLE)
            frozen = list(s.rx)
            time.sleep(0.3)
            assert s.rx == frozen, f"the stream to {dst}:{port} still delivers after {event}"
        finally:
            s.close()
        self.add(f"{event}_cut", ms(max(s.last_rx), t0))
        self.add(f"{event}_acked", ms(acked, t0))


VDI, HR, WIKI, REMEDIATION = "corp/vdi-7", "corp/hr-app-1", "corp/wiki-1", "infra/remediation-1"


def run(iterations: int, interval: float) -> dict[str, Any]:
    """Each iteration: every event twice, once measured on new connections, once on an open one."""
    from omniwall.lab.managed import managed_lab

    with managed_lab([EXAMPLE], ipv6=False) as (lab, cp):
        r = Run(lab, cp, interval)
        for i in range(iterations):
            r.access("login", HR, 443)
            r.cut("logout", HR, 8443)
            r.access("login", HR, 443)
            r.refused("logout", HR, 443)
            r.cut("infected", WIKI, 8080)
            assert lab.probe(VDI, REMEDIATION, "tcp", 80), "remediation unreachable in quarantine"
            assert not lab.probe(VDI, WIKI, "tcp", 80, timeout=0.3), "new connection allowed in quarantine"
            r.access("clean", WIKI, 80)
            r.refused("infected", WIKI, 80)
            r.access("clean", WIKI, 80)
            if (i + 1) % 10 == 0:
                print(f"{i + 1}/{iterations}", file=sys.stderr, flush=True)
    out: dict[str, Any] = {k: summary(v) for k, v in sorted(r.res.items())}
    out["host1_conntrack_entries_at_cut"] = {
        "min": min(r.ct),
        "median": statistics.median(r.ct),
        "max": max(r.ct),
    }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--interval", type=float, default=0.002, help="seconds between probe attempts")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    results = {"machine": machine(), "iterations": args.iterations, "probe_interval_ms": args.interval * 1000}
    results["latency"] = run(args.iterations, args.interval)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
