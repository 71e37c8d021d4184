"""The consistency check (issue 12, part 7), short: three managers on a three-member etcd, six clients
writing and reading for a few seconds, a manager killed (SIGKILL) and restarted in between. The longer
run is bench/consistency.py (BENCHMARKS.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from etcdhelpers import needs_etcd

from consistency import History, Read, Write, check, consistency_run


def test_the_checker_catches_a_lost_write_a_stale_read_and_an_invented_value() -> None:
    h = History(
        writes=[
            Write(1, "k0", "a", 2, 0),
            Write(2, "k0", "b", 3, 1),
            Write(3, "k1", "x", None, 0, acked=False),
        ],
        reads=[
            Read(1, 3, 4, 3, {"k0": "b", "k1": "init"}, 0),
            Read(2, 3, 4, 2, {"k0": "a", "k1": "init"}, 1),
            Read(3, 3, 3, 3, {"k0": "a", "k1": "init"}, 2),
        ],
    )
    truth = {"k0": [(1, "init"), (2, "a"), (3, "b")], "k1": [(1, "init")]}
    v = check(h, truth, {"k0": "b", "k1": "init"})
    assert v.acked == 2 and v.indeterminate == 1 and v.indeterminate_applied == 0
    assert len(v.problems) == 2  # the read at 2 started at 3 (stale); the read at 3 saw "a" (wrong state)
    v = check(h, {"k0": [(1, "init"), (2, "a")], "k1": [(1, "init"), (4, "zz")]}, {"k0": "a", "k1": "zz"})
    assert any("lost" in p for p in v.problems) and any("never written" in p for p in v.problems)


@needs_etcd
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_concurrent_writes_and_reads_through_three_managers_with_a_kill(tmp_path: Path) -> None:
    verdict, _ = consistency_run(tmp_path, seconds=8.0, kill_every=4.0, clients=6)
    assert verdict.ok, verdict.problems[:10]
    assert verdict.kills >= 1 and verdict.acked >= 20 and verdict.reads >= 20, verdict.to_json()
