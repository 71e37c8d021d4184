"""`omniwall` command line. Each command group lives in its own module and registers itself here."""

from __future__ import annotations

import typer

from omniwall.agent import cli as agent_cmd
from omniwall.cli import flows_cmd, insight_cmds, k8s_cmd, lab_cmd, pki_cmd, policy_cmds, server_cmds

app = typer.Typer(
    name="omniwall",
    help="Omniwall: a distributed firewall enforced in every host's kernel, at each workload's vNIC.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

policy_cmds.register(app)  # validate, compile, explain
k8s_cmd.register(app)  # import k8s
lab_cmd.register(app)  # lab up/down/exec/matrix
server_cmds.register(app)  # manager, token, apply, diff, get, delete, history, rollback, status
insight_cmds.register(app)  # members, realization (explain's server mode lives there too)
agent_cmd.register(app)  # agent
flows_cmd.register(app)  # flows (hubble observe-like)
pki_cmd.register(app)  # pki init/manager/host/show

if __name__ == "__main__":
    app()
