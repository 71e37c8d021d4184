"""Docs that are tested (issue 13): every command block of README.md and docs/*.md runs as written, or is
marked `<!-- illustrative: reason -->` on the line before its fence. Which block runs where, and the
markers, are in tests/docsblocks.py; root blocks (`sudo`, `omniwall lab`) run in
tests/kernel/test_docs_lab_blocks.py.

Here, a block runs in bash (`set -e`), in a scratch directory of its own where `examples/` is the
repository's, with `.venv/bin` first on PATH, HOME and the config file in the scratch directory, and
`OMNIWALL_SERVER`/`OMNIWALL_TOKEN` pointing at a manager served in this process on loopback, seeded with
examples/three-tier (its store is `./omniwall.db`).

A transcript block (lines `$ command`, then its output) runs each command and checks the first output
line shown against the first line printed (`...` in a command marks an abbreviation: not run; in an
output line it matches any text; a first line that starts with `...` is not compared).

Also: `--help` of every command and subcommand exits 0.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from apihelpers import serving
from typer.testing import CliRunner

from docsblocks import ROOT, Block, command_blocks, first_line_agrees, transcript
from omniwall.api.app import create_app
from omniwall.cli.main import app as cli
from omniwall.manager.contracts import load_documents
from omniwall.manager.service import SYSTEM, Manager
from omniwall.store.sqlite import SqliteStore

BLOCKS = command_blocks()
RUN = [b for b in BLOCKS if b.illustrative is None and not b.root]


def test_blocks_are_found_and_every_illustrative_one_says_why() -> None:
    assert len(BLOCKS) >= 20 and RUN and any(b.root for b in BLOCKS)
    for b in BLOCKS:
        assert b.illustrative is None or len(b.illustrative) >= 10, f"{b.id}: give the reason"
        assert b.daemon is None or b.illustrative is None, f"{b.id}: a daemon block is run, not illustrative"


# ------------------------------------------------------------------------------------------ runner


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    d = tmp_path_factory.mktemp("docs")
    (d / "examples").symlink_to(ROOT / "examples")
    m = Manager(SqliteStore(d / "omniwall.db"))
    m.commit(m.plan_apply(_example_documents()), SYSTEM)
    token, _ = m.tokens.create("provider-admin", name="docs")
    bindir = str(Path(sys.executable).parent)
    with serving(create_app(m, watch=True), timeout_graceful_shutdown=1) as url:
        env = {
            "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(d),
            "OMNIWALL_CONFIG": str(d / "config.yaml"),
            "OMNIWALL_SERVER": url,
            "OMNIWALL_TOKEN": token,
            "LANG": "C.UTF-8",
        }
        yield d, env


def _example_documents() -> list:  # type: ignore[type-arg]
    texts = [p.read_text() for p in sorted((ROOT / "examples" / "three-tier").glob("*.yaml"))]
    return load_documents("\n---\n".join(texts), "three-tier")


def _bash(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # Its own session, killed whole at the end: a block that starts a daemon in the background (a
    # mistake the marker check cannot see) must not outlive the test.
    proc = subprocess.Popen(
        ["bash", "-c", script], cwd=cwd, env=env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_command_block_runs_as_written(block: Block, scratch: tuple[Path, dict[str, str]]) -> None:
    base, env = scratch
    cwd = base / re.sub(r"\W", "_", block.id)  # a directory per block: `pki init` in two docs
    cwd.mkdir()
    for name in ("examples", "omniwall.db"):
        (cwd / name).symlink_to(base / name)  # SQLite resolves the link: the manager's own store
    env = {**env, "HOME": str(cwd)}
    if not block.transcript:
        res = _bash("set -eo pipefail\n" + "\n".join(block.body), cwd, env)
        assert res.returncode == 0, f"{block.id} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        return
    for cmd, shown in transcript(block):
        if " ... " in cmd:
            continue  # an abbreviation of the command before
        res = _bash(cmd, cwd, env)
        assert "Traceback" not in res.stderr, res.stderr
        if not shown or shown[0].lstrip().startswith("..."):
            assert res.returncode == 0, f"{block.id}: {cmd}\n{res.stderr[-2000:]}"
        assert first_line_agrees(shown, res.stdout), f"{block.id}: {cmd}\n{res.stdout}"


# ------------------------------------------------------------------------------------------- --help


def _commands(cmd: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    if hasattr(cmd, "commands"):  # a group (typer's click may not be the `click` import)
        for name, sub in cmd.commands.items():
            yield from _commands(sub, (*path, name))


def test_help_of_every_verb() -> None:
    root = typer.main.get_command(cli)
    paths = list(_commands(root))
    assert len(paths) > 40
    for path in paths:
        res = CliRunner().invoke(cli, [*path, "--help"])
        assert res.exit_code == 0 and "Usage:" in res.output, (path, res.output)
