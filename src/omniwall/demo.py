"""`make demo`: the three-tier example, validated, compiled and explained flow by flow.

    python -m omniwall.demo [EXAMPLE_DIR]

Loads `examples/three-tier` (two tenants with a web -> app -> db application each, provider DNS/NTP, a
quarantine for infected machines), compiles per-host desired state and asks the sim about the flows
that show the model: the allowed tiers, the denied shortcuts, tenant isolation, shared provider services
and the emergency quarantine. Each flow has the verdict the design promises; a flow that disagrees makes
the demo fail (exit 1), so the demo doubles as a smoke test.

Built for extension: `demo_flows()` lists the flows, `explain_flows()` judges them, `flows_table()`
renders them; the lab version (real namespaces, real traffic) can add a column measured in the kernel.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from omniwall.compiler.ir import HostDesiredState
from omniwall.model.catalog import Catalog
from omniwall.sim.evaluate import Network
from omniwall.sim.explain import Explanation, explain, rule_text

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "three-tier"


@dataclass(frozen=True)
class Flow:
    title: str
    src: str  # workload (tenant/name) or IP
    dst: str
    proto: str
    port: int | None
    expect_allowed: bool


def demo_flows(tenants: Sequence[str] = ("tenant-a", "tenant-b")) -> list[Flow]:
    flows: list[Flow] = []
    for i, t in enumerate(tenants):
        other = tenants[(i + 1) % len(tenants)]
        flows += [
            Flow(f"{t}: web -> app", f"{t}/web-1", f"{t}/app-1", "tcp", 8080, True),
            Flow(f"{t}: app -> db", f"{t}/app-1", f"{t}/db-1", "tcp", 5432, True),
            Flow(f"{t}: web -> db (skips a tier)", f"{t}/web-1", f"{t}/db-1", "tcp", 5432, False),
            Flow(
                f"{t}: web -> {other} app (cross-tenant)", f"{t}/web-1", f"{other}/app-1", "tcp", 8080, False
            ),
            Flow(f"{t}: web -> provider DNS", f"{t}/web-1", "infra/dns-1", "udp", 53, True),
            Flow(f"{t}: db -> provider NTP", f"{t}/db-1", "infra/ntp-1", "udp", 123, True),
        ]
    flows += [
        Flow("infected -> app (quarantined)", "tenant-a/infected-1", "tenant-a/app-1", "tcp", 8080, False),
        Flow("infected -> DNS (quarantined)", "tenant-a/infected-1", "infra/dns-1", "udp", 53, False),
        Flow("infected -> remediation", "tenant-a/infected-1", "infra/remediation-1", "tcp", 80, True),
        Flow("internet -> web", "198.51.100.20", "tenant-a/web-1", "tcp", 80, True),
    ]
    return flows


@dataclass(frozen=True)
class FlowResult:
    flow: Flow
    explanation: Explanation

    @property
    def as_expected(self) -> bool:
        return self.explanation.allowed == self.flow.expect_allowed


def load_example(directory: Path) -> tuple[Catalog, dict[str, HostDesiredState]]:
    from omniwall.compiler.build import compile_catalog
    from omniwall.model.loader import load_files
    from omniwall.model.validate import validate

    catalog = validate(load_files([directory]))
    return catalog, compile_catalog(catalog)


def explain_flows(
    catalog: Catalog, states: Mapping[str, HostDesiredState], flows: Sequence[Flow]
) -> list[FlowResult]:
    net = Network(states)
    return [FlowResult(f, explain(catalog, net, f.src, f.dst, f.proto, f.port)) for f in flows]


def hops_text(e: Explanation) -> str:
    lines = []
    for h in e.connection.request.hops:
        text = escape(f"{h.host} {h.direction:<7} {h.verdict:<6} {rule_text(h)}")
        lines.append(text if h.reached else f"[dim]{text} (not reached)[/]")
    return "\n".join(lines) or "(no vNIC on the path)"


def flows_table(results: Sequence[FlowResult], title: str = "explain: who may talk to whom") -> Table:
    t = Table(title=title, show_lines=True, header_style="bold")
    for col in ("flow", "service", "verdict", "hop by hop: host, direction, verdict, deciding rule"):
        t.add_column(col, overflow="fold")
    for r in results:
        e = r.explanation
        verdict = "[green]allowed[/]" if e.allowed else "[red]denied[/]"
        if not r.as_expected:
            design = "allow" if r.flow.expect_allowed else "deny"
            verdict += f"\n[bold red]UNEXPECTED (design: {design})[/]"
        t.add_row(f"{r.flow.title}\n[dim]{e.src} -> {e.dst}[/]", e.service, verdict, hops_text(e))
    return t


def _plural(noun: str, n: int) -> str:
    if n == 1:
        return noun
    return noun[:-1] + "ies" if noun.endswith("y") else noun + "s"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    directory = Path(args[0]) if args else EXAMPLE_DIR
    console = Console(highlight=False)
    from omniwall.model.errors import ValidationError

    try:
        catalog, states = load_example(directory)
    except ValidationError as e:
        print(f"error: {directory}: {e}", file=sys.stderr)
        return 2
    counts = {k: len(catalog.table(k)) for k in ("Tenant", "Host", "Workload", "Group", "Policy")}
    console.print(
        f"[bold]{directory}[/]: valid — "
        + ", ".join(f"{n} {_plural(k.lower(), n)}" for k, n in counts.items())
    )
    for host, s in sorted(states.items()):
        console.print(
            f"  compiled {host}: {len(s.vnics)} vNICs, {len(s.rules)} rules, {len(s.sets)} address sets"
        )
    try:
        results = explain_flows(catalog, states, demo_flows())
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    console.print(flows_table(results))
    wrong = [r for r in results if not r.as_expected]
    if wrong:
        console.print(f"[bold red]{len(wrong)} flow(s) disagree with the design[/]")
        return 1
    console.print(f"[green]all {len(results)} flows as the design says[/]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
