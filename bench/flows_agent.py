"""Agent flow records: what they cost new connections, and the agent under a denied flood. Needs root.

    sudo .venv/bin/python bench/flows_agent.py                 # ~2 min
    sudo .venv/bin/python bench/flows_agent.py --rounds 3 --seconds 2 --flood-seconds 5

One lab (two hosts, `src` on h1, `dst` on h2; a connection crosses both hosts' forward hooks), the real
agent process on each host (`python -m omniwall.agent.cli --netns ...`) fed by `FakeManager`, which also
takes their flow batches. h1: src may send anything (rule 1); h2: dst accepts tcp/5300 (rule 2), drops
udp/5500 (rule 3), default drop.

1. New-connection rate (bench/_connrate.py), flows on (`--flows`: every hop verdict logged, records read,
   aggregated, shipped) vs off (`--no-flows`: no log statements at all), same run, paired rounds in
   alternating order (agents restarted per arm; the table is rebuilt on the switch); ratio = median of
   the per-round on/off ratios, with its quartiles and each round's 1-minute load (on 2 shared cores a
   single round swings by ±30%: many short paired rounds, medians). Target >= 0.95.
2. Denied flood: UDP to dst:5500 from `src` at `--pps` for `--flood-seconds` (a small C sender,
   sendmmsg, paced; on veth the whole forwarding path runs in the sender's system call, so the achieved
   rate is what the path sustains on this machine, reported); the agents' CPU (utime+stime / wall, in
   cores) and peak RSS, the records and drops the manager received; then the same flood with flows off.

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omniwall.compiler.ir import HostDesiredState, IRRule, IRVnic, ServiceMatch
from omniwall.lab.lab import Lab

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test doubles
from doubles.fake_manager import FakeManager

CONNRATE = str(Path(__file__).resolve().parent / "_connrate.py")
SRC_IP, DST_IP = "10.91.0.1", "10.91.0.2"
CONN_PORT, FLOOD_PORT = 5300, 5500
TOKEN = "bench-token"
LAB = f"""
kind: Host
metadata: {{name: h1}}
---
kind: Host
metadata: {{name: h2}}
---
kind: Workload
metadata: {{name: src, tenant: bench}}
spec: {{host: h1, vnics: [{{name: eth0, ips: [{SRC_IP}]}}]}}
---
kind: Workload
metadata: {{name: dst, tenant: bench}}
spec: {{host: h2, vnics: [{{name: eth0, ips: [{DST_IP}]}}]}}
"""
FLOOD_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
static double now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9;
}
int main(int argc, char **argv) {
    int port = atoi(argv[2]); double pps = atof(argv[3]), secs = atof(argv[4]);
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in d = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, argv[1], &d.sin_addr);
    char buf[18] = {0}; struct iovec iov = {buf, sizeof buf};
    struct mmsghdr m[64]; memset(m, 0, sizeof m);
    for (int i = 0; i < 64; i++) { m[i].msg_hdr.msg_name = &d; m[i].msg_hdr.msg_namelen = sizeof d;
        m[i].msg_hdr.msg_iov = &iov; m[i].msg_hdr.msg_iovlen = 1; }
    long sent = 0; double t0 = now(), t;
    while ((t = now()) < t0 + secs) {
        long due = (long)((t - t0) * pps);
        if (sent >= due) { usleep(200); continue; }
        int n = due - sent > 64 ? 64 : (int)(due - sent);
        int r = sendmmsg(s, m, n, MSG_DONTWAIT);
        sent += r > 0 ? r : n;  /* a full queue drops: count it as offered */
    }
    printf("%f\n", sent / (now() - t0));
    return 0;
}
"""
FLOOD = """
import socket, sys, time
dst, port, pps, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
sent, start, msg = 0, time.monotonic(), b"x" * 18
end = start + seconds
while True:
    now = time.monotonic()
    if now >= end:
        break
    due = int((now - start) * pps)
    while sent < due:
        try:
            socks[sent & 7].sendto(msg, (dst, port))
        except OSError:
            pass
        sent += 1
print(sent / (time.monotonic() - start))
"""


def sh(ns: str, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout)


def states(src_if: str, dst_if: str) -> dict[str, HostDesiredState]:
    r1 = IRRule(1, "bench", "out", "any", "application", "allow", None, None)
    r2 = IRRule(
        2,
        "bench",
        "in",
        "conn",
        "application",
        "allow",
        None,
        None,
        (ServiceMatch("tcp", ((CONN_PORT,) * 2,)),),
    )
    r3 = IRRule(
        3,
        "bench",
        "in",
        "flood",
        "application",
        "drop",
        None,
        None,
        (ServiceMatch("udp", ((FLOOD_PORT,) * 2,)),),
    )
    return {
        "h1": HostDesiredState(
            "h1", 1, (IRVnic(src_if, "bench/src", "bench", (SRC_IP,), egress=(1,)),), (r1,)
        ),
        "h2": HostDesiredState(
            "h2", 1, (IRVnic(dst_if, "bench/dst", "bench", (DST_IP,), ingress=(2, 3)),), (r2, r3)
        ),
    }  # fmt: skip


