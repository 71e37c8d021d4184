"""Host status through etcd (BENCHMARKS.md "etcd: stateless managers"): two managers' status books on
one etcd (Debian's `etcd`, a free loopback port, data in a temp dir). Needs no root.

    .venv/bin/python bench/hoststatus.py                  # 200 hosts
    .venv/bin/python bench/hoststatus.py --hosts 1000

- acks: every host acks a new realized revision on manager A (as `POST /v1/hosts/{host}/status` does);
  the time until manager B shows each host's new revision, p50/p99 over hosts and rounds;
- counters: every host reports counters `--rate` times a second for `--seconds` seconds (nothing else
  changes); the etcd writes (txns) that cost, and the etcd revisions consumed, against the reports.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "unit")]

from etcdhelpers import etcd_cluster  # noqa: E402

from omniwall.manager.hostbook_etcd import EtcdHostStatusBook  # noqa: E402
from omniwall.store.etcd import EtcdStore  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 1) if xs else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rate", type=float, default=10.0, help="counter reports per host per second")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    hosts = [f"h{i:04d}" for i in range(args.hosts)]
    with tempfile.TemporaryDirectory(prefix="owhs-") as tmp, etcd_cluster(Path(tmp)) as cluster:
        sa, sb = EtcdStore(cluster.endpoints), EtcdStore(cluster.endpoints)
        a = EtcdHostStatusBook(sa.runtime(), "A")
        b = EtcdHostStatusBook(sb.runtime(), "B")
        b.get("none")  # B follows from now on
        now = "2026-01-01T00:00:00Z"
        for h in hosts:
            a.connect(h, now)
        a.flush(30)
        lat: list[float] = []
        for r in range(1, args.rounds + 1):
            t0 = time.monotonic()
            for h in hosts:
                a.report(h, now, r, None, None, None)
            seen: dict[str, float] = {}
            while len(seen) < len(hosts) and time.monotonic() - t0 < 30:
                st = b.statuses({}, hosts)
                t = time.monotonic()
                for h, s in st.items():
                    if h not in seen and s["realizedRevision"] == r:
                        seen[h] = t - t0
                time.sleep(0.002)
            lat.extend(seen.values())
            assert len(seen) == len(hosts), f"round {r}: {len(hosts) - len(seen)} hosts never seen on B"
        a.flush(30)
        writes0, puts0, rev0 = a.write_count, a.status_puts, sa.revision()
        reports = 0
        t0 = time.monotonic()
        tick = 1.0 / args.rate
        i = 0
        while time.monotonic() - t0 < args.seconds:
            i += 1
            for h in hosts:
                a.report(h, now, args.rounds, None, [(1, i, i * 100)], None, (i, 1000))
                reports += 1
            time.sleep(max(0.0, t0 + i * tick - time.monotonic()))
        a.flush(30)
        elapsed = time.monotonic() - t0
        writes, puts, revs = a.write_count - writes0, a.status_puts - puts0, sa.revision() - rev0
        last = b.counters()
        for _ in range(100):
            if all(last.get(h) == {1: (i, i * 100)} for h in hosts):
                break
            time.sleep(0.05)
            last = b.counters()
        for book in (a, b):
            book.stop()
        sa.close()
        sb.close()
    print(
        json.dumps(
            {
                "bench": "hoststatus",
                "hosts": args.hosts,
                "ackVisibleOnOtherManagerMs": {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "n": len(lat)},
                "counterReports": reports,
                "reportsPerHostPerSecond": round(reports / args.hosts / elapsed, 1),
                "etcdTxns": writes,
                "etcdRevisions": revs,
                "statusPutsPerHostPerSecond": round(puts / args.hosts / elapsed, 2),
                "txnsPerSecond": round(writes / elapsed, 1),
                "finalCountersOnB": all(last.get(h) == {1: (i, i * 100)} for h in hosts),
                "load": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
