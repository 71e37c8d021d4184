"""The manager's model: every resource in memory, rebuilt from the store at start and kept current by
the store's watch (writes of this process and of other replicas alike), so replicas converge.

What follows from a change is not this module's job: it reports the resources that changed (and the
other keys' events, such as migration records) to the `Listener` it was given, under its sync lock,
which serialises syncs with whatever the listener does (the compile). Readers never wait for that:
`_model_lock` is held only while the catalog's dicts change or are copied.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Protocol

from omniwall.model.catalog import Catalog
from omniwall.model.resources import _Resource
from omniwall.store import CompactedError, Event, Store, StoreUnavailable

from .contracts import describe
from .objects import RES_PREFIX, TOKEN_PREFIX, decode, key_of, object_tenant, resource_key, split_key
from .plan import copy_catalog
from .tokens import TokenBook

log = logging.getLogger(__name__)

Removed = tuple[str, str, str]  # (kind, tenant, name)
_FREEZE_AFTER = 200_000  # young containers left by a load: freeze them (as the compiler's build does)


class Listener(Protocol):
    def reloaded(self, catalog: Catalog, revision: int) -> None:
        """The whole model was (re)loaded: everything may have changed."""

    def other_event(self, e: Event) -> bool:
        """An event outside resources and tokens; True when it changes what is compiled."""

    def changed(
        self, catalog: Catalog, revision: int, changed: list[_Resource], removed: list[Removed], other: bool
    ) -> None:
        """Resources changed (and/or `other` events that matter) as of `revision`."""


class Model:
    def __init__(self, store: Store, tokens: TokenBook) -> None:
        self.store = store
        self.tokens = tokens
        self.listener: Listener | None = None
        # sync_lock serialises syncs (event application + the listener's work); _model_lock is held only
        # while the catalog's dicts change or are iterated, so readers never wait for a compile.
        self.sync_lock = threading.RLock()
        self._model_lock = threading.Lock()
        self._catalog = Catalog()
        self._rev = 0
        self._watch_stop = threading.Event()
        self._watch_thread: threading.Thread | None = None

    @property
    def revision(self) -> int:
        return self._rev

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    def load_all(self) -> None:
        """Rebuild the model from the store (at start, or when the watch fell behind a compaction).

        The cyclic collector is paused meanwhile: a million objects decoded with it on meant its full
        collections re-traversing the growing catalog, over and over (decode cost per object grew with
        the store). Nothing built here is a reference cycle; what is long-lived is frozen at the end
        (the compiler's first build, run by the listener, freezes it already: see compiler/incremental)."""
        was = gc.isenabled()
        gc.disable()
        try:
            with self.sync_lock:
                items, rev = self.store.range(RES_PREFIX)
                cat = Catalog()
                for kv in items:
                    # trusted: validated when written; constructed without re-validation (objects.decode)
                    r = self.decode(kv.key, kv.value, kv.mod_revision, trusted=True)
                    if r is not None:
                        cat.add(r)
                del items  # the raw rows (~0.5 GB at a million objects) are not kept through the compile
                with self._model_lock:
                    self._catalog, self._rev = cat, rev
                if self.listener is not None:
                    self.listener.reloaded(cat, rev)
        finally:
            if gc.get_count()[0] > _FREEZE_AFTER:
                gc.freeze()
            if was:
                gc.enable()

    def sync(self, written: int | None = None) -> int:
        """Apply every store change since the model's revision; tell the listener what changed.
        `written`: the revision of the caller's own write, which the model must reach (read-your-writes);
        then the store's head is not read first (with etcd that is two round trips fewer per write, the
        watch brings whatever came after)."""
        with self.sync_lock:
            try:
                # Read before the events: they cover at least up to it. A cluster store's revision also
                # moves for keys outside the objects (etcd's runtime keys): the model is current up to
                # `head` even when no event came, so the watch does not wake for them again.
                head = self.store.revision() if written is None else written
                events = self.store.events(self._rev + 1, head=head)
            except CompactedError:
                log.warning("watch fell behind a compaction; reloading the model")
                self.tokens.forget()  # token changes may be among the events we cannot see
                self.load_all()
                return self._rev
            if not events:
                with self._model_lock:
                    self._rev = max(self._rev, head)
                return self._rev
            changed: dict[str, _Resource] = {}
            removed: dict[str, Removed] = {}
            other = False
            with self._model_lock:
                for e in events:
                    if e.key.startswith(TOKEN_PREFIX):  # created or revoked, maybe by another process
                        self.tokens.forget(e.key[len(TOKEN_PREFIX) :])
                    elif e.key.startswith(RES_PREFIX):
                        r = self._apply_event(e)
                        if r is None:
                            changed.pop(e.key, None)
                            removed[e.key] = split_key(e.key)
                        else:
                            removed.pop(e.key, None)
                            changed[e.key] = r
                    elif self.listener is not None and self.listener.other_event(e):
                        other = True
                self._rev = max(events[-1].revision, head)
            if (changed or removed or other) and self.listener is not None:
                # the revision of the last change itself, not `head`: every manager then gives a host's
                # new state the same revision, whenever its sync ran (agents may resume on another one)
                self.listener.changed(
                    self._catalog, events[-1].revision, list(changed.values()), list(removed.values()), other
                )
            return self._rev

    def start_watch(self, poll: float = 0.25) -> None:
        """Follow writes made by other processes (replicas, `omniwall token`) in a background thread."""
        if self._watch_thread is not None:
            return
        self._watch_stop.clear()
        self.tokens.cache = True  # the watch drops cached tokens that any process changes (sync())

        def loop() -> None:
            away = False  # the store is unreachable: said once, not every round
            while not self._watch_stop.is_set():
                try:
                    if self.store.wait(self._rev + 1, poll):
                        # etcd: up to what the store's own watch holds, not a head read (store/etcd.py)
                        self.sync(self.store.watched_revision())
                    if away:
                        log.warning("store reachable again; the model follows it from revision %d", self._rev)
                        away = False
                except StoreUnavailable as e:  # etcd away: serve the last model, retry until it is back
                    if not away:
                        log.warning(
                            "store unreachable, serving the last model (revision %d): %s", self._rev, e
                        )
                        away = True
                    time.sleep(poll)
                except Exception:  # keep watching; the next round retries
                    log.exception("model sync failed")
                    time.sleep(poll)

        self._watch_thread = threading.Thread(target=loop, name="omniwall-watch", daemon=True)
        self._watch_thread.start()

    def stop_watch(self) -> None:
        self.tokens.cache = False
        self.tokens.forget()
        self._watch_stop.set()
        if self._watch_thread is not None:
            self._watch_thread.join(timeout=5)
            self._watch_thread = None

    def _apply_event(self, e: Event) -> _Resource | None:
        """Apply one store event to the catalog; returns the new object (None: gone)."""
        kind, tenant, name = split_key(e.key)
        r = self.decode(e.key, e.value or "", e.revision) if e.type == "put" else None
        if r is None:
            self._catalog.remove(kind, tenant, name)
        else:
            self._catalog.add(r)
        return r

    def decode(self, key: str, value: str, revision: int, *, trusted: bool = False) -> _Resource | None:
        try:
            return decode(value, revision, trusted=trusted)
        except Exception as err:  # a stored object the current schema rejects: skip it, loudly
            log.error("skipping unreadable stored object %s: %s", key, describe(err))
            return None

    # ------------------------------------------------------------------ reads
    def get(self, kind: str, tenant: str, name: str, *, catalog: Catalog | None = None) -> _Resource | None:
        table = (catalog or self._catalog).table(kind)
        t = object_tenant(kind, tenant, name)
        return table.get(name if kind in ("Tenant", "Host") else (t, name))

    def list(self, kind: str) -> list[_Resource]:
        return self.list_at(kind)[0]

    def list_at(self, kind: str) -> tuple[list[_Resource], int]:
        """Every object of `kind` and the model revision they are at, read together."""
        with self._model_lock:
            items, rev = list(self._catalog.table(kind).values()), self._rev
        return sorted(items, key=resource_key), rev

    def host_names(self) -> list[str]:
        with self._model_lock:
            return sorted(self._catalog.hosts)

    def snapshot_catalog(self) -> tuple[Catalog, int]:
        """A private copy of the model and its revision (safe to iterate while the model moves on)."""
        with self._model_lock:
            return copy_catalog(self._catalog), self._rev

    def history(self, kind: str, tenant: str, name: str) -> list[tuple[Event, _Resource | None]]:
        key = key_of(kind, tenant, name)
        out: list[tuple[Event, _Resource | None]] = []
        for e in self.store.history(key):
            obj = self.decode(key, e.value, e.revision) if e.type == "put" and e.value else None
            out.append((e, obj))
        return out

    def value_at(self, kind: str, tenant: str, name: str, revision: int) -> _Resource | None:
        key = key_of(kind, tenant, name)
        kv = self.store.get(key, revision=revision)
        return self.decode(key, kv.value, kv.mod_revision) if kv else None


__all__ = ["Listener", "Model", "Removed"]
