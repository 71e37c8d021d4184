"""Host status through etcd (BENCHMARKS.md "etcd: stateless managers"): two managers' status books on
one etcd (Debian's `etcd`, a free loopback port, data in a temp dir). Needs no root.

    .venv/bin/python bench/hoststatus.py                  # 200 hosts
    .venv/bin/python bench/hoststatus.py --hosts 1000

- acks: every host acks a new realized revision on manager A (as `POST /v1/hosts/{host}/status` does),
  all at once or spread over `--trickle` seconds (as a fleet's acks arrive after a change); the time
  until manager B shows each host's new revision, p50/p99 over hosts and rounds; the etcd txns A wrote
  and the etcd members' CPU per round (`--members 3`: a three-member cluster, as in the HA lab);
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
import threading
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


def _cpu(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rate", type=float, default=10.0, help="counter reports per host per second")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--trickle", type=float, default=0.0, help="seconds over which a round's acks arrive")
    ap.add_argument("--members", type=int, default=1, help="etcd members")
    ap.add_argument("--gather", type=float, default=None, help="manager A's ack gathering window (s)")
    args = ap.parse_args()
    hosts = [f"h{i:04d}" for i in range(args.hosts)]
    with tempfile.TemporaryDirectory(prefix="owhs-") as tmp, etcd_cluster(Path(tmp), args.members) as cluster:
        sa, sb = EtcdStore(cluster.endpoints), EtcdStore(cluster.endpoints)
        a = EtcdHostStatusBook(sa.runtime(), "A", **({} if args.gather is None else {"gather": args.gather}))
        b = EtcdHostStatusBook(sb.runtime(), "B")
        b.get("none")  # B follows from now on
        now = "2026-01-01T00:00:00Z"
        for h in hosts:
            a.connect(h, now)
        a.flush(30)
        lat: list[float] = []
        pids = [m.proc.pid for m in cluster.members if m.proc is not None]
        ack_writes0, etcd_cpu0 = a.write_count, _cpu(pids)
        for r in range(1, args.rounds + 1):
            t0 = time.monotonic()
            sent: dict[str, float] = {}
            seen: dict[str, float] = {}

            def watch(
                r: int = r, t0: float = t0, sent: dict[str, float] = sent, seen: dict[str, float] = seen
            ) -> None:
                """B's view, polled while A's acks come in: ack -> visible on B, per host."""
                while len(seen) < len(hosts) and time.monotonic() - t0 < 30:
                    st = b.statuses({}, hosts)
                    t = time.monotonic()
                    for h, s in st.items():
                        if h not in seen and s["realizedRevision"] == r and h in sent:
                            seen[h] = t - sent[h]
                    time.sleep(0.002)

            poller = threading.Thread(target=watch)
            poller.start()
            for k, h in enumerate(hosts):
                if args.trickle:
                    time.sleep(max(0.0, t0 + args.trickle * k / len(hosts) - time.monotonic()))
                sent[h] = time.monotonic()
                a.report(h, now, r, None, None, None)
            poller.join()
            lat.extend(seen.values())
            assert len(seen) == len(hosts), f"round {r}: {len(hosts) - len(seen)} hosts never seen on B"
        a.flush(30)
        ack_txns = (a.write_count - ack_writes0) / args.rounds
        ack_etcd_cpu = (_cpu(pids) - etcd_cpu0) / args.rounds
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
                "trickleSeconds": args.trickle,
                "gather": a.gather,
                "etcdMembers": args.members,
                "ackTxnsPerRound": round(ack_txns, 1),
                "ackEtcdCpuSecondsPerRound": round(ack_etcd_cpu, 3),
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
