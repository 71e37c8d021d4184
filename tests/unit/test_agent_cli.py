"""`omniwall agent` argument errors: one line on stderr, non-zero exit, no traceback, nothing started."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from omniwall.agent.cli import register


def app() -> typer.Typer:
    a = typer.Typer()
    register(a)

    @a.command("noop")
    def noop() -> None:  # a second command, so "agent" is a subcommand as in the real CLI
        return None

    return a


def test_missing_token_file_is_a_clear_error(tmp_path) -> None:
    res = CliRunner().invoke(
        app(),
        ["agent", "--manager", "http://127.0.0.1:9", "--host", "h1", "--token-file", str(tmp_path / "nope")],
    )
    assert res.exit_code == 2
    assert "--token-file" in res.output and "Traceback" not in res.output


def test_unknown_backend_and_bad_url(tmp_path) -> None:
    token = tmp_path / "t"
    token.write_text("x\n")
    base = ["agent", "--host", "h1", "--token-file", str(token)]
    res = CliRunner().invoke(app(), [*base, "--manager", "http://127.0.0.1:9", "--backend", "ebpf"])
    assert res.exit_code == 2 and "--backend" in res.output
    res = CliRunner().invoke(app(), [*base, "--manager", "127.0.0.1:9"])
    assert res.exit_code == 2 and "--manager" in res.output
