"""The conntrack mirror (dataplane/ctmirror.py) against the kernel's own table: it sees entries created
before it (its seed) and after it (NEW events), forgets deleted ones (DESTROY events), and answers by
address without a dump."""

from __future__ import annotations

import time

from omniwall.dataplane import ctmirror
from omniwall.dataplane.backend import ConnEntry
from omniwall.dataplane.conntrack import ConntrackTable
from omniwall.dataplane.ct_migrate import import_batched


def entry(src: str, sport: int, dst: str = "10.0.0.1", dport: int = 443) -> ConnEntry:
    return ConnEntry(2, 6, src, dst, sport, dport, dst, src, dport, sport, state="ESTABLISHED", timeout=600)


def eventually(check, timeout: float = 2.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.02)
    return check()


def test_mirror_seeds_follows_events_and_answers_by_address(topo):
    ns = topo.add_host("ctm")
    ct = ConntrackTable(ns)
    try:
        before = [entry("10.128.0.1", 1000 + k) for k in range(5)]
        assert ct.thread.call(import_batched, before) == 5
        assert ct.watch() and ct.mirror is not None
        dumps = ct.dumps
        got = {(e.src, e.sport) for e in ct.involving(["10.128.0.1"])}
        assert got == {("10.128.0.1", 1000 + k) for k in range(5)}  # the seed
        after = [entry("10.128.0.2", 2000 + k) for k in range(3)] + [entry("10.9.9.9", 7, dst="10.128.0.2")]
        assert ct.thread.call(import_batched, after) == 4
        assert len(ct.involving(["10.128.0.2"])) == 4  # NEW events, as source and as destination
        assert ct.involving(["10.128.0.3"]) == []
        # a lookup names exactly what a delete needs: deleting what it returned empties the kernel's side
        assert ct.delete(ct.involving(["10.128.0.1"])) == 5
        assert ct.involving(["10.128.0.1"]) == []
        assert ct.count() == 4
        # entries that end without us (deleted by someone else) leave through DESTROY events
        other = ConntrackTable(ns)
        try:
            assert other.delete([after[0]]) == 1
        finally:
            other.close()
        assert eventually(lambda: len(ct.involving(["10.128.0.2"])) == 3)
        assert ct.dumps == dumps  # no lookup dumped
        # deleting what is already gone counts nothing and is forgotten
        assert ct.delete([after[0]]) == 0
    finally:
        ct.close()


def test_mirror_hands_destroy_events_to_its_subscriber_and_counts_overflows(topo, monkeypatch):
    """The flow collector reads DESTROY events from the mirror's socket (agent/flows.py `ct_feed`): every
    end the mirror receives reaches the subscriber, and an overflowed socket is counted, never silent."""
    ns = topo.add_host("ctd")
    ct = ConntrackTable(ns)
    try:
        assert ct.watch() and ct.mirror is not None
        got: list = []
        ct.mirror.subscribe_events(got.extend)
        ends = [entry("10.128.1.1", 3000 + k) for k in range(20)]
        assert ct.thread.call(import_batched, ends) == 20
        assert ct.delete(ends) == 20
        assert eventually(lambda: len(got) == 20)
        assert sorted((g[1], g[2], g[3], g[4]) for g in got) == sorted(
            (e.src, e.dst, e.sport, e.dport) for e in ends
        )
        assert ct.mirror.overflows == 0
        ct.mirror.subscribe_events(None)
        ct.delete(ct.involving(["10.128.1.1"]))
    finally:
        ct.close()
    monkeypatch.setattr(ctmirror, "RCVBUF", 4096)  # a few events' worth: a burst overflows it
    ct = ConntrackTable(ns)
    try:
        assert ct.watch() and ct.mirror is not None
        got = []
        ct.mirror.subscribe_events(got.extend)
        many = [entry("10.128.1.2", 1024 + k) for k in range(3000)]
        assert ct.thread.call(import_batched, many) == 3000
        assert ct.delete(many) == 3000
        assert eventually(lambda: ct.mirror is not None and ct.mirror.overflows > 0, timeout=5)
        time.sleep(0.3)
        assert len(got) < 3000  # lost ends, and their loss counted above
    finally:
        ct.close()
