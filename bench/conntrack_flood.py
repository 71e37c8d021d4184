"""Conntrack flood: does a workload opening new connections as fast as it can stop its neighbour on the
same host from connecting? Needs root, gcc, conntrack; builds its own lab (docs/conntrack-limits.md).

    sudo .venv/bin/python bench/conntrack_flood.py                 # 7 paired rounds, ~2 min
    sudo .venv/bin/python bench/conntrack_flood.py --rounds 3 --seconds 2 --no-unlimited

One lab host `h1` with three workloads: `flooder` (tenant `flood`), `neighbour` (tenant `nb`) and
`server` (tenant `nb`). The YAML gives both tenants `connectionLimit` (default perWorkload 10000,
newPerSecond 5000); the state is compiled from it (`compile_catalog`) and synced by `NftBackend`, as an
agent would. The flooder is a small C program (compiled here with gcc; Python cannot send fast enough):
UDP datagrams from 64 sockets to every port 1024-65535 of the server in turn, `sendmmsg` 64 at a time,
so every datagram is a new 5-tuple, i.e. a new conntrack entry on the host: a new connection. The
neighbour's rate is `bench/_connrate.py` (TCP handshakes completed per second to the server, 64 in
flight).

Arms, measured in rotating order each round (conntrack of the host flushed before each):
  quiet      the neighbour alone, limits on;
  flood      the neighbour while the flooder runs, limits on;
  unlimited  the same flood with the limits removed from the state (omit with --no-unlimited): what the
             limits buy (the flooder's entries then fill the host's table, nf_conntrack_max 262144
             here, shared by every workload of the host).
The number: median over rounds of flood/quiet (paired, same round); the goal is >= 0.9. Also reported:
the flooder's offered rate (datagrams/s it managed to send: the flood's real size on this machine),
how many of them the limits dropped (the named counter `cl_<if>`), the peak conntrack count, `uptime`.
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from omniwall.agent.conntrack_usage import ConntrackUsageReader
from omniwall.compiler.build import compile_catalog
from omniwall.compiler.ir import HostDesiredState
from omniwall.dataplane.nft.backend import NftBackend
from omniwall.dataplane.nft.names import connlimit_counter
from omniwall.lab.lab import Lab

CONNRATE = str(Path(__file__).resolve().parent / "_connrate.py")
FLOOD_IP, NB_IP, SERVER_IP = "10.91.0.1", "10.91.0.2", "10.91.0.3"
CONN_PORT = 5300
ECHO_PORT, ECHO_PORTS = 6000, 64  # the flood's destination ports (echoed by the server workload)


def lab_yaml(per_workload: int, per_second: int, nb_per_second: int) -> str:
    def limit(rate: int) -> str:
        return f"connectionLimit: {{perWorkload: {per_workload}, newPerSecond: {rate}}}"

    return f"""
