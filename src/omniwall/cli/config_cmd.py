"""Contexts in the client config file, in the style of kubectl: several managers and their tokens, one
of them current.

    # ~/.config/omniwall/config.yaml (or $OMNIWALL_CONFIG)
    current-context: lab
    contexts:
      lab:  {server: "https://127.0.0.1:8443", token_file: ~/.omniwall/lab.token, ca: /tmp/lab-ca.crt}
      prod: {server: "https://fw.example.net:8443", token_file: ~/.omniwall/prod.token, ca: /etc/ow/ca.crt}

A context holds `server`, `token` or `token_file`, `ca`, `cert`, `key`. Keys at the top level (the file
format before contexts) still apply, under whatever the chosen context sets. `OMNIWALL_CONTEXT` picks a
context for one command without changing the file; `--server`/`--token` and `OMNIWALL_SERVER`/
`OMNIWALL_TOKEN`/`OMNIWALL_CA`/... still win over the file.

    omniwall config set-context lab --server https://127.0.0.1:8443 --token-file ~/.omniwall/lab.token --use
    omniwall config get-contexts
    omniwall config use-context prod
    omniwall config current-context
    omniwall config delete-context lab
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
import yaml

from omniwall.cli.output import OutputOpt, check_format, emit, fail, print_table

# The file format and how a client reads it live with the client (scripts and hooks read it too).
from omniwall.client.settings import config_path, effective, read_config


def write_config(data: dict[str, Any]) -> Path:
    """Write the file 0600 (it may hold tokens), creating its directory."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return path


def _load() -> dict[str, Any]:
    try:
        return read_config()
    except ValueError as e:
        fail(str(e))


config_app = typer.Typer(
    help="Client contexts: several managers and tokens, one current.", no_args_is_help=True
)


@config_app.command("get-contexts")
def get_contexts(output: str = OutputOpt) -> None:
    """List the contexts; `*` marks the current one."""
    check_format(output)
    data = _load()
    current = os.environ.get("OMNIWALL_CONTEXT") or data.get("current-context")
    contexts = data.get("contexts") or {}
    if output in ("json", "yaml"):
        hidden = {n: {k: ("***" if k == "token" else v) for k, v in c.items()} for n, c in contexts.items()}
        emit({"current-context": current, "contexts": hidden}, output)
        return
    rows = []
    for name, c in sorted(contexts.items()):
        auth = "token" if c.get("token") else f"file:{c['token_file']}" if c.get("token_file") else "-"
        row = ["*" if name == current else "", name, c.get("server", "-"), auth]
        rows.append(row + ([c.get("ca") or "-"] if output == "wide" else []))
    print_table(rows, ["CURRENT", "NAME", "SERVER", "AUTH"] + (["CA"] if output == "wide" else []))


@config_app.command("current-context")
def current_context() -> None:
    """Print the current context's name."""
    data = _load()
    current = os.environ.get("OMNIWALL_CONTEXT") or data.get("current-context")
    if not current:
        fail(f"no current context in {config_path()}")
    typer.echo(current)


@config_app.command("use-context")
def use_context(name: str = typer.Argument(..., help="a context of `config get-contexts`")) -> None:
    """Make a context the current one."""
    data = _load()
    if name not in (data.get("contexts") or {}):
        known = ", ".join(sorted(data.get("contexts") or {})) or "none"
        fail(f"no context {name!r} in {config_path()} (contexts: {known})")
    data["current-context"] = name
    write_config(data)
    typer.echo(f"switched to context {name!r}")


@config_app.command("set-context")
def set_context(
    name: str = typer.Argument(...),
    server: str | None = typer.Option(None, "--server", help="manager URL"),
    token: str | None = typer.Option(None, "--token", help="bearer token (stored in the file, 0600)"),
    token_file: str | None = typer.Option(None, "--token-file", help="read the token from this file"),
    ca: str | None = typer.Option(None, "--ca", help="CA certificate of the manager"),
    cert: str | None = typer.Option(None, "--cert", help="client certificate (mutual TLS)"),
    key: str | None = typer.Option(None, "--key", help="key of --cert"),
    use: bool = typer.Option(False, "--use", help="and make it the current context"),
) -> None:
    """Create or update a context (only the settings given change)."""
    data = _load()
    contexts = data.setdefault("contexts", {})
    given = {"server": server, "token": token, "token_file": token_file, "ca": ca, "cert": cert, "key": key}
    ctx = {**contexts.get(name, {}), **{k: v for k, v in given.items() if v is not None}}
    if token is not None:
        ctx.pop("token_file", None)
    if token_file is not None:
        ctx.pop("token", None)
    contexts[name] = ctx
    if use or not data.get("current-context"):
        data["current-context"] = name
    path = write_config(data)
    typer.echo(f"context {name!r} set in {path}")


@config_app.command("delete-context")
def delete_context(name: str = typer.Argument(...)) -> None:
    """Remove a context (the current one too: then none is current)."""
    data = _load()
    if name not in (data.get("contexts") or {}):
        fail(f"no context {name!r} in {config_path()}")
    del data["contexts"][name]
    if data.get("current-context") == name:
        data.pop("current-context")
    write_config(data)
    typer.echo(f"context {name!r} deleted")


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")


__all__ = ["config_path", "effective", "read_config", "register", "write_config"]
