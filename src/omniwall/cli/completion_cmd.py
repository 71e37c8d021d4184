"""`omniwall completion bash|zsh|fish`: print the shell's completion script, as `kubectl completion`.

    source <(omniwall completion bash)                                    # this shell
    omniwall completion bash > /etc/bash_completion.d/omniwall            # every shell
    omniwall completion zsh > "${fpath[1]}/_omniwall"
    omniwall completion fish > ~/.config/fish/completions/omniwall.fish

The script calls `omniwall` back with `_OMNIWALL_COMPLETE` set; typer answers it (commands, options,
and values such as -o's formats). Typer's own `--install-completion` is off: one visible verb instead.
"""

from __future__ import annotations

from enum import StrEnum

import typer


class Shell(StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def completion_cmd(shell: Shell = typer.Argument(..., help="bash, zsh or fish")) -> None:
    """Print the completion script for a shell (see `omniwall completion --help`)."""
    # typer keeps the scripts in a private module; it is pinned by typer>=0.12 and checked by a test.
    from typer._completion_shared import get_completion_script

    typer.echo(
        get_completion_script(prog_name="omniwall", complete_var="_OMNIWALL_COMPLETE", shell=shell.value)
    )


def register(app: typer.Typer) -> None:
    app.command(
        "completion",
        help="Print the shell completion script: source <(omniwall completion bash).",
    )(completion_cmd)


__all__ = ["register"]
