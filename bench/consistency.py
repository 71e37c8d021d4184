"""Consistency check of the scale-out control plane (issue 12, part 7; BENCHMARKS.md "etcd: stateless
managers"): three `omniwall manager` processes on a three-member etcd cluster (Debian's `etcd`, free
loopback ports, data in a temp dir), clients writing and reading through random managers while one
manager at a time is killed (SIGKILL) and restarted; the history is then checked against etcd's own
per-key history (tests/unit/consistency.py says what is checked). Needs no root.

    .venv/bin/python bench/consistency.py                          # 60 s, 6 clients, a kill every 8 s
    .venv/bin/python bench/consistency.py --seconds 20 --seed 2
    .venv/bin/python bench/consistency.py --manager-src /tmp/base/src   # managers of another tree

Prints one JSON line: the verdict (ok, problems), the counts (acknowledged, indeterminate, rejected
writes; reads; kills), the answers by status and the p50/p99 latency of answered writes and reads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "unit")]

from consistency import consistency_run  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 1) if xs else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--kill-every", type=float, default=8.0)
    ap.add_argument("--keys", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--manager-src", help="run the managers from this source tree (PYTHONPATH), e.g. main's")
    args = ap.parse_args()
    env = {"PYTHONPATH": args.manager_src} if args.manager_src else None
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="owcons-") as tmp:
        verdict, history = consistency_run(
            Path(tmp), seconds=args.seconds, clients=args.clients, kill_every=args.kill_every,
            keys=args.keys, seed=args.seed, manager_env=env,
        )  # fmt: skip
    out = {
        "bench": "consistency",
        **verdict.to_json(),
        "seconds": args.seconds,
        "clients": args.clients,
        "seed": args.seed,
        "managers": args.manager_src or "this tree",
        "outcomes": dict(sorted(history.outcomes.items())),
        "writeMs": {
            "p50": pct(history.latencies.get("PUT", []), 0.5),
            "p99": pct(history.latencies.get("PUT", []), 0.99),
        },
        "readMs": {
            "p50": pct(history.latencies.get("GET", []), 0.5),
            "p99": pct(history.latencies.get("GET", []), 0.99),
        },
        "readIntervalRevisions": statistics.median([r.end - r.start for r in history.reads] or [0]),
        "wall": round(time.monotonic() - t0, 1),
        "load": os.getloadavg()[0],
    }
    print(json.dumps(out))
    sys.exit(0 if verdict.ok else 1)


if __name__ == "__main__":
    main()
