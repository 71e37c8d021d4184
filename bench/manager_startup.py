"""Manager start-up at scale: store load -> every host's desired state ready to serve (issue 16 item 4).

    .venv/bin/python bench/manager_startup.py                          # 100k workloads (compile.py's shape)
    .venv/bin/python bench/manager_startup.py --workloads 1000000      # the 1M point
    .venv/bin/python bench/manager_startup.py --workloads 25000 --db /tmp/s.db --keep
    .venv/bin/python bench/manager_startup.py --baseline /tmp/base/src   # paired with another tree

The store is the SQLite store a single manager runs on, filled with bench/compile.py's synthetic data
centre (groups and rules = workloads/10, hosts = workloads/100 unless given), each object encoded as the
manager stores it (`objects.encode`), in transactions of a few thousand puts. Writing it is set-up, done
in its own subprocess (so its memory is not counted) and kept in `--db` for the next run when `--keep`
(default path: /tmp/omniwall-startup-<workloads>-<seed>.db).

What is measured, in a fresh subprocess: `Manager(SqliteStore(path))`, i.e. the manager's own start-up
path: open the store, range over every object, decode each into the model's catalog, compile every
host's desired state (the incremental compiler's initial build) and install them in `DesiredStates`,
after which a feed can serve any host (checked: every Host in the store has a state). Wall and CPU time,
per phase (a timer around each, no profiler), and peak RSS of that process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_store(
    path: str, workloads: int, groups: int, rules: int, hosts: int, seed: int, batch: int
) -> dict:
    sys.path.insert(0, HERE)
    from compile import Inventory  # the same synthetic data centre as the compile benchmark
    from omniwall.manager.objects import encode, resource_key
    from omniwall.store.base import Put
    from omniwall.store.sqlite import SqliteStore

    t0 = time.perf_counter()
    inv = Inventory(workloads, groups, rules, hosts, seed)
    t_inv = time.perf_counter() - t0
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    store = SqliteStore(path + ".tmp")
    store._db.execute("PRAGMA synchronous = OFF")  # set-up only: the measured start-up reads it back
    t1 = time.perf_counter()
    ops: list[Put] = []
    n = 0
    for r in inv.resources:
        ops.append(Put(resource_key(r), encode(r)))
        if len(ops) >= batch:
            store.txn([], ops)
            n += len(ops)
            ops = []
    if ops:
        store.txn([], ops)
        n += len(ops)
    rev = store.revision()
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    os.replace(path + ".tmp", path)
    return {
        "objects": n,
        "store_revision": rev,
        "inventory_s": round(t_inv, 1),
        "write_s": round(time.perf_counter() - t1, 1),
    }


def measure(path: str) -> dict[str, Any]:
    """Run in a fresh process: the manager's start-up, phase by phase."""
    from omniwall.manager import compilation, desired, model
    from omniwall.manager.service import Manager
    from omniwall.store.sqlite import SqliteStore

    phases: dict[str, list[float]] = {}

    def timed(owner: Any, name: str, label: str) -> None:
        f = getattr(owner, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            w, c = time.perf_counter(), time.process_time()
            try:
                return f(*a, **k)
            finally:
                acc = phases.setdefault(label, [0.0, 0.0])
                acc[0] += time.perf_counter() - w
                acc[1] += time.process_time() - c

        setattr(owner, name, wrapper)

    timed(SqliteStore, "range", "store range")
    timed(model.Model, "decode", "decode objects")
    timed(compilation.IncrementalCompiler, "__init__", "compile: build")
    timed(compilation.IncrementalCompiler, "states", "compile: states")
    timed(desired.DesiredStates, "update", "install desired states")

    w0, c0 = time.perf_counter(), time.process_time()
    store = SqliteStore(path)
    m = Manager(store)
    hosts = m.model.host_names()
    missing = [h for h in hosts if m.desired.snapshot(h) is None]
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    if missing or m.compile_error:
        raise SystemExit(f"not ready: {len(missing)} hosts without a state, compile error {m.compile_error}")
    cat = m.catalog
    return {
        "startup_wall_s": round(wall, 2),
        "startup_cpu_s": round(cpu, 2),
        "phases": {k: {"wall_s": round(v[0], 2), "cpu_s": round(v[1], 2)} for k, v in phases.items()},
        "peak_rss_mb": round(_peak_rss_mb()),
        "hosts_ready": len(hosts),
        "workloads": len(cat.workloads),
        "groups": len(cat.groups),
        "policies": len(cat.policies),
        "store_revision": m.revision,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", type=int, default=100_000)
    ap.add_argument("--groups", type=int, help="default workloads/10")
    ap.add_argument("--rules", type=int, help="default workloads/10")
    ap.add_argument("--hosts", type=int, help="default workloads/100")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--db", help="store file (default /tmp/omniwall-startup-<workloads>-<seed>.db)")
    ap.add_argument("--keep", action="store_true", help="reuse --db when it exists, and keep it afterwards")
    ap.add_argument("--batch", type=int, default=5000, help="puts per transaction while writing the store")
    ap.add_argument(
        "--baseline",
        metavar="PYTHONPATH",
        help="also measure the start-up with the omniwall package found there (e.g. an exported main: "
        "git archive main src | tar -x -C /tmp/base; --baseline /tmp/base/src), before this tree's, on "
        "the same store",
    )
    ap.add_argument("--bound", type=float, help="exit 1 when start-up takes more than this many wall seconds")
    ap.add_argument("--_write", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    n = args.workloads
    groups, rules, hosts = args.groups or n // 10, args.rules or n // 10, args.hosts or max(1, n // 100)
    path = args.db or f"/tmp/omniwall-startup-{n}-{args.seed}.db"

    if args._write:
        print(json.dumps(write_store(path, n, groups, rules, hosts, args.seed, args.batch)))
        return 0
    if args._measure:
        print(json.dumps(measure(path)))
        return 0

    def sub(flag: str, pythonpath: str | None = None) -> dict[str, Any]:
        cmd = [sys.executable, __file__, flag, f"--workloads={n}", f"--groups={groups}", f"--rules={rules}"]
        cmd += [f"--hosts={hosts}", f"--seed={args.seed}", f"--db={path}", f"--batch={args.batch}"]
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath  # another tree's omniwall, ahead of this tree's editable install
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def show(label: str, res: dict[str, Any]) -> None:
        print(
            f"{label}start-up, {n} workloads / {groups} groups / {rules} rules / {hosts} hosts: "
            f"{res['startup_wall_s']:.2f} s wall, {res['startup_cpu_s']:.2f} s CPU, peak RSS "
            f"{res['peak_rss_mb']:,} MB, {res['hosts_ready']} hosts ready (load {res['loadavg_1m']})"
        )
        for k, v in res["phases"].items():
            print(f"  {k:<24} {v['wall_s']:8.2f} s wall {v['cpu_s']:8.2f} s CPU")

    setup = None
    if not (args.keep and os.path.exists(path)):
        setup = sub("--_write")
        print(f"store written: {json.dumps(setup)}", flush=True)
    old = None
    try:
        if args.baseline:
            old = sub("--_measure", args.baseline)
            show("baseline ", old)
        res = sub("--_measure")
    finally:
        if not args.keep:
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.unlink(path + suffix)
    res.update({"setup": setup, "hosts": hosts, "rules": rules, "db": path, "baseline": old})
    show("", res)
    if old is not None:
        print(
            f"ratio this/baseline: wall {res['startup_wall_s'] / old['startup_wall_s']:.2f}, CPU "
            f"{res['startup_cpu_s'] / old['startup_cpu_s']:.2f}, peak RSS "
            f"{res['peak_rss_mb'] / old['peak_rss_mb']:.2f}"
        )
    print(json.dumps(res, sort_keys=True))
    if args.bound is not None and res["startup_wall_s"] > args.bound:
        print(f"start-up {res['startup_wall_s']:.2f} s is over the bound of {args.bound} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
