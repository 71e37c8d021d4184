"""Append-only audit log: one entry per object changed, written in the same txn as the change.

Entries live under `audit/<time_ns:020d>-<id>` (time order); the entry's revision is its key's
mod_revision, i.e. the revision of the change it records. Nothing ever rewrites or deletes them.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from omniwall.store import Put, Store

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
