"""Manager-side commands: `manager`, `token`, and the API client commands (`apply`, `diff`, `get`,
`delete`, `history`, `rollback`, `migrate`, `status`; `audit` is in cli/audit_cmd.py).

Client commands find the manager and token from `--server`/`--token`, else `OMNIWALL_SERVER`/
`OMNIWALL_TOKEN`, else the current context of `~/.config/omniwall/config.yaml` or `$OMNIWALL_CONFIG`
(`server:`, `token:` or `token_file:`, `ca:`, `cert:`, `key:`; contexts: cli/config_cmd.py; env
`OMNIWALL_CA`, `OMNIWALL_CERT`, `OMNIWALL_KEY`, `OMNIWALL_CONTEXT`).
Every call goes through omniwall.client (cli/connect.py): an HTTP error prints the server's message (and
each validation error) to stderr and exits 1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
import yaml

from omniwall.cli.args import expand_files, split_ref
from omniwall.cli.connect import connect
from omniwall.cli.output import Column, OutputOpt, check_format, col, emit, render
from omniwall.client import ClientError, kind_of
from omniwall.daemon_config import config_option_callback
from omniwall.manager.audit import Actor
from omniwall.manager.tokens import Role

# The actor audited for token changes made on the store file directly.
LOCAL = Actor("local", f"{os.environ.get('USER', 'unknown')}@cli --db", "local")

ServerOpt = typer.Option(None, "--server", help="manager URL (env OMNIWALL_SERVER)")
TokenOpt = typer.Option(None, "--token", help="bearer token (env OMNIWALL_TOKEN)")
TenantOpt = typer.Option(None, "--tenant", "-t", help="tenant of the object (default: the token's tenant)")


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


# --------------------------------------------------------------------------------------------- client


def _kind(kind: str) -> str:
    """Check the kind before anything is sent (ClientError's message otherwise)."""
    try:
        return kind_of(kind)
    except ClientError as err:
        _fail(str(err))


def _read_files(files: list[str]) -> str:
    parts = []
    try:
        files = expand_files(files)
    except ValueError as err:
        _fail(str(err))
    for f in files:
        try:
            parts.append(sys.stdin.read() if f == "-" else Path(f).read_text())
        except OSError as err:
            _fail(f"{f}: {err.strerror or err}")
    return "\n---\n".join(p for p in parts if p.strip())


def _params(tenant: str | None, **more: Any) -> dict[str, Any]:
    out = {k: v for k, v in more.items() if v is not None}
    if tenant:
        out["tenant"] = tenant
    return out


def _ref(ref: str, tenant: str | None) -> tuple[str | None, str]:
    """`tenant/name` or `name` + `--tenant` (cli/args.py), a clear error otherwise."""
    try:
        return split_ref(ref, tenant)
    except ValueError as err:
        _fail(str(err))


def _yaml_source(files: list[str]) -> tuple[str, str]:
    """The text of every file (`-f`), and the `X-Omniwall-Source` the audit log records."""
    return _read_files(files), ",".join(files)


def _labels(d: dict[str, Any]) -> str:
    labels = (d.get("metadata") or {}).get("labels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


OBJECT_COLUMNS = [
    col("KIND", "kind"),
    col("TENANT", "metadata.tenant"),
    col("NAME", "metadata.name"),
    col("REVISION", "metadata.revision"),
    col("UPDATED", "metadata.updated"),
    col("HOST", "spec.host", wide=True),
    Column("LABELS", _labels, wide=True),
]


def has_changes(result: dict[str, Any]) -> bool:
    return any(c.get("action") != "unchanged" for c in result.get("changes", []))


def _print_diff(result: dict[str, Any]) -> None:
    for c in result.get("changes", []):
        typer.echo(f"{c['action']:9} {c['kind']}/{c['tenant']}/{c['name']}")
        if c.get("diff"):
            typer.echo(c["diff"].rstrip("\n"))
    impact = result.get("impact")
    if impact:
        if impact.get("error"):
            typer.echo(f"impact: not computed ({impact['error']})")
        t = {"hosts": 0, **impact.get("totals", {})}
        typer.echo(
            f"impact: {t['hosts']} host(s), {t.get('vnics', 0)} vNIC(s); "
            f"rules +{t.get('rulesAdded', 0)} ~{t.get('rulesChanged', 0)} -{t.get('rulesRemoved', 0)}; "
            f"set elements +{t.get('setElementsAdded', 0)} -{t.get('setElementsRemoved', 0)}"
        )
        for h in impact.get("hosts", []):
            # `tenant/name (ifname)` per vNIC when the manager names them, else the interface names
            named = h.get("workloads") or h["vnics"]
            typer.echo(f"  {h['host']}: {', '.join(named) or '-'}")


def _book(db: str) -> Any:
    """The token book of a store file, its audit entries chained like the manager's."""
    from omniwall.manager.audit import chained
    from omniwall.manager.tokens import TokenBook
    from omniwall.store import open_store

    return TokenBook(chained(open_store(db)))


def _check_scope_exists(db: str, tenant: str | None, host: str | None) -> None:
    """`token create --db`: the tenant and host must exist, as through the API (POST /v1/tokens)."""
    from omniwall.manager.objects import KIND_PLURAL, RES_PREFIX, key_of
    from omniwall.manager.tokens import TokenError
    from omniwall.store import open_store

    store = open_store(db)
    if host and store.get(key_of("Host", "", host)) is None:
        raise TokenError(f"host {host!r} does not exist", "host")
    if tenant and store.get(key_of("Tenant", "", tenant)) is None:
        owned = (store.range(f"{RES_PREFIX}{k}/{tenant}/", limit=1)[0] for k in KIND_PLURAL)
        if not any(owned):
            raise TokenError(f"tenant {tenant!r} does not exist", "tenant")


# ------------------------------------------------------------------------------------------- commands


def _conntrack_cell(ct: dict[str, Any] | None) -> str:
    """`37%`, `83% WARN`, `96% CRIT` (share of the host's conntrack table in use), `-` when unknown."""
    if not ct:
        return "-"
    mark = {"warning": " WARN", "critical": " CRIT"}.get(ct.get("alarm", "ok"), "")
    return f"{ct['ratio'] * 100:.0f}%{mark}"


HISTORY_COLUMNS = [
    col("REVISION", "revision"),
    col("CHANGE", "type"),
    col("UPDATED", "object.metadata.updated", default=""),
]

TOKEN_COLUMNS = [
    col("ID", "id"),
    col("ROLE", "role"),
    Column("SCOPE", lambda t: t.get("tenant") or t.get("host") or "-"),
    col("NAME", "name"),
    col("CREATED", "created"),
    col("EXPIRES", "expires"),
    col("CREATED BY", "createdBy", wide=True),
]

STATUS_COLUMNS = [
    col("HOST", "host"),
    col("CONNECTED", "connected"),
    col("DESIRED", "desiredRevision"),
    col("REALIZED", "realizedRevision"),
    Column("CONNTRACK", lambda s: _conntrack_cell(s.get("conntrack"))),
    col("LAST SEEN", "lastSeen"),
    col("ERROR", "lastError"),
]


def register(app: typer.Typer) -> None:
    @app.command("manager")
    def manager_cmd(
        db: str = typer.Option(
            os.environ.get("OMNIWALL_DB", "omniwall.db"), "--db", help="SQLite store path"
        ),
        store: str | None = typer.Option(
            os.environ.get("OMNIWALL_STORE"),
            "--store",
            help="instead of --db: etcd://HOST:PORT[,HOST:PORT...] or sqlite:///path (docs/etcd.md)",
        ),
        listen: str = typer.Option("127.0.0.1:8443", "--listen", help="HOST:PORT"),
        tls_cert: str | None = typer.Option(None, "--tls-cert", help="serve HTTPS with this certificate"),
        tls_key: str | None = typer.Option(None, "--tls-key", help="the key of --tls-cert"),
        client_ca: str | None = typer.Option(
            None,
            "--client-ca",
            help="verify client certificates issued by this CA; agents must then present their host's",
        ),
        flows_db: str | None = typer.Option(
            None, "--flows-db", help="flow records' SQLite file (default: <db>.flows)"
        ),
        flow_retention: str = typer.Option("24h", "--flow-retention", help="keep flow records this long"),
        flow_max_records: int = typer.Option(
            10_000_000, "--flow-max-records", min=1000, help="keep at most this many flow records"
        ),
        metrics_address: str | None = typer.Option(
            None, "--metrics-address", help="serve Prometheus /metrics on HOST:PORT (no auth; off by default)"
        ),
        log_format: str = typer.Option("text", "--log-format", help="log lines as text or json"),
        config: str | None = typer.Option(
            None,
            "--config",
            help="YAML file of these options (default: $OMNIWALL_MANAGER_CONFIG, else "
            "/etc/omniwall/manager.yaml when present; '' for none). Flags override it.",
            is_eager=True,
            callback=config_option_callback("manager"),
        ),
    ) -> None:
        """Run the manager (REST API, store, compiler, host feeds, flow records). Certificate files are
        re-read when they change (and on SIGHUP)."""
        import logging

        from omniwall.api.server import FlowOptions, serve
        from omniwall.logformat import check_format, setup_logging
        from omniwall.store import StoreError

        try:
            setup_logging(check_format(log_format))
        except ValueError as err:
            _fail(str(err))
        logging.getLogger("httpx").setLevel(logging.WARNING)  # an etcd store logs no line per request
        try:
            from omniwall.api.errors import ApiError
            from omniwall.api.flows import parse_duration

            try:
                retention = parse_duration(flow_retention, "flow-retention")
            except ApiError as e:
                raise ValueError(
                    f"--flow-retention {flow_retention!r}: expected a duration like 30m, 24h or 7d"
                ) from e
            flows = FlowOptions(flows_db, retention, flow_max_records)
            spec = store or db
            serve(spec, listen, tls_cert, tls_key, client_ca, flows=flows, metrics_address=metrics_address)
        except (ValueError, OSError, StoreError) as err:
            _fail(str(err))

    token_app = typer.Typer(
        help="API tokens: create, list, revoke (on the db directly with --db).", no_args_is_help=True
    )
    app.add_typer(token_app, name="token")

    @token_app.command("create")
    def token_create(
        role: str = typer.Option(..., "--role", help="one of: " + ", ".join(r.value for r in Role)),
        tenant: str | None = typer.Option(None, "--tenant", help="tenant roles: the tenant"),
        host: str | None = typer.Option(None, "--host", help="agent role: the host"),
        name: str = typer.Option("", "--name"),
        expires: str | None = typer.Option(
            None, "--expires", help="lifetime, e.g. 30m, 24h, 7d (default: never expires)"
        ),
        db: str | None = typer.Option(None, "--db", help="operate on this store file instead of the API"),
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
    ) -> None:
        """Create a token; prints the secret once."""
        if db:
            from omniwall.manager.tokens import TokenError, parse_duration

            try:
                life = parse_duration(expires) if expires else None
                _check_scope_exists(db, tenant, host)
                secret, rec = _book(db).create(
                    role, name=name, tenant=tenant, host=host, created_by="cli", actor=LOCAL, lifetime=life
                )
            except TokenError as err:
                _fail(str(err))
            typer.echo(secret)
            typer.echo(
                f"# id {rec.id}, role {rec.role}" + (f", expires {rec.expires}" if rec.expires else ""),
                err=True,
            )
            return
        out = connect(server, token).create_token(
            role, tenant=tenant, host=host, name=name or None, expires=expires
        )
        typer.echo(out["token"])
        typer.echo(
            f"# id {out['id']}, role {out['role']}"
            + (f", expires {out['expires']}" if out.get("expires") else ""),
            err=True,
        )

    @token_app.command("rotate")
    def token_rotate(
        token_id: str = typer.Argument(..., help="token id (the middle part of ow.<id>.<secret>)"),
        db: str | None = typer.Option(None, "--db"),
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
    ) -> None:
        """Replace a token by a new one (same role, scope, name, lifetime); the old one stops working.
        Prints the new secret once."""
        if db:
            out = _book(db).rotate(token_id, LOCAL)
            if out is None:
                _fail(f"token {token_id} not found")
            secret, new_id = out[0], out[1].id
        else:
            res = connect(server, token).rotate_token(token_id)
            secret, new_id = res["token"], res["id"]
        typer.echo(secret)
        typer.echo(f"# id {new_id} replaces {token_id} (revoked)", err=True)

    @token_app.command("list")
    def token_list(
        db: str | None = typer.Option(None, "--db"),
        output: str = OutputOpt,
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
    ) -> None:
        """List tokens (never their secrets)."""
        check_format(output)
        items = [t.public() for t in _book(db).list()] if db else connect(server, token).list_tokens()
        render(items, TOKEN_COLUMNS, output)

    @token_app.command("revoke")
    def token_revoke(
        token_id: str = typer.Argument(..., help="token id (the middle part of ow.<id>.<secret>)"),
        db: str | None = typer.Option(None, "--db"),
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
    ) -> None:
        """Revoke a token."""
        if db:
            if not _book(db).revoke(token_id, LOCAL):
                _fail(f"token {token_id} not found")
        else:
            connect(server, token).revoke_token(token_id)
        typer.echo(f"revoked {token_id}")

    @app.command("apply")
    def apply_cmd(
        files: list[str] = typer.Option(
            ..., "-f", "--file", help="YAML/JSON file, directory or glob (repeatable); - for stdin"
        ),
        more: list[str] | None = typer.Argument(None, metavar="FILES", help="the rest of a shell glob"),
        dry_run: bool = typer.Option(False, "--dry-run", help="show the diff and impact, write nothing"),
        output: str = OutputOpt,
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
    ) -> None:
        """Create or update every object in the files, all or nothing."""
        check_format(output)
        text, source = _yaml_source([*files, *(more or [])])
        out = connect(server, token).apply(text, dry_run=dry_run, source=source)
        if output in ("json", "yaml"):  # the API's answer: changes, revision, impact
            emit(out, output)
            return
        if dry_run:
            _print_diff(out)
            typer.echo(f"dry run at revision {out['revision']}: nothing written")
            return
        for c in out["changes"]:
            past = {"create": "created", "update": "updated", "unchanged": "unchanged"}.get(
                c["action"], c["action"]
            )
            typer.echo(f"{c['kind']}/{c['tenant']}/{c['name']} {past}")
        typer.echo(f"revision {out['revision']}")

    @app.command("diff")
    def diff_cmd(
        files: list[str] = typer.Option(
            ..., "-f", "--file", help="YAML/JSON file, directory or glob (repeatable); - for stdin"
        ),
        more: list[str] | None = typer.Argument(None, metavar="FILES", help="the rest of a shell glob"),
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
    ) -> None:
        """What `apply` would change: object diffs and data-plane impact. Exit codes as `kubectl diff`:
        0 no change, 1 changes, 2 an error."""
        try:
            text, source = _yaml_source([*files, *(more or [])])
            out = connect(server, token).apply(text, dry_run=True, source=source)
        except typer.Exit as e:  # the error is printed; 1 means "changes" here
            raise typer.Exit(2 if e.exit_code else 0) from None
        _print_diff(out)
        if has_changes(out):
            raise typer.Exit(1)

    @app.command("get")
    def get_cmd(
        kind: str = typer.Argument(..., help="kind, e.g. policies, workload, Host"),
        name: str | None = typer.Argument(None, help="NAME or TENANT/NAME"),
        output: str = OutputOpt,
        tenant: str | None = TenantOpt,
        selector: str | None = typer.Option(None, "-l", "--selector", help="label selector, e.g. tier=web"),
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
    ) -> None:
        """Show one object or a list."""
        check_format(output)
        kind = _kind(kind)
        if name:
            tenant, name = _ref(name, tenant)
        api = connect(server, token)
        if name:
            items = [api.get(kind, name, tenant=tenant)]
        else:
            items = api.list(kind, tenant=tenant, selector=selector)
        if output == "json":
            typer.echo(json.dumps(items[0] if name else items, indent=2))
        elif output == "yaml":
            typer.echo(yaml.safe_dump_all(items, sort_keys=False).rstrip())
        else:
            render(items, OBJECT_COLUMNS, output)

    @app.command("delete")
    def delete_cmd(
        kind: str = typer.Argument(...),
        name: str = typer.Argument(..., help="NAME or TENANT/NAME"),
        tenant: str | None = TenantOpt,
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
    ) -> None:
        """Delete an object (an Application takes what it owns along)."""
        tenant, name = _ref(name, tenant)
        out = connect(server, token).delete(_kind(kind), name, tenant=tenant)
        for d in out["deleted"]:
            typer.echo(f"{d['kind']}/{d['tenant']}/{d['name']} deleted")
        typer.echo(f"revision {out['revision']}")

    @app.command("history")
    def history_cmd(
        kind: str = typer.Argument(...),
        name: str = typer.Argument(..., help="NAME or TENANT/NAME"),
        tenant: str | None = TenantOpt,
        output: str = OutputOpt,
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
    ) -> None:
        """Every retained revision of an object."""
        check_format(output)
        tenant, name = _ref(name, tenant)
        out = connect(server, token).history(_kind(kind), name, tenant=tenant)
        if output == "json":
            typer.echo(json.dumps(out, indent=2))
        elif output == "yaml":
            typer.echo(yaml.safe_dump(out, sort_keys=False).rstrip())
        else:
            render(out["items"], HISTORY_COLUMNS, output)

    @app.command("rollback")
    def rollback_cmd(
        kind: str = typer.Argument(...),
        name: str = typer.Argument(..., help="NAME or TENANT/NAME"),
        to_revision: int = typer.Option(
            ..., "--to-revision", help="restore the object as it was at this revision"
        ),
        tenant: str | None = TenantOpt,
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
    ) -> None:
        """Restore an object as it was at a revision (a new write, audited as rollback)."""
        tenant, name = _ref(name, tenant)
        out = connect(server, token).rollback(_kind(kind), name, to_revision, tenant=tenant)
        typer.echo(f"rolled back to revision {out['rolledBackTo']}; now at revision {out['revision']}")

    @app.command("migrate")
    def migrate_cmd(
        workload: str = typer.Argument(..., help="NAME or TENANT/NAME"),
        to: str = typer.Option(..., "--to", help="destination host"),
        tenant: str | None = TenantOpt,
        switch_timeout: float = typer.Option(
            120.0, "--switch-timeout", help="seconds to wait for the vNIC to reach the destination"
        ),
        wait: bool = typer.Option(True, "--wait/--no-wait", help="follow the phases until the end"),
        output: str = OutputOpt,
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
    ) -> None:
        """Live-migrate a workload to another host (docs/design/migration.md). The hypervisor moves the
        vNIC; the migration waits for it (the destination agent sees its route, or POST .../switched)."""
        check_format(output)
        tenant, workload = _ref(workload, tenant)
        text = output in ("table", "wide")
        api = connect(server, token)
        rec = api.migrate(workload, to, tenant=tenant, switch_timeout=switch_timeout)
        if text:
            typer.echo(f"migration {rec['id']}: {rec['workload']} {rec['source']} -> {rec['destination']}")
        if wait:

            def show(ph: dict[str, Any]) -> None:
                if text:
                    typer.echo(f"  {ph['ms']:>9.1f} ms  {ph['phase']}")

            limit = switch_timeout + 300  # the manager's own timeouts end it well before
            rec = api.wait_migration(
                workload, tenant=tenant, migration_id=rec["id"], timeout=limit, on_phase=show
            )
        if not text:
            emit(rec, output)
        if rec["result"] == "failed":
            typer.echo(f"error: migration failed: {rec.get('error')}", err=True)
            raise typer.Exit(1)
        if text:
            typer.echo(rec["result"])

    @app.command("status")
    def status_cmd(
        output: str = OutputOpt, server: str | None = ServerOpt, token: str | None = TokenOpt
    ) -> None:
        """Manager revision and each host's agent: connected, desired vs realized revision, last error."""
        check_format(output)
        out = connect(server, token).status()
        if output in ("json", "yaml"):
            emit(out, output)
            return
        typer.echo(f"revision {out['revision']}")
        if out.get("compileError"):
            typer.echo(f"compile error: {out['compileError']}")
        hosts = out.get("hosts")
        if hosts is None:
            return
        render([{"host": h, **s} for h, s in hosts.items()], STATUS_COLUMNS, output)

    @app.command("compact")
    def compact_cmd(
        keep: int = typer.Option(1000, "--keep", help="keep the history of the last N revisions"),
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
    ) -> None:
        """Drop store history older than the last N revisions (object values stay; audit log stays)."""
        api = connect(server, token)
        current = api.status()["revision"]
        target = current - keep
        if target < 1:
            typer.echo(f"revision {current}: nothing older than {keep} revisions to compact")
            return
        out = api.compact(target)
        typer.echo(f"history before revision {out['compacted']} dropped (current revision {out['revision']})")
