"""`Store` on etcd v3 (docs/etcd.md), through etcd's HTTP/JSON gateway (`/v3/...`) with httpx.

Client: our own thin client over the grpc-gateway, on httpx (already a dependency). Tried first:
`etcd3gw` (the OpenStack gateway client) gives no error when a watch starts behind compaction (it just
times out), so "resync on compaction" cannot be built on it; `etcd-sdk-python` (gRPC) installs without
its protobuf dependency and does not import; `aetcd` is asyncio-only while `Store` is synchronous and
threaded. The gateway is served by every etcd >= 3.4 (Debian's `etcd-server`) at `/v3/`.

Revisions: the store revision is etcd's revision minus one. A fresh etcd cluster is at revision 1 with
no key, which is the protocol's "0 for an empty store"; the first write is etcd revision 2 = store
revision 1, so on a dedicated cluster every write bumps the store revision by exactly one, as with
SQLite. If other programs share the cluster (outside `prefix`), their writes also advance etcd's
revision: store revisions then still increase strictly but may skip numbers (nothing here relies on
them being dense). `Compare(key, r)` compares etcd's mod revision with r + 1 (0 stays "absent").

History: etcd keeps every revision (MVCC) until it is compacted, and this store never compacts by
itself (start etcd without `--auto-compaction-*`): `compact(R)` is the only thing that drops history,
as with SQLite. `events(R)` / `history(key)` read etcd's history with a watch that starts at a past
revision and stops at the revision read just before. `compact(R)` compacts etcd at etcd revision R
(store revision R - 1), one earlier than strictly needed, because etcd drops a delete made at the
compaction revision itself: this keeps every change with store revision >= R, and etcd's reported
compaction revision is then exactly the store's `compacted_revision()`. A read or watch older than
that raises `CompactedError` (etcd answers a watch from a compacted revision with `compact_revision`),
so a caller resyncs from a snapshot.

Tail: etcd serves a watch that starts at a past revision only after its next 100 ms resync, so each
store also keeps one long-lived watch over the whole keyspace (`_Tail`, started by the first
`events`/`wait`) and answers `events(R)` for recent R and `wait` from it; older revisions, `history`
and anything the tail is not sure of go to etcd's history as above. The tail drops what this store
compacts; events that another client compacted away may still be served from it (they are correct).

Endpoints: a list; requests go to the first that answers. A write is retried on the next endpoint only
when the connection could not be made (the request was never sent), so it is never applied twice.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx

from omniwall.store.base import (
    CompactedError,
    Compare,
    Delete,
    Event,
    FutureRevisionError,
    KeyValue,
    Op,
    Put,
    StoreError,
    StoreLimitError,
    StoreUnavailable,
    TxnResult,
    check_unique_keys,
    follow,
)
from omniwall.store.runtime import EtcdRuntime, b64, range_end

DEFAULT_PREFIX = "/omniwall/"
REQUEST_TIMEOUT = 10.0  # seconds for one unary request (an election takes ~1 s)
HEAD_CHECK = 1.0  # seconds between two head reads of an idle `wait` while the tail follows
SUBSCRIBE_WAIT = 2.0  # seconds `subscribe_outside` waits for the tail to follow (etcd away: retried)


class EtcdUnavailable(StoreUnavailable):
    """No etcd endpoint answered (or it answered with a non-etcd error)."""


_b64 = b64
_range_end = range_end


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def parse_endpoints(spec: str, scheme: str = "http") -> list[str]:
    """`etcd://h1:2379,h2:2379` or `h1:2379,https://h2:2379` -> base URLs (`scheme` by default)."""
    body = spec.removeprefix("etcd://")
    out = []
    for part in body.split(","):
        part = part.strip().rstrip("/")
        if not part:
            continue
        if "://" not in part:
            part = f"{scheme}://{part}"
        host = part.split("://", 1)[1]
        if ":" not in host.rsplit("]", 1)[-1]:
            raise ValueError(f"--store {spec!r}: endpoint {part!r} has no port (like 127.0.0.1:2379)")
        out.append(part)
    if not out:
        raise ValueError(f"--store {spec!r}: no etcd endpoint (expected etcd://HOST:PORT[,HOST:PORT...])")
    return out


class EtcdStore:
    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = REQUEST_TIMEOUT,
        ca: str | None = None,
        cert: tuple[str, str] | None = None,
    ) -> None:
        """`ca`: verify etcd's certificate with this CA file (else the system's); `cert`: (certificate,
        key) files of a client certificate, for an etcd started with `--client-cert-auth`. Either one
        makes `https://` the default scheme of endpoints given without one."""
        tls = ca is not None or cert is not None
        if isinstance(endpoints, str):
            self.endpoints = parse_endpoints(endpoints, "https" if tls else "http")
        else:
            self.endpoints = list(endpoints)
        if not self.endpoints:
            raise ValueError("EtcdStore needs at least one endpoint")
        self._ns = prefix.encode()
        self._timeout = timeout
        self._ssl = ssl.create_default_context(cafile=ca)
        if cert is not None:
            self._ssl.load_cert_chain(cert[0], cert[1])
        self._client = self.new_client(httpx.Timeout(timeout))
        self._current = 0  # index of the endpoint that answered last
        self._compacted_floor = 0  # compaction only moves forward: a lower bound for the search
        self._tail = _Tail(self)  # started by the first events()/wait()
        self._head_read = 0.0  # monotonic time `wait` last read the head while the tail followed
        self.revision()  # fail now, naming the endpoints, if no etcd answers

    # ---- transport
    def new_client(self, timeout: httpx.Timeout) -> httpx.Client:
        # trust_env=False: no proxy from the environment between us and etcd
        return httpx.Client(timeout=timeout, verify=self._ssl, trust_env=False)

    def _call(self, path: str, body: dict[str, Any], *, write: bool = False) -> dict[str, Any]:
        errors: list[str] = []
        start = self._current
        for i in range(len(self.endpoints)):
            idx = (start + i) % len(self.endpoints)
            url = f"{self.endpoints[idx]}/v3/{path}"
            try:
                resp = self._client.post(url, json=body)
            except httpx.ConnectError as e:
                errors.append(f"{self.endpoints[idx]}: {e}")
                continue
            except httpx.HTTPError as e:
                if write:  # may have been applied: never retry a write elsewhere
                    raise EtcdUnavailable(f"etcd {self.endpoints[idx]}: {path} failed: {e}") from e
                errors.append(f"{self.endpoints[idx]}: {e}")
                continue
            self._current = idx
            try:
                data = resp.json() if resp.content else {}
                if resp.status_code in (404, 405) or (
                    resp.status_code == 200 and not ("header" in data or "result" in data)
                ):
                    raise ValueError("not an etcd answer")
            except ValueError:
                raise StoreError(
                    f"{self.endpoints[idx]} is not an etcd v3 gateway (HTTP {resp.status_code} on /v3/{path})"
                ) from None
            if resp.status_code != 200 or "error" in data:
                msg = data.get("message") or data.get("error") or resp.text
                if "required revision has been compacted" in msg:
                    raise _Compacted()
                if "required revision is a future revision" in msg:
                    raise _Future()
                if "too many operations in txn request" in msg or "request is too large" in msg:
                    raise StoreLimitError(f"etcd {self.endpoints[idx]}: {msg}")
                if "no leader" in msg or "leader changed" in msg or "timed out" in msg:
                    if write:
                        raise EtcdUnavailable(f"etcd {self.endpoints[idx]}: {msg}")
                    errors.append(f"{self.endpoints[idx]}: {msg}")
                    continue
                raise StoreError(f"etcd {self.endpoints[idx]}: {path}: {msg}")
            return data
        raise EtcdUnavailable("no etcd endpoint answered: " + "; ".join(errors))

    def _watch_stream(self, body: dict[str, Any], timeout: float | None) -> Iterator[dict[str, Any]]:
        """The `result`s of one watch stream, until the caller stops iterating (closes the stream)."""
        errors: list[str] = []
        start = self._current
        for i in range(len(self.endpoints)):
            idx = (start + i) % len(self.endpoints)
            url = f"{self.endpoints[idx]}/v3/watch"
            t = httpx.Timeout(self._timeout, read=timeout)
            try:
                with self._client.stream("POST", url, json={"create_request": body}, timeout=t) as resp:
                    self._current = idx
                    for line in resp.iter_lines():
                        if not line.strip():
                            continue
                        msg = json.loads(line)
                        if "error" in msg:
                            raise StoreError(f"etcd {self.endpoints[idx]}: watch: {msg['error']}")
                        yield msg.get("result", {})
                    return
            except httpx.ConnectError as e:
                errors.append(f"{self.endpoints[idx]}: {e}")
                continue
        raise EtcdUnavailable("no etcd endpoint answered: " + "; ".join(errors))

    # ---- key mapping
    def _k(self, key: str) -> bytes:
        return self._ns + key.encode()

    def _kv(self, raw: dict[str, Any]) -> KeyValue:
        return KeyValue(
            key=_unb64(raw["key"])[len(self._ns) :].decode(),
            value=_unb64(raw.get("value")).decode(),
            create_revision=int(raw.get("create_revision", 0)) - 1,
            mod_revision=int(raw.get("mod_revision", 0)) - 1,
            version=int(raw.get("version", 0)),
        )

    @staticmethod
    def _rev(data: dict[str, Any]) -> int:
        return int(data["header"]["revision"]) - 1

    # ---- reads
    def revision(self) -> int:
        return self._rev(self._call("kv/range", {"key": _b64(self._ns), "count_only": True}))

    def compacted_revision(self) -> int:
        """etcd has no call for it: the oldest etcd revision a range can still read (binary search)."""
        hi = self.revision() + 1  # current etcd revision: always readable
        lo = max(self._compacted_floor, 1)
        if self._readable(lo):
            return 0 if lo == 1 else lo
        while hi - lo > 1:  # invariant: lo unreadable, hi readable
            mid = (lo + hi) // 2
            if self._readable(mid):
                hi = mid
            else:
                lo = mid
        self._compacted_floor = hi
        return hi

    def _readable(self, etcd_rev: int) -> bool:
        try:
            self._call("kv/range", {"key": _b64(self._ns), "count_only": True, "revision": str(etcd_rev)})
        except _Compacted:
            return False
        return True

    def get(self, key: str, *, revision: int | None = None) -> KeyValue | None:
        body: dict[str, Any] = {"key": _b64(self._k(key))}
        if revision is not None:
            current = self.revision()
            if revision > current:
                raise FutureRevisionError(revision, current)
            if revision < current:
                # Store revision R is kept iff etcd revision R is (see the module doc): strict like SQLite.
                if not self._readable(max(revision, 1)):
                    raise CompactedError(revision, self.compacted_revision())
                if revision == 0:
                    return None  # the empty store
                body["revision"] = str(revision + 1)
        try:
            data = self._call("kv/range", body)
        except _Compacted:
            compacted = self.compacted_revision()
            raise CompactedError(revision or 0, compacted) from None
        kvs = data.get("kvs") or []
        return self._kv(kvs[0]) if kvs else None

    def range(
        self, prefix: str, *, start_after: str | None = None, limit: int | None = None
    ) -> tuple[list[KeyValue], int]:
        full = self._k(prefix)
        start = full
        if start_after is not None and start_after >= prefix:
            start = self._k(start_after) + b"\0"
        body: dict[str, Any] = {"key": _b64(start), "range_end": _b64(_range_end(full))}
        if limit is not None:
            body["limit"] = str(limit)
        data = self._call("kv/range", body)
        return [self._kv(kv) for kv in data.get("kvs") or []], self._rev(data)

    def events(self, from_revision: int, *, limit: int | None = None, head: int | None = None) -> list[Event]:
        if from_revision < self._compacted_floor:
            raise CompactedError(from_revision, self._compacted_floor)
        if head is None:
            head = self.revision()  # one round trip; a caller that knows it (its own write) saves it
        cached = self._tail.events(from_revision, head, limit)
        if cached is not None:
            return cached
        return self._events(from_revision, limit=limit)

    def _events(self, from_revision: int, *, limit: int | None = None, key: str | None = None) -> list[Event]:
        """Replay etcd's history. The watch covers the whole keyspace when the end is not known from
        the key itself: every etcd revision has at least one event somewhere, so reaching the revision
        read before is a sure end. Events outside `prefix` are dropped."""
        head = self.revision() + 1  # etcd revision to read up to
        if from_revision < 0:
            from_revision = 0
        if from_revision + 1 > head:
            return []
        # Start one etcd revision early (store revision from_revision - 1) so that a compaction at
        # exactly from_revision's etcd revision is reported (etcd drops deletes made there).
        start = max(from_revision, 1)
        if key is not None:
            kv = self._call("kv/range", {"key": _b64(self._k(key))}).get("kvs")
            if kv:  # the key exists: its last change is its mod revision
                head = int(kv[0]["mod_revision"])
                if head <= from_revision:
                    return []  # no change of the key since from_revision
                body = {"key": _b64(self._k(key)), "start_revision": str(start)}
            else:  # deleted or never written: scan everything up to head
                body = {"key": _b64(b"\0"), "range_end": _b64(b"\0"), "start_revision": str(start)}
        else:
            body = {"key": _b64(b"\0"), "range_end": _b64(b"\0"), "start_revision": str(start)}
        out: list[Event] = []
        stream = self._watch_stream(body, timeout=self._timeout)
        try:
            for result in stream:
                if result.get("canceled") or int(result.get("compact_revision", 0) or 0):
                    compacted = int(result.get("compact_revision", 0) or 0)
                    if compacted:
                        self._compacted_floor = max(self._compacted_floor, compacted)
                        raise CompactedError(from_revision, compacted)
                    raise StoreError(f"etcd watch canceled: {result.get('cancel_reason', '')}")
                last = 0
                for raw in result.get("events") or []:
                    ev_kv = raw["kv"]
                    rev = int(ev_kv["mod_revision"])
                    last = rev
                    if rev <= from_revision:
                        continue  # the extra revision before from_revision
                    if limit is not None and len(out) >= limit and rev - 1 > out[-1].revision:
                        return out  # never split a revision (a txn) across pages
                    k = _unb64(ev_kv["key"])
                    if not k.startswith(self._ns):
                        continue
                    if key is not None and k != self._k(key):
                        continue
                    if raw.get("type") == "DELETE":
                        out.append(Event(rev - 1, "delete", k[len(self._ns) :].decode(), None))
                    else:
                        value = _unb64(ev_kv.get("value")).decode()
                        out.append(Event(rev - 1, "put", k[len(self._ns) :].decode(), value))
                if last >= head:
                    return out
        except httpx.ReadTimeout as e:
            raise EtcdUnavailable(f"etcd watch did not reach revision {head - 1}: {e}") from e
        finally:
            stream.close()
        return out

    def history(self, key: str) -> list[Event]:
        """Every retained change of one key. As with SQLite, a compaction keeps the key's last put before
        the compaction point (its value then), so an object's history never starts empty."""
        while True:
            compacted = self.compacted_revision()
            base: list[Event] = []
            try:
                if compacted > 1:
                    data = self._call("kv/range", {"key": _b64(self._k(key)), "revision": str(compacted)})
                    kvs = data.get("kvs") or []
                    if kvs and int(kvs[0]["mod_revision"]) <= compacted:
                        kv = self._kv(kvs[0])
                        base = [Event(kv.mod_revision, "put", key, kv.value)]
                return base + self._events(compacted, key=key)
            except (CompactedError, _Compacted):
                continue  # compacted while we read: start again from the new point

    def watch(
        self, from_revision: int, *, stop: threading.Event | None = None, poll: float = 0.5
    ) -> Iterator[Event]:
        return follow(self, from_revision, stop, poll)

    def watched_revision(self) -> int | None:
        """The revision up to which this store's own watch (`_Tail`) holds every event, or None when it
        is not following. A watcher woken by `wait` syncs up to it (`Model.sync(written=)`) instead of
        reading the head again: every txn of any key (each gathered batch of acks too) wakes every
        manager, and the head read was a round trip to etcd each time."""
        return self._tail.complete()

    def wait(self, revision: int, timeout: float) -> bool:
        """Block on an etcd watch (not a poll) until any write reaches `revision`. While the tail
        follows, it alone answers (a write it has seen); the head is read when it times out, at most
        every HEAD_CHECK seconds, so an unreachable etcd still shows (StoreUnavailable). (The model's
        watch waits 0.25 s at a time: a head read at each was 4 round trips a second per idle manager,
        about half an idle manager's CPU and a fifth of etcd's; BENCHMARKS.md "Fan-out on etcd, part 2".)"""
        if self._tail.running():
            if self._tail.wait(revision, timeout):
                return True
            now = time.monotonic()
            if now - self._head_read < HEAD_CHECK:
                return False  # the tail follows: a write would have woken it
            self._head_read = now
            return self.revision() >= revision
        if self.revision() >= revision:
            return True
        if self._tail.wait(revision, timeout):
            return True
        if self._tail.running():
            return self.revision() >= revision
        body = {"key": _b64(b"\0"), "range_end": _b64(b"\0"), "start_revision": str(revision + 1)}
        stream = self._watch_stream(body, timeout=timeout)
        try:
            for result in stream:
                if result.get("events") or result.get("canceled"):
                    break
        except httpx.ReadTimeout:
            pass
        finally:
            stream.close()
        return self.revision() >= revision

    # ---- writes
    def put(self, key: str, value: str) -> int:
        return self.txn([], [Put(key, value)]).revision

    def delete(self, key: str) -> int | None:
        data = self._call("kv/deleterange", {"key": _b64(self._k(key))}, write=True)
        return self._rev(data) if int(data.get("deleted", 0)) else None

    def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        check_unique_keys(success)
        check_unique_keys(failure)
        cmp = [
            {
                "key": _b64(self._k(c.key)),
                "target": "MOD",
                "result": "EQUAL",
                "mod_revision": str(c.mod_revision + 1 if c.mod_revision else 0),
            }
            for c in compares
        ]
        # The failure branch also reads the compared keys, to tell which compares did not hold.
        probes = [{"request_range": {"key": _b64(self._k(c.key))}} for c in compares]
        body = {
            "compare": cmp,
            "success": [self._op(op) for op in success],
            "failure": [self._op(op) for op in failure] + probes,
        }
        try:
            data = self._call("kv/txn", body, write=True)
        except StoreLimitError as e:
            raise StoreLimitError(
                f"one write of {len(success)} operations is more than the store takes in one "
                f"transaction ({e}; raise etcd's --max-txn-ops/--max-request-bytes, or split the request)"
            ) from None
        succeeded = bool(data.get("succeeded"))
        failed: tuple[Compare, ...] = ()
        if not succeeded:
            responses = data.get("responses") or []
            reads = responses[len(failure) :]
            actual = []
            for r in reads:
                kvs = r.get("response_range", {}).get("kvs") or []
                actual.append(int(kvs[0]["mod_revision"]) - 1 if kvs else 0)
            failed = tuple(c for c, a in zip(compares, actual, strict=True) if a != c.mod_revision)
        return TxnResult(succeeded, self._rev(data), failed)

    def _op(self, op: Op) -> dict[str, Any]:
        match op:
            case Put(key, value):
                return {"request_put": {"key": _b64(self._k(key)), "value": _b64(value.encode())}}
            case Delete(key):
                return {"request_delete_range": {"key": _b64(self._k(key))}}
        raise TypeError(f"not a store op: {op!r}")

    def compact(self, revision: int) -> None:
        current = self.revision()
        if revision > current:
            raise FutureRevisionError(revision, current)
        if revision <= 1 or revision <= self._compacted_floor:
            return  # etcd revision 1 is the empty cluster: nothing before it to drop
        with contextlib.suppress(_Compacted):  # already compacted at or past it
            self._call("kv/compaction", {"revision": str(revision), "physical": True}, write=True)
        self._compacted_floor = max(self._compacted_floor, revision)
        self._tail.drop_before(revision)

    def subscribe_outside(
        self, prefix: bytes, deliver: Callable[[list[dict[str, Any]] | None], None]
    ) -> object:
        """Have the store's own watch (`_Tail`) hand `deliver` the raw etcd events of the keys below
        `prefix` (outside the store's prefix: the runtime keys), in order, each batch from one watch
        message; `deliver(None)` when events may have been missed (the tail started over). Returns the
        handle for `unsubscribe_outside` once the tail follows, so every event after a read made from
        now on is delivered; raises EtcdUnavailable when it does not follow within SUBSCRIBE_WAIT s
        (etcd away). One watch per store then serves the model and the runtime keys' followers alike: each
        watch of etcd's keyspace gets every ack of the fleet, and a manager had three (BENCHMARKS.md
        "Fan-out on etcd, part 3")."""
        return self._tail.subscribe(prefix, deliver, SUBSCRIBE_WAIT)

    def unsubscribe_outside(self, handle: object) -> None:
        self._tail.unsubscribe(handle)

    def runtime(self) -> EtcdRuntime:
        """Runtime keys with leases, beside the store (host status, liveness, elections)."""
        return EtcdRuntime(self)

    def close(self) -> None:
        self._tail.stop()
        self._client.close()


