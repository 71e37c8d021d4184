"""`omniwall audit`: the audit log newest first (`--limit`, `--until` for older pages), or oldest first
with the server's own pages (`--oldest-first`, `--continue`); filters; `-o table|wide|json|yaml`;
`--follow` streams new entries (`GET /v1/audit/watch`, Server-Sent Events); `audit verify` checks the
hash chain. A migration's entries each name their phase, source and destination.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import typer

from omniwall.cli.connect import CliClient, connect
from omniwall.cli.output import Column, OutputOpt, check_format, col, emit, err, render
from omniwall.cli.server_cmds import ServerOpt, TenantOpt, TokenOpt, _fail, _params

PAGE = 1000  # the API's largest page


def detail(e: dict[str, Any]) -> str:
    """What the entry changed: the fields, or a migration's phase `switching host-1 -> host-3`."""
    x = e.get("extra") or {}
    if e.get("action") == "migrate" and x.get("phase"):
        text = f"{x['phase']} {x.get('from', '?')} -> {x.get('to', '?')}"
        if x.get("result") not in (None, "running"):
            text += f" ({x['result']})"
        if x.get("error"):
            text += f": {x['error']}"
        return text
    if e.get("changed"):
        return ", ".join(e["changed"])
    return "-"


COLUMNS = [
    col("TIME", "time"),
    Column("REVISION", lambda e: f"r{e.get('revision')}"),
    col("ACTOR", "actor"),
    col("ROLE", "role", wide=True),
    col("ACTION", "action"),
    Column("OBJECT", lambda e: f"{e['kind']}/{e['tenant']}/{e['name']}"),
    Column("DETAIL", detail),
    col("REQUEST", "request", wide=True),
]


def _line(e: dict[str, Any]) -> str:
    """One entry for `--follow` (a table cannot be printed before it ends)."""
    return (
        f"{e['time']}  r{e.get('revision', '?'):<6} {e['actor']:16} {e['action']:8} "
        f"{e['kind']}/{e['tenant']}/{e['name']}  {detail(e)}"
    )


