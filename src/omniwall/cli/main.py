"""`omniwall` command line. Each command group lives in its own module and registers itself here."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import typer

from omniwall.agent import cli as agent_cmd
from omniwall.cli import (
    audit_cmd,
    completion_cmd,
    config_cmd,
    demo_cmd,
    events_cmd,
    flows_cmd,
    insight_cmds,
    k8s_cmd,
    lab_cmd,
    libvirt_cmd,
    pki_cmd,
    policy_cmds,
    server_cmds,
)

app = typer.Typer(
    name="omniwall",
    help="Omniwall: a distributed firewall enforced in every host's kernel, at each workload's vNIC.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,  # `omniwall completion bash|zsh|fish` instead of two hidden options
)


def _version() -> str:
    try:
        return version("omniwall")
    except PackageNotFoundError:  # running from a source tree without an install
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"omniwall {_version()}")
        raise typer.Exit()


@app.callback()
def main(
    show_version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_print_version, is_eager=True
    ),
) -> None:
    """Omniwall: a distributed firewall enforced in every host's kernel, at each workload's vNIC."""


policy_cmds.register(app)  # validate, compile, explain
k8s_cmd.register(app)  # import k8s
lab_cmd.register(app)  # lab up/down/exec/matrix
server_cmds.register(app)  # manager, token, apply, diff, get, delete, history, rollback, migrate, status
audit_cmd.register(app)  # audit (newest first, --follow), audit verify
events_cmd.register(app)  # identity login/logout, posture report
insight_cmds.register(app)  # members, realization (explain's server mode lives there too)
agent_cmd.register(app)  # agent
flows_cmd.register(app)  # flows (hubble observe-like)
pki_cmd.register(app)  # pki init/manager/host/show
config_cmd.register(app)  # config get-contexts/use-context/set-context/current-context
completion_cmd.register(app)  # completion bash|zsh|fish
demo_cmd.register(app)  # demo (live lab, or --offline)
libvirt_cmd.register(app)  # libvirt install-hook

if __name__ == "__main__":
    app()
