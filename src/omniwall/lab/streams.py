"""Long-running traffic in lab workloads, for migration tests and the soak benchmark.

Each role is a small Python process started inside a workload namespace (`ip netns exec`), stopped by
SIGTERM (by PID, ours only), and printing one JSON line with what it saw:

- `tcp-echo PORT`: echoes every TCP connection's bytes back.
- `udp-echo PORT`: echoes every datagram.
- `tcp-stream HOST PORT`: one connection, a patterned byte stream both ways (sent, echoed back,
  every echoed byte checked against the pattern): `{sent, received, ok, error, maxGapMs}`. `ok` means
  no reset, no error, and after the final drain every byte sent came back, in order and intact.
- `udp-flow HOST PORT`: a numbered datagram every 10 ms: `{sent, replies, maxGapMs, lastReplyAgoMs}`.
- `tcp-churn HOST PORT`: a new short connection every ~10 ms: `{connections, ok, slow, failed}`.
- `tcp-prober HOST PORT`: connect() again and again, 4 threads, 0.1 s timeout: `{attempts, successes}`.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omniwall.lab.lab import Lab

SCRIPT = r"""
import json, os, select, signal, socket, sys, threading, time
role, args = sys.argv[1], sys.argv[2:]
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
fam = lambda h: socket.AF_INET6 if ":" in h else socket.AF_INET
PAT = bytes(range(251)) * 300
def out(d):
    sys.stdout.write(json.dumps(d) + "\n"); sys.stdout.flush()
def tally(d, e):  # errors counted by kind: refused, reset, timed out, no route
    k = f"{type(e).__name__}: {e}"[:60]; d[k] = d.get(k, 0) + 1
if role == "tcp-echo":
    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); s.bind(("::", int(args[0]))); s.listen(64)
    errors = {}  # how connections ended other than by the client's close: what a churn failure was
    def serve(c):
        try:
            while True:
                d = c.recv(65536)
                if not d: break
                c.sendall(d)
        except OSError as e: tally(errors, e)
        finally: c.close()
    s.settimeout(0.2)
    out({"ready": True})
    while not stop.is_set():
        try: c, _ = s.accept()
        except socket.timeout: continue
        threading.Thread(target=serve, args=(c,), daemon=True).start()
    out({"errors": errors})
elif role == "udp-echo":
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", int(args[0]))); s.settimeout(0.2)
    out({"ready": True})
    while not stop.is_set():
        try: d, a = s.recvfrom(2048)
        except socket.timeout: continue
        s.sendto(d, a)
elif role == "tcp-stream":
    host, port = args[0], int(args[1]); chunk, pause = 16384, 0.002
    st = {"sent": 0, "received": 0, "ok": False, "error": None, "maxGapMs": 0.0}
    c = socket.create_connection((host, port), timeout=5); c.settimeout(None)
    out({"ready": True})
    lock = threading.Lock(); last = [time.monotonic()]; done_sending = threading.Event()
    def send():
        try:
            while not stop.is_set():
                o = st["sent"] % 251
                c.sendall(PAT[o:o + chunk]); st["sent"] += chunk
                time.sleep(pause)
        except OSError as e:
            st["error"] = st["error"] or f"send: {e}"
        done_sending.set()
    t = threading.Thread(target=send, daemon=True); t.start()
    try:
        while True:
            if done_sending.is_set() and st["received"] >= st["sent"]: break
            r, _, _ = select.select([c], [], [], 0.1)
            now = time.monotonic()
            if not r:
                if done_sending.is_set() and now - last[0] > 30: st["error"] = "drain timeout"; break
                continue
            d = c.recv(65536)
            if not d: st["error"] = st["error"] or "closed by peer"; break
            o = st["received"] % 251
            if d != PAT[o:o + len(d)]: st["error"] = "corrupt stream"; break
            st["maxGapMs"] = max(st["maxGapMs"], round((now - last[0]) * 1000, 1)); last[0] = now
            st["received"] += len(d)
    except OSError as e:
        st["error"] = st["error"] or f"recv: {e}"
    st["ok"] = st["error"] is None and st["received"] == st["sent"] and st["sent"] > 0
    out(st)
elif role == "udp-flow":
    host, port = args[0], int(args[1])
    s = socket.socket(fam(host), socket.SOCK_DGRAM); s.connect((host, port)); s.setblocking(False)
    st = {"sent": 0, "replies": 0, "maxGapMs": 0.0}; last = time.monotonic(); first = None
    out({"ready": True})
    while not stop.is_set():
        s.send(str(st["sent"]).encode()); st["sent"] += 1
        end = time.monotonic() + 0.01
        while time.monotonic() < end:
            r, _, _ = select.select([s], [], [], max(0, end - time.monotonic()))
            if r:
                try: s.recv(2048)
                except OSError: continue
                now = time.monotonic()
                if first is not None: st["maxGapMs"] = max(st["maxGapMs"], round((now - last) * 1000, 1))
                first = first or now; last = now; st["replies"] += 1
    st["lastReplyAgoMs"] = round((time.monotonic() - last) * 1000, 1)
    out(st)
elif role == "tcp-churn":
    # New connections all the time: connect, 64 bytes there and back, close. A connection counts as
    # slow when it took over 0.5 s (a lost handshake packet is retried after 1 s), failed on error.
    host, port = args[0], int(args[1]); st = {"connections": 0, "ok": 0, "slow": 0, "failed": 0}
    out({"ready": True})
    while not stop.is_set():
        t0 = time.monotonic(); st["connections"] += 1
        try:
            c = socket.create_connection((host, port), timeout=3); c.settimeout(3)
            c.sendall(b"x" * 64); got = b""
            while len(got) < 64:
                d = c.recv(64 - len(got))
                if not d: raise OSError("closed")
                got += d
            c.close(); st["ok"] += 1
            if time.monotonic() - t0 > 0.5: st["slow"] += 1
        except OSError as e:
            st["failed"] += 1; tally(st.setdefault("errors", {}), e)
        time.sleep(0.01)
    out(st)
