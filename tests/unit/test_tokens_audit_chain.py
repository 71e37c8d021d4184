"""Tokens (finding 7: validated requests; expiry, rotation, rate-limited failed authentication, aggregated
audit of failures) and the tamper-evident audit log (hash chain, `omniwall audit verify`)."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from apihelpers import ACME_TWO_HOSTS, auth, seeded_manager
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from omniwall.api.app import create_app
from omniwall.api.auth_guard import AuthGuard
from omniwall.cli.main import app as cli
from omniwall.manager.audit import SYSTEM, AuditEntry, AuditQuery, audit_put, chained, now_iso, query, verify
from omniwall.manager.objects import TOKEN_PREFIX
from omniwall.manager.service import Manager
from omniwall.manager.tokens import TokenError, parse_duration
from omniwall.store.memory import MemoryStore
from omniwall.store.sqlite import SqliteStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def env() -> tuple[TestClient, Manager, str]:
    m = seeded_manager(chained(MemoryStore()), ACME_TWO_HOSTS)
    admin = m.tokens.create("provider-admin", name="admin")[0]
    return TestClient(create_app(m, watch=False)), m, admin


# ------------------------------------------------------------------------------------ token requests

BAD_TOKEN_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"role": "tenant-admin", "tenant": "nobody"}, "tenant"),  # no such tenant
    ({"role": "tenant-admin", "tenant": "infra"}, "tenant"),  # the provider is not a tenant role's scope
    ({"role": "tenant-viewer", "tenant": "infra"}, "tenant"),
    ({"role": "agent", "host": "h9"}, "host"),  # no such host
    ({"role": "agent", "host": {"a": 1}}, "host"),
    ({"role": "tenant-admin", "tenant": {"name": "acme"}}, "tenant"),
    ({"role": "auditor", "name": {"x": 1}}, "name"),
    ({"role": "auditor", "name": "x" * 1_000_000}, "name"),
    ({"role": "auditor", "name": "ci\x00"}, "name"),
    ({"role": "auditor", "name": "ci\u202e"}, "name"),
    ({"role": "auditor", "name": " padded "}, "name"),
    ({"role": ["provider-admin"]}, "role"),
    ({"role": "root"}, "role"),
    ({"role": "auditor", "expires": "forever"}, "expires"),
    ({"role": "auditor", "expires": "5s"}, "expires"),
    ({"role": "auditor", "expires": True}, "expires"),
    ({"role": "auditor", "expires": "99999d"}, "expires"),
    ({"role": "auditor", "color": "red"}, "color"),
    ({"role": "agent"}, "host"),
    ({"role": "auditor", "tenant": "acme"}, "tenant"),
]


@pytest.mark.parametrize(("body", "field"), BAD_TOKEN_REQUESTS, ids=[f for _, f in BAD_TOKEN_REQUESTS])
def test_a_bad_token_request_is_refused_naming_the_field(
    env: tuple[TestClient, Manager, str], body: dict[str, Any], field: str
) -> None:
    c, m, admin = env
    before, tokens = m.store.revision(), len(m.tokens.list())
    r = c.post("/v1/tokens", json=body, headers=auth(admin))
    assert r.status_code == 422, r.text
    assert field in [e["path"] for e in r.json()["errors"]], r.text
    assert m.store.revision() == before and len(m.tokens.list()) == tokens


def test_good_token_requests_pass(env: tuple[TestClient, Manager, str]) -> None:
    c, _, admin = env
    for body in (
        {"role": "tenant-admin", "tenant": "acme", "name": "ci pipeline"},
        {"role": "agent", "host": "h1"},
        {"role": "auditor", "expires": "24h"},
    ):
        r = c.post("/v1/tokens", json=body, headers=auth(admin))
        assert r.status_code == 200, r.text


def test_parse_duration() -> None:
    assert parse_duration("24h") == timedelta(hours=24)
    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration(3600) == timedelta(hours=1)
    with pytest.raises(TokenError):
        parse_duration("1y")


# ------------------------------------------------------------------------------ expiry and rotation


def test_an_expired_token_is_refused(env: tuple[TestClient, Manager, str]) -> None:
    c, m, admin = env
    r = c.post("/v1/tokens", json={"role": "auditor", "expires": "1h"}, headers=auth(admin))
    token, tid = r.json()["token"], r.json()["id"]
    expires = datetime.fromisoformat(r.json()["expires"])
    assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)
    assert c.get("/v1/whoami", headers=auth(token)).status_code == 200
    # the clock moves past the expiry (the record rewritten with an expiry in the past)
    kv = m.store.get(TOKEN_PREFIX + tid)
    assert kv is not None
    rec = json.loads(kv.value) | {"expires": (datetime.now(UTC) - timedelta(seconds=1)).isoformat()}
    m.store.put(TOKEN_PREFIX + tid, json.dumps(rec))
    m.tokens.forget(tid)
    r = c.get("/v1/whoami", headers=auth(token))
    assert r.status_code == 401 and "expired" in r.json()["message"]


def test_rotate_gives_a_new_secret_and_revokes_the_old_one(env: tuple[TestClient, Manager, str]) -> None:
    c, m, admin = env
    old = c.post(
        "/v1/tokens", json={"role": "agent", "host": "h1", "expires": "7d"}, headers=auth(admin)
    ).json()
    r = c.post(f"/v1/tokens/{old['id']}/rotate", headers=auth(admin))
    assert r.status_code == 200, r.text
    new = r.json()
    assert new["replaced"] == old["id"] and new["id"] != old["id"]
    assert (new["role"], new["host"], new["name"]) == ("agent", "h1", old["name"])
    assert new["expires"] is not None
    assert c.get("/v1/whoami", headers=auth(old["token"])).status_code == 401
    assert c.get("/v1/whoami", headers=auth(new["token"])).json()["host"] == "h1"
    assert c.post("/v1/tokens/nope/rotate", headers=auth(admin)).status_code == 404
    entries, _ = query(m.store, AuditQuery(kind="Token"), limit=100)
    rotated = [e for e in entries if e.action == "rotate"]
    assert len(rotated) == 1 and rotated[0].extra["replaced"] == old["id"]


# --------------------------------------------------------------------- failed authentication


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_failed_authentication_is_rate_limited_and_audited_in_aggregate(
    env: tuple[TestClient, Manager, str],
) -> None:
    c, m, admin = env
    clock = Clock()
    c.app.state.auth_guard = AuthGuard(max_failures=5, window=60.0, clock=clock)  # type: ignore[attr-defined]
    statuses = [c.get("/v1/whoami", headers=auth(f"ow.x{i}.wrong")).status_code for i in range(300)]
    assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}
    r = c.get("/v1/whoami", headers=auth(admin))  # even a good token: the address is blocked
    assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
    failures = query(m.store, AuditQuery(kind="Authentication"), limit=1000)[0]
    assert len(failures) == 1 and failures[0].extra["failures"] == 1  # the first one, at once
    clock.t += 61  # the window is over: the address may try again; the rest is audited as one entry
    assert c.get("/v1/whoami", headers=auth(admin)).status_code == 200
    failures = query(m.store, AuditQuery(kind="Authentication"), limit=1000)[0]
    assert len(failures) == 2
    assert failures[1].extra["failures"] == 4 and failures[1].extra["byAddress"] == {"testclient": 4}
    assert failures[1].tenant == "infra" and failures[1].action == "auth-failure"
    listed = c.get("/v1/audit", params={"kind": "authentication"}, headers=auth(admin)).json()["items"]
    assert [e["extra"]["failures"] for e in listed] == [1, 4]


def test_the_guard_memory_is_bounded() -> None:
    clock = Clock()
    g = AuthGuard(max_failures=2, max_addresses=100, clock=clock)
    for i in range(1000):
        g.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(g._failures) <= 100
    summary = g.take()
    assert summary is not None and summary["failures"] == 1000 and len(summary["byAddress"]) <= 50


# ------------------------------------------------------------------------------------ audit chain


def _sqlite_world(tmp_path: Path) -> tuple[Manager, Path]:
    db = tmp_path / "m.db"
    m = seeded_manager(chained(SqliteStore(db)), ACME_TWO_HOSTS)
    for i in range(3):
        m.tokens.create("tenant-viewer", tenant="acme", name=f"v{i}", actor=SYSTEM)
    return m, db


def _audit_rows(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT key, value FROM kv WHERE key LIKE 'audit/%' ORDER BY key").fetchall()


def test_an_intact_chain_verifies_also_after_compaction(tmp_path: Path) -> None:
    m, _ = _sqlite_world(tmp_path)
    report = verify(m.store)
    assert report.ok and report.entries >= 6, report
    m.store.compact(m.store.revision())
    assert verify(m.store).ok
    # another process writing tokens on the same file keeps the chain going
    code = CliRunner().invoke(cli, ["token", "create", "--role", "auditor", "--db", str(tmp_path / "m.db")])
    assert code.exit_code == 0, code.output
    assert verify(m.store).ok and verify(m.store).entries == report.entries + 1


def test_an_edited_entry_is_named(tmp_path: Path) -> None:
    _, db = _sqlite_world(tmp_path)
    key, value = _audit_rows(db)[2]
    edited = json.loads(value) | {"actor": "someone-else"}
    with sqlite3.connect(db) as con:
        con.execute("UPDATE kv SET value = ? WHERE key = ?", (json.dumps(edited), key))
    report = verify(SqliteStore(db))
    assert not report.ok and report.broken_key == key and "changed" in report.reason
    res = CliRunner().invoke(cli, ["audit", "verify", "--db", str(db)])
    assert res.exit_code == 1 and key in res.output


def test_a_deleted_entry_is_named(tmp_path: Path) -> None:
    _, db = _sqlite_world(tmp_path)
    rows = _audit_rows(db)
    deleted_seq = json.loads(rows[1][1])["seq"]
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM kv WHERE key = ?", (rows[1][0],))
    report = verify(SqliteStore(db))
    assert not report.ok and report.broken_seq == deleted_seq and "missing" in report.reason
    assert report.broken_key == rows[2][0]  # where the chain resumes


def test_deleting_the_last_entries_is_detected(tmp_path: Path) -> None:
    _, db = _sqlite_world(tmp_path)
    rows = _audit_rows(db)
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM kv WHERE key = ?", (rows[-1][0],))
    report = verify(SqliteStore(db))
    assert not report.ok and "deleted" in report.reason


def test_audit_verify_route(tmp_path: Path) -> None:
    m, db = _sqlite_world(tmp_path)
    c = TestClient(create_app(m, watch=False))
    admin = m.tokens.create("provider-admin")[0]
    auditor = m.tokens.create("auditor")[0]
    viewer = m.tokens.create("tenant-viewer", tenant="acme")[0]
    assert c.get("/v1/audit/verify", headers=auth(auditor)).json()["ok"] is True
    assert c.get("/v1/audit/verify", headers=auth(viewer)).status_code == 403
    key, value = _audit_rows(db)[0]
    with sqlite3.connect(db) as con:
        con.execute("UPDATE kv SET value = ? WHERE key = ?", (value.replace('"create"', '"delete"'), key))
    out = c.get("/v1/audit/verify", headers=auth(admin)).json()
    assert out["ok"] is False and out["firstBroken"]["key"] == key


def test_two_writers_on_one_file_keep_one_chain(tmp_path: Path) -> None:
    """Two processes (here: two store connections) writing audited changes at once: the compare on the
    chain head serialises them, so the chain has no fork and no gap."""
    import threading

    from omniwall.manager.tokens import TokenBook

    db = tmp_path / "m.db"
    books = [TokenBook(chained(SqliteStore(db))) for _ in range(2)]

    def write(book: TokenBook, n: int) -> None:
        for i in range(n):
            book.create("auditor", name=f"t{i}", actor=SYSTEM)

    threads = [threading.Thread(target=write, args=(b, 15)) for b in books]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = verify(SqliteStore(db))
    assert report.ok and report.entries == 30, report


def test_two_writers_chain_without_reading_the_head_before_each_of_their_own_writes(tmp_path: Path) -> None:
    """A chaining store remembers the head it wrote: its next write compares on it instead of reading
    the head; when another writer moved the head, the compare fails on the head alone and it reads it."""
    m, db = _sqlite_world(tmp_path)
    a, b = m.store, chained(SqliteStore(db))  # b: another process on the same file
    reads = {"a": 0, "b": 0}
    for name, st in (("a", a), ("b", b)):
        inner = st.inner  # type: ignore[attr-defined]

        def counted(key: str, *, revision: int | None = None, _g=inner.get, _n=name) -> Any:
            reads[_n] += key == "auditchain/head"
            return _g(key, revision=revision)

        inner.get = counted
    entries = verify(a).entries
    for who, st in (("a", a), ("a", a), ("b", b), ("b", b), ("a", a), ("b", b)):
        entry = AuditEntry(
            time=now_iso(),
            actor=who,
            actor_id=who,
            role="system",
            action="update",
            kind="Note",
            tenant="acme",
            name=who,
        )
        assert st.txn([], [audit_put(entry, time.time_ns())]).succeeded
    # a: verify's read, then only its fifth write's (b wrote meanwhile; a remembers the head of its
    # seeding writes); b: its first write's and its sixth's (a wrote meanwhile)
    assert reads == {"a": 2, "b": 2}
    report = verify(a)
    assert report.ok and report.entries == entries + 6
