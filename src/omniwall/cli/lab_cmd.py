"""`omniwall lab ...`: hosts and workloads as network namespaces on this machine (docs/lab.md).

omniwall lab up -f examples/three-tier/*.yaml [--name N]
omniwall lab up --managed [--managers 3 --etcd 3] DIR   (manager(s), etcd, one agent per host)
omniwall lab matrix [--ports tcp/80,udp/81,icmp] [--json] [--expect] [--ipv6]
omniwall lab exec WORKLOAD -- CMD...        (exit code passed through)
omniwall lab migrate WORKLOAD --to HOST     (live migration: policy, conntrack, vNIC, routes)
omniwall lab status
omniwall lab down [--name N]                (idempotent; also removes half-built labs)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from omniwall.lab.matrix import MatrixEntry

lab_app = typer.Typer(
    name="lab",
    help="Hosts and workloads as network namespaces on this machine: build, probe, tear down.",
    no_args_is_help=True,
)
err = Console(stderr=True, soft_wrap=True)

# OMNIWALL_LAB names the lab when --name is absent: the docs show the plain command, and their tests
# (tests/kernel/test_docs_lab_blocks.py) run it in a lab whose name is unique per run.
NameOpt = Annotated[
    str,
    typer.Option(
        "--name", "-n", envvar="OMNIWALL_LAB", help="Lab name (state in /run/omniwall/lab/NAME.json)."
    ),
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    return typer.Exit(code)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise _fail("the lab needs root (network namespaces, veths, nftables)")


def _errors() -> tuple[type[BaseException], ...]:
    from omniwall.lab.lab import LabError
    from omniwall.lab.matrix import MatrixError
    from omniwall.lab.netns import LabNetnsError
    from omniwall.lab.plan import PlanError
    from omniwall.lab.responder import ResponderError
    from omniwall.lab.state import LabStateError
    from omniwall.model.errors import ValidationError
    from omniwall.vm.channel import ChannelError
    from omniwall.vm.image import VmImageError
    from omniwall.vm.qemu import VmError

    return (
        VmError,  # VM workloads (lab/vm.py)
        VmImageError,
        ChannelError,
        LabError,
        LabStateError,
        LabNetnsError,
        PlanError,
        MatrixError,
        ResponderError,
        ValidationError,
        KeyError,
        OSError,
        ImportError,
    )


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    return str(e) or type(e).__name__


@lab_app.command("up")
def up(
    files: Annotated[
        list[Path] | None, typer.Option("--file", "-f", help="Resource files or directories (YAML).")
    ] = None,
    more: Annotated[
        list[Path] | None, typer.Argument(help="More files (so `-f dir/*.yaml` works).", show_default=False)
    ] = None,
    name: NameOpt = "default",
    policy: Annotated[
        bool, typer.Option("--policy/--no-policy", help="Compile and program the policy (standalone).")
    ] = True,
    ipv6: Annotated[
        bool, typer.Option("--ipv6/--no-ipv6", help="IPv6 addresses too, when available.")
    ] = True,
    managed: Annotated[
        bool, typer.Option("--managed", help="Policy through a manager and one agent per host.")
    ] = False,
    managers: Annotated[
        int, typer.Option("--managers", help="With --managed: this many managers (more than 1 needs --etcd).")
    ] = 1,
    etcd: Annotated[
        int,
        typer.Option("--etcd", help="With --managed: an etcd cluster of this many members as the store."),
    ] = 0,
) -> None:
    """Build the lab: namespaces, links, addresses, routes, responders, and the policy in each host."""
    _require_root()
    from omniwall.cli.args import expand_files

    paths = [*(files or []), *(more or [])]
    if not paths:
        raise _fail("no resource files: use -f FILE...")
    try:
        paths = [Path(p) for p in expand_files(paths)]
    except ValueError as e:
        raise _fail(str(e)) from None
    from omniwall.lab.lab import Lab
    from omniwall.lab.netns import ipv6_available
    from omniwall.lab.standalone import standalone_available

    if (managers != 1 or etcd) and not managed:
        raise _fail("--managers and --etcd need --managed (a manager and agents run the policy)")
    if managed:
        from omniwall.lab.control import ManagedError, check_topology

        try:
            check_topology(managers, etcd)
        except ManagedError as e:
            raise _fail(str(e)) from None
    if policy and not managed and not standalone_available():
        err.print("warning: compiler or nftables backend not installed: the lab runs without policy")
    try:
        driver: Any = None if policy else False
        if managed:
            from omniwall.lab.managed import Managed  # manager + agents (lab/managed.py)

            driver = Managed(managers=managers, etcd=etcd)
        lab = Lab.up(paths, name=name, ipv6=ipv6 and ipv6_available(), policy=driver)
    except KeyboardInterrupt:
        raise _fail("interrupted; the partial lab was removed", 130) from None
    except _errors() as e:
        raise _fail(_message(e)) from None
    plan = lab.plan
    print(
        f"lab {lab.name!r} up: {len(plan.hosts)} hosts, {len(plan.workloads)} workloads, "
        f"{len(lab.state.responders)} responders, policy: {lab.state.policy}, prefix {lab.prefix}"
    )
    cp = getattr(driver, "control", None)
    if cp is not None:
        print_access(cp)


def print_access(cp: Any) -> None:
    """How to reach the lab's manager: the URL, the CA, where the token and the logs are (no secret on
    the terminal: the export line reads the token file)."""
    print(
        f"manager {cp.url}; logs, tokens and certificates in {cp.dir}/ (manager.log, agent-<host>.log, "
        "hypervisor.log: the lab moves the vNIC when `omniwall migrate` asks)"
    )
    if cp.managers > 1 or cp.record.etcd:
        print(f"  managers: {' '.join(cp.urls)}")
        print(f"  etcd:     {cp.store_spec}")
    print(f"  {_export_line(cp)}")


def _export_line(cp: Any) -> str:
    ca = f" OMNIWALL_CA={cp.ca_file}" if cp.ca_file else ""
    return f"export OMNIWALL_SERVER={cp.url}{ca} OMNIWALL_TOKEN=$(sudo cat {cp.admin_token_file})"


@lab_app.command("env")
def env(name: NameOpt = "default") -> None:
    """The export line of a managed lab's manager: `eval "$(sudo omniwall lab env)"` points the CLI at it."""
    from omniwall.lab import state
    from omniwall.lab.control import ControlPlane

    try:
        st = state.load(name)
    except state.LabStateError as e:
        raise _fail(str(e)) from None
    cp = ControlPlane(st.prefix)
    if not cp.exists:
        raise _fail(f"lab {name!r} is not managed (lab up --managed)")
    print(_export_line(cp))


