"""Kernel vs sim: program a lab with a resource set, probe every ordered pair, compare verdict for verdict.

`FuzzLab(inventory_resources)` brings a lab up once (no policy driver: this module programs the hosts
itself, one `NftBackend` per host namespace) and then runs *rounds*: `program(resources, mode=...)`
compiles a new policy over the same inventory, programs every host (a full table after a teardown,
`sync` from what the kernel holds, or the incremental compiler's deltas through `apply`) and flushes
every host's conntrack table, so connections of an earlier round cannot make the kernel
look more permissive than the sim; `probe(cases)` sends real TCP/UDP/ICMP exchanges and judges the
same connections with `judge_connection`. They agree when both allow or both deny, and, for a denial,
when the way it failed fits the sim's verdicts (`agrees`: a TCP reset exactly when the sim says the
client is refused, `sim_refuses`; an ICMP error only then). A probe whose kernel result differs is
probed once more with a longer timeout: still different = a *confirmed* mismatch; agreeing now =
*flaky* (timing, reported apart, never hidden).

`check_scenario(resources, cases)` is the one-shot form used by regression tests: lab up, program,
probe, down. `minimize(...)` shrinks a mismatching policy (greedily dropping policies, rules, groups,
services, tenants) on the lab that found it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

from omniwall.compiler.build import compile_catalog
from omniwall.compiler.incremental import IncrementalCompiler
from omniwall.compiler.ir import HostDesiredState
from omniwall.dataplane.nft.backend import NftBackend
from omniwall.fuzz.generate import EPHEMERAL_SPORT, TCP_PORTS, UDP_PORTS
from omniwall.lab import Lab
from omniwall.lab.plan import LabPlan, WorkloadPlan
from omniwall.lab.probe import Probe, ProbeResult, run_probes
from omniwall.model.catalog import Catalog
from omniwall.model.errors import ValidationError
from omniwall.model.loader import dump_yaml
from omniwall.model.resources import dump
from omniwall.model.validate import validate
from omniwall.sim.evaluate import ConnectionVerdict, Network, judge_hop
from omniwall.sim.explain import path_json, rule_text, verdict_text
from omniwall.sim.packet import Packet

PROBE_TIMEOUT = 1.0
MODES = ("fresh", "sync", "delta")
INVENTORY_KINDS = ("Host", "Workload")
RETRY_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class Case:
    """One probe: a connection from workload `src` to workload `dst` ("tenant/name"), between their
    `src_index`-th and `dst_index`-th addresses of IP version `family` (vNIC order, then address order)."""

    src: str
    dst: str
    proto: str  # tcp | udp | icmp (icmpv6 over IPv6)
    port: int | None = None
    family: int = 4
    src_index: int = 0
    dst_index: int = 0

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "src": self.src,
            "dst": self.dst,
            "proto": self.proto,
            "port": self.port,
            "family": self.family,
        }
        if self.src_index or self.dst_index:
            d |= {"src_index": self.src_index, "dst_index": self.dst_index}
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> Case:
        return Case(
            d["src"],
            d["dst"],
            d["proto"],
            d.get("port"),
            d.get("family", 4),
            d.get("src_index", 0),
            d.get("dst_index", 0),
        )

    def __str__(self) -> str:
        svc = self.proto if self.port is None else f"{self.proto}/{self.port}"
        at = f" addresses #{self.src_index}->#{self.dst_index}" if self.src_index or self.dst_index else ""
        return f"{self.src} -> {self.dst} {svc} (IPv{self.family}{at})"


def addresses(w: WorkloadPlan, family: int) -> list[str]:
    return [ip for ip in w.ips if ipaddress.ip_address(ip).version == family]


TARGETS: tuple[tuple[str, int | None], ...] = (
    *(("tcp", p) for p in TCP_PORTS),
    *(("udp", p) for p in UDP_PORTS),
    ("icmp", None),
)
EXTRA_TARGETS: tuple[tuple[str, int | None], ...] = (
    ("tcp", TCP_PORTS[0]),
    ("udp", UDP_PORTS[0]),
    ("icmp", None),
)


def all_cases(plan: LabPlan, *, ipv6: bool) -> list[Case]:
    """Every ordered pair of workloads x every fuzz port (each has a responder) x icmp, per family,
    between their first addresses; plus a few targets from and to every further address."""
    families = (4, 6) if ipv6 else (4,)
    out = []
    for s in plan.workloads:
        for d in plan.workloads:
            if s is d:
                continue
            for fam in families:
                n_src, n_dst = len(addresses(s, fam)), len(addresses(d, fam))
                if not n_src or not n_dst:
                    continue
                out.extend(Case(s.key, d.key, proto, port, fam) for proto, port in TARGETS)
                for si, di in [*((i, 0) for i in range(1, n_src)), *((0, j) for j in range(1, n_dst))]:
                    out.extend(Case(s.key, d.key, proto, port, fam, si, di) for proto, port in EXTRA_TARGETS)
    return out


def sim_packet(src_addr: str, dst_addr: str, case: Case) -> Packet:
    if case.proto in ("icmp", "icmpv6"):
        return Packet(src_addr, dst_addr, "icmpv6" if case.family == 6 else "icmp")
    return Packet(src_addr, dst_addr, case.proto, sport=EPHEMERAL_SPORT, dport=case.port or 0)


def explanation_text(cv: ConnectionVerdict) -> str:
    """The sim's hop-by-hop reasoning, one line per hop."""
    lines = []
    for what, path in (("request", cv.request), ("reply", cv.reply), ("ack", cv.ack)):
        if path is None:
            continue
        untracked = f" untracked on {', '.join(sorted(path.untracked_hosts))}" if path.untracked_hosts else ""
        lines.append(f"{what}: {path.packet.describe()} -> {path.verdict}{untracked}")
        for h in path.hops:
            lines.append(
                f"  {h.host} {h.ifname} ({h.workload}) {h.direction}: {verdict_text(h)} by {rule_text(h)}"
                f"{'' if h.tracked else ' [untracked]'}"
            )
    return "\n".join(lines)


