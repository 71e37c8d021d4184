"""`make demo-ha` as the tests run it: `python -m omniwall.demo_ha --once` brings up three managers on a
three-member etcd cluster, checks the matrix, kills a manager and sees its agents re-attach, prints every
manager URL and the sign-in token, and leaves nothing behind (no process naming its control directory,
no namespace with its prefix). Root: the demo builds network namespaces."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the demo builds network namespaces (root)")


def test_demo_ha_once_comes_up_fails_over_and_tears_down() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-m", "omniwall.demo_ha", "--once"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert len(re.findall(r"manager \d:\s+https://127\.0\.0\.1:\d+", text)) == 3, text
    assert len(re.findall(r"etcd \S+: http://127\.0\.0\.1:\d+", text)) == 3, text
    assert "(leader)" in text and "sign in with:  ow." in text
    assert re.search(r"re-attached to https://127\.0\.0\.1:\d+ after \d+\.\d+ s", text), text
    prefix = re.search(r"namespace prefix (\S+)", text)
    assert prefix is not None, text
    control = f"/run/omniwall/lab/{prefix.group(1)}managed"
    assert not Path(control).exists()
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and control in _cmdline(p)]
    assert left == [], left
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix.group(1) not in netns


def _cmdline(p: Path) -> str:
    try:
        return (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