@lab_app.command("down")
def down(
    name: NameOpt = "default",
    all_labs: Annotated[bool, typer.Option("--all", help="Every lab that has a state file.")] = False,
) -> None:
    """Tear the lab down (responders, namespaces, state). Safe to repeat."""
    _require_root()
    from omniwall.lab import state
    from omniwall.lab.lab import Lab

    names = state.names() if all_labs else [name]
    if not names:
        print("no lab is up")
    for n in names:
        try:
            deleted = Lab.down_by_name(n)
        except _errors() as e:
            raise _fail(_message(e)) from None
        print(f"lab {n!r} down: {len(deleted)} namespaces deleted" if deleted else f"lab {n!r} is not up")


@lab_app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_(
    workload: Annotated[
        str, typer.Argument(help="Workload (`name` or `tenant/name`), or a host with --host.")
    ],
    cmd: Annotated[list[str], typer.Argument(help="Command and arguments (after --).")],
    name: NameOpt = "default",
    host: Annotated[
        bool, typer.Option("--host", help="WORKLOAD names a host: run in its namespace.")
    ] = False,
) -> None:
    """Run a command inside a workload's (or host's) namespace; its exit code is passed through."""
    _require_root()
    from omniwall.lab.lab import Lab

    try:
        lab = Lab.attach(name)
        ns = lab.host_netns(workload) if host else lab.workload_netns(workload)
    except _errors() as e:
        raise _fail(_message(e)) from None
    from omniwall.lab import netns

    sys.stdout.flush()
    try:
        res = netns.run(ns, cmd, capture=False)
    except OSError as e:
        raise _fail(_message(e)) from None
    raise typer.Exit(res.returncode)


