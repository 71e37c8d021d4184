"""Append-only audit log: one entry per object changed, written in the same txn as the change.

Entries live under `audit/<time_ns:020d>-<id>` (time order); the entry's revision is its key's
mod_revision, i.e. the revision of the change it records. Nothing ever rewrites or deletes them.

Tamper evidence (`chained`, `verify`): every entry carries `seq` (1, 2, ...) and `chain` =
sha256(previous entry's chain, its key, its content); `auditchain/head` holds the last seq and chain.
The chain is computed in the very txn that writes the entries (a compare on the head serialises writers,
also across processes), so it needs nothing from callers. Editing an entry breaks its hash, deleting one
leaves a gap in `seq` (or a head beyond the last entry). The chain lives in the entries' values, which
store compaction keeps (compaction drops history events, never current values).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from omniwall.store import Compare, Put, Store
from omniwall.store.base import Op, TxnResult

from .objects import AUDIT_PREFIX


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change: a token (id, name, role), or the system itself."""

    id: str
    name: str
    role: str


SYSTEM = Actor("system", "system", "system")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    time: str  # ISO 8601 UTC
    actor: str  # token name
    actor_id: str  # token id
    role: str
    action: str  # create | update | delete | rollback
    kind: str
    tenant: str
    name: str
    changed: tuple[str, ...] = ()  # dotted field paths that changed
    previous_revision: int | None = None  # the object's revision before the change (None: created)
    request: str = ""  # entries written by one request share this id
    revision: int = 0  # filled in on read
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "actor": self.actor,
            "actorId": self.actor_id,
            "role": self.role,
            "action": self.action,
            "kind": self.kind,
            "tenant": self.tenant,
            "name": self.name,
            "changed": list(self.changed),
            "previousRevision": self.previous_revision,
            "request": self.request,
            "revision": self.revision,
            **({"extra": self.extra} if self.extra else {}),
        }


def audit_put(entry: AuditEntry, time_ns: int) -> Put:
    data = entry.to_json()
    data.pop("revision")
    return Put(f"{AUDIT_PREFIX}{time_ns:020d}-{secrets.token_hex(4)}", json.dumps(data, sort_keys=True))


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def entry_put(actor: Actor, action: str, kind: str, tenant: str, name: str, **extra: Any) -> Put:
    """An audit entry for a change made outside `Manager.commit` (tokens), stamped now."""
    e = AuditEntry(now_iso(), actor.name, actor.id, actor.role, action, kind, tenant, name, extra=extra)
    return audit_put(e, time.time_ns())


def _from_json(d: dict[str, Any], revision: int) -> AuditEntry:
    return AuditEntry(
        time=d["time"],
        actor=d["actor"],
        actor_id=d.get("actorId", ""),
        role=d.get("role", ""),
        action=d["action"],
        kind=d["kind"],
        tenant=d["tenant"],
        name=d["name"],
        changed=tuple(d.get("changed", ())),
        previous_revision=d.get("previousRevision"),
        request=d.get("request", ""),
        revision=revision,
        extra=d.get("extra", {}),
    )


@dataclass(frozen=True, slots=True)
class AuditQuery:
    tenant: str | None = None
    actor: str | None = None
    kind: str | None = None
    name: str | None = None
    since: str | None = None  # ISO 8601, inclusive
    until: str | None = None  # ISO 8601, exclusive

    def matches(self, e: AuditEntry) -> bool:
        return (
            (self.tenant is None or e.tenant == self.tenant)
            and (self.actor is None or self.actor in (e.actor, e.actor_id))
            and (self.kind is None or e.kind == self.kind)
            and (self.name is None or e.name == self.name)
            and (self.since is None or e.time >= self.since)
            and (self.until is None or e.time < self.until)
        )


def query(
    store: Store, q: AuditQuery, *, limit: int = 100, after: str | None = None
) -> tuple[list[AuditEntry], str | None]:
    """Matching entries, oldest first, and the key to continue after (None when there are no more)."""
    out: list[AuditEntry] = []
    cursor = after
    while len(out) < limit:
        page, _ = store.range(AUDIT_PREFIX, start_after=cursor, limit=500)
        if not page:
            return out, None
        for kv in page:
            cursor = kv.key
            e = _from_json(json.loads(kv.value), kv.mod_revision)
            if q.matches(e):
                out.append(e)
                if len(out) == limit:
                    more, _ = store.range(AUDIT_PREFIX, start_after=cursor, limit=1)
                    return out, (cursor if more else None)
    return out, None


# ------------------------------------------------------------------------------------------ hash chain

CHAIN_HEAD = "auditchain/head"
GENESIS = "0" * 64
_CHAIN_FIELDS = ("seq", "chain")


def entry_hash(previous: str, key: str, body: dict[str, Any]) -> str:
    """The chain value of one entry: its key and content (seq included, chain excluded) after the
    previous entry's chain value."""
    content = json.dumps({k: v for k, v in body.items() if k != "chain"}, sort_keys=True)
    return hashlib.sha256(f"{previous}\n{key}\n{content}".encode()).hexdigest()


