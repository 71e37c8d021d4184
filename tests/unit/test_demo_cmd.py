"""`omniwall demo`: the demo's verb runs from the CLI (and so from an installed package)."""

from __future__ import annotations

from typer.testing import CliRunner

from omniwall.cli.main import app


def test_demo_offline_explains_every_flow_as_designed() -> None:
    r = CliRunner().invoke(app, ["demo", "--offline"])
    assert r.exit_code == 0, r.output
    assert "all 16 flows as the design says" in r.output


def test_demo_refuses_a_missing_directory() -> None:
    r = CliRunner().invoke(app, ["demo", "--offline", "/nonexistent/omniwall-demo"])
    assert r.exit_code != 0