class Bench:
    def __init__(self, lab: Lab, args: argparse.Namespace) -> None:
        self.lab, self.args = lab, args
        self.src_ns, self.dst_ns = lab.workload_netns("src"), lab.workload_netns("dst")
        self.hosts = {"h1": lab.host_netns("h1"), "h2": lab.host_netns("h2")}
        src_if = lab.plan.workload("src").vnics[0].host_ifname
        dst_if = lab.plan.workload("dst").vnics[0].host_ifname
        self.fm = FakeManager(tokens=dict.fromkeys(self.hosts, TOKEN), heartbeat=0.5)
        self.fm.start()
        for st in states(src_if, dst_if).values():
            self.fm.publish(st)
        self.tmp = tempfile.TemporaryDirectory(prefix="owbench-flows-")
        Path(self.tmp.name, "token").write_text(TOKEN + "\n")
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.servers: list[subprocess.Popen[bytes]] = []

    def start_server(self) -> None:
        sh(self.src_ns, ["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])
        out = open(Path(self.tmp.name, "server.log"), "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            ["ip", "netns", "exec", self.dst_ns, sys.executable, CONNRATE, "server", "--addr", DST_IP,
             "--port", str(CONN_PORT)], stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.servers.append(p)
        time.sleep(0.5)

    def start_agents(self, flows: bool) -> None:
        self.stop_agents()
        for host, ns in self.hosts.items():
            argv = [sys.executable, "-m", "omniwall.agent.cli", "--manager", self.fm.url, "--host", host,
                    "--token-file", str(Path(self.tmp.name, "token")), "--netns", ns,
                    "--state-dir", self.tmp.name, "--flows" if flows else "--no-flows"]  # fmt: skip
            log = open(Path(self.tmp.name, f"agent-{host}.log"), "a")  # noqa: SIM115
            self.agents[host] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        want = "established flows:16" if flows else "established"
        acks = {h: len(self.fm.statuses.get(h, [])) for h in self.hosts}
        deadline = time.monotonic() + 30
        for h, ns in self.hosts.items():
            # this agent's own ack (an adopted table matches at once), then its table
            # flows on: "established flows:16", or ".../ct-new" (ingress allowed records from conntrack)
            while len(self.fm.statuses.get(h, [])) <= acks[h] or not any(
                c == want or c.startswith(want + "/") for c in _fwd_comments(ns)
            ):
                if time.monotonic() > deadline:
                    logs = "".join(Path(self.tmp.name, f"agent-h{h}.log").read_text()[-800:] for h in "12")
                    raise RuntimeError(f"agent did not program {ns} (flows={flows}): {logs}")
                time.sleep(0.1)
        time.sleep(2.0)  # start-up CPU (imports, adoption) must not overlap the measurement

    def stop_agents(self) -> None:
        for p in self.agents.values():  # our own children, by PID
            p.terminate()
            p.wait(10)
        self.agents.clear()

    def connrate(self) -> float:
        for ns in self.hosts.values():
            sh(ns, ["conntrack", "-F"])
        r = sh(
            self.src_ns,
            [sys.executable, CONNRATE, "client", "--dst", DST_IP, "--port", str(CONN_PORT),
             "--seconds", str(self.args.seconds), "--concurrency", str(self.args.concurrency)],
            timeout=self.args.seconds + 30,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"connection-rate client failed: {r.stderr.strip()}")
        return float(json.loads(r.stdout.strip().splitlines()[-1])["rate"])

    def flood(self, flows: bool = True) -> dict[str, Any]:
        self.start_agents(flows)
        time.sleep(1.5)
        before = {h: _cpu(p.pid) for h, p in self.agents.items()}
        rss = dict.fromkeys(self.agents, 0)
        records0 = self._records()
        t0 = time.monotonic()
        argv = [DST_IP, str(FLOOD_PORT), str(self.args.pps), str(self.args.flood_seconds)]
        sender = subprocess.Popen(
            ["ip", "netns", "exec", self.src_ns, *self.flooder(), *argv], stdout=subprocess.PIPE, text=True
        )
        while sender.poll() is None:
            for h, p in self.agents.items():
                rss[h] = max(rss[h], _rss(p.pid))
            time.sleep(0.25)
        wall = time.monotonic() - t0
        after = {h: _cpu(p.pid) for h, p in self.agents.items()}
        pps = float((sender.stdout.read() if sender.stdout else "0").strip() or 0)
        time.sleep(3)  # the last interval's aggregates ship
        batches = self.fm.flow_batches.get("h2", [])
        recs = [r for b in batches for r in b["records"]]
        denied = sum(r["count"] for r in recs if r["verdict"] == "denied" and r["rule_id"] == 3)
        dropped = batches[-1]["dropped"] if batches else {}
        return {
            "pps_target": self.args.pps,
            "pps_sent": round(pps),
            "seconds": round(wall, 1),
            "agent_cpu_cores": {h: round((after[h] - before[h]) / wall, 3) for h in self.agents},
            "agent_rss_mb": {h: round(v / 1e6, 1) for h, v in rss.items()},
            "h2_records": len(recs) - records0,
            "h2_denied_packets_in_records": denied,
            "h2_dropped": dropped,
        }

    def flooder(self) -> list[str]:
        """A small C sender (sendmmsg, paced) when gcc is there; else Python (far fewer pps)."""
        src, exe = Path(self.tmp.name, "flood.c"), Path(self.tmp.name, "flood")
        src.write_text(FLOOD_C)
        if shutil.which("gcc") and subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)]).returncode == 0:
            return [str(exe)]
        return [sys.executable, "-c", FLOOD]

    def _records(self) -> int:
        return sum(len(b["records"]) for b in self.fm.flow_batches.get("h2", []))

    def close(self) -> None:
        self.stop_agents()
        for p in self.servers:
            p.terminate()
            p.wait(5)
        self.fm.stop()
        self.tmp.cleanup()


