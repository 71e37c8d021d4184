"""`make demo`: the three-tier example on a managed lab, measured with real traffic.

    python -m omniwall.demo [EXAMPLE_DIR] [--once] [--offline]

Live (default, needs root): brings up a lab of network namespaces from `examples/three-tier` (three
hosts; the provider's DNS/NTP/remediation servers and two tenants' web -> app -> db applications), starts
a manager (SQLite, 127.0.0.1) and one agent per host (`omniwall.lab.managed`), applies every resource
through the API, waits until each host's kernel realized its desired revision, then probes every ordered
pair of workloads with real connections and prints the matrix next to what the policy says (the sim,
`omniwall.lab.expect`), the design's named flows; then runs `omniwall migrate tenant-a/app-1 --to
host-3` while a TCP connection streams through app-1 (the lab's hypervisor moves the vNIC; not a byte
may be lost), and prints the API URL and an admin token. It then stays up for
your own `curl`/`omniwall` commands until Ctrl-C (or SIGTERM), and tears everything down. While it stays
up it prints the web console's URL (`/ui/`) with an admin and an auditor token, and probes one allowed and
one denied flow about every second (`BackgroundTraffic`), so the console is alive when opened.
`--once`: no waiting (tests, CI). Exit status 1 when a measured result differs from the expectation.

`--offline`: no lab; the example is validated, compiled and explained flow by flow by the sim (the
allowed tiers, the denied shortcuts, tenant isolation, shared provider services, the emergency
quarantine). Each flow has the verdict the design promises; a flow that disagrees makes it exit 1.

`demo_flows()` lists the flows, `explain_flows()` judges them (sim), `flows_table()` renders them;
`main(argv)` is the offline run (kept for callers), `cli(argv)` the command line.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from omniwall.compiler.ir import HostDesiredState
from omniwall.lab.matrix import MatrixEntry
from omniwall.model.catalog import Catalog
from omniwall.sim.evaluate import Network
from omniwall.sim.explain import Explanation, explain, rule_text

# omniwall/examples is a link to the repository's examples/ and a copy in an installed wheel (pyproject.toml)
EXAMPLE_DIR = Path(__file__).resolve().parent / "examples" / "three-tier"


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


# ------------------------------------------------------------------------------------------- live


def matrix_grid(workloads: Sequence[str], entries: Sequence[MatrixEntry]) -> Table:
    """Rows: from; columns: to, by number (and the port its responder serves). Each cell:
    measured|expected."""
    number = {k: i + 1 for i, k in enumerate(workloads)}
    columns: list[tuple[str, str, int | None]] = []
    for e in entries:
        if (e.dst, e.proto, e.port) not in columns:
            columns.append((e.dst, e.proto, e.port))
    columns.sort(key=lambda c: (number[c[0]], c[1], c[2] or 0))
    t = Table(
        title="reachability: measured with real traffic | expected by the policy (sim)",
        caption="✓ allowed  · denied   cell = measured|expected   [black on yellow] disagreement [/]",
        header_style="bold",
        box=None,
    )
    t.add_column("from \\ to", style="bold", no_wrap=True)
    for dst, proto, port in columns:
        t.add_column(f"{number[dst]}\n{proto}" + (f"/{port}" if port else ""), justify="center")
    cells = {(e.src, e.dst, e.proto, e.port): e for e in entries}
    for src in workloads:
        row = [f"{number[src]:>2} {src}"]
        for dst, proto, port in columns:
            e = cells.get((src, dst, proto, port))
            row.append(_grid_cell(e) if e is not None else "[dim]-[/]")
        t.add_row(*row)
    return t


def _grid_cell(e: MatrixEntry) -> str:
    text = f"{'✓' if e.allowed else '·'}|{'✓' if e.expected else '·'}"
    if not e.agrees:
        return f"[bold black on yellow]{text}[/]"
    return f"[green]{text}[/]" if e.allowed else f"[red]{text}[/]"


def measured_flows_table(entries: Sequence[MatrixEntry], flows: Sequence[Flow]) -> Table:
    """The design's named flows (those between two lab workloads), as measured."""
    cells = {(e.src, e.dst, e.proto, e.port): e for e in entries}
    t = Table(title="the design's flows, measured", header_style="bold")
    for col in ("flow", "service", "design", "measured", "policy (sim)"):
        t.add_column(col)
    for f in flows:
        e = cells.get((f.src, f.dst, f.proto, f.port))
        if e is None:
            continue
        word = {True: "[green]allowed[/]", False: "[red]denied[/]"}
        measured = word[e.allowed]
        if e.allowed != f.expect_allowed or not e.agrees:
            measured = f"[bold black on yellow]{'allowed' if e.allowed else 'denied'}[/]"
        t.add_row(
            f"{f.title}\n[dim]{f.src} -> {f.dst}[/]",
            f"{f.proto}/{f.port}",
            word[f.expect_allowed],
            measured,
            word[bool(e.expected)],
        )
    return t


