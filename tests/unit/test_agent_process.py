"""`python -m omniwall.agent.cli --backend sim` as a real process: SIGTERM stops it cleanly, the state
stays, and the next process resumes from it. No root needed (sim backend, manager on 127.0.0.1)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from doubles.fake_manager import FakeManager
from omniwall.compiler.ir import HostDesiredState, IRVnic

HOST = "h-proc"


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def spawn(fm: FakeManager, tmp: Path) -> subprocess.Popen[str]:
    (tmp / "token").write_text("tok\n")
    argv = [sys.executable, "-m", "omniwall.agent.cli", "--manager", fm.url, "--host", HOST]
    argv += ["--token-file", str(tmp / "token"), "--backend", "sim", "--state-dir", str(tmp / "state")]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_keeps_state_and_next_process_resumes(tmp_path: Path) -> None:
    fm = FakeManager(tokens={HOST: "tok"}, heartbeat=0.3)
    fm.start()
    s3 = HostDesiredState(host=HOST, revision=3, vnics=(IRVnic("vn1", "t/w", "t", ("10.2.0.1",)),))
    fm.publish(s3)
    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(spawn(fm, tmp_path))
        wait_for(lambda: (fm.last_status(HOST) or {}).get("realized_revision") == 3, "ack of revision 3")
        procs[0].send_signal(signal.SIGTERM)
        out, _ = procs[0].communicate(timeout=10)
        assert procs[0].returncode == 0, out
        assert "Traceback" not in out
        saved = json.loads((tmp_path / "state" / f"sim-{HOST}.json").read_text())
        assert saved["revision"] == 3, "SIGTERM must leave the realized state in place"

        n = len(fm.feed_requests)
        procs.append(spawn(fm, tmp_path))
        wait_for(lambda: len(fm.feed_requests) > n, "second process connected")
        assert fm.feed_requests[n] == (HOST, 3), "resumed from the state the first process left"
    finally:
        for p in procs:  # only ours, by PID
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=10)
        fm.stop()