def _fwd_comments(ns: str) -> list[str]:
    out = sh(ns, ["nft", "-j", "list", "table", "inet", "omniwall"]).stdout
    objs = json.loads(out)["nftables"] if out.strip() else []
    return [o["rule"].get("comment", "") for o in objs if "rule" in o and o["rule"]["chain"] == "fwd"]


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=11, help="paired rounds (on and off, alternating order)")
    p.add_argument("--seconds", type=float, default=2.0, help="per connection-rate run")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--pps", type=int, default=100_000, help="denied flood rate (paced)")
    p.add_argument("--flood-seconds", type=float, default=10.0)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/flows_agent.py needs root (network namespaces)", file=sys.stderr)
        return 2
    load = os.getloadavg()
    log(f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs")
    rates: dict[str, list[float]] = {"on": [], "off": []}
    cpu_us: list[float] = []
    cpu_off_us: list[float] = []
    # per host and arm: flows' cost moved between the hosts (ingress allowed records from conntrack)
    by_host: dict[str, list[float]] = {f"{h}_{a}": [] for h in ("h1", "h2") for a in ("on", "off")}
    loads: list[float] = []  # 1-minute load at each round's start
    with Lab.up(LAB, policy=False, responders=False, ipv6=False) as lab:
        bench = Bench(lab, args)
        try:
            bench.start_server()
            for r in range(args.rounds):
                loads.append(round(os.getloadavg()[0], 2))
                for arm in ("on", "off") if r % 2 == 0 else ("off", "on"):
                    bench.start_agents(arm == "on")
                    cpu0 = {h: _cpu(p.pid) for h, p in bench.agents.items()}
                    t0 = time.monotonic()
                    rates[arm].append(bench.connrate())
                    conns = rates[arm][-1] * (time.monotonic() - t0)
                    # the agents' CPU per connection, both arms (robust to a busy machine): flows' own
                    # share is on - off (the off arm still runs the agent: feed, conntrack mirror)
                    used = sum(_cpu(p.pid) - cpu0[h] for h, p in bench.agents.items()) / conns * 1e6
                    (cpu_us if arm == "on" else cpu_off_us).append(used)
                    for h, p in bench.agents.items():
                        by_host[f"{h}_{arm}"].append((_cpu(p.pid) - cpu0[h]) / conns * 1e6)
                    log(f"round {r} flows {arm}: {rates[arm][-1]:.0f} conn/s")
            flood = bench.flood()
            flood_off = bench.flood(flows=False)
        finally:
            bench.close()
    ratios = [a / b for a, b in zip(rates["on"], rates["off"], strict=True)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    result = {
        "bench": "flows_agent",
        "loadavg_start": load,
        "conn_rate_on": statistics.median(rates["on"]),
        "conn_rate_off": statistics.median(rates["off"]),
        "ratio_on_off": round(statistics.median(ratios), 3),
        "ratio_quartiles": [round(q[0], 3), round(q[2], 3)],
        "ratios": [round(x, 3) for x in ratios],
        "round_loads": loads,
        "agents_cpu_us_per_connection": round(statistics.median(cpu_us), 1),
        "agents_cpu_us_per_connection_flows_off": round(statistics.median(cpu_off_us), 1),
        "agent_cpu_us_per_connection_by_host": {
            k: round(statistics.median(v), 1) for k, v in by_host.items()
        },
        "flood": flood,
        "flood_flows_off": {k: flood_off[k] for k in ("pps_sent", "agent_cpu_cores", "agent_rss_mb")},
        "loadavg_end": os.getloadavg(),
    }
    print(f"new connections/s: flows on {result['conn_rate_on']:.0f}, off {result['conn_rate_off']:.0f}, "
          f"ratio {result['ratio_on_off']} (quartiles {result['ratio_quartiles']}; per round "
          f"{result['ratios']}; load per round {loads}); both agents' CPU "
          f"{result['agents_cpu_us_per_connection']} us per connection with flows on, "
          f"{result['agents_cpu_us_per_connection_flows_off']} off")  # fmt: skip
    print(f"denied flood: {flood}")
    print(f"same flood, flows off: {result['flood_flows_off']}")
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
