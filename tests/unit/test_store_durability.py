"""Durability: a writer killed with SIGKILL mid-stream loses no acknowledged write and no half txn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from omniwall.store.sqlite import SqliteStore

WRITER = r"""
import sys
from omniwall.store import Put
from omniwall.store.sqlite import SqliteStore

s = SqliteStore(sys.argv[1])
i = 0
while True:
    i += 1
    # Each txn writes three keys with the same payload: after a crash they must agree.
    payload = "x" * (i % 50) + str(i)
    rev = s.txn([], [Put(f"a/{i % 7}", payload), Put(f"b/{i % 7}", payload), Put("last", str(i))]).revision
    print(i, rev, flush=True)  # the acknowledgement: printed only after commit returned
"""


def test_kill_9_mid_stream_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    acked: list[tuple[int, int]] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    try:
        while len(acked) < 150 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            i, rev = line.split()
            acked.append((int(i), int(rev)))
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: it is writing the next txn right now
        proc.wait(timeout=10)
    assert len(acked) >= 150, "writer did not make progress"
    # Lines printed after our last read are acknowledged too; drain them.
    for line in proc.stdout.read().splitlines():
        i, rev = line.split()
        acked.append((int(i), int(rev)))

    s = SqliteStore(db)
    last_i, last_rev = acked[-1]
    assert s.revision() >= last_rev
    committed = int(s.get("last").value)  # type: ignore[union-attr]
    assert committed >= last_i
    assert s.revision() == committed  # one txn per revision, no gaps, nothing half-counted
    # No partial txn: each txn's three keys carry the same payload and revision.
    for k in range(7):
        a, b = s.get(f"a/{k}"), s.get(f"b/{k}")
        assert a is not None and b is not None
        assert (a.value, a.mod_revision) == (b.value, b.mod_revision)
    for rev in range(max(1, committed - 20), committed + 1):
        assert len([e for e in s.events(rev) if e.revision == rev]) == 3
    s.close()
