"""The daemons' operator options (issue 13, "a real install"): configuration files under /etc/omniwall/,
the JSON log format and the systemd readiness datagram."""

from __future__ import annotations

import io
import json
import logging
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from omniwall import logformat, sdnotify
from omniwall.cli.main import app
from omniwall.daemon_config import ConfigFileError, config_path, read_config

runner = CliRunner()


def test_json_log_lines_carry_fields_and_extras() -> None:
    stream = io.StringIO()
    logformat.setup_logging("json", logging.INFO, stream)
    try:
        logging.getLogger("omniwall.test").warning("host %s gone", "h1", extra={"host": "h1"})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("omniwall.test").exception("failed")
    finally:
        logformat.setup_logging("text", logging.WARNING)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "host h1 gone" and first["level"] == "WARNING" and first["host"] == "h1"
    assert first["logger"] == "omniwall.test" and first["time"].endswith("+00:00")
    assert "RuntimeError: boom" in second["exception"]


def test_unknown_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="--log-format: 'xml'"):
        logformat.check_format("xml")


def test_notify_sends_one_datagram(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        assert sdnotify.notify("READY=1\nSTATUS=up", environ={"NOTIFY_SOCKET": str(path)})
        assert sock.recv(100) == b"READY=1\nSTATUS=up"
    assert not sdnotify.notify("READY=1", environ={})  # not under systemd: nothing, no error
    assert not sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})


def test_config_path_precedence(tmp_path: Path) -> None:
    assert config_path("agent", str(tmp_path / "a.yaml"), {}) == tmp_path / "a.yaml"
    env = {"OMNIWALL_AGENT_CONFIG": str(tmp_path / "b.yaml")}
    assert config_path("agent", None, env) == tmp_path / "b.yaml"
    assert config_path("agent", "", env) is None  # --config '' reads none


def test_config_errors_name_file_and_key(tmp_path: Path) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text("manager: http://127.0.0.1:1\nbogus: 1\n")
    with pytest.raises(ConfigFileError, match=r"agent.yaml: unknown option 'bogus'"):
        read_config(f, {"manager": object()})
    f.write_text("- a list\n")
    with pytest.raises(ConfigFileError, match="expected a mapping"):
        read_config(f, {})
    f.write_text("manager: [1, 2]\n")
    with pytest.raises(ConfigFileError, match="manager: expected a single value"):
        read_config(f, {"manager": object()})


def test_agent_reads_its_config_file_and_flags_win(tmp_path: Path) -> None:
    """The file fills the required options; a bad value from it fails like the flag would."""
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"manager: http://127.0.0.1:9\nhost: h1\ntoken-file: {tmp_path / 'missing.token'}\nbackend: sim\n"
    )
    out = runner.invoke(app, ["agent", "--config", str(cfg)])
    assert out.exit_code == 2 and "--token-file: cannot read" in out.output  # got that far: all set
    out = runner.invoke(app, ["agent", "--config", str(cfg), "--backend", "bogus"])
    assert "--backend: 'bogus'" in out.output  # the flag overrides the file
    cfg.write_text("host: h1\n")
    out = runner.invoke(app, ["agent", "--config", str(cfg)])
    assert out.exit_code == 2 and "--manager" in out.output  # still required when the file lacks it


def test_manager_config_file_unknown_key(tmp_path: Path) -> None:
    cfg = tmp_path / "manager.yaml"
    cfg.write_text("listen: 127.0.0.1:1\ndatabase: x.db\n")
    out = runner.invoke(app, ["manager", "--config", str(cfg)])
    assert out.exit_code == 2 and "unknown option 'database'" in out.output
