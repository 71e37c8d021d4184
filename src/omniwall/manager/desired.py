"""Per-host desired states, the deltas between their versions, and wake-ups for the feeds waiting on them.

A host's state gets a new revision only when its content changes: a write that does not touch a host
leaves its state (and revision) alone, so its agent receives nothing. The last `max_log` deltas of each
host are kept, so an agent reconnecting with a recent revision gets deltas, an older one a snapshot.

Two ways in (docs/design/delta-path.md):
- `apply(deltas)`, the common one: the incremental compiler's per-host deltas are stored and sent as
  they are; each host's current state (for snapshots) is `apply_delta(previous, delta)`, which shares
  every part the delta does not touch. No full state is built or compared.
- `update(states)`: a full rebuild (first load, a compiler failure, the reload after a compaction) hands
  complete states, which are diffed against the previous ones, so agents still get deltas.

A change to many hosts leaves many long-lived objects (a delta in each host's log, a new state), which
the cyclic collector would otherwise traverse again in each full collection, and those grow with the
hosts: at 10,000 hosts a full collection landing in a change's window doubled its CPU (bench/
manager_hosts.py, BENCHMARKS.md). So after such a change they are moved to the permanent generation
(`_freeze`), like the compiler's first build (compiler/incremental.py `_gc_paused`). They hold no
reference cycle: a delta pushed out of the log, a state replaced, are freed by reference counting.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from itertools import islice

from omniwall.compiler.ir import HostDelta, HostDesiredState, apply_delta, diff, empty_state

log = logging.getLogger("omniwall.manager")

FREEZE_HOSTS = 256  # a change to at least this many hosts freezes what it left (module docstring)


def _freeze(hosts: int) -> None:
    """Freeze the objects of a change to `hosts` hosts. The young generations are collected first, so
    the cyclic garbage of the moment (a request's exception, say) is freed, not pinned; what a full
    collection would have found in the old generation is pinned, as by every `gc.freeze`."""
    if hosts >= FREEZE_HOSTS and gc.isenabled():
        gc.collect(1)
        gc.freeze()


class Broadcaster:
    """Wakes subscribed asyncio tasks (on whatever loop they run) from any thread: every one, or those
    subscribed to one of the given keys (a host's feed subscribes with its host: a change that leaves a
    host's state alone does not wake its feed, which would only find nothing to send).

    A subscriber may also give a `push`: called on its loop instead of waking the task, it does the
    task's work itself when it can (a feed writes the host's new deltas to its connection) and returns
    True; False (or an exception) wakes the task as usual. With a thousand feeds on one loop, that is one
    callback for the change instead of a thousand task wake-ups (bench/manager_hosts.py)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Event, str | None, Push | None]] = {}

    def subscribe(self, key: str | None = None, push: Push | None = None) -> asyncio.Event:
        """`key` None: woken by every notify."""
        ev = asyncio.Event()
        with self._lock:
            self._subs[id(ev)] = (asyncio.get_running_loop(), ev, key, push)
        return ev

    def unsubscribe(self, ev: asyncio.Event) -> None:
        with self._lock:
            self._subs.pop(id(ev), None)

    def notify(self, keys: Collection[str] | None = None) -> None:
        """Wake the subscribers of `keys` and those of no key (`keys` None: all of them)."""
        # One wake-up per loop, not per subscriber: call_soon_threadsafe writes to the loop's self-pipe,
        # and a thousand feeds on one loop would mean a thousand syscalls and callbacks per change.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Event, Push | None]]] = {}
        with self._lock:
            for loop, ev, key, push in self._subs.values():
                if keys is None or key is None or key in keys:
                    by_loop.setdefault(loop, []).append((ev, push))
        for loop, subs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_set_all, subs)
            except RuntimeError:  # loop closed: its subscribers are gone
                for ev, _ in subs:
                    self.unsubscribe(ev)


Push = Callable[[], bool]


def _set_all(subs: list[tuple[asyncio.Event, Push | None]]) -> None:
    for ev, push in subs:
        if push is not None:
            try:
                if push():
                    continue
            except Exception:  # the task does it, and meets the error itself
                log.exception("a subscriber's push failed; waking its task instead")
        ev.set()


