"""`omniwall flows`: flow records from the manager, in the spirit of `hubble observe`.

    omniwall flows                          the last 20 records, oldest first, as a table
    omniwall flows --verdict denied --since 5m --workload acme/web1
    omniwall flows --follow                 live (GET /v1/flows/watch, Server-Sent Events)
    omniwall flows -o json                  JSON (a list; one object per line with --follow)

A thin client over GET /v1/flows and /v1/flows/watch (api/flows.py); the manager scopes what a token
sees. Server and token as for every client command (`--server`/`--token`, OMNIWALL_SERVER/_TOKEN, config).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any

import typer
from rich.markup import escape

from omniwall.cli.connect import CliClient, connect
from omniwall.cli.output import EXIT_USAGE, cli_errors, echo, emit_json, err, fail, out, print_rich, table
from omniwall.cli.server_cmds import ServerOpt, TokenOpt
from omniwall.client.sse import sse_events

VERDICT_STYLE = {"allowed": "green", "denied": "red", "rejected": "red", "would-deny": "yellow"}
COLUMNS = ("TIME", "VERDICT", "SOURCE", "DESTINATION", "SERVICE", "RULE", "HOP", "COUNT")


def _time(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S.%f")[:-3]


def _end(addr: str, workload: str | None, port: int = 0) -> str:
    where = f"{addr}:{port}" if port else addr
    return f"{workload} ({where})" if workload else where


def _rule(f: dict[str, Any]) -> str:
    if f["category"] == "default":
        return f"{f['rule_tenant']} default: {f['rule']}"
    if f["policy"] == "(other tenant)":
        return "(other tenant)"
    return f"{f['rule_tenant']}/{f['policy']}/{f['rule']} #{f['rule_id']}"


def _service(f: dict[str, Any]) -> str:
    return f"{f['proto']}/{f['dport']}" if f["dport"] or f["proto"] in ("tcp", "udp") else f["proto"]


def cells(f: dict[str, Any]) -> list[str]:
    """One record as table cells (also the --follow line)."""
    hop = f["hop"] + (f" @{f['host']}" if f.get("host") else "")
    return [
        _time(f["end"]),
        f["verdict"],
        _end(f["src"], f.get("src_workload"), f.get("sport") or 0),
        _end(f["dst"], f.get("dst_workload")),
        _service(f),
        _rule(f),
        hop,
        str(f["count"]),
    ]


def _follow(api: CliClient, params: dict[str, Any], json_out: bool) -> None:
    drops: dict[str, int] = {}
    for kind, data in api.watch_flows(**params):
        if kind == "flow":
            if json_out:
                print(json.dumps(data, sort_keys=True), flush=True)
            else:
                c = cells(data)
                out.print(
                    "  ".join(c), markup=False, style=VERDICT_STYLE.get(data["verdict"]), highlight=False
                )
                sys.stdout.flush()  # a pipe (| grep) sees each record as it comes
        elif kind == "stats":
            lost = {
                **data.get("dropped", {}),
                **{f"agent {k}": v for k, v in data["agentDropped"].items()},
            }
            lost["watch"] = data.get("watchDropped", 0)
            if {k: v for k, v in lost.items() if v} != drops:
                drops = {k: v for k, v in lost.items() if v}
                if drops:
                    err.print(
                        "records lost so far: " + ", ".join(f"{k} {v}" for k, v in sorted(drops.items())),
                        markup=False,
                        style="yellow",
                    )


def register(app: typer.Typer) -> None:
    @app.command("flows")
    def flows_cmd(
        follow: bool = typer.Option(False, "--follow", "-f", help="keep printing records as they arrive"),
        verdict: str | None = typer.Option(None, "--verdict", help="allowed, denied, rejected or would-deny"),
        workload: str | None = typer.Option(None, "--workload", help="TENANT/NAME: either end"),
        group: str | None = typer.Option(None, "--group", help="TENANT/NAME: either end is a member"),
        policy: str | None = typer.Option(None, "--policy", help="TENANT/NAME of the deciding policy"),
        rule: str | None = typer.Option(None, "--rule", help="rule id, or TENANT/POLICY/RULE"),
        tenant: str | None = typer.Option(None, "--tenant", help="records touching this tenant"),
        host: str | None = typer.Option(None, "--host", help="the reporting host"),
        proto: str | None = typer.Option(None, "--proto"),
        port: int | None = typer.Option(None, "--port", help="destination port"),
        since: str | None = typer.Option(None, "--since", help="RFC 3339 or relative: 5m, 1h"),
        until: str | None = typer.Option(None, "--until"),
        limit: int | None = typer.Option(
            None, "--limit", "-n", min=1, help="records to show (default 20; with --follow: stop after N)"
        ),
        output: str = typer.Option("table", "--output", "-o", help="table or json"),
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
    ) -> None:
        """Flow records: which rule allowed or denied what, newest last (like `hubble observe`)."""
        with cli_errors():
            if output not in ("table", "json"):
                fail(f"--output {output!r}: expected table or json", EXIT_USAGE)
            params: dict[str, Any] = {
                "verdict": verdict,
                "workload": workload,
                "group": group,
                "policy": policy,
                "rule": rule,
                "tenant": tenant,
                "host": host,
                "proto": proto,
                "port": port,
                "since": since,
                "until": until,
            }
            params = {k: v for k, v in params.items() if v is not None}
            api = connect(server, token)
            if follow:
                if limit is not None:
                    params["limit"] = limit
                _follow(api, params, output == "json")
                return
            page = api.flows(**params, limit=limit or 20)
            items = list(reversed(page["items"]))  # oldest first, the newest at the bottom
            if output == "json":
                emit_json(items)
                return
            if not items:
                echo("no flow records match")
                return
            t = table(*COLUMNS)
            for f in items:
                t.add_row(*(escape(c) for c in cells(f)), style=VERDICT_STYLE.get(f["verdict"]))
            print_rich(t)


__all__ = ["cells", "register", "sse_events"]