class _Compacted(StoreError):
    """etcd said: required revision has been compacted (mapped to CompactedError by the caller)."""


class _Future(StoreError):
    """etcd said: required revision is a future revision."""


class _Tail:
    """One long-lived etcd watch over the whole keyspace, from the revision it started at: it keeps the
    recent events of the store's prefix in memory, so that `events(R)` for a recent R and `wait` answer
    without opening a watch on a past revision (etcd syncs those only every 100 ms).

    Every etcd revision has at least one event somewhere in the keyspace, so the tail knows exactly up to
    which revision it is complete (`rev`); `events` uses it only when it is complete up to the head
    revision the caller read, and falls back to a one-off history read otherwise. After a disconnect
    it resumes from `rev + 1`; if that was compacted meanwhile, it starts over (its start moves up).
    """

    MAX_EVENTS = 100_000  # memory bound: older events are read from etcd's history again
    IDLE = 30.0  # seconds

    def __init__(self, store: EtcdStore) -> None:
        self._store = store
        self._cond = threading.Condition()
        self._events: list[Event] = []
        self._revs: list[int] = []  # store revision of each event, for bisect
        self._start = 0  # store revision from which the buffer holds every event (0: not started)
        self._rev = -1  # last store revision the buffer is complete up to
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._client: httpx.Client | None = None
        # runtime keys' followers: (prefix, deliver); a tuple replaced whole, read without the lock
        self._subs: tuple[tuple[bytes, Callable[[list[dict[str, Any]] | None], None]], ...] = ()

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._start > 0

    def _ensure(self) -> None:
        if self._thread is None and not self._stopped.is_set():
            self._thread = threading.Thread(target=self._run, name="omniwall-etcd-tail", daemon=True)
            self._thread.start()

    def events(self, from_revision: int, head: int, limit: int | None) -> list[Event] | None:
        self._ensure()
        with self._cond:
            if not self._start or from_revision < self._start:
                return None
            # the tail lags the caller's read by the time one event takes to arrive: wait for it briefly
            if not self._cond.wait_for(lambda: self._rev >= head, timeout=2.0):
                return None
            i = bisect.bisect_left(self._revs, from_revision)
            j = bisect.bisect_right(self._revs, head)
            if limit is not None and i + limit < j:
                j = bisect.bisect_right(self._revs, self._revs[i + limit - 1]) if limit > 0 else i
            return self._events[i:j]

    def wait(self, revision: int, timeout: float) -> bool:
        self._ensure()
        with self._cond:
            if not self._start:
                return False
            return self._cond.wait_for(lambda: self._rev >= revision, timeout)

    def subscribe(
        self, prefix: bytes, deliver: Callable[[list[dict[str, Any]] | None], None], timeout: float
    ) -> object:
        handle = (prefix, deliver)
        with self._cond:
            self._subs = (*self._subs, handle)
        self._ensure()
        with self._cond:
            if self._stopped.is_set() or not self._cond.wait_for(self.running, timeout):
                self._subs = tuple(h for h in self._subs if h is not handle)
                raise EtcdUnavailable("the store's etcd watch is not following")
        return handle

    def unsubscribe(self, handle: object) -> None:
        with self._cond:
            self._subs = tuple(h for h in self._subs if h is not handle)

    def _reset_subs(self) -> None:
        """Events may have been missed (the tail starts over, or stops): each follower re-reads."""
        for _, deliver in self._subs:
            deliver(None)

    def complete(self) -> int | None:
        """The store revision the buffer is complete up to, while following (None otherwise)."""
        with self._cond:
            return self._rev if self.running() and self._rev >= self._start - 1 else None

    def drop_before(self, revision: int) -> None:
        with self._cond:
            i = bisect.bisect_left(self._revs, revision)
            del self._events[:i], self._revs[:i]
            if self._start and self._start < revision:
                self._start = revision

    def stop(self) -> None:
        self._stopped.set()
        if self._client is not None:
            self._client.close()  # ends the blocking read of the stream
        self._reset_subs()

    def _run(self) -> None:
        store = self._store
        while not self._stopped.is_set():
            try:
                with self._cond:
                    if self._rev < 0:
                        head = store.revision()
                        self._start, self._rev = head + 1, head
                        self._events.clear()
                        self._revs.clear()
                        self._cond.notify_all()  # a subscriber waits for the tail to follow
                    start = self._rev + 1  # store revision = etcd revision - 1
                self._follow(start + 1)
            except CompactedError:
                with self._cond:
                    self._rev = -1  # fell behind a compaction while disconnected: start over
                    self._start = 0  # not following until then (a subscriber waits for it)
                self._reset_subs()
            except Exception:  # etcd unreachable or idle timeout: retry; the fallback serves meanwhile
                if self._stopped.wait(0.5):
                    return

    def _follow(self, etcd_start: int) -> None:
        store = self._store
        body = {"key": _b64(b"\0"), "range_end": _b64(b"\0"), "start_revision": str(etcd_start)}
        # an idle stream is reopened every IDLE seconds (from the next revision: nothing is missed)
        self._client = store.new_client(httpx.Timeout(store._timeout, read=self.IDLE))
        try:
            if self._stopped.is_set():
                return
            url = f"{store.endpoints[store._current]}/v3/watch"
            with self._client.stream("POST", url, json={"create_request": body}) as resp:
                for line in resp.iter_lines():
                    if self._stopped.is_set():
                        return
                    if not line.strip():
                        continue
                    result = json.loads(line).get("result", {})
                    compacted = int(result.get("compact_revision", 0) or 0)
                    if compacted:
                        raise CompactedError(etcd_start - 1, compacted)
                    if result.get("canceled"):
                        return
                    self._add(result.get("events") or [])
        finally:
            self._client.close()

    def _add(self, raw_events: list[dict[str, Any]]) -> None:
        ns = self._store._ns
        subs = self._subs
        outside: dict[int, list[dict[str, Any]]] = {}  # subscriber index -> its events of this message
        new: list[Event] = []
        last = -1
        for raw in raw_events:
            kv = raw["kv"]
            rev = int(kv["mod_revision"]) - 1
            last = max(last, rev)
            k = _unb64(kv["key"])
            if not k.startswith(ns):
                for i, (prefix, _) in enumerate(subs):
                    if k.startswith(prefix):
                        outside.setdefault(i, []).append(raw)
                continue
            key = k[len(ns) :].decode()
            if raw.get("type") == "DELETE":
                new.append(Event(rev, "delete", key, None))
            else:
                new.append(Event(rev, "put", key, _unb64(kv.get("value")).decode()))
        for i, batch in outside.items():
            subs[i][1](batch)
        if last < 0:
            return
        with self._cond:
            self._events.extend(new)
            self._revs.extend(e.revision for e in new)
            if len(self._events) > self.MAX_EVENTS:
                cut_rev = self._revs[len(self._events) - self.MAX_EVENTS // 2]
                cut = bisect.bisect_right(self._revs, cut_rev)  # whole revisions only
                del self._events[:cut], self._revs[:cut]
                self._start = cut_rev + 1
            self._rev = max(self._rev, last)
            self._cond.notify_all()
