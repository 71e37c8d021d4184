"""Bytes on the wire per host for one member change of a large group (BENCHMARKS.md "Delta path").

    .venv/bin/python bench/wire_bytes.py --members 2000,100000
    PYTHONPATH=/tmp/base/src .venv/bin/python bench/wire_bytes.py --members 2000   # another tree's code
    .venv/bin/python bench/wire_bytes.py --cpu      # CPU per change: compiler, manager member, fan-out

A manager (in-memory store, the real `Manager`: watch, compile, DesiredStates) holds N workloads labelled
`tier: web` spread over `--hosts` hosts, one `db` workload per host, and a policy web -> db, so every host
holds the web group's address set. One change = one more `web` workload written through plan/commit
(its address joins the set), then one removed. For each host that got a delta, the feed line
(`stream.wire.delta_line`, what the feed endpoint writes) is measured in bytes; also the time from the
commit call to the desired states being updated (compile + DesiredStates), median over `--rounds`.
Objects are written straight into the store (one txn) before the manager starts, so a 100k inventory
loads in one full compile rather than 100k API writes.

`--cpu`: CPU time (`process_time`, so a loaded machine inflates it less than wall time) per change of
(1) the compiler alone, label changes in bench/compile.py's inventory (10k workloads, 1k groups, 1k
rules, 100 hosts; 300 changes), (2) the manager, one member change of the 2,000-member group held by 100
hosts (plan, validation, store txn, compile, DesiredStates), (3) the manager, a policy change reaching
every one of the 100 hosts.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

from omniwall.manager.contracts import load_documents
from omniwall.manager.objects import RES_PREFIX, encode, resource_key
from omniwall.manager.service import SYSTEM, Manager
from omniwall.store import Put
from omniwall.store.memory import MemoryStore
from omniwall.stream.wire import delta_line


def world(members: int, hosts: int) -> list[Any]:
    docs = ["kind: Tenant\nmetadata: {name: acme}"]
    docs += [f"kind: Host\nmetadata: {{name: h{h}}}" for h in range(hosts)]
    docs += [
        "kind: Group\nmetadata: {name: web, tenant: acme}\nspec: {selector: 'tier == \"web\"'}",
        "kind: Group\nmetadata: {name: db, tenant: acme}\nspec: {selector: 'tier == \"db\"'}",
        "kind: Policy\nmetadata: {name: p, tenant: acme}\nspec:\n  rules:\n"
        "  - {name: sql, sources: [web], destinations: [db], services: [tcp/5432], action: allow}",
    ]
    docs += [
        f"kind: Workload\nmetadata: {{name: db{h}, tenant: acme, labels: {{tier: db}}}}\n"
        f"spec: {{host: h{h}, vnics: [{{name: eth0, ips: [10.255.0.{h + 1}]}}]}}"
        for h in range(hosts)
    ]
    out = load_documents("\n---\n".join(docs), "bench")
    template = load_documents(
        "kind: Workload\nmetadata: {name: w, tenant: acme, labels: {tier: web}}\n"
        "spec: {host: h0, vnics: [{name: eth0, ips: [10.0.0.1]}]}",
        "bench",
    )[0]
    for i in range(members):
        ip = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
        md = template.metadata.model_copy(update={"name": f"w{i}"})
        spec = template.spec.model_copy(  # type: ignore[attr-defined]
            update={
                "host": f"h{i % hosts}",
                "vnics": [template.spec.vnics[0].model_copy(update={"ips": [ip]})],  # type: ignore[attr-defined]
            }
        )
        out.append(template.model_copy(update={"metadata": md, "spec": spec}))
    return out


def one_change(m: Manager, doc: str, delete: bool) -> tuple[float, dict[str, int]]:
    before = m.desired.revisions()
    t0 = time.perf_counter()
    if delete:
        plan = m.plan_delete("Workload", "acme", "extra")
    else:
        plan = m.plan_apply(load_documents(doc, "change"))
    m.commit(plan, SYSTEM)
    dt = time.perf_counter() - t0
    sizes = {}
    for h, rev in before.items():
        for d in m.desired.deltas_since(h, rev) or []:
            sizes[h] = sizes.get(h, 0) + len(delta_line(d))
    return dt, sizes


def run(members: int, hosts: int, rounds: int) -> dict[str, Any]:
    store = MemoryStore()
    resources = world(members, hosts)
    store.txn([], [Put(RES_PREFIX + resource_key(r), encode(r)) for r in resources])
    t0 = time.perf_counter()
    m = Manager(store)
    load_s = time.perf_counter() - t0
    assert m.compile_error is None, m.compile_error
    doc = (
        "kind: Workload\nmetadata: {name: extra, tenant: acme, labels: {tier: web}}\n"
        "spec: {host: h0, vnics: [{name: eth0, ips: [10.254.0.1]}]}"
    )
    per_host: list[int] = []
    times: list[float] = []
    for _ in range(rounds):
        for delete in (False, True):
            dt, sizes = one_change(m, doc, delete)
            times.append(dt)
            # the hosts that only hold the set (not the new workload's own host): the fan-out that scales
            per_host.extend(v for h, v in sizes.items() if h != "h0")
    return {
        "members": members,
        "hosts": hosts,
        "load_s": round(load_s, 2),
        "bytes_per_host_median": statistics.median(per_host),
        "bytes_per_host_max": max(per_host),
        "change_ms_median": round(statistics.median(times) * 1000, 2),
    }


def cpu_per_change() -> dict[str, Any]:
    import gc
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from compile import Inventory  # bench/compile.py
    from omniwall.compiler.incremental import IncrementalCompiler
    from omniwall.model.catalog import Catalog

    out: dict[str, Any] = {}
    inv = Inventory(10000, 1000, 1000, 100, 1)
    ic = IncrementalCompiler(Catalog.of(inv.resources), revision=1)
    gc.collect()
    gc.freeze()
    n = 300
    c0 = time.process_time()
    for i in range(n):
        ic.update([inv.random_label_change()], [], i + 2)
    out["compiler_label_change_cpu_ms"] = round((time.process_time() - c0) / n * 1000, 3)
    del ic

    store = MemoryStore()
    store.txn([], [Put(RES_PREFIX + resource_key(r), encode(r)) for r in world(2000, 100)])
    m = Manager(store)
    add = load_documents(
        "kind: Workload\nmetadata: {name: extra, tenant: acme, labels: {tier: web}}\n"
        "spec: {host: h0, vnics: [{name: eth0, ips: [10.254.0.1]}]}",
        "c",
    )
    k = 20
    c0 = time.process_time()
    for _ in range(k):
        m.commit(m.plan_apply(add), SYSTEM)
        m.commit(m.plan_delete("Workload", "acme", "extra"), SYSTEM)
    out["manager_member_change_cpu_ms"] = round((time.process_time() - c0) / (2 * k) * 1000, 2)
    pol = (
        "kind: Policy\nmetadata: {name: q, tenant: acme}\nspec:\n  rules:\n"
        "  - {name: sql, sources: [web], destinations: [db], services: [tcp/%d], action: allow}"
    )
    m.commit(m.plan_apply(load_documents(pol % 5999, "p")), SYSTEM)
    c0 = time.process_time()
    for i in range(2 * k):
        m.commit(m.plan_apply(load_documents(pol % (6000 + i), "p")), SYSTEM)
    out["manager_fanout_policy_change_cpu_ms_100_hosts"] = round(
        (time.process_time() - c0) / (2 * k) * 1000, 2
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", default="2000,100000", help="group sizes, comma-separated")
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5, help="add+remove pairs per size")
    ap.add_argument("--cpu", action="store_true", help="CPU per change instead (see the module's doc)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    import omniwall

    out: dict[str, Any] = {"code": omniwall.__file__, "python": platform.python_version()}
    if a.cpu:
        out["cpu"] = cpu_per_change()
    else:
        out["results"] = [run(int(n), a.hosts, a.rounds) for n in a.members.split(",")]
    print(json.dumps(out, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