@lab_app.command("matrix")
def matrix(
    name: NameOpt = "default",
    ports: Annotated[
        str | None, typer.Option("--ports", help="Probe these on every destination: tcp/80,udp/81,icmp.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    output: Annotated[
        str, typer.Option("--output", "-o", help="table, wide, json (one object per line) or yaml.")
    ] = "table",
    expect: Annotated[
        bool, typer.Option("--expect", help="Compare with the policy's expectation; exit 1 on disagreement.")
    ] = False,
    ipv6: Annotated[bool, typer.Option("--ipv6", help="Probe IPv6 addresses instead of IPv4.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per probe.")] = 1.0,
) -> None:
    """Probe every ordered pair of workloads with real connections and print the result."""
    if output not in ("table", "wide", "json", "yaml"):
        raise _fail(f"-o {output!r}: expected one of table, wide, json, yaml", 2)
    _require_root()
    from omniwall.lab.lab import Lab

    try:
        lab = Lab.attach(name)
        if expect and lab.state.policy == "none":
            err.print("warning: this lab runs without policy; expect disagreements")
        entries = lab.matrix(ports, family=6 if ipv6 else 4, expect=expect, timeout=timeout)
    except _errors() as e:
        raise _fail(_message(e)) from None
    if not entries:
        err.print(f"nothing to probe: no pair of workloads with IPv{6 if ipv6 else 4} addresses and ports")
        return
    if as_json or output == "json":
        for e in entries:
            print(e.json_line())
    elif output == "yaml":
        import json

        import yaml

        print(yaml.safe_dump([json.loads(e.json_line()) for e in entries], sort_keys=False), end="")
    else:
        # Piped output gets the whole table; a terminal gets its own width (use --json for scripts).
        Console(width=None if sys.stdout.isatty() else 4000).print(
            _table(lab.plan.workloads, entries, expect)
        )
    if expect:
        wrong = [e for e in entries if not e.agrees]
        if wrong:
            err.print(f"{len(wrong)} of {len(entries)} probes disagree with the policy")
            raise typer.Exit(1)
        if not as_json:
            print(f"all {len(entries)} probes agree with the policy")


def _short_names(workloads: object) -> dict[str, str]:
    keys = [w.key for w in workloads]  # type: ignore[attr-defined]
    bare = [k.split("/", 1)[1] for k in keys]
    return {k: (b if bare.count(b) == 1 else k) for k, b in zip(keys, bare, strict=True)}


def _cell(e: MatrixEntry, expect: bool) -> Text:
    word = "allow" if e.allowed else "deny"
    if expect and not e.agrees:
        want = "allow" if e.expected else "deny"
        return Text(f"{word}≠{want}", style="bold black on yellow")
    return Text(word, style="green" if e.allowed else "red")


def _table(workloads: object, entries: list[MatrixEntry], expect: bool) -> Table:
    short = _short_names(workloads)
    columns: list[tuple[str, str, int | None]] = []
    for e in entries:
        col = (e.dst, e.proto, e.port)
        if col not in columns:
            columns.append(col)
    columns.sort(key=lambda c: (list(short).index(c[0]), c[1], c[2] or 0))
    title = "lab matrix" + (" (measured≠expected in yellow)" if expect else "")
    table = Table(title=title, show_lines=False)
    table.add_column("from \\ to", style="bold")
    for dst, proto, port in columns:
        table.add_column(f"{short[dst]}\n{proto}" + (f"/{port}" if port else ""), justify="center")
    cells = {(e.src, e.dst, e.proto, e.port): e for e in entries}
    for src in short:
        row: list[Text | str] = [short[src]]
        for dst, proto, port in columns:
            e = cells.get((src, dst, proto, port))
            row.append(_cell(e, expect) if e else Text("·", style="dim"))
        table.add_row(*row)
    return table


@lab_app.command("migrate")
def migrate(
    workload: Annotated[str, typer.Argument(help="Workload (`name` or `tenant/name`).")],
    to: Annotated[str, typer.Option("--to", help="Destination host.")],
    name: NameOpt = "default",
) -> None:
    """Live-migrate a workload: its policy and conntrack entries first (managed labs), then its vNIC
    and every host's routes; the workload's processes and connections stay (docs/design/migration.md)."""
    _require_root()
    from omniwall.lab.lab import Lab
    from omniwall.lab.migrate import migrate as run_migration

    try:
        lab = Lab.attach(name)
        rec = run_migration(lab, workload, to, on_phase=lambda p: print(f"  {p}", flush=True))
    except _errors() as e:
        raise _fail(_message(e)) from None
    total = rec["phases"][-1]["ms"] if rec.get("phases") else rec.get("ms")
    print(f"{workload} is on {to} ({rec['result']}, {total} ms)")


@lab_app.command("status")
def status(
    name: Annotated[str | None, typer.Option("--name", "-n", help="Show one lab in detail.")] = None,
) -> None:
    """List the labs that are up (or show one: hosts, workloads, namespaces, responders)."""
    from omniwall.lab import netns, responder, state

    if name is None:
        names = state.names()
        if not names:
            print("no lab is up")
            return
        for n in names:
            try:
                st = state.load(n)
            except state.LabStateError as e:
                print(f"{n}: {e}")
                continue
            hosts = len(st.plan.hosts) if st.plan else 0
            wls = len(st.plan.workloads) if st.plan else 0
            print(f"{n}: {st.status}, prefix {st.prefix}, {hosts} hosts, {wls} workloads, policy {st.policy}")
        return
    try:
        st = state.load(name)
    except state.LabStateError as e:
        raise _fail(str(e)) from None
    print(f"lab {st.name}: {st.status}, prefix {st.prefix}, policy {st.policy}, ipv6 {st.ipv6}")
    if st.policy == "managed":
        _control_status(st.prefix)
    if st.plan is None:
        return
    for h in st.plan.hosts:
        ok = "ok" if netns.exists(h.netns) else "MISSING"
        print(f"  host {h.name}: netns {h.netns} ({ok}), fabric {h.fabric_ip4}")
    for w in st.plan.workloads:
        ok = "ok" if netns.exists(w.netns) else "MISSING"
        pid = st.responders.get(w.key)
        resp = ""
        if pid:
            resp = f", responder pid {pid} ({'running' if responder.is_ours(pid, w.netns) else 'GONE'})"
        addrs = ", ".join(w.ips) or "no address"
        where = f"netns {w.netns} ({ok})"
        if w.kind == "vm":  # a QEMU guest (lab/vm.py)
            from omniwall.lab import vm

            where = vm.describe(w.netns)
        print(f"  workload {w.key} on {w.host}: {addrs}; {where}{resp}")


def _control_status(prefix: str) -> None:
    """The managed lab's processes: managers, etcd members, agents (running or not, by PID)."""
    from omniwall.lab.control import ControlPlane

    cp = ControlPlane(prefix)
    if not cp.exists:
        print("  control plane: not running")
        return

    def state(alive: bool) -> str:
        return "running" if alive else "STOPPED"

    for i in range(cp.managers):
        print(
            f"  manager {i + 1}: {cp.manager_url(i)} pid {cp.manager_pid(i)} ({state(cp.manager_alive(i))})"
        )
    for i, m in enumerate(cp.etcd_members):
        print(f"  etcd {m.name}: {m.client_url} pid {m.pid} ({state(cp.etcd_alive(i))})")
    for host, pid in sorted(cp.record.agents.items()):
        print(f"  agent {host}: pid {pid} ({state(cp.agent_running(host))})")


def register(app: typer.Typer) -> None:
    app.add_typer(lab_app, name="lab")