elif role == "tcp-prober":
    # An admitted SYN is answered in well under 1 ms here, a dropped one is retried by the kernel only
    # after 1 s: a 0.1 s timeout misses no success. Four threads: ~40 attempts/s.
    host, port = args[0], int(args[1]); st = {"attempts": 0, "successes": 0}; lock = threading.Lock()
    def probe():
        while not stop.is_set():
            ok = 0
            try:
                socket.create_connection((host, port), timeout=0.1).close(); ok = 1
            except OSError: pass
            with lock: st["attempts"] += 1; st["successes"] += ok
            time.sleep(0.005)
    ts = [threading.Thread(target=probe, daemon=True) for _ in range(4)]
    out({"ready": True})
    for t in ts: t.start()
    for t in ts: t.join()
    out(st)
"""


@dataclass
class Flow:
    role: str
    netns: str
    args: tuple[str, ...]
    proc: subprocess.Popen[str] | None = None
    result: dict[str, Any] = field(default_factory=dict)

    def start(self, ready_timeout: float = 10.0) -> Flow:
        argv = ["ip", "netns", "exec", self.netns, sys.executable, "-c", SCRIPT, self.role, *self.args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # {"ready": true}, or EOF when it failed
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"{self.role} in {self.netns} did not start: {err.strip()[-500:]}")
        return self

    def stop(self, timeout: float = 40.0) -> dict[str, Any]:
        """SIGTERM (our own child, by PID), wait, parse the last JSON line."""
        p = self.proc
        if p is None:
            return self.result
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        lines = [x for x in out.splitlines() if x.strip()]
        self.result = json.loads(lines[-1]) if lines else {"error": f"no output (exit {p.returncode})"}
        self.proc = None
        return self.result


def wait_port(netns: str, host: str, port: int, timeout: float = 5.0) -> None:
    """Until a TCP connect to host:port from `netns` works (a server just started)."""
    code = f"import socket;socket.create_connection(({host!r},{port}),timeout=0.3).close()"
    deadline = time.monotonic() + timeout
    while True:
        r = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code], capture_output=True)
        if r.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{host}:{port} not reachable from {netns}")
        time.sleep(0.1)


@contextlib.contextmanager
def live_tcp(lab: Lab, src: str, dst: str, port: int) -> Iterator[Flow]:
    """A patterned TCP stream from workload `src` to an echo server on `dst`:`port` for the block (the
    port's responder, if any, pauses meanwhile). `flow.stop()` gives `{sent, received, ok, maxGapMs}`:
    `ok` when no reset came and every byte came back in order."""
    d = lab.plan.workload(dst)
    addr = d.address(4) or d.address(6)
    if addr is None:
        raise ValueError(f"{d.key} has no address")
    with lab.responder_paused(d.key):
        server = Flow("tcp-echo", d.netns, (str(port),)).start()
        try:
            wait_port(lab.workload_netns(src), addr, port)
            stream = Flow("tcp-stream", lab.workload_netns(src), (addr, str(port))).start()
            try:
                yield stream
            finally:
                stream.stop()
        finally:
            server.stop(timeout=5)


__all__ = ["MOBILITY", "Flow", "live_tcp", "wait_port"]


# A small inventory for mobility tests and the soak benchmark: `srv` migrates; `cli` streams to it and
# it streams back; `bad` (an intruder) and `cli` (on a port it may not use) probe it; `sls` is
# governed by a stateless policy (nothing to import). Three hosts.
MOBILITY = """
kind: Tenant
metadata: {name: infra}
---
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
spec: {host: h1, vnics: [{name: eth0, ips: [10.78.0.1]}]}
---
kind: Workload
metadata: {name: srv, tenant: t1, labels: {role: server}}
spec: {host: h2, vnics: [{name: eth0, ips: [10.78.0.2]}], lab: {servers: [tcp/7001]}}
---
kind: Workload
metadata: {name: bad, tenant: t1, labels: {role: intruder}}
spec: {host: h3, vnics: [{name: eth0, ips: [10.78.0.3]}]}
---
kind: Workload
metadata: {name: sls, tenant: t1, labels: {role: stateless}}
spec: {host: h2, vnics: [{name: eth0, ips: [10.78.0.4]}]}
---
kind: Group
metadata: {name: clients, tenant: t1}
spec: {selector: 'role == "client"'}
---
kind: Group
metadata: {name: servers, tenant: t1}
spec: {selector: 'role == "server"'}
---
kind: Group
metadata: {name: stateless, tenant: t1}
spec: {selector: 'role == "stateless"'}
---
kind: Policy
metadata: {name: mobility, tenant: t1}
spec:
  category: application
  rules:
  - {name: to-srv, sources: [clients], destinations: [servers], services: [tcp/5001, udp/5002], action: allow}
  - {name: from-srv, sources: [servers], destinations: [clients], services: [tcp/5011], action: allow}
---
kind: Policy
metadata: {name: untracked, tenant: t1}
spec:
  category: application
  stateful: false
  rules:
  - {name: to-sls, sources: [clients], destinations: [stateless], services: [tcp/5101], action: allow}
  - {name: sls-replies, sources: [stateless], destinations: [clients], services: [tcp], action: allow}
"""
