"""API bearer tokens: roles, creation, verification, revocation, first-run bootstrap.

A token is `ow.<id>.<secret>`. The store keeps only sha256(secret) under `tokens/<id>`; verification
looks the id up and compares digests in constant time. A random 256-bit secret needs no slow KDF.

A token may expire (`expires`, UTC); an expired token verifies as None, like a revoked one. `rotate`
replaces a token by a new one with the same role, scope, name and lifetime, in one txn (the old secret
stops working at once).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

from omniwall import PROVIDER_TENANT
from omniwall.store import Compare, Put, Store
from omniwall.store.base import Delete

from .audit import SYSTEM, Actor, entry_put
from .objects import TOKEN_PREFIX

log = logging.getLogger(__name__)

BOOTSTRAP_KEY = "bootstrap/provider-admin"  # which token the first run created (one per store)


class Role(StrEnum):
    PROVIDER_ADMIN = "provider-admin"
    TENANT_ADMIN = "tenant-admin"
    TENANT_VIEWER = "tenant-viewer"
    AUDITOR = "auditor"
    AGENT = "agent"
    IDENTITY_SOURCE = "identity-source"  # POST /v1/identity/events only (identity.write)
    POSTURE_SOURCE = "posture-source"  # POST /v1/posture/reports only (posture.write)


TENANT_ROLES = frozenset({Role.TENANT_ADMIN, Role.TENANT_VIEWER})


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    name: str
    role: str
    tenant: str | None
    host: str | None
    sha256: str
    created: str
    created_by: str | None = None
    expires: str | None = None  # ISO 8601 UTC; None: never

    def public(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("sha256")
        return d

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires is not None and datetime.fromisoformat(self.expires) <= (now or datetime.now(UTC))

    def lifetime(self) -> timedelta | None:
        if self.expires is None:
            return None
        return datetime.fromisoformat(self.expires) - datetime.fromisoformat(self.created)


class TokenError(ValueError):
    """A token request that cannot be honoured; `field` names the request field at fault."""

    def __init__(self, message: str, field: str = "role") -> None:
        super().__init__(message)
        self.field = field


MAX_NAME = 128
MAX_LIFETIME = timedelta(days=3650)
_DURATION = re.compile(r"^\s*(\d{1,9})\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str | int, field: str = "expires") -> timedelta:
    """`90s`, `30m`, `24h`, `7d`, `2w` or a number of seconds -> a positive timedelta (at most 10 years)."""
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise TokenError(f"{field}: expected a duration like 24h, 7d or a number of seconds", field)
    m = _DURATION.match(str(text))
    if not m:
        raise TokenError(f"{field}: {str(text)[:40]!r} is not a duration (like 30m, 24h, 7d, 2w)", field)
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if not 60 <= seconds <= MAX_LIFETIME.total_seconds():
        raise TokenError(f"{field}: a token lives between 1 minute and 3650 days", field)
    return timedelta(seconds=seconds)


def check_name(name: object, field: str = "name") -> str:
    """Token names are shown in listings and the audit log: short, printable, no surrounding blanks."""
    if not isinstance(name, str):
        raise TokenError(f"{field}: expected a string, got {type(name).__name__}", field)
    if len(name) > MAX_NAME:
        raise TokenError(f"{field}: {len(name)} characters, at most {MAX_NAME}", field)
    if name and (not name.isprintable() or name != name.strip()):
        raise TokenError(f"{field}: only printable characters, no leading or trailing blanks", field)
    return name


def check_scope(role: str, tenant: str | None, host: str | None) -> Role:
    """Tenant roles need a tenant, the agent role needs a host, other roles take neither."""
    try:
        r = Role(role)
    except ValueError:
        raise TokenError(
            f"unknown role {str(role)[:40]!r}; roles: {', '.join(x.value for x in Role)}"
        ) from None
    if r in TENANT_ROLES and not tenant:
        raise TokenError(f"role {r.value} needs a tenant", "tenant")
    if r not in TENANT_ROLES and tenant:
        raise TokenError(f"role {r.value} is not scoped to a tenant", "tenant")
    if r in TENANT_ROLES and tenant == PROVIDER_TENANT:
        raise TokenError(
            f"tenant {PROVIDER_TENANT!r} is the provider: its admins get role provider-admin, not {r.value}",
            "tenant",
        )
    if r == Role.AGENT and not host:
        raise TokenError("role agent needs a host", "host")
    if r != Role.AGENT and host:
        raise TokenError(f"role {r.value} is not scoped to a host", "host")
    return r


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenBook:
    def __init__(self, store: Store) -> None:
        self.store = store
        # id -> record, used by verify() while `cache` is on (the manager turns it on with its store watch,
        # which calls `forget` for every token key any process writes: a revocation elsewhere is honoured
        # within one watch poll). Every request verifies a token; without the cache that is a store read
        # behind the store's single lock, i.e. behind any write's fsync.
        self.cache = False
        self._cached: dict[str, TokenRecord] = {}
        self._generation = 0  # bumped by forget(): a lookup that raced with it must not cache its result

    def create(
        self,
        role: str,
        *,
        name: str = "",
        tenant: str | None = None,
        host: str | None = None,
        created_by: str | None = None,
        actor: Actor | None = None,
        lifetime: timedelta | None = None,
    ) -> tuple[str, TokenRecord]:
        """Returns (the token string, shown once; its record). With `actor`, the creation is audited in
        the same txn. `lifetime`: the token expires that long from now."""
        r = check_scope(role, tenant, host)
        check_name(name)
        tid, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        now = datetime.now(UTC).replace(microsecond=0)
        rec = TokenRecord(
            id=tid,
            name=name or f"{r.value}-{tid}",
            role=r.value,
            tenant=tenant,
            host=host,
            sha256=_digest(secret),
            created=now.isoformat(timespec="seconds"),
            created_by=created_by,
            expires=(now + lifetime).isoformat(timespec="seconds") if lifetime is not None else None,
        )
        ops: list[Put | Delete] = [Put(TOKEN_PREFIX + tid, json.dumps(asdict(rec)))]
        if actor is not None:
            ops.append(_audit(actor, "create", rec))
        res = self.store.txn([Compare(TOKEN_PREFIX + tid, 0)], ops)
        if not res.succeeded:  # pragma: no cover - 48 random bits colliding
            raise TokenError("token id collision, try again")
        return f"ow.{tid}.{secret}", rec

    def verify(self, token: str) -> TokenRecord | None:
        parts = token.strip().split(".")
        if len(parts) != 3 or parts[0] != "ow":
            return None
        rec = self._lookup(parts[1])
        if rec is None or rec.expired():
            return None
        return rec if hmac.compare_digest(_digest(parts[2]), rec.sha256) else None

    def verify_cached(self, token: str) -> TokenRecord | None:
        """verify() from the cache alone (no store access, safe on an event loop); None: not cached or
        not valid: call verify()."""
        parts = token.strip().split(".")
        rec = self._cached.get(parts[1]) if self.cache and len(parts) == 3 and parts[0] == "ow" else None
        if rec is None or rec.expired():
            return None
        return rec if hmac.compare_digest(_digest(parts[2]), rec.sha256) else None

    def still_cached(self, rec: TokenRecord) -> bool:
        """`rec`, which verified a token before, is still that token's cached record and unexpired, so the
        token verifies as it did (writing, revoking or forgetting a token drops or replaces its cached
        record). False: verify the token again. A status stream asks this before each line instead of
        hashing the token each time."""
        return self.cache and self._cached.get(rec.id) is rec and not rec.expired()

    def _lookup(self, tid: str) -> TokenRecord | None:
        if not self.cache:
            return self.get(tid)
        rec = self._cached.get(tid)
        if rec is not None:
            return rec
        generation = self._generation
        rec = self.get(tid)
        if rec is not None and generation == self._generation and self.cache:
            self._cached[tid] = rec
        return rec

    def forget(self, tid: str | None = None) -> None:
        """Drop one cached token (None: all of them): it was written, revoked or may have been."""
        self._generation += 1
        if tid is None:
            self._cached.clear()
        else:
            self._cached.pop(tid, None)

    def get(self, tid: str) -> TokenRecord | None:
        kv = self.store.get(TOKEN_PREFIX + tid)
        return TokenRecord(**json.loads(kv.value)) if kv else None

    def list(self) -> list[TokenRecord]:
        items, _ = self.store.range(TOKEN_PREFIX)
        return [TokenRecord(**json.loads(kv.value)) for kv in items]

    def revoke(self, tid: str, actor: Actor | None = None) -> bool:
        """True if the token existed and is now gone. With `actor`, audited in the same txn."""
        kv = self.store.get(TOKEN_PREFIX + tid)
        if kv is None:
            return False
        self.forget(tid)
        ops: list[Put | Delete] = [Delete(TOKEN_PREFIX + tid)]
        if actor is not None:
            ops.append(_audit(actor, "revoke", TokenRecord(**json.loads(kv.value))))
        res = self.store.txn([Compare(TOKEN_PREFIX + tid, kv.mod_revision)], ops)
        self.forget(tid)  # also after: a verify between the first forget and the delete may have cached it
        return res.succeeded

    def rotate(self, tid: str, actor: Actor | None = None) -> tuple[str, TokenRecord] | None:
        """A new token with the old one's role, scope, name and lifetime; the old one is deleted in the
        same txn (audited `rotate`, naming both ids). None when `tid` does not exist."""
        kv = self.store.get(TOKEN_PREFIX + tid)
        if kv is None:
            return None
        old = TokenRecord(**json.loads(kv.value))
        new_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        now = datetime.now(UTC).replace(microsecond=0)
        life = old.lifetime()
        rec = TokenRecord(
            id=new_id,
            name=old.name,
            role=old.role,
            tenant=old.tenant,
            host=old.host,
            sha256=_digest(secret),
            created=now.isoformat(timespec="seconds"),
            created_by=actor.name if actor is not None else old.created_by,
            expires=(now + life).isoformat(timespec="seconds") if life is not None else None,
        )
        ops: list[Put | Delete] = [
            Delete(TOKEN_PREFIX + tid),
            Put(TOKEN_PREFIX + new_id, json.dumps(asdict(rec))),
        ]
        if actor is not None:
            ops.append(_audit(actor, "rotate", rec, replaced=tid))
        self.forget(tid)
        res = self.store.txn(
            [Compare(TOKEN_PREFIX + tid, kv.mod_revision), Compare(TOKEN_PREFIX + new_id, 0)], ops
        )
        self.forget(tid)
        if not res.succeeded:
            raise TokenError(f"token {tid} changed concurrently; try again", "id")
        return f"ow.{new_id}.{secret}", rec

    def bootstrap(self, token_file: Path) -> Path | None:
        """First run: no provider-admin token yet -> create one, write it to `token_file` (0600).

        Several managers may start at once on one empty store (etcd): the token is created in one txn
        with the key `BOOTSTRAP_KEY`, on the condition that this key does not exist, so exactly one
        manager creates it and writes its file; the others log which token won and write nothing."""
        if any(t.role == Role.PROVIDER_ADMIN for t in self.list()):
            return None
        r = check_scope(Role.PROVIDER_ADMIN, None, None)
        tid, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        now = datetime.now(UTC).replace(microsecond=0).isoformat(timespec="seconds")
        rec = TokenRecord(tid, "bootstrap-admin", r.value, None, None, _digest(secret), now, "bootstrap")
        res = self.store.txn(
            [Compare(BOOTSTRAP_KEY, 0), Compare(TOKEN_PREFIX + tid, 0)],
            [
                Put(TOKEN_PREFIX + tid, json.dumps(asdict(rec))),
                Put(BOOTSTRAP_KEY, json.dumps({"token": tid, "created": now})),
                _audit(SYSTEM, "create", rec),
            ],
        )
        if not res.succeeded:
            kv = self.store.get(BOOTSTRAP_KEY)
            winner = json.loads(kv.value).get("token") if kv is not None else "?"
            log.warning(
                "first run: another manager created the provider-admin token (%s) at the same time; "
                "its token file is where that manager runs",
                winner,
            )
            return None
        token = f"ow.{tid}.{secret}"
        token_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.chmod(token_file, 0o600)  # also when the file existed with wider permissions
        log.warning(
            "first run: provider-admin token %s written to %s (mode 0600)", rec.id, token_file.absolute()
        )
        return token_file


def _audit(actor: Actor, action: str, rec: TokenRecord, **more: str) -> Put:
    scope = {k: v for k, v in (("role", rec.role), ("host", rec.host), ("expires", rec.expires)) if v}
    return entry_put(
        actor, action, "Token", rec.tenant or PROVIDER_TENANT, f"{rec.name} ({rec.id})", **scope, **more
    )


def token_file_for(db: str) -> Path:
    """The bootstrap token lives next to the database: `<db>.admin-token`."""
    return Path(db + ".admin-token") if db != ":memory:" else Path("omniwall.admin-token")
