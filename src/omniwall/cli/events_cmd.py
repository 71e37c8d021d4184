"""Identity events and posture reports from the command line (docs/identity-posture.md):

    omniwall identity login corp/vdi-7 --user alice        POST /v1/identity/events
    omniwall identity logout corp/vdi-7 --user alice
    omniwall posture report corp/vdi-7 av.status=infected av.engine=clamav [av.engine=null]

Posture values are parsed as JSON when they can be (`true`, `3`, `null` removes), else taken as
strings. The reply (workload, changed, revision, attributes) is printed as a line, or `-o json|yaml`.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from omniwall.cli.connect import connect
from omniwall.cli.output import OutputOpt, check_format, emit
from omniwall.cli.server_cmds import ServerOpt, TenantOpt, TokenOpt, _fail

identity_app = typer.Typer(
    help="Identity events: a user logs in to or out of a workload.", no_args_is_help=True
)
posture_app = typer.Typer(help="Posture reports: a scanner's facts about a workload.", no_args_is_help=True)


def _show(out: dict[str, Any], output: str) -> None:
    if output in ("json", "yaml"):
        emit(out, output)
        return
    attrs = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(out.get("attributes", {}).items()))
    change = "changed" if out.get("changed") else "unchanged"
    typer.echo(f"{out['workload']} {change} at revision {out['revision']}: {attrs or '(no attributes)'}")


def _identity(
    action: str,
    workload: str,
    user: str,
    tenant: str | None,
    output: str,
    server: str | None,
    token: str | None,
) -> None:
    check_format(output)
    _show(connect(server, token).identity_event(workload, user, action, tenant=tenant), output)


@identity_app.command("login")
def login_cmd(
    workload: str = typer.Argument(..., help="TENANT/NAME, or NAME (+ --tenant)"),
    user: str = typer.Option(..., "--user", "-u", help="the user who logged in"),
    tenant: str | None = TenantOpt,
    output: str = OutputOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """A user logged in to a workload: adds them to its `user` attribute (role identity-source)."""
    _identity("login", workload, user, tenant, output, server, token)


@identity_app.command("logout")
def logout_cmd(
    workload: str = typer.Argument(..., help="TENANT/NAME, or NAME (+ --tenant)"),
    user: str = typer.Option(..., "--user", "-u", help="the user who logged out"),
    tenant: str | None = TenantOpt,
    output: str = OutputOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """A user logged out: removes them from the workload's `user` attribute."""
    _identity("logout", workload, user, tenant, output, server, token)


def parse_facts(facts: list[str]) -> dict[str, Any]:
    """`key=value` pairs; a value that is JSON (`true`, `3`, `null`, `"x"`) is taken as such."""
    out: dict[str, Any] = {}
    for f in facts:
        key, eq, raw = f.partition("=")
        if not eq or not key:
            raise ValueError(f"{f!r}: expected KEY=VALUE, e.g. av.status=infected")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


@posture_app.command("report")
def report_cmd(
    workload: str = typer.Argument(..., help="TENANT/NAME, or NAME (+ --tenant)"),
    facts: list[str] = typer.Argument(..., help="KEY=VALUE, e.g. av.status=infected (null removes)"),
    tenant: str | None = TenantOpt,
    output: str = OutputOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Report posture facts about a workload (role posture-source): `av.*`, `edr.*`, `fw.*`, ..."""
    check_format(output)
    try:
        parsed = parse_facts(facts)
    except ValueError as e:
        _fail(str(e))
    _show(connect(server, token).posture_report(workload, parsed, tenant=tenant), output)


def register(app: typer.Typer) -> None:
    app.add_typer(identity_app, name="identity")
    app.add_typer(posture_app, name="posture")


__all__ = ["parse_facts", "register"]