class DesiredStates:
    def __init__(self, max_log: int = 256) -> None:
        self._lock = threading.Lock()  # held only for lookups and the final swap of an update
        self._update_lock = threading.Lock()  # one update at a time
        self._states: dict[str, HostDesiredState] = {}
        self._log: dict[str, deque[HostDelta]] = {}
        self._max_log = max_log
        self.changed = Broadcaster()

    def apply(self, deltas: Mapping[str, HostDelta]) -> list[HostDelta]:
        """Take the compiler's per-host deltas; returns those that changed a host (the ones logged).

        Each delta is rebased on the revision this book holds for the host: the compiler numbers a
        host's states itself (from its last rebuild), while the content here is the same (a rebuild
        goes through `update`, which makes it so), and agents know only this book's revisions. A host
        seen for the first time gets its state without a log entry (its feed starts with a snapshot)."""
        out: list[HostDelta] = []
        with self._update_lock:
            with self._lock:
                current = {h: self._states.get(h) for h in deltas}
            changed: list[tuple[str, HostDesiredState, HostDelta | None]] = []
            for host, d in deltas.items():
                prev = current[host]
                if prev is not None and d.empty:
                    continue
                base = prev if prev is not None else empty_state(host, d.from_revision)
                if d.from_revision != base.revision:
                    d = replace(d, from_revision=base.revision)
                changed.append((host, apply_delta(base, d), d if prev is not None else None))
            with self._lock:
                for host, target, d in changed:
                    if d is not None:
                        self._log.setdefault(host, deque(maxlen=self._max_log)).append(d)
                        out.append(d)
                    self._states[host] = target
        if changed:
            self.changed.notify({host for host, _, _ in changed})
            _freeze(len(changed))
        return out

    def update(
        self, new: dict[str, HostDesiredState], revision: int, *, only: set[str] | None = None
    ) -> list[HostDelta]:
        """Take complete states at `revision` (a full rebuild; `apply` is the incremental path); returns
        the deltas of the hosts whose state changed.
        `only`: just these hosts were recompiled (the others are unchanged); otherwise `new` is complete
        and hosts missing from it disappeared: they get an empty state (their agents clear their tables)."""
        deltas: list[HostDelta] = []
        # Compare and diff outside `_lock`: with a thousand hosts that takes a while, and every feed and
        # ack reads a state or revision meanwhile (on the server's event loop). Readers see the old states
        # until the swap at the end, which installs states and deltas together.
        with self._update_lock:
            with self._lock:
                current = dict(self._states)
            changed: list[tuple[str, HostDesiredState, HostDelta | None]] = []
            hosts = only if only is not None else set(new) | set(current)
            for host in sorted(hosts):
                target = new.get(host) or empty_state(host, revision)
                target = replace(target, revision=revision)
                prev = current.get(host)
                if prev is not None and replace(target, revision=prev.revision) == prev:
                    continue
                changed.append((host, target, diff(prev, target) if prev is not None else None))
            with self._lock:
                for host, target, d in changed:
                    if d is not None:
                        self._log.setdefault(host, deque(maxlen=self._max_log)).append(d)
                        deltas.append(d)
                    self._states[host] = target
        if deltas:
            self.changed.notify({host for host, _, _ in changed})
            _freeze(len(changed))
        return deltas

    def snapshot(self, host: str) -> HostDesiredState | None:
        with self._lock:
            return self._states.get(host)

    def all(self) -> dict[str, HostDesiredState]:
        with self._lock:
            return dict(self._states)

    def revisions(self) -> dict[str, int]:
        """Every host's desired revision, under one lock acquisition (GET /v1/status)."""
        with self._lock:
            return {h: s.revision for h, s in self._states.items()}

    def revision(self, host: str) -> int:
        with self._lock:
            s = self._states.get(host)
            return s.revision if s else 0

    def deltas_since(self, host: str, from_revision: int) -> list[HostDelta] | None:
        """The deltas taking revision `from_revision` to the current state; [] when current; None when
        `from_revision` is unknown or too old (the caller sends a snapshot instead)."""
        with self._lock:
            state = self._states.get(host)
            if state is None or from_revision <= 0:
                return None
            if from_revision == state.revision:
                return []
            log = self._log.get(host)
            if not log:
                return None
            # From the newest: a following feed is one delta behind, not `max_log` (no copy of the log
            # per host per change either).
            for i in range(len(log) - 1, -1, -1):
                if log[i].from_revision == from_revision:
                    return list(islice(log, i, None))
        return None