def hosts_table(status: Mapping[str, Any], netns: Mapping[str, str]) -> Table:
    t = Table(title="agents (one per lab host; kernel: the host namespace's nftables)", header_style="bold")
    for col in ("host", "namespace", "agent", "desired", "realized", "in sync"):
        t.add_column(col)
    for h, s in sorted((status.get("hosts") or {}).items()):
        t.add_row(
            h,
            netns.get(h, "?"),
            "connected" if s["connected"] else "[red]away[/]",
            str(s["desiredRevision"]),
            str(s["realizedRevision"]),
            "[green]yes[/]" if s["inSync"] else "[red]no[/]",
        )
    return t


def run_live(directory: Path, *, once: bool, console: Console) -> int:
    """Bring up the managed lab, measure, print, wait for Ctrl-C (unless `once`), tear down."""
    from omniwall.lab.demorun import run_demo

    console.print(f"[bold]bringing up a managed lab from {directory}[/] (namespaces, manager, agents) ...")
    return run_demo(
        directory,
        lambda lab, cp: show(console, lab, cp),
        console=console,
        once=once,
        gone="lab down: namespaces, manager and agents removed",
        while_up=lambda lab, cp: staying_up(console, lab, cp),
    )


def show(console: Console, lab: Any, cp: Any) -> bool:
    """The live demo on an up lab: the agents, the matrix against the sim, the migration, the API's
    access lines. True when every probe agreed and the migration kept its connection."""
    plan = lab.plan
    console.print(hosts_table(cp.status(), {h.name: h.netns for h in plan.hosts}))
    t0 = time.monotonic()
    entries = lab.matrix(expect=True)
    console.print(matrix_grid([w.key for w in plan.workloads], entries))
    console.print(f"[dim]{len(entries)} probes in {time.monotonic() - t0:.1f} s[/]")
    console.print(measured_flows_table(entries, demo_flows()))
    wrong = [e for e in entries if not e.agrees]
    if wrong:
        console.print(f"[bold red]{len(wrong)} of {len(entries)} probes differ from the policy:[/]")
        for e in wrong:
            console.print(f"  {escape(e.json_line())}")
    else:
        console.print(f"[bold green]all {len(entries)} probes agree with the policy[/]")
    migrated = show_migration(console, lab, cp)
    _print_access(console, lab.name, cp.url, cp.admin_token, cp.ca_file, cp.dir)
    return not wrong and migrated


@contextlib.contextmanager
def staying_up(console: Console, lab: Any, cp: Any) -> Iterator[None]:
    """While the lab waits for Ctrl-C: the console's URL and tokens, and background traffic for it."""
    _print_console(console, cp)
    traffic = BackgroundTraffic(lab, demo_flows())
    traffic.start()
    try:
        yield
    finally:
        traffic.stop()


MIGRATING = ("tenant-a/app-1", "host-3", "tenant-a/web-1", 8080)  # workload, to, its client, port


def show_migration(console: Console, lab: Any, cp: Any) -> bool:
    """`omniwall migrate tenant-a/app-1 --to host-3` (the README's command, run as printed) while a TCP
    connection from web-1 streams through app-1's port 8080: the manager moves policy and connection
    state, the lab's hypervisor moves the vNIC; the connection must lose no byte. False when it failed."""
    import subprocess

    from omniwall.lab.streams import live_tcp

    workload, to, client, port = MIGRATING
    keys = {w.key for w in lab.plan.workloads}
    if workload not in keys or client not in keys or to not in {h.name for h in lab.plan.hosts}:
        return True  # another example: nothing to show
    if lab.plan.workload(workload).host == to:
        return True
    command = ["omniwall", "migrate", workload, "--to", to]
    console.print(
        f"\n[bold]live migration[/] of {workload} to {to}, with a TCP connection {client} -> "
        f"{workload}:{port} streaming:\n$ {' '.join(command)}",
        highlight=False,
    )
    env = {**os.environ, "OMNIWALL_SERVER": cp.url, "OMNIWALL_TOKEN": cp.admin_token}
    if cp.ca_file:
        env["OMNIWALL_CA"] = str(cp.ca_file)
    argv = [sys.executable, "-m", "omniwall.cli.main", *command[1:]]
    with live_tcp(lab, client, workload, port) as stream:
        time.sleep(0.3)
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        time.sleep(0.3)
        res = stream.stop()
    lab.reload()  # the lab's hypervisor recorded the move
    console.print(escape((out.stdout + out.stderr).rstrip()), highlight=False)
    moved = out.returncode == 0 and lab.plan.workload(workload).host == to
    alive = bool(res.get("ok"))
    mb = res.get("sent", 0) / 1e6
    if moved and alive:
        console.print(
            f"[bold green]{workload} now runs on {to}; the connection stayed up[/]: {mb:.1f} MB echoed, "
            f"none lost, longest pause {res.get('maxGapMs', 0):.0f} ms",
            highlight=False,
        )
    else:
        console.print(f"[bold red]migration: moved {moved}, connection {res}[/]", highlight=False)
    return moved and alive