def sim_refuses(net: Network, cv: ConnectionVerdict) -> bool:
    """Does the client see a refusal (a TCP reset, an ICMP error), by the sim's verdicts?

    Only a `reject` of a packet the client sent (the request, or the TCP handshake's ACK) answers the
    client; a rejected reply answers the server. The answer is sent by the rejecting host itself (its
    output path, which Omniwall does not filter), so it reaches a client on that host. A client on
    another host receives it through its own ingress hop, like any packet: untracked there (a stateless
    rule matches the answer), that hop's rules decide; tracked, it passes as part of the connection when
    the client's host tracked the request, and is `ct state invalid` (dropped) when it did not.
    ICMP errors (UDP, ICMP) are only checked one way (see `agrees`), so for them this says True.
    """
    first = next((p for p in cv.paths if not p.allowed), None)
    if first is None or first is cv.reply or first.verdict != "reject":
        return False
    at = first.denied_at
    client = first.hops[0] if first.src is not None and first.hops else None
    p = first.packet
    if at is None or client is None or at.host == client.host or p.protocol != "tcp":
        return True
    answer = Packet(p.dst, p.src, p.protocol, sport=p.dport, dport=p.sport)
    hop = judge_hop(net.states[client.host], client.ifname, "ingress", answer)
    if not hop.tracked:
        return hop.allowed
    return client.host not in first.untracked_hosts


def kernel_refuses(allowed: bool, detail: str) -> bool:
    """A denial that came back at once (RST, ICMP unreachable/prohibited), not a timeout."""
    return not allowed and detail != "timeout"


def agrees(case: Case, cv: ConnectionVerdict, sim_refused: bool, allowed: bool, detail: str) -> bool:
    """Allowed/denied must be equal. Denied TCP: refused (RST) exactly when the sim rejects. Denied
    UDP/ICMP: a refusal needs a reject in the sim, but a reject may time out (the kernel rate-limits
    ICMP errors)."""
    if allowed != cv.allowed:
        return False
    if allowed:
        return True
    if case.proto == "tcp":
        return kernel_refuses(allowed, detail) == sim_refused
    return not kernel_refuses(allowed, detail) or sim_refused


