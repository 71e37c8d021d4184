"""Flows across managers (BENCHMARKS.md "Flows across managers"): the cost of a flow query answered from
three managers' stores (fan-out to two peers and merge) against the same query on one manager that holds
every row itself (SQLite store, no peers), in the same run. Needs Debian's `etcd`; no root.

    .venv/bin/python bench/flows_fanout.py                     # 30,000 rows, 40 paired rounds
    .venv/bin/python bench/flows_fanout.py --rows 90000 --rounds 60

Setup: one etcd member; three `omniwall manager` processes on it, each given a third of the rows by its
own host's agent; one `omniwall manager` process on SQLite given all of them (same records). Each round
runs every query once on the single manager and once on one cluster manager (order alternating), over
keep-alive connections. Reported per query: wall latency median / p90 on each, their ratio, and the
managers' CPU time per query (utime+stime from /proc, summed over the three cluster processes).

Prints one JSON line.
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
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "unit")]

from etcdhelpers import etcd_cluster, manager_processes  # noqa: E402

from omniwall.manager.audit import SYSTEM, chained  # noqa: E402
from omniwall.manager.contracts import load_documents  # noqa: E402
from omniwall.manager.service import Manager  # noqa: E402
from omniwall.store import open_store  # noqa: E402

HOSTS = ("h1", "h2", "h3")
WORLD = "\n---\n".join(
    ["kind: Tenant\nmetadata: {name: acme}"]
    + [f"kind: Host\nmetadata: {{name: {h}}}" for h in HOSTS]
    + [
        f"kind: Workload\nmetadata: {{name: w{i}, tenant: acme}}\n"
        f"spec: {{host: {h}, vnics: [{{name: eth0, ips: [10.0.{i}.1]}}]}}"
        for i, h in enumerate(HOSTS)
    ]
)
QUERIES: dict[str, tuple[str, dict[str, Any]]] = {
    "page100": ("/v1/flows", {"limit": 100}),
    "page1000": ("/v1/flows", {"limit": 1000}),
    "workload_1h": ("/v1/flows", {"workload": "acme/w1", "since": "1h", "limit": 100}),
    "hits": ("/v1/flows/hits", {}),
    "graph": ("/v1/flows/graph", {"window": "1h"}),
}


def records(host: str, n: int, t0: float) -> list[dict[str, Any]]:
    i = HOSTS.index(host)
    return [
        {
            "start": t0 + k * 0.01,
            "end": t0 + k * 0.01 + 0.5,
            "host": host,
            "hop": "egress",
            "ifname": "eth0",
            "workload": f"acme/w{i}",
            "verdict": ("allowed", "denied")[k % 2],
            "rule_id": 100 + k % 50,
            "rule_tenant": "acme",
            "policy": "p",
            "rule": f"r{k % 50}",
            "category": "application",
            "revision": 1,
            "proto": "tcp",
            "src": f"10.0.{i}.1",
            "dst": f"10.0.{(i + 1) % 3}.1",
            "sport": 1024 + k % 60000,
            "dport": 80,
        }
        for k in range(n)
    ]


def seed(store_url: str) -> tuple[dict[str, str], dict[str, str]]:
    m = Manager(chained(open_store(store_url)))
    m.commit(m.plan_apply(load_documents(WORLD, "world.yaml")), SYSTEM)
    admin = {"Authorization": f"Bearer {m.tokens.create('provider-admin', name='bench')[0]}"}
    agents = {h: m.tokens.create("agent", host=h)[0] for h in HOSTS}
    m.store.close()
    return admin, agents


def post(url: str, host: str, token: str, recs: list[dict[str, Any]]) -> None:
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {token}"}) as c:
        for k in range(0, len(recs), 5000):
            r = c.post(f"/v1/hosts/{host}/flows", json={"host": host, "records": recs[k : k + 5000]})
            assert r.status_code == 202, r.text


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=30_000, help="total rows (a third per cluster manager)")
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    per = args.rows // len(HOSTS)
    t0 = time.time() - 600
    with tempfile.TemporaryDirectory(prefix="ow-fanout-") as d:
        tmp = Path(d)
        with etcd_cluster(tmp) as etcd:
            admin, agents = seed(etcd.url)
            sqlite = f"sqlite://{tmp / 'single.db'}"
            admin1, agents1 = seed(sqlite)
            with (
                manager_processes(tmp / "c", etcd.url, count=3) as cluster,
                manager_processes(tmp / "s", sqlite, count=1) as single,
            ):
                recs = {h: records(h, per, t0) for h in HOSTS}
                for h, mp in zip(HOSTS, cluster, strict=True):
                    post(mp.url, h, agents[h], recs[h])
                    post(single[0].url, h, agents1[h], recs[h])
                fan = httpx.Client(base_url=cluster[0].url, headers=admin, timeout=60)
                one = httpx.Client(base_url=single[0].url, headers=admin1, timeout=60)
                deadline = time.monotonic() + 30
                while fan.get("/v1/flows", params={"limit": 1}).json().get("managers") != 3:
                    assert time.monotonic() < deadline, "the cluster managers did not find each other"
                    time.sleep(0.2)
                for path, params in QUERIES.values():  # warm both (caches, connections)
                    fan.get(path, params=params)
                    one.get(path, params=params)
                lat: dict[str, dict[str, list[float]]] = {q: {"single": [], "fanout": []} for q in QUERIES}
                cpu_s: dict[str, float] = {"single": 0.0, "fanout": 0.0}
                load = os.getloadavg()[0]
                for r in range(args.rounds):
                    order = [("single", one, [single[0]]), ("fanout", fan, cluster)]
                    if r % 2:
                        order.reverse()
                    for name, client, procs in order:
                        before = sum(cpu(p.proc.pid) for p in procs)
                        for q, (path, params) in QUERIES.items():
                            t = time.perf_counter()
                            resp = client.get(path, params=params)
                            lat[q][name].append(time.perf_counter() - t)
                            assert resp.status_code == 200 and not resp.json().get("partial"), resp.text[:300]
                        cpu_s[name] += sum(cpu(p.proc.pid) for p in procs) - before

                # both hold the same records: the same hit totals
                def total(c: httpx.Client) -> int:
                    return sum(h["total"] for h in c.get("/v1/flows/hits").json()["rules"])

                same = total(fan) == total(one) == per * len(HOSTS)
                out: dict[str, Any] = {
                    "rows": per * len(HOSTS),
                    "rounds": args.rounds,
                    "same_hit_totals": same,
                    "loadavg_1m": round(load, 2),
                    "manager_cpu_ms_per_query": {
                        k: round(v * 1000 / (args.rounds * len(QUERIES)), 2) for k, v in cpu_s.items()
                    },
                }
                for q, by in lat.items():
                    s_med, f_med = statistics.median(by["single"]), statistics.median(by["fanout"])
                    out[q] = {
                        "single_ms": {
                            "p50": round(s_med * 1e3, 2),
                            "p90": round(pct(by["single"], 0.9) * 1e3, 2),
                        },
                        "fanout_ms": {
                            "p50": round(f_med * 1e3, 2),
                            "p90": round(pct(by["fanout"], 0.9) * 1e3, 2),
                        },
                        "ratio_p50": round(f_med / s_med, 2),
                    }
                fan.close()
                one.close()
                print(json.dumps(out))


if __name__ == "__main__":
    main()
