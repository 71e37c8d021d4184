"""Compile benchmark: a synthetic data-centre inventory through `compile_catalog`, then random label
changes through `IncrementalCompiler`.

    .venv/bin/python bench/compile.py                       # 100k workloads, 10k groups, 10k rules, 1k hosts
    .venv/bin/python bench/compile.py --workloads 10000 --groups 1000 --rules 1000 --hosts 100 --changes 200
    .venv/bin/python bench/compile.py --sweep --max-workloads 200000   # growth table, 25k doubling up

Sweep: sizes scaled together with today's default shape (workloads/10 groups and rules, workloads/100
hosts), each size in its own subprocess so that peak RSS is that size's own; the table gives time per rule
placement, which is flat when the compile is linear in the work.

The inventory (see BENCHMARKS.md "Compile"): tenants of ~5,000 workloads; ~100 workloads per host,
placed at random; apps of ~20 workloads with tier/env/zone labels and an `os` attribute; groups mostly
selector-based (per app, per app+tier, per tenant tier/env), some static, nested and CIDR groups, a few
shared provider groups; rules mostly app-to-app (derived span: egress of the source app, ingress of the
destination app), per-tenant baseline rules on `any`, and a provider infrastructure policy on every vNIC.

Memory: ru_maxrss (peak RSS) of this process, and VmRSS just before compiling, so the compile's own
share is visible (the catalog of pydantic objects is built first and counted in the peak).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from omniwall.compiler.incremental import IncrementalCompiler
from omniwall.compiler.testing import group, host, md, service
from omniwall.model.catalog import Catalog
from omniwall.model.resources import (
    Group,
    GroupSpec,
    Policy,
    PolicySpec,
    Rule,
    Tenant,
    TenantSpec,
    Vnic,
    Workload,
    WorkloadSpec,
)

TIERS = ("web", "app", "db", "cache")
ENVS = ("prod", "staging", "dev")
ZONES = ("z1", "z2", "z3", "z4")
PORTS = (80, 443, 5432, 6379, 8080, 9000, 3306, 27017)


def vm_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Inventory:
    """The synthetic inventory, plus what the change generator needs to know about it."""

    def __init__(self, workloads: int, groups: int, rules: int, hosts: int, seed: int) -> None:
        rnd = self.rnd = random.Random(seed)
        self.resources: list[Any] = []
        add = self.resources.append
        ntenants = max(1, workloads // 5000)
        self.tenants = [f"t{i:02d}" for i in range(ntenants)]
        self.hosts = [f"host-{i:04d}" for i in range(hosts)]
        for h in self.hosts:
            add(host(h))
        for t in self.tenants:
            add(Tenant(metadata=md(t), spec=TenantSpec(mode="monitor" if t == "t01" else "enforce")))

        # apps of ~20 workloads, spread over tenants
        napps = max(len(self.tenants), workloads // 20)
        self.apps = [(self.tenants[i % ntenants], f"app{i:05d}") for i in range(napps)]
        self.apps_of: dict[str, list[str]] = {t: [] for t in self.tenants}
        for t, a in self.apps:
            self.apps_of[t].append(a)
        self.workloads: list[Workload] = []
        self.by_tenant: dict[str, list[str]] = {t: [] for t in self.tenants}
        for i in range(workloads):
            t, app = self.apps[i % napps]
            name = f"w{i:06d}"
            labels = {
                "app": app,
                "tier": TIERS[(i // napps) % len(TIERS)],
                "env": ENVS[(i // napps // 4) % len(ENVS)],
                "zone": rnd.choice(ZONES),
            }
            ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
            w = Workload(
                metadata=md(name, t, labels),
                spec=WorkloadSpec(
                    host=rnd.choice(self.hosts),
                    vnics=[Vnic(ips=[ip])],
                    attributes={"os": "windows" if i % 10 == 0 else "linux"},
                ),
            )
            self.workloads.append(w)
            self.by_tenant[t].append(name)
            add(w)
        # a few provider workloads (DNS, monitoring)
        for i in range(4):
            add(
                Workload(
                    metadata=md(f"dns-{i}", "infra", {"role": "dns"}),
                    spec=WorkloadSpec(host=self.hosts[i % hosts], vnics=[Vnic(ips=[f"172.31.0.{i + 1}"])]),
                )
            )

        # ---- groups
        self.group_names: dict[str, list[str]] = {t: [] for t in self.tenants}
        provider = [
            group("infra", "dns", 'role == "dns"', shareWith=["*"]),
            group("infra", "quarantine", "has(quarantine)", shareWith=["*"]),
            group("infra", "windows", 'os == "windows"', shareWith=["*"]),
            group("infra", "mgmt-net", cidrs=["192.168.100.0/24"], shareWith=["*"]),
        ]
        for g in provider:
            add(g)
        n = len(provider)
        budget = max(0, groups - n)
        n_app = min(napps, budget * 50 // 100)
        n_tier = budget * 25 // 100
        n_tenant = min(len(self.tenants) * (len(TIERS) + len(ENVS)), budget * 2 // 100)
        n_static = budget * 14 // 100
        n_nested = budget * 5 // 100
        n_cidr = budget - n_app - n_tier - n_tenant - n_static - n_nested
        self.app_group: dict[tuple[str, str], str] = {}
        for t, a in self.apps[:n_app]:
            self._group(t, f"g-{a}", selector=f'app == "{a}"')
            self.app_group[(t, a)] = f"g-{a}"
        for i in range(n_tier):
            t, a = self.apps[i % napps]
            tier = TIERS[(i // napps) % len(TIERS)]
            self._group(t, f"g-{a}-{tier}", selector=f'app == "{a}" && tier == "{tier}"')
        k = 0
        for t in self.tenants:
            for tier in TIERS:
                if k < n_tenant:
                    self._group(t, f"all-{tier}", selector=f'tier == "{tier}"')
                    k += 1
            for env in ENVS:
                if k < n_tenant:
                    self._group(t, f"env-{env}", selector=f'env == "{env}" && os != "windows"')
                    k += 1
        for i in range(n_static):
            t = self.tenants[i % ntenants]
            members = rnd.sample(self.by_tenant[t], min(8, len(self.by_tenant[t])))
            self._group(t, f"static-{i:05d}", workloads=members)
        for i in range(n_nested):
            t = self.tenants[i % ntenants]
            own = [g for g in self.group_names[t] if g.startswith("g-app")]
            self._group(t, f"nested-{i:05d}", groups=rnd.sample(own, min(3, len(own))))
        for i in range(n_cidr):
            t = self.tenants[i % ntenants]
            self._group(
                t, f"net-{i:05d}", cidrs=[f"100.{i % 250}.{(i // 250) % 250}.0/24", f"198.51.{i % 250}.7/32"]
            )

        # ---- services
        for p in PORTS:
            add(service("infra", f"svc-{p}", "tcp", [p]))
        add(service("infra", "dns", "udp", [53]))

        # ---- policies
        infra_rules = [
            Rule(name="quarantine-out", sources=["quarantine"], action="drop"),
            Rule(name="quarantine-in", destinations=["quarantine"], action="drop"),
            Rule(
                name="dns", destinations=["dns"], services=["dns", "tcp/53"], action="allow", direction="out"
            ),
            Rule(name="mgmt-ssh", sources=["mgmt-net"], services=["tcp/22"], action="allow", direction="in"),
            Rule(name="icmp", services=["icmp/8", "icmpv6/128"], action="allow"),
            Rule(name="no-smb", services=["tcp/445", "tcp/139"], action="drop"),
            Rule(name="windows-rdp", destinations=["windows"], services=["tcp/3389"], action="pass"),
            Rule(name="to-tenants", action="pass"),
        ]
        add(
            Policy(
                metadata=md("baseline"),
                spec=PolicySpec(category="infrastructure", priority=10, rules=infra_rules),
            )
        )
        add(
            Policy(
                metadata=md("break-glass"),
                spec=PolicySpec(
                    category="emergency",
                    rules=[
                        Rule(
                            name="block-bad",
                            sources=["203.0.113.0/24", "198.51.100.66"],
                            action="drop",
                            direction="out",
                        ),
                    ],
                ),
            )
        )
        nrules = len(infra_rules) + 1
        for t in self.tenants:
            if nrules >= rules:
                break
            add(
                Policy(
                    metadata=md("env-baseline", t),
                    spec=PolicySpec(
                        category="environment",
                        rules=[
                            Rule(
                                name="prod-from-dev",
                                sources=["env-dev"],
                                destinations=["env-prod"],
                                action="drop",
                            ),
                            Rule(
                                name="intra",
                                sources=["any"],
                                destinations=["any"],
                                services=["tcp/22"],
                                action="allow",
                            ),
                        ],
                    ),
                )
            )
            nrules += 2
        i = 0
        while nrules < rules:
            t, a = self.apps[i % napps]
            peers = self.apps_of[t]
            rr = []
            for j in range(2):
                b = rnd.choice(peers)
                src = self.app_group.get((t, b)) or f"g-{b}"
                dst = self.app_group.get((t, a)) or f"g-{a}"
                svc = rnd.choice([f"infra/svc-{rnd.choice(PORTS)}", f"tcp/{rnd.choice(PORTS)}"])
                extra = [] if j else [rnd.choice(self.group_names[t])]
                rr.append(
                    Rule(
                        name=f"r{j}",
                        sources=[src, *extra],
                        destinations=[dst],
                        services=[svc],
                        action="allow",
                    )
                )
            rr = rr[: rules - nrules]
            add(
                Policy(
                    metadata=md(f"pol-{a}-{i // napps}", t), spec=PolicySpec(priority=100 + i % 7, rules=rr)
                )
            )
            nrules += len(rr)
            i += 1

    def _group(self, tenant: str, name: str, **spec: Any) -> None:
        self.group_names[tenant].append(name)
        self.resources.append(Group(metadata=md(name, tenant), spec=GroupSpec(**spec)))

    def random_label_change(self) -> Workload:
        """A workload moves to another app, tier or env, or gets/loses a quarantine label."""
        rnd = self.rnd
        i = rnd.randrange(len(self.workloads))
        w = self.workloads[i]
        labels = dict(w.metadata.labels)
        r = rnd.random()
        if r < 0.4:
            labels["app"] = rnd.choice(self.apps_of[w.metadata.tenant])
            self.last_kind = "app"
        elif r < 0.7:
            labels["tier"] = rnd.choice(TIERS)
            self.last_kind = "tier"
        elif r < 0.9:
            labels["env"] = rnd.choice(ENVS)
            self.last_kind = "env"
        elif "quarantine" in labels:
            del labels["quarantine"]
            self.last_kind = "quarantine"
        else:
            labels["quarantine"] = "true"
            self.last_kind = "quarantine"
        new = w.model_copy(update={"metadata": w.metadata.model_copy(update={"labels": labels})})
        self.workloads[i] = new
        return new


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


SWEEP_SIZES = (25_000, 50_000, 100_000, 200_000, 400_000, 800_000, 1_000_000)


def _run_size(n: int, changes: int, seed: int, profile: str | None, pythonpath: str | None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        f"--workloads={n}",
        f"--groups={n // 10}",
        f"--rules={n // 10}",
        f"--hosts={n // 100}",
        f"--changes={changes}",
        f"--seed={seed}",
    ]
    if profile:
        cmd.append(f"--profile={profile}")
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath  # the baseline's compiler, ahead of this tree's editable install
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    res = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(res, sort_keys=True), file=sys.stderr, flush=True)
    return res


def _row(r: dict, base: float | None, label: str = "") -> str:
    per = r["full_compile_cpu_s"] / r["rule_placements"] * 1e6
    rel = f" (x{per / base:.2f})" if base else ""
    return (
        f"| {label}{_k(r['workloads'])} / {_k(r['groups'])} / {_k(r['rules'])} / {_k(r['hosts'])} "
        f"| {r['rule_placements'] / 1e6:.2f} M "
        f"| {r['full_compile_s']:.2f} / {r['full_compile_cpu_s']:.2f} s "
        f"| {r['peak_rss_mb']:,} MB | {per:.2f} µs{rel} "
        f"| {r['incr_median_ms']:.2f} / {r['incr_p99_ms']:.2f} ms{_cpu_change(r)} | {r['loadavg_1m']} |"
    )


def _cpu_ratio(r: dict, old: dict) -> str:
    if not (r.get("incr_cpu_median_ms") and old.get("incr_cpu_median_ms")):
        return ""
    return (
        f" (CPU {r['incr_cpu_median_ms'] / old['incr_cpu_median_ms']:.2f} / "
        f"{r['incr_cpu_p99_ms'] / old['incr_cpu_p99_ms']:.2f})"
    )


def _cpu_change(r: dict) -> str:
    if r.get("incr_cpu_median_ms") is None:  # a baseline tree's bench output may lack it
        return ""
    return f" (CPU {r['incr_cpu_median_ms']:.2f} / {r['incr_cpu_p99_ms']:.2f})"


def sweep(
    sizes: list[int],
    max_workloads: int,
    changes: int,
    seed: int,
    profile_dir: str | None,
    baseline: str | None,
) -> int:
    """One subprocess per size (peak RSS per size); prints the growth table and one JSON line per size
    (stderr). With `baseline` (a PYTHONPATH holding another tree's `omniwall`), each size runs the
    baseline first, then this tree: paired rounds in one sitting."""
    results: list[tuple[dict, dict | None]] = []
    load0 = os.getloadavg()
    for n in sizes:
        if n > max_workloads:
            break
        old = _run_size(n, changes, seed, None, baseline) if baseline else None
        prof = os.path.join(profile_dir, f"compile-{n}.prof") if profile_dir else None
        results.append((_run_size(n, changes, seed, prof, None), old))
    print(
        "| workloads / groups / rules / hosts | rule placements | full compile wall / CPU | peak RSS "
        "| CPU per placement (vs first size) | change median / p99 wall (CPU) | load 1m |"
    )
    print("|---|---|---|---|---|---|---|")
    base = None
    for r, old in results:
        per = r["full_compile_cpu_s"] / r["rule_placements"] * 1e6
        base = base or per
        if old is not None:
            print(_row(old, None, "baseline "))
        print(_row(r, base))
        if old is not None:
            print(
                f"| ratio this/baseline | | {r['full_compile_s'] / old['full_compile_s']:.2f} / "
                f"{r['full_compile_cpu_s'] / old['full_compile_cpu_s']:.2f} "
                f"| {r['peak_rss_mb'] / old['peak_rss_mb']:.2f} | "
                f"| {r['incr_median_ms'] / old['incr_median_ms']:.2f} / "
                f"{r['incr_p99_ms'] / old['incr_p99_ms']:.2f}{_cpu_ratio(r, old)} | |"
            )
    load1 = os.getloadavg()
    print(
        f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
        f"after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; "
        f"{os.cpu_count()} CPUs; Python {platform.python_version()}"
    )
    return 0


def _k(n: int) -> str:
    return (
        f"{n // 1_000_000}M"
        if n >= 1_000_000 and not n % 1_000_000
        else (f"{n // 1000}k" if n >= 1000 and not n % 1000 else str(n))
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", type=int, default=100_000)
    ap.add_argument("--groups", type=int, default=10_000)
    ap.add_argument("--rules", type=int, default=10_000)
    ap.add_argument("--hosts", type=int, default=1_000)
    ap.add_argument("--changes", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="do not gc.freeze() after the build (a long-running manager should freeze: otherwise every "
        "full collection re-traverses the compiler's millions of long-lived objects)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="full compiles to run; the fastest is reported")
    ap.add_argument("--profile", help="write a cProfile of the full compile to this file")
    ap.add_argument("--profile-changes", help="write a cProfile of the label changes to this file")
    ap.add_argument("--sweep", action="store_true", help="the growth table, 25k workloads doubling up to 1M")
    ap.add_argument(
        "--sizes",
        default=",".join(map(str, SWEEP_SIZES)),
        help="with --sweep: workload counts, comma-separated (default %(default)s)",
    )
    ap.add_argument("--max-workloads", type=int, default=1_000_000, help="largest sweep size")
    ap.add_argument("--profile-dir", help="with --sweep: one cProfile (CPU time) per size in this directory")
    ap.add_argument(
        "--baseline",
        metavar="PYTHONPATH",
        help="with --sweep: also run each size with the omniwall package found there (e.g. an exported "
        "main: git archive main src | tar -x -C /tmp/base; --baseline /tmp/base/src), paired",
    )
    args = ap.parse_args(argv)
    if args.sweep:
        return sweep(
            [int(x) for x in args.sizes.split(",")],
            args.max_workloads,
            args.changes,
            args.seed,
            args.profile_dir,
            args.baseline,
        )

    t0 = time.perf_counter()
    inv = Inventory(args.workloads, args.groups, args.rules, args.hosts, args.seed)
    catalog = Catalog.of(inv.resources)
    t_inv = time.perf_counter() - t0
    gc.collect()
    rss_before = vm_rss_mb()

    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile(time.process_time)  # CPU time: the machine may be shared
        prof.enable()
    walls: list[float] = []
    cpus: list[float] = []
    syss: list[float] = []  # system time: page faults of the memory the build first touches
    faults: list[int] = []
    states: dict[str, Any] = {}
    for i in range(max(1, args.repeat)):
        if i:
            ic = states = None  # type: ignore[assignment]
            gc.collect()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0, c0 = time.perf_counter(), time.process_time()
        ic = IncrementalCompiler(catalog, revision=1)
        states = ic.states()  # == compile_catalog(catalog, 1): same code path
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        syss.append(ru1.ru_stime - ru0.ru_stime)
        faults.append(ru1.ru_minflt - ru0.ru_minflt)
    t_full, cpu_full = min(walls), min(cpus)
    if prof is not None:
        prof.disable()
        prof.dump_stats(args.profile)
    peak = peak_rss_mb()
    rss_after = vm_rss_mb()

    n_vnics = sum(len(s.vnics) for s in states.values())
    n_place = sum(len(v.egress) + len(v.ingress) for s in states.values() for v in s.vnics)
    rules_per_host = [len(s.rules) for s in states.values()]
    sets_per_host = [len(s.sets) for s in states.values()]
    n_rules = sum(1 for r in inv.resources if isinstance(r, Policy) for _ in r.spec.rules)
    n_groups = sum(1 for r in inv.resources if isinstance(r, Group))
    del states

    if not args.no_gc_freeze:
        gc.collect()
        gc.freeze()
    times: list[float] = []
    cpu_times: list[float] = []  # CPU time too: on a shared machine, wall time of a change is mostly waiting
    by_kind: dict[str, list[tuple[float, float, int]]] = {}
    hosts_touched: list[int] = []
    rev = 1
    prof = None
    if args.profile_changes:
        import cProfile

        prof = cProfile.Profile(time.process_time)  # CPU time: the machine may be shared
        prof.enable()
    for _ in range(args.changes):
        w = inv.random_label_change()
        rev += 1
        t0, c0 = time.perf_counter(), time.process_time()
        deltas = ic.update([w], [], rev)
        times.append((time.perf_counter() - t0) * 1000)
        cpu_times.append((time.process_time() - c0) * 1000)
        hosts_touched.append(len(deltas))
        by_kind.setdefault(inv.last_kind, []).append((times[-1], cpu_times[-1], len(deltas)))
    if prof is not None:
        prof.disable()
        prof.dump_stats(args.profile_changes)

    res = {
        "workloads": args.workloads,
        "groups": n_groups,
        "rules": n_rules,
        "hosts": args.hosts,
        "tenants": len(inv.tenants),
        "vnics_compiled": n_vnics,
        "rule_placements": n_place,
        "rules_per_host_median": statistics.median(rules_per_host),
        "sets_per_host_median": statistics.median(sets_per_host),
        "inventory_build_s": round(t_inv, 2),
        "full_compile_s": round(t_full, 2),
        "full_compile_all_s": [round(x, 2) for x in walls],
        "full_compile_cpu_s": round(cpu_full, 2),
        "full_compile_sys_s": round(syss[cpus.index(cpu_full)], 2),
        "full_compile_minor_faults": faults[cpus.index(cpu_full)],
        "env": {k: os.environ[k] for k in ("PYTHONMALLOC", "GLIBC_TUNABLES") if k in os.environ},
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "rss_before_compile_mb": round(rss_before),
        "rss_after_compile_mb": round(rss_after),
        "peak_rss_mb": round(peak),
        "changes": args.changes,
        "gc_freeze": not args.no_gc_freeze,
        "incr_median_ms": round(statistics.median(times), 3) if times else None,
        "incr_p99_ms": round(pct(times, 99), 3) if times else None,
        "incr_max_ms": round(max(times), 3) if times else None,
        "incr_cpu_median_ms": round(statistics.median(cpu_times), 3) if times else None,
        "incr_cpu_p99_ms": round(pct(cpu_times, 99), 3) if times else None,
        "incr_by_kind": {
            k: {
                "n": len(v),
                "median_ms": round(statistics.median(x[0] for x in v), 3),
                "p99_ms": round(pct([x[0] for x in v], 99), 3),
                "cpu_median_ms": round(statistics.median(x[1] for x in v), 3),
                "cpu_p99_ms": round(pct([x[1] for x in v], 99), 3),
                "hosts_median": statistics.median(x[2] for x in v),
            }
            for k, v in sorted(by_kind.items())
        },
        "hosts_per_change_median": statistics.median(hosts_touched) if times else None,
        "hosts_per_change_p99": pct([float(h) for h in hosts_touched], 99) if times else None,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
    }
    rows = [
        (
            "inventory",
            f"{args.workloads} workloads, {n_groups} groups, {n_rules} rules, {args.hosts} hosts, "
            f"{len(inv.tenants)} tenants",
        ),
        (
            "compiled",
            f"{n_vnics} vNICs, {n_place} rule placements; per host median {res['rules_per_host_median']} "
            f"rules, {res['sets_per_host_median']} sets",
        ),
        ("full compile", f"{t_full:.2f} s wall, {cpu_full:.2f} s CPU (target < 10 s)"),
        (
            "memory",
            f"peak RSS {peak:.0f} MB; RSS {rss_before:.0f} MB before compile, {rss_after:.0f} MB after "
            f"(target < 2048 MB)",
        ),
        (
            "label change",
            f"median {res['incr_median_ms']} ms, p99 {res['incr_p99_ms']} ms, max "
            f"{res['incr_max_ms']} ms over {args.changes} changes (target median < 5 ms); CPU median "
            f"{res['incr_cpu_median_ms']} ms, p99 {res['incr_cpu_p99_ms']} ms",
        ),
        *(
            (
                f"  {k} changes",
                f"{v['n']}: median {v['median_ms']} / p99 {v['p99_ms']} ms wall, {v['cpu_median_ms']} / "
                f"{v['cpu_p99_ms']} ms CPU, hosts median {v['hosts_median']}",
            )
            for k, v in res["incr_by_kind"].items()
        ),
        ("hosts/change", f"median {res['hosts_per_change_median']}, p99 {res['hosts_per_change_p99']}"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
