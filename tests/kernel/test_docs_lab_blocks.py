"""The root blocks of README.md and docs/*.md (`sudo ...`, `omniwall lab ...`) run as written, as root
(issue 13; which block is a root block, and the markers, are in tests/docsblocks.py).

The blocks of one document run in order, in one scratch directory (where `examples/` and `.venv/` are
the repository's), each in bash with `set -eo pipefail`; the variables a block exports are carried to
the next block of the same document (a reader runs them in one shell). Documents that show the same
labs (docs/lab.md and the README) run as one session and share those labs (tests/docsblocks.py,
`shared_lab_runs`: a block runs right after the one whose lab it shares, skipping only the `lab up` that
block already ran, and the earlier block leaves its `lab down` to it). `OMNIWALL_LAB` holds a lab name
unique to this run, so `omniwall lab up` without `--name` builds this run's lab; `sudo` is a shim that
keeps the environment (we are root already; the real sudo would reset it and its PATH). After each
document the lab is taken down, also on failure, and nothing of it may be left.

A `<!-- daemon: TEXT -->` block runs in a private network and mount namespace
(`unshare`): its loopback ports are its own and a tmpfs covers /var/lib there, so the documented
production paths and fixed ports collide with nothing on this machine. The test waits until TEXT appears
in the block's output, then kills the block's process group by its PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from docsblocks import ROOT, Block, command_blocks, first_line_agrees, sessions, shared_lab_runs, transcript
from labhelpers import LAB_MARKS
from omniwall.lab import state as lab_state

pytestmark = LAB_MARKS

BLOCKS = [b for b in command_blocks() if b.illustrative is None and b.root]
SESSIONS = sessions(list(dict.fromkeys(b.doc for b in BLOCKS)))
# We are root already: run the command with this environment (the real sudo would reset it).
SUDO = '#!/bin/sh\nexec env "$@"\n'


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("docs-root")
    (d / "bin").mkdir()
    (d / "bin" / "sudo").write_text(SUDO)
    (d / "bin" / "sudo").chmod(0o755)
    return d


def _env(base: Path, cwd: Path, lab: str) -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return {
        "PATH": f"{base / 'bin'}:{bindir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
        "HOME": str(cwd),
        "OMNIWALL_CONFIG": str(cwd / "config.yaml"),
        "OMNIWALL_LAB": lab,
        "LANG": "C.UTF-8",
        "COLUMNS": "200",
    }


def _run(script: str, cwd: Path, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    # Its own session, killed whole (by the PID of its leader) at the end: nothing a block starts
    # outlives it.
    proc = subprocess.Popen(
        ["bash", "-c", script], cwd=cwd, env=env, text=True, start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"no end within {timeout:g} s:\n{script}\n{out[-2000:]}\n{err[-2000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _isolated(body: list[str]) -> list[str]:
    """`bash -c SCRIPT` in a private network and mount namespace, /var/lib a fresh tmpfs there."""
    inner = "set -eo pipefail\nip link set lo up\nmount -t tmpfs docs /var/lib\nmkdir -p /var/lib/omniwall\n"
    return ["unshare", "--net", "--mount", "--propagation", "private", "bash", "-c", inner + "\n".join(body)]


def _daemon(block: Block, cwd: Path, env: dict[str, str], timeout: float = 120) -> None:
    """Start the block in its private namespaces; pass when `block.daemon` is printed, then kill it."""
    assert block.daemon is not None
    proc = subprocess.Popen(
        _isolated(block.body), cwd=cwd, env=env, text=True, start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    out = ""
    try:
        end = time.monotonic() + timeout
        while block.daemon not in out:
            left = end - time.monotonic()
            assert left > 0, f"{block.id}: no {block.daemon!r} within {timeout:g} s:\n{out[-3000:]}"
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if ready:
                line = proc.stdout.readline()
                assert line, f"{block.id}: ended (exit {proc.wait()}) before {block.daemon!r}:\n{out[-3000:]}"
                out += line
        assert "Traceback" not in out, out[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def _lab_gone(lab: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "omniwall.cli.main", "lab", "down", "--name", lab],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert lab not in lab_state.names()


@pytest.mark.parametrize("session", SESSIONS, ids=["+".join(s) for s in SESSIONS])
def test_root_blocks_run_as_written(session: tuple[str, ...], base: Path) -> None:
    lab = f"docs-{secrets.token_hex(3)}"
    cwd = base / re.sub(r"\W", "_", "+".join(session))
    cwd.mkdir()
    for name in ("examples", ".venv"):
        (cwd / name).symlink_to(ROOT / name)
    env = _env(base, cwd, lab)
    carry = cwd / ".exports"
    carry.write_text("")
    try:
        for block, lines in shared_lab_runs([b for doc in session for b in BLOCKS if b.doc == doc]):
            if block.daemon is not None:
                _daemon(block, cwd, env)
            elif block.transcript:
                for cmd, shown in transcript(block):
                    if " ... " in cmd:
                        continue  # an abbreviation of the command before
                    res = _run(f"source {carry}\n{cmd}\nexport -p > {carry}", cwd, env)
                    assert "Traceback" not in res.stderr, res.stderr
                    if not shown or shown[0].lstrip().startswith("..."):  # as the unit runner: output
                        assert res.returncode == 0, f"{block.id}: {cmd}\n{res.stdout[-2000:]}\n{res.stderr}"
                    assert first_line_agrees(shown, res.stdout), f"{block.id}: {cmd}\n{res.stdout}"
            else:
                body = "\n".join(lines)
                script = f"source {carry}\nset -eo pipefail\n{body}\nexport -p > {carry}\n"
                res = _run(script, cwd, env)
                assert "Traceback" not in res.stderr, res.stderr
                assert res.returncode == 0, f"{block.id} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    finally:
        _lab_gone(lab)


def test_root_blocks_leave_the_lab_name_to_the_test() -> None:
    """A runnable block names no lab (`--name`): the test gives each run its own through OMNIWALL_LAB,
    and takes exactly that lab down afterwards."""
    assert BLOCKS, "no root block found: the docs lost their lab examples"
    for b in BLOCKS:
        for line in b.body:
            command = line.split(" #")[0]  # not the comment
            assert not re.search(r"omniwall lab \S+.*(--name|-n )", command), f"{b.id}: {line}"
