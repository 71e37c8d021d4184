"""Live-manager views: `omniwall members GROUP`, `omniwall realization POLICY`, and `omniwall explain`
without `-f` (server mode: `GET /v1/explain`, printed exactly like the offline explain).

Server and token come from `--server`/`--token`, `OMNIWALL_SERVER`/`OMNIWALL_TOKEN`, or the config file,
as for every client command (cli/connect.py). Exit codes of `explain`: 0 allowed, 1 denied,
2 anything else (bad input, unknown workload, no token, manager unreachable): never 1 for an error, so a
script can tell "denied" from "could not ask".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import typer

from omniwall.cli.connect import CliClient, connect
from omniwall.cli.output import (
    EXIT_DENIED,
    EXIT_USAGE,
    OutputOpt,
    echo,
    emit,
    emit_json,
    fail,
    print_table,
    table_lines,
)
from omniwall.cli.server_cmds import ServerOpt, TenantOpt, TokenOpt, _ref

# ------------------------------------------------------------------------------------------ explain


def _verdict_text(h: dict[str, Any]) -> str:
    text = str(h["verdict"])
    if h.get("monitored"):
        text = f"allow (monitor: would {h.get('would')})"
    if not h.get("reached", True):
        text += " (not reached)"
    return text


def print_explanation_json(d: dict[str, Any]) -> None:
    """The lines `policy_cmds.print_explanation` prints, from the API's JSON (host '-' when hidden)."""
    echo(f"{d['from']} -> {d['to']} {d['service']}: {'ALLOWED' if d['allowed'] else 'DENIED'}")
    sections = [("request", d["request"])]
    if d.get("reply") is not None:
        sections.append(("reply", d["reply"]))
    ack = d.get("ack")
    if ack is not None and not all(h.get("established") for h in ack["hops"]):
        sections.append(("ack", ack))
    rows = [
        [
            h.get("host") or "-",
            h.get("ifname") or "-",
            h.get("workload") or "-",
            str(h["direction"]),
            _verdict_text(h),
            str(h.get("decision") or "") + ("" if h.get("tracked", True) else "  [untracked]"),
        ]
        for _, pv in sections
        for h in pv["hops"]
    ]
    it = iter(table_lines(rows))  # the hops of every section aligned together (rich, cli/output.py)
    for name, pv in sections:
        echo(f"  {name}: {pv.get('description', '')}")
        if not pv["hops"]:
            echo("    no vNIC on the path: not judged by omniwall")
        for _ in pv["hops"]:
            echo("    " + next(it))
    if d.get("reply") is None and d["request"]["allowed"] and not d.get("expectsReply", True):
        echo("  reply: none expected")


def _client(server: str | None, token: str | None) -> CliClient:
    """explain's client: any failure (no token, bad config, an HTTP error) exits 2, never 1 (denied)."""
    return connect(server, token, exit_code=EXIT_USAGE)


def explain_remote(
    src: str,
    dst: str,
    proto: str,
    port: int | None,
    *,
    json_out: bool = False,
    server: str | None = None,
    token: str | None = None,
) -> None:
    """`omniwall explain` in server mode; raises typer.Exit(1) when the connection is denied."""
    api = _client(server, token)
    d = api.explain(src, dst, proto, port)
    if json_out:
        emit_json({k: v for k, v in d.items() if k not in ("expectsReply", "revision")} | _strip(d))
    else:
        print_explanation_json(d)
    if not d["allowed"]:
        raise typer.Exit(EXIT_DENIED)


def _strip(d: dict[str, Any]) -> dict[str, Any]:
    """The offline JSON shape: no per-path `description` (the API adds it for printing)."""
    out = {}
    for section in ("request", "reply", "ack"):
        pv = d.get(section)
        out[section] = None if pv is None else {k: v for k, v in pv.items() if k != "description"}
    return out


# ------------------------------------------------------------------------------ members, realization


def _members_text(d: dict[str, Any]) -> None:
    echo(f"group {d['tenant']}/{d['group']} (revision {d['revision']}): {len(d['workloads'])} workload(s)")
    rows = [
        (w["workload"], w.get("host") or "-", ", ".join(w["addresses"]) or "-", ", ".join(w["via"]))
        for w in d["workloads"]
    ]
    print_table(rows, ("WORKLOAD", "HOST", "ADDRESSES", "VIA"))
    if d.get("cidrs"):
        echo(f"  cidrs: {', '.join(d['cidrs'])}")
    echo(f"  addresses: {', '.join(d['addresses']) or '(none)'}")
    if d.get("hiddenWorkloads"):
        echo(f"  ({d['hiddenWorkloads']} workload(s) of other tenants not shown)")


def _realization_text(d: dict[str, Any]) -> None:
    state = "realized everywhere" if d["realized"] else "NOT realized everywhere"
    echo(f"policy {d['tenant']}/{d['policy']} ({d['category']}, priority {d['priority']}): {state}")
    for r in d["rules"]:
        rid = f"id {r['ruleId']}" if r["ruleId"] is not None else "no id"
        where = "not installed" + (" (disabled)" if r["disabled"] else "") if not r["installed"] else ""
        hits = f"{r['packets']} packets, {r['bytes']} bytes"
        echo(f"  rule {r['rule']} ({rid}, {r['action']}): {hits}  {where}".rstrip())
        for h in r["hosts"]:
            ok = "realized" if h["realized"] else f"PENDING (realized {h['realizedRevision']})"
            vnics = ", ".join(
                f"{v['workload']} {v['ifname']} {'+'.join(v['directions'])}" for v in h["vnics"]
            )
            echo(f"    {h.get('host') or '-'}  r{h['desiredRevision']} {ok}  {h['packets']} pkts  {vnics}")


def _show(
    server: str | None,
    token: str | None,
    view: Callable[[CliClient], dict[str, Any]],
    output: str,
    as_text: Callable[[dict[str, Any]], None],
) -> None:
    """GET one view of a tenant's object and print it as JSON or as text (`-o table`); the output
    format is checked before the manager is contacted."""
    if output not in ("table", "wide", "json", "yaml"):
        fail(f"-o {output!r}: expected one of table, wide, json, yaml")
    d = view(connect(server, token))
    if output == "json":
        typer.echo(json.dumps(d, indent=2))
    elif output == "yaml":
        emit(d, "yaml")
    else:
        as_text(d)


def register(app: typer.Typer) -> None:
    @app.command("members")
    def members_cmd(
        group: str = typer.Argument(..., help="NAME or TENANT/NAME of the group"),
        tenant: str | None = TenantOpt,
        output: str = OutputOpt,
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
    ) -> None:
        """A group's effective members right now: workloads (and why), addresses, CIDRs."""
        tenant, group = _ref(group, tenant)
        _show(server, token, lambda api: api.members(group, tenant=tenant), output, _members_text)

    @app.command("realization")
    def realization_cmd(
        policy: str = typer.Argument(..., help="NAME or TENANT/NAME of the policy"),
        tenant: str | None = TenantOpt,
        output: str = OutputOpt,
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
    ) -> None:
        """Where each rule of a policy is installed, whether every host realized it, and its hits."""
        tenant, policy = _ref(policy, tenant)
        _show(server, token, lambda api: api.realization(policy, tenant=tenant), output, _realization_text)


__all__ = ["explain_remote", "print_explanation_json", "register"]
