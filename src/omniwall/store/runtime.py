"""Runtime keys of a cluster store: state that is shared by the managers but is not policy (host status,
agent liveness, leader elections), with leases. On etcd (docs/etcd.md, "Runtime keys and leases").

These keys live outside the store's prefix (`/omniwall-run/` next to `/omniwall/`): they are never part
of the store's events, history, audit log or model, and writing them never changes an object. They do
advance etcd's revision (the store revision may skip numbers; nothing relies on it being dense).

A lease (`grant(ttl)`) expires `ttl` seconds after its last `keepalive`; etcd then deletes every key put
with it. A manager keeps one lease for all the keys that must vanish with it (the feeds it holds, the
elections it won).
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from .base import StoreError

log = logging.getLogger(__name__)

_STOP = object()  # queued by `Follower.stop` for a follower fed by the store's watch


@dataclass(frozen=True, slots=True)
class RuntimeKV:
    key: str  # below the runtime prefix
    value: str
    mod_revision: int  # etcd's
    lease: int


class Follower:
    """The handle of `EtcdRuntime.follow`: `stop()` ends its thread (closes the open stream, or wakes
    the thread waiting for the store's watch)."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.client: httpx.Client | None = None
        self.wake: Callable[[], None] | None = None

    def stop(self) -> None:
        self.stopped.set()
        if self.client is not None:
            self.client.close()
        if self.wake is not None:
            self.wake()
        if self.thread is not None:
            self.thread.join(timeout=5)


@dataclass(frozen=True, slots=True)
class RuntimeEvent:
    type: str  # put | delete
    key: str
    value: str | None
    mod_revision: int


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def range_end(prefix: bytes) -> bytes:
    """etcd's prefix end: the prefix with its last byte below 0xff incremented ("\\0" = to the end)."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\0"


class EtcdRuntime:
    def __init__(self, store: Any) -> None:
        """`store`: the EtcdStore whose transport (endpoints, TLS, failover) this uses."""
        self._store = store
        self._b64 = b64
        self.ns = store._ns.rstrip(b"/") + b"-run/"

    def _k(self, key: str) -> str:
        return self._b64(self.ns + key.encode())

    def _call(self, path: str, body: dict[str, Any], write: bool = False) -> dict[str, Any]:
        return self._store._call(path, body, write=write)

    # ---- leases
    def grant(self, ttl: int) -> int:
        return int(self._call("lease/grant", {"TTL": str(ttl)}, write=True)["ID"])

    def keepalive(self, lease: int) -> bool:
        """Renew; False when the lease has expired (its keys are gone)."""
        data = self._call("lease/keepalive", {"ID": str(lease)})
        return int(data.get("result", {}).get("TTL", 0) or 0) > 0

    def revoke(self, lease: int) -> None:
        try:
            self._call("kv/lease/revoke", {"ID": str(lease)}, write=True)
        except StoreError as e:
            if "lease not found" not in str(e):
                raise

    # ---- keys
    def _put(self, key: str, value: str, lease: int) -> dict[str, Any]:
        req: dict[str, Any] = {"key": self._k(key), "value": self._b64(value.encode())}
        if lease:
            req["lease"] = str(lease)
        return {"request_put": req}

    def write(self, puts: Sequence[tuple[str, str, int]], deletes: Sequence[str] = ()) -> int:
        """Put (key, value, lease) and delete keys in one txn; returns etcd's revision after it."""
        ops = [self._put(k, v, lease) for k, v, lease in puts]
        ops += [{"request_delete_range": {"key": self._k(k)}} for k in deletes]
        data = self._call("kv/txn", {"compare": [], "success": ops}, write=True)
        return int(data["header"]["revision"])

    def create(self, key: str, value: str, lease: int = 0) -> tuple[bool, str]:
        """Put `key` only if it does not exist (compare create_revision == 0). Returns (created, the value
        the key holds now: ours, or the one that was there first)."""
        body = {
            "compare": [{"key": self._k(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            "success": [self._put(key, value, lease)],
            "failure": [{"request_range": {"key": self._k(key)}}],
        }
        data = self._call("kv/txn", body, write=True)
        if data.get("succeeded"):
            return True, value
        kvs = (data.get("responses") or [{}])[0].get("response_range", {}).get("kvs") or []
        if not kvs:
            return False, ""  # deleted in between (its lease expired): the caller tries again
        return False, self._value(kvs[0])

    def get(self, key: str) -> RuntimeKV | None:
        kvs = self._call("kv/range", {"key": self._k(key)}).get("kvs") or []
        return self._kv(kvs[0]) if kvs else None

    def range(self, prefix: str) -> tuple[list[RuntimeKV], int]:
        full = self.ns + prefix.encode()
        data = self._call("kv/range", {"key": self._b64(full), "range_end": self._b64(range_end(full))})
        return [self._kv(kv) for kv in data.get("kvs") or []], int(data["header"]["revision"])

    def _value(self, raw: dict[str, Any]) -> str:
        return base64.b64decode(raw.get("value") or "").decode()

    def _kv(self, raw: dict[str, Any]) -> RuntimeKV:
        key = base64.b64decode(raw["key"])[len(self.ns) :].decode()
        lease = int(raw.get("lease", 0) or 0)
        return RuntimeKV(key, self._value(raw), int(raw.get("mod_revision", 0)), lease)

    # ---- following changes
    def follow(
        self,
        prefix: str,
        on_snapshot: Callable[[list[RuntimeKV]], None],
        on_event: Callable[[RuntimeEvent], None],
        name: str = "omniwall-runtime-watch",
    ) -> Follower:
        """A thread: a snapshot of `prefix` (`on_snapshot`), then each change (`on_event`), until `stop`.
        After a broken stream it takes a new snapshot (nothing is missed: each snapshot is complete).

        The changes come from the store's own watch of etcd's keyspace when it has one
        (`EtcdStore.subscribe_outside`), not from a watch of `prefix`: that watch receives every key of
        the runtime already (each ack of the fleet), and a second and third watch per manager (host
        status, agent commands) cost etcd and the manager the same events again."""
        f = Follower()
        subscribe = getattr(self._store, "subscribe_outside", None)

        def run() -> None:
            while not f.stopped.is_set():
                try:
                    if subscribe is not None:
                        self._follow_tail(prefix, on_snapshot, on_event, f)
                    else:
                        items, rev = self.range(prefix)
                        on_snapshot(items)
                        for ev in self._watch(prefix, rev + 1, f):
                            on_event(ev)
                except Exception as e:  # etcd away: retry; readers keep the last known state
                    log.debug("runtime watch of %s: %s", prefix, e)
                if f.stopped.wait(0.5):
                    return

        f.thread = threading.Thread(target=run, name=name, daemon=True)
        f.thread.start()
        return f

    def _follow_tail(
        self,
        prefix: str,
        on_snapshot: Callable[[list[RuntimeKV]], None],
        on_event: Callable[[RuntimeEvent], None],
        f: Follower,
    ) -> None:
        """One snapshot and the changes after it, from the store's watch, until the store says events
        may have been missed (a new snapshot then) or `f` stops. The store's watch thread only queues
        the raw events: decoding them and the callbacks run here."""
        q: queue.SimpleQueue[list[dict[str, Any]] | object | None] = queue.SimpleQueue()
        f.wake = lambda: q.put(_STOP)
        if f.stopped.is_set():
            return
        handle = self._store.subscribe_outside(self.ns + prefix.encode(), q.put)
        try:
            # subscribed first: every change after this read is queued (the watch follows already)
            items, rev = self.range(prefix)
            on_snapshot(items)
            while True:
                batch = q.get()
                if batch is None or batch is _STOP or f.stopped.is_set():
                    return
                for raw in batch:  # type: ignore[union-attr]
                    ev = self._event(raw)
                    if ev.mod_revision > rev:  # queued before the snapshot's read: in it already
                        on_event(ev)
        finally:
            self._store.unsubscribe_outside(handle)

    def _event(self, raw: dict[str, Any]) -> RuntimeEvent:
        kv = raw["kv"]
        key = base64.b64decode(kv["key"])[len(self.ns) :].decode()
        if raw.get("type") == "DELETE":
            return RuntimeEvent("delete", key, None, int(kv["mod_revision"]))
        return RuntimeEvent("put", key, self._value(kv), int(kv["mod_revision"]))

    def _watch(self, prefix: str, start: int, f: Follower) -> Iterator[RuntimeEvent]:
        full = self.ns + prefix.encode()
        body = {"key": self._b64(full), "range_end": self._b64(range_end(full)), "start_revision": str(start)}
        store = self._store
        client = store.new_client(httpx.Timeout(store._timeout, read=30.0))  # idle: reopened
        f.client = client
        try:
            if f.stopped.is_set():
                return
            url = f"{store.endpoints[store._current]}/v3/watch"
            with client.stream("POST", url, json={"create_request": body}) as resp:
                for line in resp.iter_lines():
                    if f.stopped.is_set():
                        return
                    if not line.strip():
                        continue
                    result = json.loads(line).get("result", {})
                    if result.get("canceled") or result.get("compact_revision"):
                        return  # start over from a snapshot
                    for raw in result.get("events") or []:
                        yield self._event(raw)
        finally:
            client.close()
