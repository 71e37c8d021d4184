"""How every CLI command reaches the manager: `omniwall.client.Client`, whose failures become a message
on stderr and an exit code instead of an exception.

Server and token: `--server`/`--token`, else `OMNIWALL_SERVER`/`OMNIWALL_TOKEN`, else the config file's
current context (omniwall/client/settings.py). An HTTP error prints the server's message (and each
validation problem) to stderr and exits 1 (`explain`: 2, so that 1 still means "denied").
"""

from __future__ import annotations

from typing import NoReturn

import typer

from omniwall.client import Client, ClientError, Settings


class CliClient(Client):
    """A `Client` that reports a failure as `error: ...` on stderr and exits `exit_code`."""

    exit_code = 1

    def _fail(self, err: ClientError) -> NoReturn:
        report(err, self.exit_code)


def report(err: ClientError, code: int = 1) -> NoReturn:
    lines = err.lines()
    typer.echo("\n".join([f"error: {lines[0]}", *lines[1:]]), err=True)
    raise typer.Exit(code)


def connect(server: str | None, token: str | None, *, exit_code: int = 1) -> CliClient:
    """The client a command uses; a missing token or an unusable config or CA file exits `exit_code`."""
    try:
        client = CliClient.from_settings(Settings.resolve(server, token))
    except ClientError as e:
        report(e, exit_code)
    client.exit_code = exit_code
    return client


__all__ = ["CliClient", "connect", "report"]
