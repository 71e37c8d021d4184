"""The manager's fast paths keep their semantics: the token cache honours revocations (this process and
others sharing the store), desired-state updates are atomic to readers, and the bulk host status equals
the per-host one."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from omniwall.compiler.ir import HostDesiredState, IRSet, empty_state
from omniwall.manager.desired import Broadcaster, DesiredStates
from omniwall.manager.service import Manager
from omniwall.manager.tokens import TokenBook
from omniwall.store import open_store


def test_token_cache_serves_hits_and_honours_revocations(tmp_path: Path) -> None:
    db = str(tmp_path / "ow.db")
    m = Manager(open_store(db))
    m.tokens.cache = True  # what start_watch() turns on
    token, rec = m.tokens.create("agent", host="h1")
    assert m.tokens.verify_cached(token) is None  # not looked up yet
    assert m.tokens.verify(token) == rec
    assert m.tokens.verify_cached(token) == rec  # cached now
    assert m.tokens.verify_cached(token[:-2] + "xx") is None  # a wrong secret never matches
    assert m.tokens.verify(token[:-2] + "xx") is None

    assert m.tokens.revoke(rec.id)  # revoked here: gone at once
    assert m.tokens.verify_cached(token) is None and m.tokens.verify(token) is None

    # revoked by another process on the same store: gone once the watch has synced
    token2, rec2 = m.tokens.create("agent", host="h2")
    assert m.tokens.verify(token2) == rec2
    other = TokenBook(open_store(db))
    assert other.revoke(rec2.id)
    m.sync()
    assert m.tokens.verify_cached(token2) is None and m.tokens.verify(token2) is None


def test_token_cache_is_off_without_the_watch(tmp_path: Path) -> None:
    db = str(tmp_path / "ow.db")
    m = Manager(open_store(db))
    token, rec = m.tokens.create("agent", host="h1")
    assert m.tokens.verify(token) == rec
    assert m.tokens.verify_cached(token) is None  # nothing cached: every verify reads the store
    assert TokenBook(open_store(db)).revoke(rec.id)
    assert m.tokens.verify(token) is None  # no sync needed


def test_desired_update_is_atomic_for_readers() -> None:
    ds = DesiredStates()
    hosts = [f"h{i}" for i in range(200)]
    ds.update({h: empty_state(h, 1) for h in hosts}, 1)
    seen: list[set[int]] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.append(set(ds.revisions().values()))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for rev in range(2, 12):  # every host changes at every revision
            sets = (IRSet(f"s{rev}", ("10.0.0.1",)),)
            ds.update({h: HostDesiredState(h, rev, sets=sets) for h in hosts}, rev)
    finally:
        stop.set()
        t.join()
    assert seen and all(len(s) == 1 for s in seen)  # never a mix of old and new revisions
    assert ds.revisions() == dict.fromkeys(hosts, 11)
    assert all(len(ds.deltas_since(h, 1) or []) == 10 for h in hosts)


def test_broadcaster_wakes_every_subscriber_with_one_call_per_loop() -> None:
    b = Broadcaster()

    async def main() -> None:
        events = [b.subscribe() for _ in range(50)]
        threading.Thread(target=b.notify).start()
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), timeout=5)
        for e in events:
            b.unsubscribe(e)

    asyncio.run(main())


def test_a_change_wakes_the_feeds_of_the_hosts_it_changed_and_no_other() -> None:
    """A host's feed subscribes with its host: a change elsewhere must not wake it (with N feeds, every
    change woke N tasks that found nothing to send); a subscriber without a key, and a notify without
    keys (an agent command), still wake every one."""
    ds = DesiredStates()
    ds.update({h: HostDesiredState(h, 1) for h in ("a", "b")}, 1)

    async def main() -> None:
        a, b, anyone = ds.changed.subscribe("a"), ds.changed.subscribe("b"), ds.changed.subscribe()
        sets = (IRSet("s2", ("10.0.0.1",)),)
        await asyncio.to_thread(ds.update, {"a": HostDesiredState("a", 2, sets=sets)}, 2, only={"a"})
        await asyncio.wait_for(asyncio.gather(a.wait(), anyone.wait()), timeout=5)
        await asyncio.sleep(0.05)  # b's wake-up, if any, would have run by now
        assert not b.is_set()
        await asyncio.to_thread(ds.changed.notify)
        await asyncio.wait_for(b.wait(), timeout=5)
        for e in (a, b, anyone):
            ds.changed.unsubscribe(e)

    asyncio.run(main())
    assert ds.revisions() == {"a": 2, "b": 1}


def test_bulk_host_statuses_equal_per_host_ones(tmp_path: Path) -> None:
    m = Manager(open_store(str(tmp_path / "ow.db")))
    m.desired.update({h: empty_state(h, 3) for h in ("a", "b")}, 3)
    m.hosts.report("a", "2026-01-01T00:00:00.000Z", 3, None, None, None)
    m.hosts.report("b", "2026-01-01T00:00:00.000Z", 2, "boom", None, None)
    bulk = m.hosts.statuses(m.desired.revisions(), ["a", "b", "c"])
    assert bulk == {h: m.host_status(h) for h in ("a", "b", "c")}
    assert bulk["a"]["inSync"] and not bulk["b"]["inSync"] and bulk["b"]["lastError"] == "boom"


def test_feed_lines_encode_exactly_like_asdict() -> None:
    """The wire's fast encoder must give the same bytes as json.dumps(asdict(...)) (agents decode both)."""
    import json

    from omniwall.compiler.build import compile_catalog
    from omniwall.compiler.ir import diff
    from omniwall.model.loader import load_files
    from omniwall.model.validate import validate
    from omniwall.stream.wire import decode, delta_line, snapshot_line

    def reference(obj: dict[str, object]) -> bytes:
        return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()

    example = Path(__file__).resolve().parents[2] / "examples" / "three-tier"
    states = compile_catalog(validate(load_files(sorted(example.glob("*.yaml")))), revision=7)
    assert states
    for host, st in states.items():
        assert snapshot_line(st) == reference({"type": "snapshot", "revision": 7, "state": st.to_json()})
        d = diff(empty_state(host, 6), st)
        assert delta_line(d) == reference({"type": "delta", "delta": d.to_json()})
        assert decode(delta_line(d)).delta == d  # type: ignore[union-attr]


def test_now_iso_is_the_real_clock_to_the_millisecond(tmp_path: Path) -> None:
    """now_iso's cached text (the second's prefix formatted once, the milliseconds added) is the wall
    clock's ISO 8601 UTC text, across millisecond and second boundaries."""
    import time
    from datetime import UTC, datetime

    m = Manager(open_store(str(tmp_path / "ow.db")))
    seconds = set()
    end = time.monotonic() + 1.3  # crosses at least one second boundary
    while time.monotonic() < end:
        before = time.time_ns() // 1_000_000
        text = m.now_iso()
        after = time.time_ns() // 1_000_000
        assert text.endswith("Z") and len(text) == len("2026-12-07T23:00:00.123Z"), text
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        assert when.tzinfo is not None and when.utcoffset() == UTC.utcoffset(None)
        ms = int(when.timestamp() * 1000 + 0.5)
        assert before <= ms <= after, (text, before, after)
        seconds.add(ms // 1000)
        time.sleep(0.0003)
    assert len(seconds) >= 2