kind: Host
metadata: {{name: h1}}
---
kind: Tenant
metadata: {{name: flood}}
spec: {{defaultAction: allow, {limit(per_second)}}}
---
kind: Tenant
metadata: {{name: nb}}
spec: {{defaultAction: allow, {limit(nb_per_second)}}}
---
kind: Workload
metadata: {{name: flooder, tenant: flood}}
spec: {{host: h1, vnics: [{{name: eth0, ips: [{FLOOD_IP}]}}]}}
---
kind: Workload
metadata: {{name: neighbour, tenant: nb}}
spec: {{host: h1, vnics: [{{name: eth0, ips: [{NB_IP}]}}]}}
---
kind: Workload
metadata: {{name: server, tenant: nb}}
spec: {{host: h1, vnics: [{{name: eth0, ips: [{SERVER_IP}]}}]}}
"""


# `flood DST PORT0 NPORTS NSOCK SECONDS RATE`: NSOCK UDP sockets (NSOCK source ports), each sending one
# datagram to each of NPORTS destination ports per sendmmsg, socket after socket, round and round: the
# first pass opens NSOCK*NPORTS new flows (5-tuples), later passes revisit them (a flow the server
# answered and that is seen again after 2 s becomes an ASSURED conntrack entry, which the kernel never
# evicts early). RATE > 0 paces it (datagrams/s). Prints JSON: datagrams sent, seconds, flows, and the
# seconds the first pass took. `echo BIND PORT0 NPORTS`: echoes every datagram on those ports.
FLOOD_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#define BATCH 64
static double now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9;
}
static int udp(void) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (fd < 0) { perror("socket"); exit(1); }
    return fd;
}
static int echo(const char *bind_ip, int port0, int nports) {
    int fds[BATCH]; struct sockaddr_in a; int ep = epoll_create1(0);
    for (int i = 0; i < nports; i++) {
        fds[i] = udp(); memset(&a, 0, sizeof a); a.sin_family = AF_INET; a.sin_port = htons(port0 + i);
        inet_pton(AF_INET, bind_ip, &a.sin_addr);
        if (bind(fds[i], (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fds[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
    }
    printf("ready\n"); fflush(stdout);
    struct mmsghdr m[BATCH]; struct iovec iov[BATCH]; char buf[BATCH][64]; struct sockaddr_in from[BATCH];
    struct epoll_event evs[BATCH];
    for (;;) {
        int k = epoll_wait(ep, evs, BATCH, -1);
        for (int e = 0; e < k; e++) {
            memset(m, 0, sizeof m);
            for (int j = 0; j < BATCH; j++) {
                iov[j].iov_base = buf[j]; iov[j].iov_len = sizeof buf[j];
                m[j].msg_hdr.msg_iov = &iov[j]; m[j].msg_hdr.msg_iovlen = 1;
                m[j].msg_hdr.msg_name = &from[j]; m[j].msg_hdr.msg_namelen = sizeof from[j];
            }
            int n = recvmmsg(evs[e].data.fd, m, BATCH, MSG_DONTWAIT, NULL);
            if (n <= 0) continue;
            for (int j = 0; j < n; j++) iov[j].iov_len = m[j].msg_len;
            sendmmsg(evs[e].data.fd, m, n, MSG_DONTWAIT);
        }
    }
}
int main(int argc, char **argv) {
    if (argc == 5 && !strcmp(argv[1], "echo")) return echo(argv[2], atoi(argv[3]), atoi(argv[4]));
    if (argc != 8 || strcmp(argv[1], "flood")) {
        fprintf(stderr, "usage: flood DST PORT0 NPORTS NSOCK SECONDS RATE | echo BIND PORT0 NPORTS\n");
        return 2;
    }
    const char *dst = argv[2]; int port0 = atoi(argv[3]), nports = atoi(argv[4]), nsock = atoi(argv[5]);
    double secs = atof(argv[6]), rate = atof(argv[7]);
    struct rlimit rl; getrlimit(RLIMIT_NOFILE, &rl); rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl);
    int *fds = calloc(nsock, sizeof(int));
    for (int i = 0; i < nsock; i++) fds[i] = udp();
    struct sockaddr_in to[BATCH]; struct mmsghdr msgs[BATCH]; struct iovec iov; char payload[8] = "flood";
    iov.iov_base = payload; iov.iov_len = sizeof payload;
    memset(msgs, 0, sizeof msgs);
    for (int j = 0; j < nports; j++) {
        memset(&to[j], 0, sizeof to[j]); to[j].sin_family = AF_INET; to[j].sin_port = htons(port0 + j);
        inet_pton(AF_INET, dst, &to[j].sin_addr);
        msgs[j].msg_hdr.msg_name = &to[j]; msgs[j].msg_hdr.msg_namelen = sizeof to[j];
        msgs[j].msg_hdr.msg_iov = &iov; msgs[j].msg_hdr.msg_iovlen = 1;
    }
    long long sent = 0; double start = now(), end = start + secs, t = start, first = 0;
    for (int s = 0; t < end; s = (s + 1) % nsock) {
        int n = sendmmsg(fds[s], msgs, nports, 0);
        if (n > 0) sent += n;
        t = now();
        if (s == nsock - 1 && first == 0) first = t - start;
        if (rate > 0) {
            double ahead = sent / rate - (t - start);
            if (ahead > 0) { usleep(ahead * 1e6); t = now(); }
        }
    }
    printf("{\"sent\": %lld, \"seconds\": %.3f, \"flows\": %lld, \"first_pass\": %.3f}\n", sent, t - start,
           (long long)nsock * nports, first);
    return 0;
}
"""


def sh(ns: str, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_flooder(workdir: str) -> str:
    src, exe = Path(workdir) / "flood.c", Path(workdir) / "flood"
    src.write_text(FLOOD_C)
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True, capture_output=True, text=True)
    return str(exe)


def unlimited(st: HostDesiredState) -> HostDesiredState:
    return replace(st, vnics=tuple(replace(v, conn_limit=None, conn_rate=None) for v in st.vnics))


