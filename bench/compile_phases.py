"""Per-phase CPU of one full compile, per rule placement, without a profiler (issue 16: profile the
sweep). Wraps the compiler's phase methods with process-time accumulators (a few hundred ns per call,
~0.3% of a vNIC's cost), builds `bench/compile.py`'s synthetic data centre at one size, compiles it
(`IncrementalCompiler` + `states()`, what `compile_catalog` runs) and prints one JSON line: CPU µs
per placement of each phase, the total, peak RSS and the 1-minute load.

    .venv/bin/python bench/compile_phases.py 100000      # workloads; groups = rules = n/10, hosts = n/100
    PYTHONPATH=/tmp/compile-base/src .venv/bin/python bench/compile_phases.py 100000   # another tree

Phases: `_workloads` (ingestion, label index), `_groups` (selectors, membership), `_recompile` (rules,
ids, span index, unions), `_vnics_of` (each vNIC's rule lists and IRVnic), `fill` (per-host counting and
indexes), `states` (per-host HostDesiredState), `rest` (the rest of the update: set flushes, routing).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compile import Inventory
from omniwall.compiler import hoststate, incremental
from omniwall.model.catalog import Catalog

PHASES = ("_workloads", "_groups", "_recompile", "_vnics_of")
acc: dict[str, float] = {}


def _timed(cls: type, name: str) -> None:
    f: Callable[..., Any] = getattr(cls, name)

    def wrapper(*a: Any, **k: Any) -> Any:
        c0 = time.process_time()
        try:
            return f(*a, **k)
        finally:
            acc[name] = acc.get(name, 0.0) + time.process_time() - c0

    setattr(cls, name, wrapper)


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    for name in PHASES:
        _timed(incremental.IncrementalCompiler, name)
    _timed(hoststate.HostState, "fill")
    inv = Inventory(n, n // 10, n // 10, n // 100, 1)
    catalog = Catalog.of(inv.resources)
    gc.collect()
    c0 = time.process_time()
    ic = incremental.IncrementalCompiler(catalog, revision=1)
    c1 = time.process_time()
    states = ic.states()
    c2 = time.process_time()
    place = sum(len(v.egress) + len(v.ingress) for s in states.values() for v in s.vnics)
    per = 1e6 / place
    # `_vnics_of` and `fill` run inside the update, apart from the other phases
    rest = (c1 - c0) - sum(acc.values())
    out: dict[str, Any] = {"workloads": n, "placements": place, "total_us": round((c2 - c0) * per, 3)}
    for name in (*PHASES, "fill"):
        out[name] = round(acc.get(name, 0.0) * per, 3)
    out["states"] = round((c2 - c1) * per, 3)
    out["rest"] = round(rest * per, 3)
    out["compile_cpu_s"] = round(c2 - c0, 2)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    out["loadavg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
