"""VM live-migration soak (BENCHMARKS.md "VM live migration"): a running QEMU guest migrated back and
forth between two lab hosts while traffic flows to and from it, with and without Omniwall, in one run.

    sudo .venv/bin/python bench/migration.py --vm                     # 30 migrations per arm
    sudo .venv/bin/python bench/vm_migration.py --migrations 30 --json /tmp/vm-mig.json

Two labs up at once, the same inventory (a guest `srv` on h2, a client namespace `cli` on h1, an intruder
namespace `bad` on h3), paired rounds alternating which arm goes first:
- `omniwall`: a managed lab (manager, an agent per host, nftables); each migration is started as
  `omniwall migrate` does (`POST .../migrate`, then following the record every 0.2 s): the manager's
  phases (destination programmed, conntrack copied), and the lab's hypervisor process doing its part,
  `lab.vm.migrate_guest` (destination QEMU with `-incoming`, routes switched on RESUME, source stopped);
- `bare`: a lab without any firewall (no nftables table at all); each migration is the same hypervisor
  part alone (`lab.migrate.switch_vnics`).
Traffic, all the time, in both labs:
- TCP: cli -> srv:5001 (busybox `nc -ll -e cat` in the guest echoes), 1 KiB every 10 ms, every echoed
  byte checked against the pattern; "survives" = no error or reset and every byte back in order;
- UDP: the guest's busybox `tftp -p` of /dev/zero to a sink in cli (udp/5003) acknowledging each block
  after 10 ms: one UDP flow (one source port, one request) for the whole run (busybox-static has no UDP
  server and its `nc` has no UDP);
- `omniwall` arm only: two denied-flow probers (bad -> srv tcp/5001, cli -> srv tcp/5009: 4 connect()
  threads each): successes must be 0.
Application-visible gap of one migration = the longest pause between two echoed TCP chunks (or two UDP
blocks) that overlaps the migration (from `migrate` called to 1 s after it returned). The firewall's
cost = the paired difference omniwall - bare, round by round; the issue's bar: ≤ 50 ms (median).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from omniwall.lab import Lab, guest
from omniwall.lab.managed import managed_lab
from omniwall.lab.migrate import switch_vnics
from omniwall.lab.streams import Flow, wait_port

LAB = """
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
spec: {host: h1, vnics: [{name: eth0, ips: [10.%d.0.1]}]}
---
kind: Workload
metadata: {name: srv, tenant: t1, labels: {role: server}}
spec: {host: h2, vnics: [{name: eth0, ips: [10.%d.0.2]}], lab: {kind: vm, servers: [tcp/7001]}}
---
kind: Workload
metadata: {name: bad, tenant: t1, labels: {role: intruder}}
spec: {host: h3, vnics: [{name: eth0, ips: [10.%d.0.3]}]}
---
kind: Group
metadata: {name: clients, tenant: t1}
spec: {selector: 'role == "client"'}
---
kind: Group
metadata: {name: servers, tenant: t1}
spec: {selector: 'role == "server"'}
---
kind: Policy
metadata: {name: vm-mobility, tenant: t1}
spec:
  category: application
  rules:
  - {name: to-srv, sources: [clients], destinations: [servers], services: [tcp/5001, icmp], action: allow}
  - {name: from-srv, sources: [servers], destinations: [clients], services: [udp/5003], action: allow}
"""

# A paced TCP stream with per-gap timestamps (lab/streams.py's `tcp-stream` runs flat out and reports
# only its largest gap; a TCG guest's `cat` is CPU-bound, and we need each migration's own gap).
STREAM = r"""
import json, select, signal, socket, sys, threading, time
host, port, chunk, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
stop = threading.Event(); signal.signal(signal.SIGTERM, lambda *a: stop.set())
PAT = bytes(range(251)) * 300
s = socket.create_connection((host, port), timeout=10); s.settimeout(None)
st = {"sent": 0, "received": 0, "ok": True, "error": None, "gaps": [], "diedAt": None, "lastRecvAt": None}
def recv():
    last = time.monotonic()
    while True:
        try: d = s.recv(65536)
        except OSError as e:
            st["ok"] = False; st["error"] = str(e); st["diedAt"] = time.monotonic(); return
        if not d:
            if st["received"] < st["sent"]: st["ok"] = False; st["error"] = st["error"] or "closed"
            return
        now = time.monotonic()
        if now - last > 0.02: st["gaps"].append([round(now, 4), round((now - last) * 1000, 1)])
        last = st["lastRecvAt"] = now
        off = st["received"] % 251
        if d != PAT[off:off + len(d)]:
            st["ok"] = False; st["error"] = f"corrupt at byte {st['received']}"
        st["received"] += len(d)
t = threading.Thread(target=recv, daemon=True); t.start()
print(json.dumps({"ready": True}), flush=True)
nxt = time.monotonic()
while not stop.is_set() and st["ok"]:
    off = st["sent"] % 251
    if not select.select([], [s], [], 0.5)[1]:  # stalled (nothing acknowledged): keep checking `stop`
        continue
    try: s.sendall(PAT[off:off + chunk])
    except OSError as e:
        st["ok"] = False; st["error"] = str(e); break
    st["sent"] += chunk
    nxt += every; time.sleep(max(0.0, nxt - time.monotonic()))
