"""Offline policy commands: `validate`, `compile` and `explain`, straight from YAML files.

`-f` takes files, directories and globs (cli/args.py `expand_files`, shared with apply, diff and lab
up); extra positional paths are read too, so a shell glob (`-f examples/*.yaml`) works. Exit codes:
0 fine (explain: allowed), 1 explain: denied, 2 bad input (every problem listed on stderr), 70 a bug.
Never a traceback.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from omniwall.cli.output import EXIT_DENIED, cli_errors, echo, emit, emit_json, fail, table_lines
from omniwall.compiler.ir import HostDesiredState, IRRule, ServiceMatch
from omniwall.model.catalog import Catalog
from omniwall.sim.explain import Explanation, explain, explanation_json, rule_text, verdict_text

FilesOpt = Annotated[
    list[Path] | None,
    typer.Option("--file", "-f", help="YAML file or directory (repeatable).", show_default=False),
]
MoreFiles = Annotated[
    list[Path] | None,
    typer.Argument(
        metavar="FILES",
        help="More YAML files or directories (e.g. the rest of a shell glob).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout (= -o json).")]
FormatOpt = Annotated[
    str,
    typer.Option(
        "--output", "-o", help="text, json or yaml.", autocompletion=lambda: ["text", "json", "yaml"]
    ),
]


def _structured(output: str, json_out: bool) -> str | None:
    """`json` or `yaml` when asked for (--json or -o), None for the text; a bad -o is a usage error."""
    if output not in ("text", "table", "json", "yaml"):
        fail(f"-o {output!r}: expected text, json or yaml")
    return "json" if json_out else output if output in ("json", "yaml") else None


KIND_ORDER = ("Tenant", "Host", "Workload", "Group", "Service", "Application", "Policy")


def load_catalog(files: list[Path] | None, more: list[Path] | None) -> Catalog:
    """Load and validate; raises ValidationError listing every problem."""
    from omniwall.cli.args import expand_files
    from omniwall.model.loader import load_files
    from omniwall.model.validate import validate

    paths = [*(files or []), *(more or [])]
    if not paths:
        fail("no input: give YAML files or directories with -f FILE")
    return validate(load_files(expand_files(paths)))


def compile_states(catalog: Catalog) -> dict[str, HostDesiredState]:
    from omniwall.compiler.build import compile_catalog

    return compile_catalog(catalog)


# -------------------------------------------------------------------------------------------- validate


def _plural(kind: str, n: int) -> str:
    if n == 1:
        return kind
    return kind[:-1] + "ies" if kind.endswith("y") else kind + "s"


def _counts(catalog: Catalog) -> Counter[str]:
    return Counter(r.kind for r in catalog)  # type: ignore[attr-defined]


def validate_cmd(
    files: FilesOpt = None, more: MoreFiles = None, json_out: JsonOpt = False, output: FormatOpt = "text"
) -> None:
    """Check YAML resources (schema, references, tenancy); print what they contain."""
    with cli_errors():
        fmt = _structured(output, json_out)
        catalog = load_catalog(files, more)
        counts = _counts(catalog)
        if fmt:
            emit({"valid": True, "counts": {k: counts.get(k, 0) for k in KIND_ORDER}}, fmt)
            return
        parts = [f"{counts[k]} {_plural(k, counts[k])}" for k in KIND_ORDER if counts.get(k)]
        rules = sum(len(p.spec.rules) for p in catalog.policies.values())
        echo(f"valid: {', '.join(parts) or 'no resources'} ({rules} rules)")


# --------------------------------------------------------------------------------------------- compile


def service_text(s: ServiceMatch) -> str:
    if s.protocol in ("tcp", "udp"):
        if not s.ports:
            return s.protocol
        ports = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in s.ports)
        return f"{s.protocol}/{ports}"
    if s.protocol in ("icmp", "icmpv6") and s.icmp_type is not None:
        code = f"/{s.icmp_code}" if s.icmp_code is not None else ""
        return f"{s.protocol}/{s.icmp_type}{code}"
    return s.protocol


def rule_line(r: IRRule) -> str:
    services = ",".join(service_text(s) for s in r.services) or "any"
    flags = [f for f, on in (("stateless", not r.stateful), ("log", r.log), ("monitor", r.monitor)) if on]
    extra = f"  [{' '.join(flags)}]" if flags else ""
    return (
        f"{r.action:<6} {r.label} (id {r.id})  from {r.src_set or 'any'} to {r.dst_set or 'any'}"
        f"  service {services}{extra}"
    )


def print_state(state: HostDesiredState) -> None:
    echo(
        f"host {state.host} (revision {state.revision}): {len(state.vnics)} vNICs, "
        f"{len(state.rules)} rules, {len(state.sets)} sets"
    )
    rules = state.rule_map()
    for v in state.vnics:
        default = f"{v.default_action}{' (monitor)' if v.default_monitor else ''}"
        echo(f"  vNIC {v.ifname}  {v.workload}  {', '.join(v.addresses) or '-'}  default {default}")
        for direction, ids in (("egress", v.egress), ("ingress", v.ingress)):
            echo(f"    {direction}:{'' if ids else ' (no rules: default)'}")
            category = None
            for n, rid in enumerate(ids, 1):
                r = rules[rid]
                if r.category != category:
                    category = r.category
                    echo(f"      {category}")
                echo(f"        {n:>2}. {rule_line(r)}")
    if state.sets:
        echo("  sets:")
        for s in state.sets:
            members = [*s.addresses, *s.cidrs]
            shown = ", ".join(members[:8]) + (f", ... ({len(members)} in all)" if len(members) > 8 else "")
            echo(f"    {s.name}: {shown or '(empty)'}")


def compile_cmd(
    files: FilesOpt = None,
    more: MoreFiles = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Host to show (default: every host).", show_default=False)
    ] = None,
    json_out: JsonOpt = False,
    output: FormatOpt = "text",
) -> None:
    """Compile resources into per-host desired state (vNICs, ordered rules, address sets)."""
    with cli_errors():
        fmt = _structured(output, json_out)
        states = compile_states(load_catalog(files, more))
        if host is not None:
            if host not in states:
                known = ", ".join(sorted(states)) or "none"
                fail(f"unknown host {host!r} (hosts: {known})")
            selected = {host: states[host]}
        else:
            selected = dict(sorted(states.items()))
        if fmt:
            emit(
                selected[host].to_json()
                if host is not None
                else {h: s.to_json() for h, s in selected.items()},
                fmt,
            )
            return
        for i, state in enumerate(selected.values()):
            if i:
                echo()
            print_state(state)


# --------------------------------------------------------------------------------------------- explain


def print_explanation(e: Explanation) -> None:
    c = e.connection
    echo(f"{e.src} -> {e.dst} {e.service}: {'ALLOWED' if c.allowed else 'DENIED'}")
    sections = [("request", c.request)]
    if c.reply is not None:
        sections.append(("reply", c.reply))
    if c.ack is not None and not all(h.established for h in c.ack.hops):
        sections.append(("ack", c.ack))  # only worth a line when conntrack does not just pass it
    rows = [
        [
            h.host,
            h.ifname,
            h.workload,
            h.direction,
            verdict_text(h),
            rule_text(h) + ("" if h.tracked else "  [untracked]"),
        ]
        for _, pv in sections
        for h in pv.hops
    ]
    it = iter(table_lines(rows))  # the hops of every section aligned together (rich, cli/output.py)
    for name, pv in sections:
        echo(f"  {name}: {pv.packet.describe()}")
        if not pv.hops:
            echo("    no vNIC on the path: not judged by omniwall")
        for _ in pv.hops:
            echo("    " + next(it))
    if c.reply is None and c.request.allowed and not c.expects_reply:
        echo("  reply: none expected")


def explain_cmd(
    files: FilesOpt = None,
    more: MoreFiles = None,
    src: Annotated[
        str, typer.Option("--from", help="Source workload (name or tenant/name) or IP.", show_default=False)
    ] = "",
    dst: Annotated[
        str,
        typer.Option("--to", help="Destination workload (name or tenant/name) or IP.", show_default=False),
    ] = "",
    proto: Annotated[str, typer.Option("--proto", help="tcp, udp, icmp or icmpv6.")] = "tcp",
    port: Annotated[
        int | None, typer.Option("--port", help="Destination port (tcp/udp).", show_default=False)
    ] = None,
    json_out: JsonOpt = False,
    output: FormatOpt = "text",
    server: Annotated[
        str | None,
        typer.Option("--server", help="Without -f: ask this manager (OMNIWALL_SERVER).", show_default=False),
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="Bearer token (env OMNIWALL_TOKEN).", show_default=False)
    ] = None,
) -> None:
    """Would this connection be allowed? Each hop (host, vNIC, direction), its verdict and deciding rule.
    From YAML files (-f), or without -f from the manager's live state. Exit 0 when allowed, 1 when denied."""
    with cli_errors():
        fmt = _structured(output, json_out)
        if fmt == "yaml":
            fail("explain: -o text or json")
        json_out = fmt == "json"
        if not src or not dst:
            fail("explain needs --from WORKLOAD and --to WORKLOAD|IP")
        if not files and not more:  # server mode: GET /v1/explain (cli/insight_cmds.py)
            from omniwall.cli.insight_cmds import explain_remote

            explain_remote(src, dst, proto, port, json_out=json_out, server=server, token=token)
            return
        catalog = load_catalog(files, more)
        result = explain(catalog, compile_states(catalog), src, dst, proto, port)
        if json_out:
            emit_json(explanation_json(result))
        else:
            print_explanation(result)
    if not result.allowed:
        raise typer.Exit(EXIT_DENIED)


def register(app: typer.Typer) -> None:
    app.command("validate")(validate_cmd)
    app.command("compile")(compile_cmd)
    app.command("explain")(explain_cmd)