def _newest(api: CliClient, params: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """The last `limit` matching entries, newest first (the API pages oldest first: keep the tail)."""
    tail: deque[dict[str, Any]] = deque(maxlen=limit)
    cont = None
    while True:
        page = api.audit(**params, limit=PAGE, cont=cont)
        tail.extend(page["items"])
        cont = page.get("continue")
        if not cont:
            return list(reversed(tail))


def _kind(word: str) -> str:
    from omniwall.manager.objects import kind_of

    w = word.lower()
    if w in ("token", "tokens"):
        return "Token"
    if w in ("authentication", "auth"):
        return "Authentication"
    try:
        return kind_of(word)
    except ValueError as e:
        _fail(str(e))


def register(app: typer.Typer) -> None:
    audit_app = typer.Typer(
        help="The audit log: list entries (default: newest first), or `verify` its hash chain.",
        invoke_without_command=True,
    )
    app.add_typer(audit_app, name="audit")

    @audit_app.command("verify")
    def audit_verify_cmd(
        db: str | None = typer.Option(None, "--db", help="check this store file instead of asking the API"),
        output: str = typer.Option("table", "--output", "-o", help="table (one line), json or yaml"),
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
    ) -> None:
        """Check the audit log's hash chain; exit 1 naming the first edited, deleted or inserted entry."""
        check_format(output, ("table", "json", "yaml"))
        if db:
            from omniwall.manager.audit import verify
            from omniwall.store import open_store

            out = verify(open_store(db)).to_json()
        else:
            out = connect(server, token).audit_verify()
        if output != "table":
            emit(out, output)
            raise typer.Exit(0 if out["ok"] else 1)
        if out["ok"]:
            extra = f" ({out['unchained']} older entries carry no chain)" if out.get("unchained") else ""
            typer.echo(f"audit log intact: {out['entries']} chained entries{extra}")
            return
        b = out["firstBroken"] or {}
        where = " ".join(x for x in (f"#{b['seq']}" if b.get("seq") else "", b.get("key") or "") if x)
        _fail(f"audit log broken at entry {where or '?'}: {b.get('reason', '')}")

    @audit_app.callback()
    def audit_cmd(
        ctx: typer.Context,
        tenant: str | None = TenantOpt,
        actor: str | None = typer.Option(None, "--actor", help="token name or id"),
        kind: str | None = typer.Option(None, "--kind", help="Workload, Policy, Token, Authentication, ..."),
        name: str | None = typer.Option(None, "--name", help="object name (or TENANT/NAME)"),
        action: str | None = typer.Option(None, "--action", help="create, update, delete, migrate, ..."),
        since: str | None = typer.Option(None, "--since", help="ISO 8601 time, inclusive"),
        until: str | None = typer.Option(None, "--until", help="ISO 8601 time, exclusive (older pages)"),
        limit: int = typer.Option(50, "--limit", min=1, help="entries to show"),
        oldest_first: bool = typer.Option(
            False, "--oldest-first", help="oldest first, in the server's pages (with --continue)"
        ),
        cont: str | None = typer.Option(None, "--continue", help="--oldest-first: the next page's token"),
        follow: bool = typer.Option(False, "--follow", "-w", help="then stream new entries until Ctrl-C"),
        output: str = OutputOpt,
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
    ) -> None:
        """Who changed what, when, at which revision: newest first. `--follow` keeps streaming."""
        if ctx.invoked_subcommand is not None:
            return
        check_format(output)
        if name and "/" in name:
            from omniwall.cli.args import split_ref

            try:
                tenant, name = split_ref(name, tenant)
            except ValueError as e:
                _fail(str(e))
        params = _params(tenant, actor=actor, kind=kind, name=name, since=since, until=until)
        api = connect(server, token)
        more = None
        if follow:
            # What happened before, oldest first so the stream continues below it; then live entries.
            items = list(reversed(_newest(api, params, limit)))
        elif oldest_first:
            page = api.audit(**params, limit=min(limit, PAGE), cont=cont)
            items, more = page["items"], page.get("continue")
        else:
            items = _newest(api, params, limit)
        if action:
            items = [e for e in items if e.get("action") == action]
        if follow:
            for e in items:
                print(json.dumps(e, sort_keys=True) if output in ("json", "yaml") else _line(e), flush=True)
            if items:
                params["since"] = items[-1]["time"]  # replay from the last one shown ...
            seen = {(e["time"], e.get("request"), e["name"], e["action"]) for e in items}
            _follow_after(api, {**params, "action": action}, output, seen)
            return
        render(items, COLUMNS, output, document={"items": items, "continue": more} if oldest_first else None)
        if more and output in ("table", "wide"):
            err.print(f"# more: omniwall audit --oldest-first --continue {more}", markup=False)
        elif not oldest_first and len(items) == limit and output in ("table", "wide"):
            err.print(f"# older: omniwall audit --until {items[-1]['time']}", markup=False)


def _follow_after(api: CliClient, params: dict[str, Any], fmt: str, seen: set[tuple[Any, ...]]) -> None:
    """... without printing again the entries of that same millisecond already shown."""
    q = {k: v for k, v in params.items() if k in ("tenant", "kind", "since")}
    if q.get("kind"):  # the stream matches the kind as written (`Workload`); GET /v1/audit normalises
        q["kind"] = _kind(q["kind"])
    try:
        for e in api.watch_audit(**q):
            if (e["time"], e.get("request"), e["name"], e["action"]) in seen:
                continue
            if params.get("actor") and params["actor"] not in (e.get("actor"), e.get("actorId")):
                continue
            if params.get("name") and params["name"] != e.get("name"):
                continue
            if params.get("action") and params["action"] != e.get("action"):
                continue
            print(json.dumps(e, sort_keys=True) if fmt in ("json", "yaml") else _line(e), flush=True)
    except KeyboardInterrupt:
        return


__all__ = ["COLUMNS", "detail", "register"]