@dataclass
class Outcome:
    case: Case
    src_addr: str
    dst_addr: str
    kernel: bool
    detail: str
    sim: ConnectionVerdict
    sim_refuses: bool = False  # the client sees a refusal, by the sim (`sim_refuses`)
    retry: bool | None = None  # the kernel's second answer, for a disagreement
    retry_detail: str | None = None

    @property
    def agrees(self) -> bool:
        return agrees(self.case, self.sim, self.sim_refuses, self.kernel, self.detail)

    @property
    def confirmed(self) -> bool:
        """A mismatch the retry reproduced."""
        return (
            not self.agrees
            and self.retry is not None
            and not agrees(self.case, self.sim, self.sim_refuses, self.retry, self.retry_detail or "")
        )

    def to_json(self) -> dict[str, Any]:
        cv = self.sim
        return {
            "probe": self.case.to_json() | {"src_addr": self.src_addr, "dst_addr": self.dst_addr},
            "kernel": {
                "allowed": self.kernel,
                "detail": self.detail,
                "retry_allowed": self.retry,
                "retry_detail": self.retry_detail,
            },
            "sim": {"allowed": cv.allowed, "verdict": cv.verdict, "refuses": self.sim_refuses},
            "confirmed": self.confirmed,
            "explanation": explanation_text(cv),
            "paths": {
                "request": path_json(cv.request),
                "reply": None if cv.reply is None else path_json(cv.reply),
                "ack": None if cv.ack is None else path_json(cv.ack),
            },
        }


@dataclass
class RoundResult:
    outcomes: list[Outcome]
    elapsed: float
    programming: str  # fresh | sync | delta
    drift: list[str] = field(default_factory=list)  # delta mode: hosts whose incremental state differs

    @property
    def probes(self) -> int:
        return len(self.outcomes)

    @property
    def allowed(self) -> int:
        return sum(o.kernel for o in self.outcomes)

    @property
    def mismatches(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.confirmed]

    @property
    def flaky(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.agrees and not o.confirmed]


@dataclass
class FuzzLab:
    """A lab built once from inventory resources (Hosts, Workloads), re-programmed round after round."""

    inventory: Sequence[Any]
    ipv6: bool | None = None
    timeout: float = PROBE_TIMEOUT
    lab: Lab | None = None
    backends: dict[str, NftBackend] = field(default_factory=dict)
    states: dict[str, HostDesiredState] = field(default_factory=dict)
    catalog: Catalog | None = None
    revision: int = 0
    drift: list[str] = field(default_factory=list)  # hosts where incremental != full compile (delta mode)
    _compiler: IncrementalCompiler | None = None

    def __enter__(self) -> FuzzLab:
        self.lab = Lab.up(list(self.inventory), policy=False, ipv6=self.ipv6)
        try:
            self.lab.__enter__()  # traps SIGTERM/SIGHUP like Ctrl-C, so teardown always runs
            for h in self.lab.plan.hosts:
                self.backends[h.name] = NftBackend(netns=h.netns, revoke=False)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
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
        for host, delta in self._compiler.update(changed, removed, self.revision).items():
            self.backends[host].apply(delta)
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
        for o, r in zip(outcomes, run_probes(probes, timeout=self.timeout), strict=True):
            o.kernel, o.detail = r.allowed, r.detail
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
    """Lab up for `resources` (inventory and policy together), program, probe `cases` (default: all),
    tear down. Returns every outcome; the caller asserts `o.agrees`."""
    inventory = [r for r in resources if r.kind in ("Host", "Workload")]
    policy = [r for r in resources if r.kind not in ("Host", "Workload")]
    with FuzzLab(inventory, timeout=timeout) as fl:
        fl.program(policy, mode="fresh")
        return fl.probe(cases if cases is not None else all_cases(fl.plan, ipv6=fl.has_ipv6))


def scenario_yaml(inventory: Sequence[Any], resources: Sequence[Any]) -> str:
    return dump_yaml([*inventory, *resources])


__all__ = [
    "Case",
    "FuzzLab",
    "Outcome",
    "RoundResult",
    "all_cases",
    "check_scenario",
    "explanation_text",
    "minimize",
    "scenario_yaml",
    "sim_packet",
]
