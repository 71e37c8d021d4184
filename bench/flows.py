"""Manager flow numbers (issue 10): ingest rate through the real HTTP route, and query time over 1M flows.

    .venv/bin/python bench/flows.py                       # defaults: 4 posters, 15 s, 1,000,000 rows
    .venv/bin/python bench/flows.py --seconds 5 --rows 200000 --posters 2   # quicker

1. Baseline, same run: `SqliteFlowStore.insert` of the same rows in this process (the store alone: the
   ceiling any HTTP ingest can reach), in rounds of `--batch` records; median records/s.
2. Ingest: a real `omniwall manager` (subprocess, uvicorn) over a world of `--workloads` workloads on
   `--hosts` hosts; `--posters` processes, one agent token each, POST `--batch`-record FlowBatches to
   `/v1/hosts/{host}/flows` for `--seconds`. Then wait until the manager's queue is written. Rate =
   records stored / (time from first post to the last record written). Loss check from /v1/flows/stats:
   offered == stored + dropped (every place), and offered == records the posters had accepted
   (202 bodies) + dropped in their answers: zero silent loss.
3. Query: the flow store pre-filled with `--rows` rows spread over 24 h (written before the manager
   starts, directly through the store), then `GET /v1/flows?workload=T/W&since=1h` for a typical
   workload and a hot one (10% of all rows), median of `--rounds` calls; baseline: the same query on
   the store in this process (ratio = HTTP/API overhead).

Prints a summary (JSON) with `uptime` before and after. Nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from omniwall.manager.contracts import load_documents
from omniwall.manager.flows import AddressBook, to_rows
from omniwall.manager.flowstore import FlowQuery, SqliteFlowStore
from omniwall.manager.service import SYSTEM, Manager
from omniwall.model.catalog import Catalog
from omniwall.store import open_store

TENANTS = 10


def world(workloads: int, hosts: int) -> str:
    docs = [f"kind: Tenant\nmetadata: {{name: t{t}}}\n" for t in range(TENANTS)]
    docs += [f"kind: Host\nmetadata: {{name: h{h}}}\n" for h in range(hosts)]
    for i in range(workloads):
        docs.append(
            f"kind: Workload\nmetadata: {{name: w{i}, tenant: t{i % TENANTS}}}\n"
            f"spec: {{host: h{i % hosts}, vnics: [{{name: eth0, ips: [{ip(i)}]}}]}}\n"
        )
    return "---\n".join(docs)


def ip(i: int) -> str:
    return f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256 + 0}"


def record(i: int, workloads: int, hosts: int, now: float, rnd: random.Random) -> dict[str, Any]:
    src, dst = rnd.randrange(workloads), rnd.randrange(workloads)
    return {
        "start": now - 2,
        "end": now - rnd.random(),
        "host": f"h{src % hosts}",
        "hop": "egress",
        "ifname": f"ow{src:010d}",
        "workload": f"t{src % TENANTS}/w{src}",
        "verdict": ("allowed", "denied", "allowed", "rejected")[i % 4],
        "rule_id": 1000 + i % 50,
        "rule_tenant": f"t{src % TENANTS}",
        "policy": f"p{i % 5}",
        "rule": f"r{i % 10}",
        "category": "application",
        "revision": 7,
        "proto": "tcp",
        "src": ip(src),
        "dst": ip(dst),
        "sport": 30000 + i % 30000,
        "dport": 443,
        "packets": 10,
        "bytes": 4000,
        "count": 1,
        "final": True,
    }


# ---------------------------------------------------------------------------------------------- posters


def poster(url: str, token: str, host: str, body: bytes, n: int, seconds: float, out: Any) -> None:
    accepted = dropped = posts = errors = deferred = 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            r = c.post(f"/v1/hosts/{host}/flows", content=body, headers={"Content-Type": "application/json"})
            posts += 1
            if r.status_code == 202:
                d = r.json()
                accepted += d["accepted"]
                dropped += d["dropped"]
            elif r.status_code == 429:  # the manager's queue is full: wait as told, like an agent
                deferred += 1
                time.sleep(float(r.headers.get("retry-after", "1")))
            else:
                errors += 1
    out.put(
        {
            "host": host,
            "posts": posts,
            "accepted": accepted,
            "dropped": dropped,
            "deferred": deferred,
            "errors": errors,
        }
    )


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat): load-independent cost."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------------------------------------- phases


def baseline_insert(rows: list[tuple[Any, ...]], batch: int, rounds: int, tmp: Path) -> float:
    rates = []
    for k in range(rounds):
        store = SqliteFlowStore(str(tmp / f"baseline{k}.flows"))
        t0 = time.perf_counter()
        for i in range(0, len(rows), batch):
            store.insert(rows[i : i + batch])
        rates.append(len(rows) / (time.perf_counter() - t0))
        store.close()
    return statistics.median(rates)


def prefill(path: str, n: int, workloads: int, hosts: int, hot: int) -> None:
    """n rows over the last 24 h, oldest first, through the store itself (50,000-row transactions);
    workload `hot` is an end of 10% of them."""
    rnd = random.Random(1)
    now = time.time()
    book = AddressBook.of(Catalog.of(load_documents(world(workloads, hosts), "world.yaml")))
    store = SqliteFlowStore(path)
    chunk = 50_000
    for start in range(0, n, chunk):
        recs = []
        for i in range(start, min(n, start + chunk)):
            d = record(i, workloads, hosts, now, rnd)
            age = (n - i) / n * 86400
            d["start"], d["end"] = now - age - 1, now - age
            if i % 10 == 0:
                d["dst"] = ip(hot)
            recs.append(d)
        store.insert(to_rows("h0", recs, book))
    store.close()


def baseline_bare(rows: list[tuple[Any, ...]], batch: int, rounds: int) -> float:
    """The same rows into an in-memory table with no index: what SQLite itself costs from Python."""
    import sqlite3

    from omniwall.manager.flowstore import COLUMNS

    sql = f"INSERT INTO flows ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    rates = []
    for _ in range(rounds):
        conn = sqlite3.connect(":memory:", isolation_level=None)
        conn.execute(f"CREATE TABLE flows (id INTEGER PRIMARY KEY, {', '.join(COLUMNS)})")
        t0 = time.perf_counter()
        for i in range(0, len(rows), batch):
            conn.execute("BEGIN")
            conn.executemany(sql, rows[i : i + batch])
            conn.execute("COMMIT")
        rates.append(len(rows) / (time.perf_counter() - t0))
        conn.close()
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--posters", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--workloads", type=int, default=1000)
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="owbench-flows-"))
    result: dict[str, Any] = {"uptime_before": uptime(), "args": vars(args)}
    proc = None
    try:
        db = str(tmp / "m.db")
        flows_db = str(tmp / "m.db.flows")
        m = Manager(open_store(db))
        m.commit(m.plan_apply(load_documents(world(args.workloads, args.hosts), "world.yaml")), SYSTEM)
        tokens = {f"h{h}": m.tokens.create("agent", host=f"h{h}")[0] for h in range(args.hosts)}
        admin = m.tokens.create("auditor")[0]
        del m

        # 1. baseline: the store alone, same rows, same batch size
        rnd = random.Random(2)
        now = time.time()
        book = AddressBook.of(Catalog.of(load_documents(world(args.workloads, args.hosts), "world.yaml")))
        sample = [record(i, args.workloads, args.hosts, now, rnd) for i in range(200_000)]
        rows = to_rows("h0", sample, book)
        result["baseline_store_insert_per_s"] = round(baseline_insert(rows, args.batch, 3, tmp))
        result["baseline_bare_sqlite_insert_per_s"] = round(baseline_bare(rows, args.batch, 3))

        # 3 (prep). prefill the flow store the manager will open
        hot = 7
        t0 = time.perf_counter()
        prefill(flows_db, args.rows, args.workloads, args.hosts, hot)
        result["prefill_seconds"] = round(time.perf_counter() - t0, 1)

        # 2. ingest through HTTP
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "omniwall.cli.main",
                "manager",
                "--db",
                db,
                "--listen",
                f"127.0.0.1:{port}",
                "--flows-db",
                flows_db,
                "--flow-max-records",
                str(args.rows * 10),
                "--flow-retention",
                "48h",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        auth = {"Authorization": f"Bearer {admin}"}
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("manager did not start")
            time.sleep(0.2)
        before = httpx.get(f"{url}/v1/flows/stats", headers=auth, timeout=60).json()
        bodies = {}
        for k in range(args.posters):
            host = f"h{k % args.hosts}"
            recs = [record(i, args.workloads, args.hosts, now, rnd) for i in range(args.batch)]
            for r in recs:  # each poster is one host's agent: its records are its own
                r["host"] = host
            bodies[k] = (host, json.dumps({"host": host, "records": recs, "dropped": {"kernel": 0}}).encode())
        cpu_before = cpu_seconds(proc.pid)
        q: Any = mp.Queue()
        procs = [
            mp.Process(target=poster, args=(url, tokens[h], h, b, args.batch, args.seconds, q))
            for h, b in bodies.values()
        ]
        t_start = time.perf_counter()
        for p in procs:
            p.start()
        posted = [q.get() for _ in procs]
        for p in procs:
            p.join()
        t_posted = time.perf_counter()
        while True:
            st = httpx.get(f"{url}/v1/flows/stats", headers=auth, timeout=60).json()
            if st["pending"] == 0:
                break
            time.sleep(0.05)
        t_done = time.perf_counter()
        cpu_used = cpu_seconds(proc.pid) - cpu_before
        accepted = sum(p["accepted"] for p in posted)
        answered_dropped = sum(p["dropped"] for p in posted)
        offered = st["offered"] - before["offered"]
        stored = st["stored"] - before["stored"]
        drops = sum(st["dropped"].values()) - sum(before["dropped"].values())
        result["ingest"] = {
            "posters": posted,
            "records_offered": offered,
            "records_stored": stored,
            "records_dropped_counted": drops,
            "batches_deferred_429": sum(p["deferred"] for p in posted),
            "offered_eq_stored_plus_dropped": offered == stored + drops,
            "offered_eq_posters_accepted_plus_dropped": offered == accepted + answered_dropped,
            "post_seconds": round(t_posted - t_start, 2),
            "drain_seconds": round(t_done - t_posted, 2),
            "stored_per_s": round(stored / (t_done - t_start)),
            # load-independent: what the manager process spent per offered record (parse, enrich,
            # queue, store), and the rate that is on one free core; the store's own rate meanwhile
            "manager_cpu_us_per_record": round(cpu_used / max(1, offered) * 1e6, 2),
            "records_per_manager_cpu_second": round(offered / max(cpu_used, 1e-9)),
            "store_write_seconds": st["writeSeconds"] - before.get("writeSeconds", 0),
            "store_rows_per_write_second": round(
                stored / max(1e-9, st["writeSeconds"] - before.get("writeSeconds", 0))
            ),
            "ratio_to_store_baseline": round(
                stored / (t_done - t_start) / result["baseline_store_insert_per_s"], 3
            ),
            "ratio_to_bare_sqlite": round(
                stored / (t_done - t_start) / result["baseline_bare_sqlite_insert_per_s"], 3
            ),
        }

        # 3. query: one workload over the last hour, typical and hot
        store = SqliteFlowStore(flows_db)
        client = httpx.Client(base_url=url, headers=auth, timeout=60)  # keep-alive, like a console
        result["query"] = {"rows_in_store": store.rows()}
        for label, wl in (("typical", f"t{42 % TENANTS}/w42"), ("hot", f"t{hot % TENANTS}/w{hot}")):
            api, direct = [], []
            n_api = 0
            for _ in range(args.rounds):  # paired rounds: API then store, the same query
                t0 = time.perf_counter()
                r = client.get("/v1/flows", params={"workload": wl, "since": "1h", "limit": 100})
                api.append(time.perf_counter() - t0)
                n_api = len(r.json()["items"])
                t0 = time.perf_counter()
                store.query(FlowQuery(workloads=(wl,), since=time.time() - 3600), 100)
                direct.append(time.perf_counter() - t0)
            in_hour = store.aggregate(FlowQuery(workloads=(wl,), since=time.time() - 3600), ("verdict",))
            result["query"][label] = {
                "workload": wl,
                "rows_last_hour": sum(r[-1] for r in in_hour),
                "returned": n_api,
                "api_ms_median": round(statistics.median(api) * 1000, 2),
                "api_ms_max": round(max(api) * 1000, 2),
                "store_ms_median": round(statistics.median(direct) * 1000, 2),
                "ratio_api_to_store": round(statistics.median(api) / statistics.median(direct), 2),
            }
        store.close()
        client.close()
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        result["uptime_after"] = uptime()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
