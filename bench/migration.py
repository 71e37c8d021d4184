"""Migration soak (BENCHMARKS.md "Migration"): live migrations back and forth across three lab hosts
while traffic runs through the migrating workload.

    sudo .venv/bin/python bench/migration.py                      # 100 migrations
    sudo .venv/bin/python bench/migration.py --migrations 20 --json /tmp/mig.json
    sudo .venv/bin/python bench/migration.py --vm                 # QEMU guests: bench/vm_migration.py

A managed lab (`omniwall.lab.streams.MOBILITY`: manager process, one agent process per host namespace,
nftables) with `srv` migrating h2 -> h3 -> h1 -> h2 ... (`omniwall.lab.migrate.migrate`: the manager's
phases, the lab moving the veth and the routes). All the time:
- two TCP streams with continuous data both ways (cli -> srv:5001 and srv -> cli:5011, echoed and
  checked byte for byte: a connection "survives" when it never errored or reset and every byte came
  back intact and in order);
- a UDP flow (a datagram every 10 ms, echoed);
- with --churn: a new short TCP connection every ~10 ms each way (cli -> srv:5001, srv -> cli:5011;
  what the second copy of the entries after the switch is for: connections opened after the first
  copy);
- three denied-flow probers, four connect() threads each: into srv (bad -> srv tcp/5001, cli -> srv
  tcp/7001) and out of it (srv -> bad tcp/6000); something listens on every port, the policy refuses
  all three: successes must be 0.
Migration time = the manager's record, `started` -> `done` (the destination has enforced, entries
copied, vNIC moved, spec.host written, the source has dropped the chains and its entries); also the
client's wall time around `migrate()` and the vNIC-move step alone (phase `switching` -> `switched`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from omniwall.dataplane.conntrack import ConntrackTable
from omniwall.lab.managed import control_dir, managed_lab
from omniwall.lab.migrate import migrate
from omniwall.lab.streams import MOBILITY, Flow, wait_port


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


def phase_ms(rec: dict[str, Any], a: str, b: str) -> float | None:
    at = {p["phase"]: p["ms"] for p in rec.get("phases", [])}
    return at[b] - at[a] if a in at and b in at else None


def phase_table(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """p50/p99 of each step between consecutive phases (`a->b`), over the migrations: where time goes."""
    steps: dict[str, list[float]] = {}
    for rec in records:
        ph = rec.get("phases", [])
        for x, y in itertools.pairwise(ph):
            steps.setdefault(f"{x['phase']}->{y['phase']}", []).append(y["ms"] - x["ms"])
    return {k: {"p50": round(pct(v, 50), 1), "p99": round(pct(v, 99), 1)} for k, v in steps.items()}


def versions() -> dict[str, str]:
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "kernel": platform.release(),
        "nft": nft,
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
    }


def run(
    n: int,
    hold: float = 1.0,
    second_copy: bool = False,
    churn: bool = False,
    keep_logs: Path | None = None,
) -> dict[str, Any]:
    with managed_lab(MOBILITY, ipv6=False) as (lab, _cp):
        cli, srv, bad = (lab.plan.workload(f"t1/{x}") for x in ("cli", "srv", "bad"))
        srv_ip, cli_ip = srv.vnics[0].ips[0], cli.vnics[0].ips[0]
        servers = [
            Flow("tcp-echo", srv.netns, ("5001",)).start(),
            Flow("udp-echo", srv.netns, ("5002",)).start(),
            Flow("tcp-echo", cli.netns, ("5011",)).start(),
            Flow("tcp-echo", bad.netns, ("6000",)).start(),
        ]
        wait_port(cli.netns, srv_ip, 5001)
        flows = {
            "tcp cli->srv": Flow("tcp-stream", cli.netns, (srv_ip, "5001")).start(),
            "tcp srv->cli": Flow("tcp-stream", srv.netns, (cli_ip, "5011")).start(),
            "udp cli->srv": Flow("udp-flow", cli.netns, (srv_ip, "5002")).start(),
            "denied bad->srv:5001": Flow("tcp-prober", bad.netns, (srv_ip, "5001")).start(),
            "denied cli->srv:7001": Flow("tcp-prober", cli.netns, (srv_ip, "7001")).start(),
            "denied srv->bad:6000": Flow("tcp-prober", srv.netns, (bad.vnics[0].ips[0], "6000")).start(),
        }
        if churn:
            flows["churn cli->srv"] = Flow("tcp-churn", cli.netns, (srv_ip, "5001")).start()
            flows["churn srv->cli"] = Flow("tcp-churn", srv.netns, (cli_ip, "5011")).start()
        hosts = [h.name for h in lab.plan.hosts]
        records: list[dict[str, Any]] = []
        wall: list[float] = []
        failures: list[str] = []
        starts: list[float] = []  # seconds after the start: to place a stream's break among migrations
        t_start = time.monotonic()
        try:
            time.sleep(hold)
            for i in range(n):
                here = lab.plan.workload("t1/srv").host
                dst = hosts[(hosts.index(here) + 1) % len(hosts)]
                t0 = time.monotonic()
                starts.append(round(t0 - t_start, 2))
                try:
                    rec = migrate(lab, "t1/srv", dst, api_options={"secondCopy": second_copy})
                except Exception as e:  # keep soaking; count it
                    failures.append(f"#{i} {here}->{dst}: {e}")
                    continue
                wall.append((time.monotonic() - t0) * 1000)
                records.append(rec)
                time.sleep(0.1)
            time.sleep(1.0)
        finally:
            results = {k: f.stop() for k, f in flows.items()}
            servers_out = [s.stop(timeout=5) for s in servers]
            broken = failures or any(
                not v.get("ok") if k.startswith("tcp") else v.get("failed") for k, v in results.items()
            )
            if broken and keep_logs is not None:  # the diagnosis goes with the lab: logs, tables, routes
                shutil.copytree(control_dir(lab.prefix), keep_logs, dirs_exist_ok=True)
                for h in hosts:
                    for what, argv in (
                        ("nft", ["nft", "-a", "list", "ruleset"]),
                        ("ip", ["ip", "-d", "addr"]),
                        ("route", ["ip", "route"]),
                        ("neigh", ["ip", "neigh"]),
                        ("conntrack", ["conntrack", "-L"]),
                    ):
                        out = lab.exec_host(h, argv)
                        (keep_logs / f"{h}.{what}.txt").write_text(out.stdout + out.stderr)
        elapsed = time.monotonic() - t_start
        final = lab.plan.workload("t1/srv").host
        ifname = srv.vnics[0].host_ifname
        leftovers = {}
        for h in hosts:
            if h == final:
                continue
            rules = lab.exec_host(h, ["nft", "list", "table", "inet", "omniwall"]).stdout
            ct = ConntrackTable(lab.host_netns(h))
            try:
                entries = [e for e in ct.matching([srv_ip]) if cli_ip not in (e.src, e.dst) or h != cli.host]
            finally:
                ct.close()
            leftovers[h] = {
                "chainsLeft": ifname in rules,
                "entriesLeft": len(entries),
                # what they are (which connection, which TCP state, how long left): the diagnosis
                "entries": [
                    f"{e.protocol} {e.src}:{e.sport}->{e.dst}:{e.dport} {e.state} t={e.timeout}s "
                    f"status={e.status:#x} mark={e.mark}"
                    for e in entries[:10]
                ],
            }
    total = [r["phases"][-1]["ms"] for r in records]
    move = [x for x in (phase_ms(r, "switching", "switched") for r in records) if x is not None]
    prep = [x for x in (phase_ms(r, "prepare", "export") for r in records) if x is not None]
    tcp = {k: v for k, v in results.items() if k.startswith("tcp")}
    denied = {k: v for k, v in results.items() if k.startswith("denied")}
    return {
        "machine": versions(),
        "migrations": {
            "asked": n,
            "succeeded": len(records),
            "failed": failures,
            "elapsedS": round(elapsed, 1),
            "startsS": starts,
        },
        "migrationMs": {
            "p50": pct(total, 50),
            "p99": pct(total, 99),
            "max": max(total, default=float("nan")),
        },
        "clientWallMs": {"p50": round(pct(wall, 50), 1), "p99": round(pct(wall, 99), 1)},
        "prepareMs": {"p50": pct(prep, 50), "p99": pct(prep, 99)},
        "vnicMoveMs": {"p50": pct(move, 50), "p99": pct(move, 99)},
        "phaseMs": phase_table(records),
        "entries": {
            "firstCopyMean": round(statistics.mean(r["stats"].get("imported", 0) for r in records), 2)
            if records
            else 0.0,
            "secondCopyImportedTotal": sum(r["stats"].get("importedAfterSwitch", 0) for r in records),
            "switchedBy": sorted({r["stats"].get("switchedBy", "?") for r in records}),
        },
        "tcp": tcp,
        "tcpSurviving": f"{sum(1 for v in tcp.values() if v.get('ok'))}/{len(tcp)}",
        "churn": {k: v for k, v in results.items() if k.startswith("churn")},
        "serverErrors": [x.get("errors") for x in servers_out],
        "secondCopy": second_copy,
        "udp": results["udp cli->srv"],
        "denied": denied,
        "deniedSuccesses": sum(v.get("successes", 0) for v in denied.values()),
        "sourceLeftovers": leftovers,
    }


def main() -> None:
    if "--vm" in sys.argv[1:]:  # a QEMU guest instead of a namespace: bench/vm_migration.py
        import vm_migration

        sys.exit(vm_migration.main([a for a in sys.argv[1:] if a != "--vm"]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--migrations", type=int, default=100)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--churn", action="store_true", help="also a new short TCP connection every ~10 ms each way"
    )
    ap.add_argument("--second-copy", action="store_true", help="copy the entries again after the switch")
    ap.add_argument("--hold", type=float, default=1.0, help="seconds of traffic before the first migration")
    ap.add_argument(
        "--keep-logs", type=Path, default=None, help="copy the control plane's logs here if a migration fails"
    )
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, nftables)")
    out = run(a.migrations, a.hold, a.second_copy, a.churn, a.keep_logs)
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