end = time.monotonic() + 15
while st["received"] < st["sent"] and st["ok"] and time.monotonic() < end: time.sleep(0.05)
if st["received"] != st["sent"]:
    st["ok"] = False; st["error"] = st["error"] or f"{st['sent'] - st['received']} bytes never came back"
    st["diedAt"] = st["diedAt"] or st["lastRecvAt"]  # stalled: dead since the last byte came back
print(json.dumps(st), flush=True)
"""


class Stream:
    def __init__(self, netns: str, host: str, port: int) -> None:
        argv = ["ip", "netns", "exec", netns, sys.executable, "-c", STREAM, host, str(port), "1024", "0.01"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        if '"ready"' not in self.proc.stdout.readline():
            self.proc.kill()
            raise RuntimeError(f"TCP stream in {netns} did not start")

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=40)
        return json.loads(out.strip().splitlines()[-1])


class Arm:
    """One lab and its traffic."""

    def __init__(self, name: str, lab: Lab, net: int, cp: Any = None) -> None:
        self.name, self.lab, self.cp = name, lab, cp
        self.ip = {n: f"10.{net}.0.{i}" for i, n in ((1, "cli"), (2, "srv"), (3, "bad"))}
        self.windows: list[tuple[float, float]] = []
        self.ms: list[float] = []
        self.paused: list[float] = []  # the guest paused (source STOP -> destination RESUME), per QEMU
        self.probers: dict[str, Flow] = {}
        self.infos: list[dict[str, Any]] = []  # lab.vm's migration.json of each migration

    def start_traffic(self, *, probers: bool) -> None:
        srv, cli, bad = (self.lab.plan.workload(f"t1/{n}") for n in ("srv", "cli", "bad"))
        guest.start_tcp_echo(srv.netns, 5001)
        self.sink = guest.TftpSink(cli.netns, 5003)
        guest.start_udp_put(srv.netns, self.ip["cli"], 5003)
        wait_port(cli.netns, self.ip["srv"], 5001, timeout=60)
        self.stream = Stream(cli.netns, self.ip["srv"], 5001)
        if probers:
            self.probers = {
                "intruder": Flow("tcp-prober", bad.netns, (self.ip["srv"], "5001")).start(),
                "wrong-port": Flow("tcp-prober", cli.netns, (self.ip["srv"], "5009")).start(),
            }

    def stop_traffic(self) -> dict[str, Any]:
        out = {"tcp": self.stream.stop(), "udp": self.sink.stop()}
        out.update({k: f.stop() for k, f in self.probers.items()})
        return out

    def migrate_once(self) -> None:
        w = self.lab.plan.workload("t1/srv")
        to = "h3" if w.host == "h2" else "h2"
        t0 = time.monotonic()
        if self.cp is not None:  # as `omniwall migrate` does; the lab's hypervisor process moves the guest
            api = self.cp.api_client()
            rec = api.migrate(w.key, to, switch_timeout=120)
            rec = api.wait_migration(w.key, migration_id=rec["id"], timeout=300)
            assert rec["result"] == "succeeded", rec
            wait_moved(self.lab, w.key, to)
        else:
            switch_vnics(self.lab.name, w.key, to)
            self.lab.reload()
        t1 = time.monotonic()
        self.windows.append((t0, t1))
        self.ms.append((t1 - t0) * 1000)
        # written by lab.vm.migrate_guest, whichever process ran it (this one or the lab's hypervisor)
        info = json.loads((guest.rundir(w.netns) / "migration.json").read_text())
        self.paused.append(info["pausedMs"])
        self.infos.append(info)


def wait_moved(lab: Lab, key: str, to: str, timeout: float = 60.0) -> None:
    """The manager may end a migration (the destination agent saw the guest's route) before the lab's
    hypervisor has recorded the move in the lab's state file (it stops the source QEMU first)."""
    deadline = time.monotonic() + timeout
    while True:
        lab.reload()
        if lab.plan.workload(key).host == to:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{key}: the lab's state does not show it on {to} after {timeout:g} s")
        time.sleep(0.05)


def gap_per_window(
    gaps: list[list[float]], windows: list[tuple[float, float]], tail: float = 1.0
) -> list[float]:
    """For each migration window, the longest gap (ending at t, lasting ms) overlapping it (+ tail);
    10 ms (the pacing) when none over 20 ms did."""
    out = []
    for t0, t1 in windows:
        hits = [ms for t, ms in gaps if t >= t0 and t - ms / 1000 <= t1 + tail]
        out.append(max(hits, default=10.0))
    return out


def timeline(arm: Arm, res: dict[str, Any]) -> list[dict[str, Any]]:
    """Per migration, ms relative to the call: QEMU's `migrate` issued, STOP, RESUME, routes switched,
    the call's return; and the TCP/UDP gaps (start, end) overlapping it. Where a gap comes from."""
    out = []
    for (t0, t1), info in zip(arm.windows, arm.infos, strict=True):
        base = info["started"]

        def rel(t: float, base: float = base) -> float:
            return round((t - base) * 1000)

        row: dict[str, Any] = {
            "call": rel(t0),
            "stop": round(info["stop"] * 1000),
            "resume": round(info["resume"] * 1000),
            "routed": info.get("routedMs"),
            "returned": rel(t1),
        }
        for proto in ("tcp", "udp"):
            row[proto] = [
                [rel(t - ms / 1000), rel(t)]
                for t, ms in res[proto]["gaps"]
                if t >= t0 and t - ms / 1000 <= t1 + 1
            ]
        out.append(row)
    return out


def med(xs: Sequence[float]) -> float:
    return round(statistics.median(xs), 1) if xs else float("nan")


def pct(xs: Sequence[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return round(s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))], 1)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--migrations", type=int, default=30, help="per arm")
    ap.add_argument("--hold", type=float, default=1.0, help="seconds of traffic between migrations")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    t_start = time.monotonic()
    with (
        managed_lab(LAB % (81, 81, 81), ipv6=False) as (fw_lab, _cp),
        Lab.up(LAB % (82, 82, 82), policy=False, ipv6=False) as bare_lab,
    ):
        arms = [Arm("omniwall", fw_lab, 81, _cp), Arm("bare", bare_lab, 82)]
        arms[0].start_traffic(probers=True)
        arms[1].start_traffic(probers=False)
        res: dict[str, dict[str, Any]] = {}
        try:
            time.sleep(args.hold)
            for i in range(args.migrations):
                for arm in arms if i % 2 == 0 else arms[::-1]:
                    arm.migrate_once()
                    time.sleep(args.hold)
                print(f"round {i + 1}/{args.migrations}: "
                      + ", ".join(f"{a.name} {a.ms[-1]:.0f} ms" for a in arms), flush=True)  # fmt: skip
            time.sleep(1.0)
        finally:
            for arm in arms:
                res[arm.name] = arm.stop_traffic()
    load1 = os.getloadavg()
    report: dict[str, Any] = {
        "migrations_per_arm": args.migrations,
        "machine": platform.node(),
        "load_before": [round(x, 2) for x in load0],
        "load_after": [round(x, 2) for x in load1],
        "seconds": round(time.monotonic() - t_start),
    }
    gaps: dict[str, dict[str, list[float]]] = {}
    for arm in arms:
        r = res[arm.name]
        g = {
            "tcp": gap_per_window(r["tcp"]["gaps"], arm.windows),
            "udp": gap_per_window(r["udp"]["gaps"], arm.windows),
        }
        gaps[arm.name] = g
        report[arm.name] = {
            "migration_ms": {"p50": med(arm.ms), "p90": pct(arm.ms, 90), "max": round(max(arm.ms))},
            "guest_paused_ms": {"p50": med(arm.paused), "p90": pct(arm.paused, 90), "max": max(arm.paused)},
            "tcp": {
                "ok": r["tcp"]["ok"],
                "error": r["tcp"]["error"],
                "bytes": r["tcp"]["sent"],
                "gap_ms": {"p50": med(g["tcp"]), "p90": pct(g["tcp"], 90), "max": max(g["tcp"])},
            },
            "udp": {
                "requests": r["udp"]["requests"],
                "peers": len(r["udp"]["peers"]),
                "blocks": r["udp"]["blocks"],
                "lastBlockAgoMs": r["udp"].get("lastBlockAgoMs"),
                "gap_ms": {"p50": med(g["udp"]), "p90": pct(g["udp"], 90), "max": max(g["udp"])},
            },
        }
        for k in ("intruder", "wrong-port"):
            if k in r:
                report[arm.name][k] = {"attempts": r[k]["attempts"], "successes": r[k]["successes"]}
    report["timeline"] = {a.name: timeline(a, res[a.name]) for a in arms}
    # Pairs only while both arms' streams were alive (a stream that died has no gaps after it).
    alive = [
        i
        for i in range(args.migrations)
        if all((res[a.name]["tcp"].get("diedAt") or float("inf")) > a.windows[i][1] + 1 for a in arms)
    ]
    report["paired_rounds"] = len(alive)
    for proto in ("tcp", "udp"):
        d = [gaps["omniwall"][proto][i] - gaps["bare"][proto][i] for i in alive]
        report[f"added_{proto}_gap_ms"] = {"median_of_paired_diffs": med(d), "p90": pct(d, 90)}
    fw = report["omniwall"]
    survived = all(
        report[a]["tcp"]["ok"] and report[a]["udp"]["requests"] == 1 and report[a]["udp"]["peers"] == 1
        for a in ("omniwall", "bare")
    )
    report["verdict"] = {
        "streams_survive": survived,
        "denied_successes": sum(fw[k]["successes"] for k in ("intruder", "wrong-port")),
        "added_gap_le_50ms": all(
            report[f"added_{p}_gap_ms"]["median_of_paired_diffs"] <= 50 for p in ("tcp", "udp")
        ),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    v = report["verdict"]
    return 0 if v["streams_survive"] and v["denied_successes"] == 0 and v["added_gap_le_50ms"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
