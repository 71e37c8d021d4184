"""Probes from a QEMU guest: one batch script vs one channel command per probe (BENCHMARKS.md "VM guests").

    sudo .venv/bin/python bench/vm_probes.py --probes 40 --rounds 3

A lab with one VM workload and one namespace workload on one host, no policy. Each round sends the
same N TCP probes from the guest to the namespace's responders twice, in random order: **batch** =
`lab/vm.py`'s way (one script, each probe one background `nc`: one fork and exec), **per-command** =
`channel.run_many` with one script per probe (each probe also gets its own shell, its script decoded
from base64 and its output encoded). Also `lab up` with the guest's boot. Reports medians of the paired
rounds, how many probes answered, and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

from omniwall.lab import Lab
from omniwall.lab import guest as lab_guest
from omniwall.lab import probe as lab_probe
from omniwall.lab.probe import Probe
from omniwall.vm import channel

LAB = """
kind: Host
metadata: {name: h1}
---
kind: Workload
metadata: {name: vm-a, tenant: t1}
spec:
  host: h1
  vnics: [{name: eth0, ips: [10.97.0.1]}]
  lab: {kind: vm}
---
kind: Workload
metadata: {name: ns-b, tenant: t1}
spec:
  host: h1
  vnics: [{name: eth0, ips: [10.97.0.2]}]
  lab: {servers: [tcp/80-83]}
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    start = time.monotonic()
    with Lab.up(LAB, policy=False) as lab:
        up = time.monotonic() - start
        w = lab.plan.workload("vm-a")
        probes = [
            Probe(w.netns, "10.97.0.2", "tcp", 80 + i % 4, "t1/vm-a", "t1/ns-b", None, "t1/ns-b")
            for i in range(args.probes)
        ]
        ctl = lab_guest.rundir(w.netns) / "ctl.sock"
        times: dict[str, list[float]] = {"batch": [], "per-command": []}
        answered: dict[str, list[int]] = {"batch": [], "per-command": []}
        for _ in range(args.rounds):
            for mode in random.sample(list(times), 2):
                t = time.monotonic()
                if mode == "batch":
                    ok = sum(r.allowed for r in lab_probe.guest_batch(w.netns, probes, 1.0))
                else:
                    scripts = [lab_probe.probe_command(p, 1.0) for p in probes]
                    results = channel.run_many(ctl, scripts, timeout=120)
                    ok = sum(r.output.startswith("omniwall-lab") for r in results)
                times[mode].append(time.monotonic() - t)
                answered[mode].append(ok)  # every probe has a responder: fewer = a probe timed out
    load = os.getloadavg()[0]
    print(f"lab up with one guest (boot included): {up:.1f} s")
    for mode, ts in times.items():
        print(
            f"{mode:12s} {args.probes} probes: median {statistics.median(ts):.2f} s",
            f"rounds {[round(x, 2) for x in ts]}, answered {answered[mode]} of {args.probes}",
        )
    ratio = statistics.median(times["per-command"]) / statistics.median(times["batch"])
    print(f"per-command / batch: {ratio:.1f}x   load average (1 min) at the end: {load:.2f}")


if __name__ == "__main__":
    main()
