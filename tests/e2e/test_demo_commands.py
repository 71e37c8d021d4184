"""`make demo` end to end, and every command it prints under "try" works as printed (issue 13): the demo
is started (it stays up), its lines are run in bash exactly as shown, then the demo is stopped with
SIGINT, by its PID; it must exit 0 (every probe agreed, the migration kept its connection) and tear its
lab down (no namespace with its prefix, no control directory). Root: the demo builds network
namespaces."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from labhelpers import NEEDS_ROOT
from omniwall.lab import netns
from omniwall.lab.managed import control_dir

ROOT = Path(__file__).resolve().parents[2]

pytestmark = NEEDS_ROOT


def _read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> str:
    assert proc.stdout is not None
    out = ""
    end = time.monotonic() + timeout
    while marker not in out:
        left = end - time.monotonic()
        assert left > 0, f"no {marker!r} within {timeout:g} s:\n{out[-3000:]}"
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, f"the demo ended:\n{out[-3000:]}"
            out += line
    return out


def test_the_commands_the_demo_prints_work_as_printed() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "omniwall.demo"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Ctrl-C as on a terminal: a test run started as a background job inherits SIGINT ignored, and
        # Python then never turns SIGINT into KeyboardInterrupt in the demo.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        out = _read_until(proc, "Ctrl-C tears it down", 240)
        block = out[out.index("try") :].split("\n", 1)[1]
        commands = []
        for line in block.splitlines():
            if not line.startswith("  "):
                break
            commands.append(line.strip())
        assert any(c.startswith("omniwall status") for c in commands), commands
        assert any(c.startswith("export PATH=") for c in commands), commands
        script = "set -eo pipefail\n" + "\n".join(commands)
        clean = {k: v for k, v in os.environ.items() if not k.startswith("OMNIWALL_")}
        clean["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"  # `omniwall` comes from the printed PATH line
        res = subprocess.run(
            ["bash", "-c", script], cwd="/", env=clean, capture_output=True, text=True, timeout=240
        )
        assert res.returncode == 0, f"{script}\n---\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        assert "host-1" in res.stdout and "probes agree with the policy" in res.stdout
        # the demo migrated app-1 to host-3 with a connection alive; the printed command brings it back
        assert "the connection stayed up" in out, out[-3000:]
        assert re.search(r"migration \S+: tenant-a/app-1 host-3 -> host-2", res.stdout), res.stdout[-2000:]
        assert res.stdout.rstrip().endswith("succeeded") or "\nsucceeded\n" in res.stdout, res.stdout[-2000:]
        # the demo's own report: the matrix, the API's access over mutual TLS
        assert "probes agree with the policy" in out, out[-3000:]
        assert "admin token: ow." in out and "URL:         https://127.0.0.1:" in out, out[-3000:]
        assert "OMNIWALL_CA=" in out, out[-3000:]
    finally:
        interrupted = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the demo's own teardown, by its PID
        killed = False
        try:
            rest, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            killed = True
            rest, _ = proc.communicate()
    waited = time.monotonic() - interrupted
    assert not killed, f"the demo did not end within 120 s of Ctrl-C; its last output:\n{rest[-3000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode} {waited:.1f} s after Ctrl-C:\n{rest[-3000:]}"
    assert "lab down" in rest, rest[-3000:]
    prefix = re.search(r"namespace prefix (\S+)", out)
    assert prefix is not None, out[:3000]
    assert netns.list_names(prefix.group(1)) == []
    assert not control_dir(prefix.group(1)).exists()