class ChainedStore:
    """A `Store` whose txns chain the audit entries they write (see the module doc). Everything else is
    the wrapped store's."""

    MAX_ATTEMPTS = 100

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self._lock = threading.Lock()  # one chaining txn at a time in this process; the compare does the rest
        # (seq, chain, mod revision) of the head this process wrote last: the next txn compares on it
        # instead of reading the head first (on etcd a round trip per write, ~4 ms of a PUT's ~35);
        # when another process wrote meanwhile, the compare fails on the head alone and it is read
        self._head: tuple[int, str, int] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        slots = sorted(
            (op.key, i)
            for i, op in enumerate(success)
            if isinstance(op, Put) and op.key.startswith(AUDIT_PREFIX)
        )
        if not slots:
            return self.inner.txn(compares, success, failure)
        with self._lock:
            for _ in range(self.MAX_ATTEMPTS):
                # the remembered head only without failure ops: a txn failing on a stale head alone
                # must not run them (it is retried instead)
                known = self._head if not failure else None
                self._head = None  # kept only when this txn writes the head
                if known is not None:
                    seq, chain, head_rev = known
                else:
                    head = self.inner.get(CHAIN_HEAD)
                    seq, chain, head_rev = (0, GENESIS, 0)
                    if head is not None:
                        h = json.loads(head.value)
                        seq, chain, head_rev = int(h["seq"]), str(h["hash"]), head.mod_revision
                ops = list(success)
                for key, i in slots:
                    body = json.loads(ops[i].value)  # type: ignore[union-attr]
                    seq += 1
                    body["seq"] = seq
                    chain = entry_hash(chain, key, body)
                    body["chain"] = chain
                    ops[i] = Put(key, json.dumps(body, sort_keys=True))
                ops.append(Put(CHAIN_HEAD, json.dumps({"seq": seq, "hash": chain, "key": slots[-1][0]})))
                mine = Compare(CHAIN_HEAD, head_rev)
                res = self.inner.txn([*compares, mine], ops, failure)
                theirs = tuple(c for c in res.failed if c.key != CHAIN_HEAD)
                if res.succeeded:
                    self._head = (seq, chain, res.revision)
                if res.succeeded or theirs or failure:
                    return TxnResult(res.succeeded, res.revision, theirs)
                # only the head moved (another process wrote entries) and nothing was written: again
        raise RuntimeError("audit chain: the head kept moving; gave up")  # pragma: no cover


def chained(store: Store) -> Store:
    return store if isinstance(store, ChainedStore) else ChainedStore(store)  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class ChainReport:
    ok: bool
    entries: int  # chained entries checked
    unchained: int  # entries written before the chain existed (older stores): not verifiable
    broken_key: str | None = None  # the first entry found broken (or the entry after a gap)
    broken_seq: int | None = None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "unchained": self.unchained,
            "firstBroken": None
            if self.ok
            else {"key": self.broken_key, "seq": self.broken_seq, "reason": self.reason},
        }


def verify(store: Store) -> ChainReport:
    """Walk the chain in seq order; the first entry that was edited, is missing, or does not belong."""
    chained_entries: list[tuple[int, str, dict[str, Any]]] = []
    unchained: list[str] = []
    cursor = None
    while True:
        page, _ = store.range(AUDIT_PREFIX, start_after=cursor, limit=1000)
        if not page:
            break
        for kv in page:
            cursor = kv.key
            try:
                body = json.loads(kv.value)
                seq = body.get("seq")
            except (ValueError, AttributeError):
                return ChainReport(False, 0, 0, kv.key, None, "not a JSON audit entry (edited)")
            if isinstance(seq, int) and isinstance(body.get("chain"), str):
                chained_entries.append((seq, kv.key, body))
            else:
                unchained.append(kv.key)
    chained_entries.sort(key=lambda t: (t[0], t[1]))
    first_chained_key = min((k for _, k, _ in chained_entries), default=None)
    late = [k for k in unchained if first_chained_key is not None and k > first_chained_key]
    chain, expected = GENESIS, 1
    for n, (seq, key, body) in enumerate(chained_entries):
        if seq != expected:
            why = (
                f"entry #{expected} is missing (deleted); the chain resumes at #{seq}"
                if seq > expected
                else f"entry #{seq} appears twice (copied or forged)"
            )
            return ChainReport(False, n, len(unchained), key, expected, why)
        want = entry_hash(chain, key, body)
        if want != body["chain"]:
            return ChainReport(
                False, n, len(unchained), key, seq, "changed after it was written (hash mismatch)"
            )
        chain, expected = want, expected + 1
    if late:
        return ChainReport(
            False,
            len(chained_entries),
            len(unchained),
            late[0],
            None,
            "has no chain hash (edited or inserted)",
        )
    head = store.get(CHAIN_HEAD)
    if head is not None:
        h = json.loads(head.value)
        if int(h.get("seq", 0)) != expected - 1 or h.get("hash") != chain:
            return ChainReport(
                False,
                len(chained_entries),
                len(unchained),
                h.get("key"),
                int(h.get("seq", 0)),
                f"the chain ends at #{expected - 1} but its head records #{h.get('seq')}: "
                "the last entries were deleted",
            )
    elif chained_entries:
        return ChainReport(
            False, len(chained_entries), len(unchained), None, None, "the chain head is missing (deleted)"
        )
    return ChainReport(True, len(chained_entries), len(unchained))
