"""Kernel vs sim on one lab: program it with a resource set, probe, compare verdict for verdict.

`FuzzLab(inventory_resources)` brings a lab up once (no policy driver: this module programs the hosts
itself, one `NftBackend` per host namespace) and then runs *rounds*: `program(resources, mode=...)`
compiles a new policy over the same inventory, programs every host (a full table after a teardown,
`sync` from what the kernel holds, or the incremental compiler's deltas through `apply`) and flushes
every host's conntrack table, so connections of an earlier round cannot make the kernel look more
permissive than the sim. `probe(cases)` sends real TCP/UDP/ICMP exchanges (`cases`) and judges the
same connections with `judge_connection`; `compare.agrees` decides. A probe whose kernel result
differs is probed once more with a longer timeout: still different = a *confirmed* mismatch; agreeing
now = *flaky* (timing, reported apart, never hidden).

`check_scenario(resources, cases)` is the one-shot form used by regression tests: lab up, program,
probe, down. `minimize(...)` shrinks a mismatching policy (greedily dropping policies, rules, groups,
services, tenants) on the lab that found it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

from omniwall.compiler.build import compile_catalog
from omniwall.compiler.incremental import IncrementalCompiler
from omniwall.compiler.ir import HostDesiredState
from omniwall.dataplane.nft.backend import NftBackend
from omniwall.dataplane.nft.render import DEFAULT_FLOW_GROUP
from omniwall.fuzz.attribution import KernelFlows, sim_attribution, sim_key
from omniwall.fuzz.cases import Case, addresses, all_cases, sim_packet
from omniwall.fuzz.compare import Outcome, RoundResult, sim_refuses
from omniwall.fuzz.generate import is_outside
from omniwall.lab import Lab
from omniwall.lab.plan import LabPlan
from omniwall.lab.probe import Probe, ProbeResult, run_probes
from omniwall.model.catalog import Catalog
from omniwall.model.errors import ValidationError
from omniwall.model.loader import dump_yaml
from omniwall.model.resources import dump
from omniwall.model.validate import validate
from omniwall.sim.evaluate import Network

PROBE_TIMEOUT = 1.0
MODES = ("fresh", "sync", "delta")
INVENTORY_KINDS = ("Host", "Workload")
RETRY_TIMEOUT = 3.0


@dataclass
class FuzzLab:
    """A lab built once from inventory resources (Hosts, Workloads), re-programmed round after round."""

    inventory: Sequence[Any]
    outside: Sequence[Any] = ()  # lab-only Hosts/Workloads the compiler never sees (generate.is_outside)
    ipv6: bool | None = None
    timeout: float = PROBE_TIMEOUT
    lab: Lab | None = None
    backends: dict[str, NftBackend] = field(default_factory=dict)
    states: dict[str, HostDesiredState] = field(default_factory=dict)
    catalog: Catalog | None = None
    revision: int = 0
    drift: list[str] = field(default_factory=list)  # hosts where incremental != full compile (delta mode)
    attribution: bool = True  # also check the kernel's flow logs name the sim's rules (fuzz/attribution.py)
    flows: KernelFlows | None = None
    _compiler: IncrementalCompiler | None = None

    def __enter__(self) -> FuzzLab:
        self.lab = Lab.up([*self.inventory, *self.outside], policy=False, ipv6=self.ipv6)
        try:
            self.lab.__enter__()  # traps SIGTERM/SIGHUP like Ctrl-C, so teardown always runs
            ours = {r.name for r in self.inventory if r.kind == "Host"}
            for h in self.lab.plan.hosts:
                if h.name in ours:  # an outside host forwards unfiltered
                    self.backends[h.name] = NftBackend(netns=h.netns, revoke=False)
            if self.attribution:
                nets = {h.name: h.netns for h in self.lab.plan.hosts if h.name in ours}
                self.flows = KernelFlows(nets, DEFAULT_FLOW_GROUP)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.flows is not None:
            self.flows.close()
            self.flows = None
        for b in self.backends.values():
            with contextlib.suppress(Exception):
                b.close()
        self.backends.clear()
        if self.lab is not None:
            lab, self.lab = self.lab, None
            lab.__exit__(None, None, None)

    @property
    def plan(self) -> LabPlan:
        assert self.lab is not None, "FuzzLab is not up"
        return self.lab.plan

    @property
    def has_ipv6(self) -> bool:
        assert self.lab is not None, "FuzzLab is not up"
        return self.lab.state.ipv6

    def program(self, resources: Iterable[Any], *, mode: str = "fresh") -> Catalog:
        """Validate inventory + `resources`, compile, program every host, flush conntrack everywhere.
        `mode`: `fresh` (teardown, then a full table), `sync` (`backend.sync`: the minimal transaction
        from what the kernel holds) or `delta` (the `IncrementalCompiler`'s deltas from the previous
        program, through `backend.apply`, as an agent does). Raises ValidationError for an invalid set."""
        if mode not in MODES:
            raise ValueError(f"programming mode {mode!r}: use one of {', '.join(MODES)}")
        catalog = validate([*self.inventory, *resources])
        self.revision += 1
        states = compile_catalog(catalog, self.revision)
        self.drift = []
        if mode == "delta" and self.catalog is not None:
            try:
                self._apply_deltas(catalog, states)
            except BaseException:
                self._compiler = None  # half-applied: the next program must start from a full table
                raise
        else:
            for host, backend in self.backends.items():
                if mode == "fresh":
                    backend.teardown()
                backend.sync(states[host])
            self._compiler = None
        self.flush_conntrack()
        self.catalog, self.states = catalog, states
        return catalog

    def _apply_deltas(self, catalog: Catalog, full: dict[str, HostDesiredState]) -> None:
        if self._compiler is None:  # what the kernel holds: the previous program, at its revision
            assert self.catalog is not None
            self._compiler = IncrementalCompiler(self.catalog, self.revision - 1)
        old = {r.key: r for r in self.catalog or () if r.kind not in INVENTORY_KINDS}
        new = {r.key: r for r in catalog if r.kind not in INVENTORY_KINDS}
        changed = [r for k, r in new.items() if k not in old or dump(old[k]) != dump(r)]
        removed = [k for k in old if k not in new]
        bases = self._compiler.states()
        deltas = self._compiler.update(changed, removed, self.revision)
        targets = self._compiler.states()
        for host, delta in deltas.items():
            self.backends[host].apply(bases[host], delta, targets[host])
        # The incremental compiler must land where a fresh compile does (the sim judges the latter).
        inc = self._compiler.states()
        self.drift = sorted(
            h for h in full if h not in inc or replace(inc[h], revision=0) != replace(full[h], revision=0)
        )

    def flush_conntrack(self) -> None:
        for backend in self.backends.values():
            backend.flush_connections(backend.connections())

    def probe(self, cases: Sequence[Case], *, retry: bool = True) -> list[Outcome]:
        """Kernel and sim verdicts of `cases` under the current program; disagreements probed again."""
        plan = self.plan
        net = Network(self.states)
        probes, outcomes = [], []
        for c in cases:
            s, d = plan.workload(c.src), plan.workload(c.dst)
            try:
                src_addr, dst_addr = addresses(s, c.family)[c.src_index], addresses(d, c.family)[c.dst_index]
            except IndexError:
                raise ValueError(f"{c}: no such address in the lab") from None
            probes.append(Probe(s.netns, dst_addr, c.proto, c.port, s.key, d.key, src_addr, d.key))
            cv = net.judge_connection(sim_packet(src_addr, dst_addr, c))
            outcomes.append(Outcome(c, src_addr, dst_addr, False, "", cv, sim_refuses(net, cv)))
        if self.flows is not None:
            self.flows.drain()
        results = run_probes(probes, timeout=self.timeout)
        kflows = self.flows.collect(self.states) if self.flows is not None else None
        for o, r in zip(outcomes, results, strict=True):
            o.kernel, o.detail = r.allowed, r.detail
            if kflows is not None:
                o.kernel_attr = kflows.get(sim_key(o.sim), {})
                o.sim_attr = sim_attribution(o.sim, self.states)
        wrong = [i for i, o in enumerate(outcomes) if not o.agrees]
        if retry and wrong:
            again: list[ProbeResult] = run_probes(
                [probes[i] for i in wrong], timeout=max(RETRY_TIMEOUT, self.timeout)
            )
            for i, r in zip(wrong, again, strict=True):
                outcomes[i].retry, outcomes[i].retry_detail = r.allowed, r.detail
        return outcomes

    def round(
        self, resources: Iterable[Any], cases: Sequence[Case] | None = None, *, mode: str = "fresh"
    ) -> RoundResult:
        start = time.monotonic()
        self.program(resources, mode=mode)
        outcomes = self.probe(cases if cases is not None else all_cases(self.plan, ipv6=self.has_ipv6))
        return RoundResult(outcomes, time.monotonic() - start, mode, list(self.drift))

    # ------------------------------------------------------------------------------------- shrinking

    def still_mismatches(self, resources: Sequence[Any], case: Case, tries: int = 2) -> bool:
        """Does `case` still disagree under `resources` (fresh program, every try)?"""
        try:
            self.program(resources, mode="fresh")
        except ValidationError:
            return False
        for _ in range(tries):
            (o,) = self.probe([case], retry=False)
            if o.agrees:
                return False
            self.flush_conntrack()
        return True


def _shrink_candidates(resources: list[Any]) -> Iterable[list[Any]]:
    """Smaller variants: without one resource (policies first), then policies without one rule."""
    order = {"Policy": 0, "Group": 1, "Service": 2, "Tenant": 3}
    idx = sorted(range(len(resources)), key=lambda i: order.get(resources[i].kind, 9))
    for i in idx:
        yield resources[:i] + resources[i + 1 :]
    for i, r in enumerate(resources):
        if r.kind != "Policy" or len(r.spec.rules) < 2:
            continue
        for j in range(len(r.spec.rules)):
            rules = r.spec.rules[:j] + r.spec.rules[j + 1 :]
            smaller = r.model_copy(update={"spec": r.spec.model_copy(update={"rules": rules})})
            yield [*resources[:i], smaller, *resources[i + 1 :]]


def minimize(
    fl: FuzzLab,
    resources: Sequence[Any],
    case: Case,
    *,
    budget: float = 120.0,
    log: Callable[[str], None] | None = None,
) -> list[Any]:
    """Greedy shrinking of the (non-inventory) `resources` while `case` keeps disagreeing; at most
    `budget` seconds. Returns the smallest set found (the input when nothing smaller reproduces)."""
    current = list(resources)
    deadline = time.monotonic() + budget
    progress = True
    while progress and time.monotonic() < deadline:
        progress = False
        for candidate in _shrink_candidates(current):
            if time.monotonic() >= deadline:
                break
            if fl.still_mismatches(candidate, case):
                current = candidate
                progress = True
                if log:
                    log(f"  shrunk to {len(current)} resources")
                break
    return current


def check_scenario(
    resources: Sequence[Any], cases: Sequence[Case] | None = None, *, timeout: float = PROBE_TIMEOUT
) -> list[Outcome]:
    """Lab up for `resources` (inventory, outside resources and policy together), program, probe `cases`
    (default: all), tear down. Returns every outcome; the caller asserts `o.agrees`."""
    outside = [r for r in resources if is_outside(r)]
    inventory = [r for r in resources if r.kind in INVENTORY_KINDS and not is_outside(r)]
    policy = [r for r in resources if r.kind not in INVENTORY_KINDS]
    with FuzzLab(inventory, outside, timeout=timeout) as fl:
        fl.program(policy, mode="fresh")
        return fl.probe(cases if cases is not None else all_cases(fl.plan, ipv6=fl.has_ipv6))


def scenario_yaml(inventory: Sequence[Any], resources: Sequence[Any]) -> str:
    return dump_yaml([*inventory, *resources])


__all__ = [
    "INVENTORY_KINDS",
    "MODES",
    "PROBE_TIMEOUT",
    "Case",
    "FuzzLab",
    "Outcome",
    "RoundResult",
    "all_cases",
    "check_scenario",
    "minimize",
    "scenario_yaml",
]