class Bench:
    def __init__(self, lab: Lab, args: argparse.Namespace, flooder: str) -> None:
        self.args, self.flooder = args, flooder
        self.host = lab.host_netns("h1")
        self.ns = {w: lab.workload_netns(w) for w in ("flooder", "neighbour", "server")}
        self.flood_if = lab.plan.workload("flooder").vnics[0].host_ifname
        self.limited = compile_catalog(lab.catalog)["h1"]
        self.free = replace(unlimited(self.limited), revision=self.limited.revision + 1)
        self.backend = NftBackend(self.host)
        self.usage = ConntrackUsageReader(self.host)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []
        self.current: HostDesiredState | None = None  # what the table holds
        self.source: HostDesiredState | None = None  # which of limited/free it came from

    def start(self) -> None:
        sh(self.ns["neighbour"], ["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])
        argv = [sys.executable, CONNRATE, "server", "--addr", SERVER_IP, "--port", str(CONN_PORT)]
        self._spawn([*self.cpu("neighbour"), *argv])
        self._spawn([*self.cpu("flooder"), self.flooder, "echo", SERVER_IP, str(ECHO_PORT), str(ECHO_PORTS)])

    def cpu(self, side: str) -> list[str]:
        """`taskset` prefix with --pin: the flooder's side on CPU 0, the neighbour's on CPU 1, like VMs
        with their own vCPUs (the host's softirq work for a packet runs on the CPU that sent it)."""
        if not self.args.pin:
            return []
        return ["taskset", "-c", "0" if side == "flooder" else "1"]

    def _spawn(self, argv: list[str]) -> None:
        """A server in the server workload, output to a file; wait until it prints `ready`."""
        out = tempfile.NamedTemporaryFile("w+", prefix="owflood-", suffix=".log")  # noqa: SIM115
        self.logs.append(out)
        p = subprocess.Popen(["ip", "netns", "exec", self.ns["server"], *argv], stdout=out, stderr=out)
        self.procs.append(p)
        deadline = time.monotonic() + 10
        while "ready" not in Path(out.name).read_text():
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not start: {Path(out.name).read_text()[-300:]!r}")
            time.sleep(0.05)

    def stop(self) -> None:
        for p in self.procs:  # only what we started, by PID
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        self.usage.close()
        self.backend.close()

    def program(self, st: HostDesiredState) -> None:
        """Sync `st` (limited or free) unless it is what the table holds (revisions only go up)."""
        if self.source is not st:
            rev = self.current.revision + 1 if self.current else st.revision
            self.current = replace(st, revision=rev)
            self.backend.sync(self.current)
            self.source = st

    def drops(self) -> int:
        if self.current is None or all(v.conn_limit is None for v in self.current.vnics):
            return 0
        res = sh(
            self.host, ["nft", "-j", "list", "counter", "inet", "omniwall", connlimit_counter(self.flood_if)]
        )
        for obj in json.loads(res.stdout).get("nftables", []):
            if "counter" in obj:
                return int(obj["counter"]["packets"])
        return 0

    def measure(self, arm: str) -> dict[str, Any]:
        """One measurement: `quiet`/`flood` with the limits, `quiet-free`/`flood-free` without."""
        a = self.args
        self.program(self.free if arm.endswith("-free") else self.limited)
        sh(self.host, ["conntrack", "-F"], timeout=120)
        time.sleep(0.2)
        drops0 = self.drops()
        flood = None
        peak = [0]
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.1):
                u = self.usage.read()
                if u is not None:
                    peak[0] = max(peak[0], u.count)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        if arm.startswith("flood"):
            usage = self.usage.read()
            ct_max = usage.max if usage is not None else 262144
            nsock = -(-ct_max * 5 // 4 // ECHO_PORTS)  # 1.25 x the table's size in flows
            flood = subprocess.Popen(
                ["ip", "netns", "exec", self.ns["flooder"], *self.cpu("flooder"), self.flooder, "flood",
                 SERVER_IP, str(ECHO_PORT), str(ECHO_PORTS), str(nsock), str(a.warmup + a.seconds + 0.5),
                 str(a.flood_rate)],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            self.procs.append(flood)  # type: ignore[arg-type]
            time.sleep(a.warmup)  # the table fills (and, without limits, the flows get ASSURED) first
        res = sh(
            self.ns["neighbour"],
            [*self.cpu("neighbour"), sys.executable, CONNRATE, "client", "--dst", SERVER_IP,
             "--port", str(CONN_PORT), "--seconds", str(a.seconds), "--concurrency", "64"],
            timeout=a.seconds + 30,
        )  # fmt: skip
        done.set()
        watcher.join()
        if res.returncode != 0:
            raise RuntimeError(f"connrate client failed: {res.stderr[-300:]}")
        nb = json.loads(res.stdout.strip().splitlines()[-1])
        out: dict[str, Any] = {"arm": arm, "rate": nb["rate"], "errors": nb["errors"], "peak_ct": peak[0]}
        if flood is not None:
            fo, _ = flood.communicate(timeout=a.warmup + a.seconds + 30)
            self.procs.remove(flood)  # type: ignore[arg-type]
            f = json.loads(fo.strip().splitlines()[-1])
            # every datagram of the first pass opens a flow; a slow flooder may not finish that pass
            out["new_flows_per_s"] = min(f["sent"], f["flows"]) / (f["first_pass"] or f["seconds"])
            out["datagrams_per_s"] = f["sent"] / f["seconds"]
            out["limit_drops_per_s"] = (self.drops() - drops0) / f["seconds"]
        return out


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def environment() -> dict[str, Any]:
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "kernel": platform.release(),
        "nft": nft,
        "cpus": os.cpu_count(),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="neighbour measurement per arm and round")
    p.add_argument("--warmup", type=float, default=45.0, help="seconds of flood before the neighbour starts")
    p.add_argument("--per-workload", type=int, default=10_000, help="connectionLimit.perWorkload (both)")
    p.add_argument("--per-second", type=int, default=5_000, help="the flooder tenant's newPerSecond")
    p.add_argument("--neighbour-per-second", type=int, default=50_000, help="the neighbour's newPerSecond")
    p.add_argument(
        "--flood-rate", type=int, default=100_000, help="pace the flood (datagrams/s); 0: flat out"
    )
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="flooder side on CPU 0, neighbour side on CPU 1 (default: on)")  # fmt: skip
    p.add_argument("--no-unlimited", action="store_true", help="skip the arms without limits")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/conntrack_flood.py needs root (network namespaces)", file=sys.stderr)
        return 2
    for tool in ("gcc", "conntrack", "ip", "nft"):
        if shutil.which(tool) is None:
            print(f"bench/conntrack_flood.py needs {tool}", file=sys.stderr)
            return 2
    env = environment()
    log(f"kernel {env['kernel']}, {env['nft']}, {env['cpus']} CPUs, {env['uptime']}")
    arms = ["quiet", "flood"] + ([] if args.no_unlimited else ["quiet-free", "flood-free"])
    results: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    with tempfile.TemporaryDirectory(prefix="owflood-") as tmp:
        flooder = build_flooder(tmp)
        yaml = lab_yaml(args.per_workload, args.per_second, args.neighbour_per_second)
        with Lab.up(yaml, policy=False, responders=False, ipv6=False) as lab:
            log(f"lab {lab.name}: {', '.join(lab.namespaces())}")
            bench = Bench(lab, args, flooder)
            try:
                bench.start()
                for rnd in range(args.rounds):
                    order = arms[rnd % len(arms) :] + arms[: rnd % len(arms)]
                    for arm in order:
                        r = bench.measure(arm)
                        results[arm].append(r)
                        shown = ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in r.items() if k != "arm")  # fmt: skip
                        log(f"round {rnd + 1} {arm:10}: {shown}")
            finally:
                bench.stop()
    env["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    summary: dict[str, Any] = {"env": env, "args": {k: str(v) for k, v in vars(args).items()}}
    for arm in arms:
        rs = results[arm]
        summary[arm] = {
            "neighbour_rate": med([r["rate"] for r in rs]),
            "neighbour_errors": med([r["errors"] for r in rs]),
            "peak_conntrack": med([r["peak_ct"] for r in rs]),
        }
        if arm.startswith("flood"):
            base = [r["rate"] for r in results[arm.replace("flood", "quiet")]]
            summary[arm]["ratio_to_quiet"] = med([r["rate"] / q for r, q in zip(rs, base, strict=True)])
            for k in ("new_flows_per_s", "datagrams_per_s", "limit_drops_per_s"):
                summary[arm][k] = med([r[k] for r in rs])
    print(f"{'arm':11} {'neighbour conn/s':>16} {'ratio':>6} {'flood new flows/s':>18} {'datagrams/s':>12}"
          f" {'limit drops/s':>14} {'peak conntrack':>15}")  # fmt: skip
    for arm in arms:
        s = summary[arm]
        print(
            f"{arm:11} {s['neighbour_rate']:16.0f} {s.get('ratio_to_quiet', 1.0):6.3f} "
            f"{s.get('new_flows_per_s', 0):18.0f} {s.get('datagrams_per_s', 0):12.0f} "
            f"{s.get('limit_drops_per_s', 0):14.0f} {s['peak_conntrack']:15.0f}"
        )
    line = json.dumps(summary, separators=(",", ":"), default=str)
    if args.json_out:
        args.json_out.write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