def _print_access(
    console: Console, name: str, url: str, token: str, ca: Path | None = None, logs: Path | None = None
) -> None:
    # The lab's manager serves HTTPS with a throwaway CA (lab/managed.py); agents present host certificates.
    ca_line = f"  CA:          {ca}   (agents: mutual TLS, one certificate per host)\n" if ca else ""
    ca_env = f" OMNIWALL_CA={ca}" if ca else ""
    console.print(
        "\n[bold]manager API[/]\n"
        f"  URL:         {url}   (OpenAPI docs: {url}/docs)\n"
        f"  admin token: {token}\n"
        f"{ca_line}"
        + (f"  logs:        {logs}/manager.log, agent-<host>.log, hypervisor.log\n" if logs else "")
        + "[bold]try[/] (in another terminal; `omniwall` is in .venv/bin)\n"
        f"  export PATH={Path(sys.executable).parent}:$PATH\n"
        f"  export OMNIWALL_SERVER={url} OMNIWALL_TOKEN={token}{ca_env}\n"
        "  omniwall status\n"
        "  omniwall get workloads -t tenant-a\n"
        f"  omniwall lab matrix --name {name} --expect\n"
        f"  omniwall lab exec --name {name} tenant-a/web-1 -- nc -w1 10.1.0.2 8080\n"
        "  omniwall migrate tenant-a/app-1 --to host-2   # and back: the lab plays the hypervisor\n",
        highlight=False,
        soft_wrap=True,
    )


def _print_console(console: Console, cp: Any) -> None:
    """The web console's URL and two sign-in tokens: the admin's and a read-only auditor's."""
    auditor = cp.api("POST", "/v1/tokens", json={"role": "auditor", "name": "demo-auditor"})["token"]
    console.print(
        "[bold]web console[/] (live flows, map, policies, groups, hosts, audit; docs/console.md)\n"
        f"  open:          {cp.url}/ui/\n"
        f"  sign in with:  {cp.admin_token}   (provider admin)\n"
        f"            or:  {auditor}   (auditor: sees everything, changes nothing)\n"
        "  background traffic: one allowed and one denied probe about every second, until Ctrl-C\n",
        highlight=False,
        soft_wrap=True,
    )


class BackgroundTraffic:
    """Bounded background probes so the console has something to show: each round, one allowed and one
    denied flow of the design (between lab workloads), one round at most every `period` s, in one thread,
    until `stop()`."""

    def __init__(self, lab: Any, flows: Sequence[Flow], period: float = 1.0) -> None:
        workloads = {w.key for w in lab.plan.workloads}
        inside = [f for f in flows if f.src in workloads and f.dst in workloads]
        self.allowed = [f for f in inside if f.expect_allowed]
        self.denied = [f for f in inside if not f.expect_allowed]
        self.lab, self.period = lab, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)

    def start(self) -> None:
        if self.allowed or self.denied:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            started = time.monotonic()
            for pool in (self.allowed, self.denied):
                if pool:
                    f = pool[n % len(pool)]
                    with contextlib.suppress(Exception):  # a probe failing must not end the demo
                        self.lab.probe(f.src, f.dst, f.proto, f.port, timeout=0.5)
            n += 1
            self._stop.wait(max(0.0, self.period - (time.monotonic() - started)))


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line (`python -m omniwall.demo`, `make demo`)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m omniwall.demo", description=__doc__.split("\n")[0])
    ap.add_argument("directory", nargs="?", type=Path, default=EXAMPLE_DIR, help="resource files")
    ap.add_argument("--once", action="store_true", help="measure, print, tear down; do not wait")
    ap.add_argument("--offline", action="store_true", help="no lab: explain the flows with the sim only")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.offline:
        return main([str(args.directory)])
    if os.geteuid() != 0:
        print(
            "error: the live demo needs root (network namespaces, nftables): run `sudo make demo`, "
            "or `python -m omniwall.demo --offline` for the sim's explanation only",
            file=sys.stderr,
        )
        return 2
    # A pipe (CI, `tee`) gets the full width of the matrix; a terminal keeps its own.
    width = None if sys.stdout.isatty() else 130
    return run_live(args.directory, once=args.once, console=Console(highlight=False, width=width))


if __name__ == "__main__":
    raise SystemExit(cli())
