"""Host feed and status: snapshot then deltas, catch-up from a revision, heartbeats, acks, counters;
in process (TestClient) and over a real socket (uvicorn + `tests/doubles/feed_client.FeedClient`)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from apihelpers import (
    ACME_TWO_HOSTS,
    ADMIN_AND_AGENTS,
    WEB_TO_DB_SQL,
    auth,
    issue_tokens,
    seeded_manager,
    serving,
    yaml_docs,
)
from fastapi.testclient import TestClient

from doubles.feed_client import FeedClient, FeedError
from omniwall.api import feed
from omniwall.api.app import create_app
from omniwall.compiler.ir import HostDesiredState, apply_delta
from omniwall.manager.contracts import load_documents
from omniwall.manager.service import SYSTEM, Manager
from omniwall.store.sqlite import SqliteStore
from omniwall.stream.wire import Command, Delta, Heartbeat, Snapshot, StatusReport, Unknown, decode, encode

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

WORLD = yaml_docs(
    ACME_TWO_HOSTS,
    """
kind: Workload
metadata: {name: web1, tenant: acme, labels: {tier: web}}
spec: {host: h1, vnics: [{name: eth0, ips: [10.0.0.1]}]}
---
kind: Workload
metadata: {name: db1, tenant: acme, labels: {tier: db}}
spec: {host: h2, vnics: [{name: eth0, ips: [10.0.1.1]}]}
""",
    WEB_TO_DB_SQL,
)

WEB2 = """
kind: Workload
metadata: {name: web2, tenant: acme, labels: {tier: web}}
spec: {host: h1, vnics: [{name: eth0, ips: [10.0.0.2]}]}
"""


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[TestClient, Manager, dict[str, str]]]:
    store = SqliteStore(tmp_path / "m.db")
    m = seeded_manager(store, WORLD)
    tokens = issue_tokens(m, ADMIN_AND_AGENTS)
    headers = {k: f"Bearer {v}" for k, v in tokens.items()}
    yield TestClient(create_app(m, watch=False)), m, headers
    store.close()


def lines(client: TestClient, host: str, auth: str, **params: Any) -> list[Any]:
    r = client.get(
        f"/v1/hosts/{host}/feed", params={"follow": "false", **params}, headers={"Authorization": auth}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return [decode(line) for line in r.text.splitlines() if line]


def test_snapshot_then_deltas_after_a_change(env: tuple[TestClient, Manager, dict[str, str]]) -> None:
    c, m, h = env
    [snap] = lines(c, "h1", h["h1"], **{"from": 0})
    assert isinstance(snap, Snapshot)
    assert snap.state.host == "h1" and snap.revision == snap.state.revision > 0
    assert [v.workload for v in snap.state.vnics] == ["acme/web1"]
    assert snap.state.rules, "the web->db rule egresses at web1"
    # A change that touches h1 (a new web workload): the feed from the snapshot's revision is one delta.
    r = c.post("/v1/apply", content=WEB2, headers={"Authorization": h["admin"]})
    assert r.status_code == 200, r.text
    [d] = lines(c, "h1", h["h1"], **{"from": snap.revision})
    assert isinstance(d, Delta)
    assert d.delta.from_revision == snap.revision and d.delta.to_revision == r.json()["revision"]
    after = apply_delta(snap.state, d.delta)
    assert after == m.desired_state("h1")
    assert sorted(v.workload for v in after.vnics) == ["acme/web1", "acme/web2"]
    # h2's db1 admits web2's address: its set changed, by exactly one element.
    h2_snap = m.desired_state("h2")
    assert h2_snap is not None and h2_snap.revision == r.json()["revision"]
    # Already current: nothing to send.
    assert lines(c, "h1", h["h1"], **{"from": d.delta.to_revision}) == []
    # Unknown revision (or one older than the delta log): a snapshot.
    [again] = lines(c, "h1", h["h1"], **{"from": 99_999})
    assert isinstance(again, Snapshot) and again.state == after


def test_a_write_that_does_not_touch_a_host_sends_it_nothing(
    env: tuple[TestClient, Manager, dict[str, str]],
) -> None:
    c, m, h = env
    rev_h1 = m.desired.revision("h1")
    text = "kind: Group\nmetadata: {name: unused, tenant: acme}\nspec: {cidrs: [10.7.0.0/16]}\n"
    assert c.post("/v1/apply", content=text, headers={"Authorization": h["admin"]}).status_code == 200
    assert m.desired.revision("h1") == rev_h1
    assert lines(c, "h1", h["h1"], **{"from": rev_h1}) == []


def test_delta_log_overflow_falls_back_to_a_snapshot(tmp_path: Path) -> None:
    m = seeded_manager(SqliteStore(tmp_path / "m.db"), WORLD, max_delta_log=2)
    first = m.desired.revision("h1")
    for i in range(3):
        text = (
            f"kind: Workload\nmetadata: {{name: w{i}, tenant: acme}}\n"
            f"spec: {{host: h1, vnics: [{{ips: [10.0.5.{i + 1}]}}]}}\n"
        )
        m.commit(m.plan_apply(load_documents(text, "w")), SYSTEM)
    assert m.desired.deltas_since("h1", first) is None  # too old: the caller sends a snapshot
    recent = m.desired.deltas_since("h1", m.desired.revision("h1") - 1)
    assert recent is not None and len(recent) == 1


def test_status_ack_and_host_list(env: tuple[TestClient, Manager, dict[str, str]]) -> None:
    c, m, h = env
    desired = m.desired.revision("h1")
    r = c.post("/v1/hosts/h1/status", json={"realized_revision": desired}, headers={"Authorization": h["h1"]})
    assert r.status_code == 200, r.text
    hosts = {
        d["metadata"]["name"]: d["status"]
        for d in c.get("/v1/hosts", headers={"Authorization": h["admin"]}).json()["items"]
    }
    assert hosts["h1"]["realizedRevision"] == desired and hosts["h1"]["inSync"] is True
    assert hosts["h1"]["lastSeen"] is not None
    assert hosts["h2"]["realizedRevision"] == 0 and hosts["h2"]["inSync"] is False
    r = c.post(
        "/v1/hosts/h1/status",
        json={"realized_revision": desired, "error": "nft: boom"},
        headers={"Authorization": h["h1"]},
    )
    assert r.json()["lastError"] == "nft: boom" and r.json()["inSync"] is False
    bad = c.post("/v1/hosts/h1/status", json={"realized": 1}, headers={"Authorization": h["h1"]})
    assert bad.status_code == 422
    assert {e["path"] for e in bad.json()["errors"]} >= {"body.realized_revision", "body.realized"}


def test_realized_at_is_when_the_manager_recorded_the_revisions_first_ack(
    env: tuple[TestClient, Manager, dict[str, str]],
) -> None:
    c, m, h = env
    desired = m.desired.revision("h1")
    t0 = datetime(2026, 12, 7, 12, 0, 0, 250000, tzinfo=UTC)

    def ack(rev: int, at: datetime, **more: Any) -> dict[str, Any]:
        m.clock = lambda: at
        r = c.post(
            "/v1/hosts/h1/status", json={"realized_revision": rev, **more}, headers={"Authorization": h["h1"]}
        )
        assert r.status_code == 200, r.text
        return c.get("/v1/status", headers={"Authorization": h["admin"]}).json()["hosts"]["h1"]

    assert (
        c.get("/v1/status", headers={"Authorization": h["admin"]}).json()["hosts"]["h1"]["realizedAt"] is None
    )
    assert ack(desired - 1, t0)["realizedAt"] == "2026-12-07T12:00:00.250Z"
    st = ack(desired, t0 + timedelta(seconds=2))
    assert st["realizedAt"] == "2026-12-07T12:00:02.250Z" and st["inSync"] is True
    # the same revision again (counters, an error, a re-sent report) is not a new ack of it
    st = ack(desired, t0 + timedelta(seconds=9), counters=[{"rule_id": 1, "packets": 1, "bytes": 1}])
    assert st["realizedAt"] == "2026-12-07T12:00:02.250Z" and st["lastSeen"] == "2026-12-07T12:00:09.250Z"


def test_policy_stats_sum_counters_across_hosts(env: tuple[TestClient, Manager, dict[str, str]]) -> None:
    c, m, h = env
    ids = {st.host: [r.id for r in st.rules if r.policy == "web-db"] for st in m.desired.all().values()}
    assert ids["h1"] and ids["h1"] == ids["h2"]  # one stable id per rule, on both hosts
    rid = ids["h1"][0]
    for host, (p, b) in (("h1", (3, 300)), ("h2", (4, 400))):
        body = {"realized_revision": 1, "counters": [{"rule_id": rid, "packets": p, "bytes": b}]}
        assert (
            c.post(f"/v1/hosts/{host}/status", json=body, headers={"Authorization": h[host]}).status_code
            == 200
        )
    # a report without counters keeps the last ones (agents send them only when they moved)
    c.post("/v1/hosts/h1/status", json={"realized_revision": 2}, headers={"Authorization": h["h1"]})
    st = c.get(
        "/v1/policies/web-db/stats", params={"tenant": "acme"}, headers={"Authorization": h["admin"]}
    ).json()
    assert st["rules"] == [{"rule": "sql", "ruleId": rid, "packets": 7, "bytes": 700, "hosts": 2}]
    assert (st["packets"], st["bytes"]) == (7, 700)


def test_wire_round_trip_and_forward_compatibility() -> None:
    from omniwall.compiler.ir import HostDelta, empty_state

    s = Snapshot(3, empty_state("h1", 3))
    assert decode(encode(s)) == s
    d = Delta(HostDelta("h1", 3, 4))
    assert decode(encode(d)) == d
    assert decode(encode(Heartbeat(4))) == Heartbeat(4)
    u = decode(b'{"type":"future-thing","x":1}\n')
    assert isinstance(u, Unknown) and u.type == "future-thing"
    with pytest.raises(ValueError, match="not JSON"):
        decode("{nope")
    with pytest.raises(ValueError, match="malformed snapshot"):
        decode('{"type":"snapshot"}')


# ------------------------------------------------------------------ over a real socket, long-lived stream


@pytest.fixture
def server(env: tuple[TestClient, Manager, dict[str, str]]) -> Iterator[tuple[str, Manager, dict[str, str]]]:
    c, m, h = env
    with serving(c.app, timeout_graceful_shutdown=1) as url:
        yield url, m, {k: v.split(" ", 1)[1] for k, v in h.items()}


def test_live_stream_snapshot_deltas_heartbeats_and_connected(
    server: tuple[str, Manager, dict[str, str]],
) -> None:
    url, m, tokens = server
    got: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    client = FeedClient(url, tokens["h1"], "h1", heartbeat=0.2)

    def consume() -> None:
        try:
            for msg in client.messages(0):
                got.put(msg)
                if stop.is_set():
                    return
        except FeedError as err:
            got.put(err)

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    snap = got.get(timeout=10)
    assert isinstance(snap, Snapshot)
    state: HostDesiredState = snap.state
    assert m.host_status("h1")["connected"] is True
    hb = got.get(timeout=5)
    assert isinstance(hb, Heartbeat) and hb.revision == state.revision
    # a change arrives as a delta on the open stream
    admin = FeedClient(url, tokens["admin"], "h1")
    m.commit(m.plan_apply(load_documents(WEB2, "web2.yaml")), SYSTEM)
    msg = got.get(timeout=10)
    while isinstance(msg, Heartbeat):
        msg = got.get(timeout=10)
    assert isinstance(msg, Delta)
    state = apply_delta(state, msg.delta)
    assert state == m.desired_state("h1")
    # ack it: the host is in sync
    ack = client.post_status(StatusReport(realized_revision=state.revision))
    assert ack["inSync"] is True and ack["realizedRevision"] == state.revision
    assert admin.desired() == state
    stop.set()
    client.close()
    admin.close()
    t.join(timeout=5)
    deadline = time.monotonic() + 5
    while m.host_status("h1")["connected"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m.host_status("h1")["connected"] is False


def test_client_reports_the_servers_refusal(server: tuple[str, Manager, dict[str, str]]) -> None:
    url, _, tokens = server
    with (
        FeedClient(url, tokens["h1"], "h2") as c,
        pytest.raises(FeedError, match=r"403: .*scoped to host h1"),
    ):
        list(c.messages(0, follow=False))


def test_compile_failure_is_fail_static(tmp_path: Path) -> None:
    """A compile error keeps the last good states; a host never compiled gets 503, not an empty state."""
    from omniwall.compiler.build import compile_catalog

    broken = {"on": False}

    def compile_fn(catalog: Any, revision: int) -> dict[str, HostDesiredState]:
        if broken["on"]:
            raise RuntimeError("compiler bug")
        return compile_catalog(catalog, revision)

    m = seeded_manager(SqliteStore(tmp_path / "m.db"), WORLD, compile_fn=compile_fn)
    good = m.desired_state("h1")
    assert good is not None and good.vnics
    broken["on"] = True
    m.commit(
        m.plan_apply(load_documents(WEB2, "w") + load_documents("kind: Host\nmetadata: {name: h3}\n", "h")),
        SYSTEM,
    )
    assert m.compile_error and "compiler bug" in m.compile_error
    assert m.desired_state("h1") == good
    token, _ = m.tokens.create("agent", host="h3")
    c = TestClient(create_app(m, watch=False))
    r = c.get("/v1/hosts/h3/feed", params={"follow": "false"}, headers=auth(token))
    assert r.status_code == 503 and "compiler bug" in r.json()["message"]


def test_a_manager_behind_the_agent_catches_up_before_answering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failover to a replica whose watch is behind: the agent's revision came from the other manager, and
    the lagging one must answer from that revision on (here: nothing to send), never with its older state;
    one that cannot catch up in time answers 503 and the agent keeps its rules."""
    path = tmp_path / "m.db"
    a = seeded_manager(SqliteStore(path), WORLD)
    tokens = issue_tokens(a, ADMIN_AND_AGENTS)
    b_store = SqliteStore(path)
    b = Manager(b_store)  # a replica on the same store, its watch not running: it lags behind a
    before = b.desired.revision("h1")
    a.commit(a.plan_apply(load_documents(WEB2, "web2.yaml")), SYSTEM)
    realized = a.desired.revision("h1")  # what h1's agent realized through manager a
    assert realized > before == b.desired.revision("h1")
    c = TestClient(create_app(b, watch=False))
    assert lines(c, "h1", f"Bearer {tokens['h1']}", **{"from": realized}) == []  # caught up: current
    assert b.desired_state("h1") == a.desired_state("h1")

    a.commit(a.plan_apply(load_documents(WEB2.replace("web2", "web3").replace(".2]", ".3]"), "w")), SYSTEM)
    ahead = a.desired.revision("h1")
    monkeypatch.setattr(feed, "CATCH_UP_BOUND", 0.2)
    with b.model.sync_lock:  # b is busy syncing (a long compile, a slow store) for longer than the bound
        r = c.get(
            "/v1/hosts/h1/feed",
            params={"from": ahead, "follow": "false"},
            headers={"Authorization": f"Bearer {tokens['h1']}"},
        )
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1" and f"behind revision {ahead}" in r.json()["message"]
    b_store.close()


LEAN_CASES = [  # (body, answered by the lean route)
    ({"realized_revision": 1}, True),
    ({"realized_revision": 2, "error": "nft: boom"}, True),
    ({"realized_revision": 3, "counters": [{"rule_id": 1, "packets": 2, "bytes": 3}]}, True),
    ({"realized_revision": 3, "conntrack": {"count": 5, "max": 100}}, True),
    ({"realized_revision": "4"}, False),  # pydantic's lax reading accepts it: the route does
    ({"realized_revision": 5, "addresses": {"eth0": ["10.0.0.1"]}}, False),  # reconciled in the pool
    ({"realized": 1}, False),  # 422 from the route
    ({"realized_revision": -1}, False),
    ({"realized_revision": 1, "counters": [{"rule_id": 0, "packets": 1, "bytes": 1}]}, False),
]


def _comparable(r: Any) -> tuple[int, Any]:
    body = r.json()
    if isinstance(body, dict):
        body.pop("lastSeen", None)
    return r.status_code, body


def test_lean_ack_route_answers_like_the_full_route(
    env: tuple[TestClient, Manager, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`AgentPath` answers the common ack from the token cache, without FastAPI; every other request goes to
    the route with its body replayed. Same status, same body, same host status, either way."""
    c, m, h = env
    answered: list[bool] = []
    lean = feed.AgentPath._status

    async def spy(self: Any, *args: Any) -> Any:
        rest = await lean(self, *args)
        answered.append(rest is None)
        return rest

    monkeypatch.setattr(feed.AgentPath, "_status", spy)

    def post(host: str, body: Any, token: str | None) -> Any:
        headers = {"Authorization": token} if token else {}
        return c.post(f"/v1/hosts/{host}/status", json=body, headers=headers)

    for body, by_lean in LEAN_CASES:
        m.tokens.cache = False  # as without the store watch: the full route
        answered.clear()
        full = post("h1", body, h["h1"])
        assert answered == [False]
        m.tokens.cache = True
        post("h1", body, h["h1"])  # the full route caches the token
        answered.clear()
        r = post("h1", body, h["h1"])
        assert answered == [by_lean], body
        assert _comparable(r) == _comparable(full), body
        if r.status_code == 200:
            assert m.host_status("h1")["realizedRevision"] == r.json()["realizedRevision"]
    # refusals come from the route, with its messages
    m.tokens.cache = True
    for host, token, status in (("h1", h["h2"], 403), ("h1", None, 401), ("h1", "Bearer ow.x.y", 401)):
        answered.clear()
        r = post(host, {"realized_revision": 1}, token)
        assert r.status_code == status and answered == [False], r.text
    # the ack is timed like the route's (api/metrics.py)
    from omniwall.api.metrics import render

    text = render(c.app.state.metrics).decode()  # type: ignore[attr-defined]
    assert 'route="/v1/hosts/{host}/status",status="200"' in text


def test_cached_principal_takes_every_check_of_authenticate(
    env: tuple[TestClient, Manager, dict[str, str]],
) -> None:
    """The lean ack route's authentication: a principal only when `authenticate` would give the same one
    with nothing to record; None (take the full route) for a rate-limited address, an audit due, a token
    not cached, another host's certificate, or no certificate where one is required."""
    from types import SimpleNamespace

    from omniwall.api.auth import agent_certificates, cached_principal
    from omniwall.api.auth_guard import AuthGuard
    from omniwall.pki import HOST_URI_PREFIX

    _, m, h = env
    token = h["h1"].split(" ", 1)[1]
    state = SimpleNamespace(manager=m)

    def scope(
        tok: str | None = token, cert_host: str | None = None, scheme: str = "Bearer"
    ) -> dict[str, Any]:
        s: dict[str, Any] = {"client": ("10.9.9.9", 1234), "headers": []}
        if tok is not None:
            s["headers"].append((b"authorization", f"{scheme} {tok}".encode()))
        if cert_host is not None:
            peer = {"subjectAltName": (("URI", HOST_URI_PREFIX + cert_host),), "serialNumber": "AB"}
            s["extensions"] = {"tls": {"peercert": peer}}
        return s

    m.tokens.cache = True
    assert cached_principal(state, scope()) is None  # not cached yet: the full route verifies it
    assert m.tokens.verify(token) is not None  # ... and caches it
    p = cached_principal(state, scope())
    assert p is not None and p.host == "h1" and p.role.value == "agent"
    assert cached_principal(state, scope(scheme="Basic")) is None
    assert cached_principal(state, scope(tok=None)) is None
    assert cached_principal(state, scope(tok=token[:-2] + "xx")) is None  # wrong secret
    # certificate binding
    assert cached_principal(state, scope(cert_host="h2")) is None
    bound = cached_principal(state, scope(cert_host="h1"))
    assert bound is not None and agent_certificates(state)["h1"]["serial"] == "ab"
    state.agent_cert_required = True
    assert cached_principal(state, scope()) is None
    assert cached_principal(state, scope(cert_host="h1")) is not None
    # the guard: a blocked address, or failures waiting to be audited, go the full way
    guard = state.auth_guard = AuthGuard()
    for _ in range(guard.max_failures):
        guard.failed("10.9.9.9")
    assert cached_principal(state, scope(cert_host="h1")) is None
    state.auth_guard = AuthGuard()
    state.auth_guard.failed("10.1.1.1")
    assert state.auth_guard.due() and cached_principal(state, scope(cert_host="h1")) is None
    m.tokens.cache = False
    assert cached_principal(state, scope(cert_host="h1")) is None  # no cache: never decided here


def test_deltas_are_pushed_to_the_connection_in_order_and_a_waiting_command_goes_first(
    env: tuple[TestClient, Manager, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Served as `omniwall manager` serves it (uvicorn, the app inside `EndStreams`), a feed's deltas
    are written from the broadcaster's push (no task wake-up per change): they still chain revision to
    revision and end in the desired state, and a command queued for the host before a change reaches the
    agent before that change's delta."""
    from omniwall.api.server import EndStreams

    c, m, h = env
    tokens = {k: v.split(" ", 1)[1] for k, v in h.items()}
    pushed: list[int] = []
    write = feed.DirectChunks.write

    def counted(self: feed.DirectChunks, data: bytes) -> None:
        pushed.append(len(data))
        write(self, data)

    monkeypatch.setattr(feed.DirectChunks, "write", counted)
    with serving(EndStreams(c.app), timeout_graceful_shutdown=1) as url:  # type: ignore[arg-type]
        _pushed_in_order(url, m, tokens)
    assert pushed, "no delta went through the direct path"


def _pushed_in_order(url: str, m: Manager, tokens: dict[str, str]) -> None:
    got: queue.Queue[Any] = queue.Queue()
    client = FeedClient(url, tokens["h1"], "h1", heartbeat=30)

    def consume() -> None:
        try:
            for msg in client.messages(0):
                got.put(msg)
        except Exception as err:  # the client closed at the end, or a real failure: the test reads it
            got.put(err)

    t = threading.Thread(target=consume, daemon=True)
    t.start()

    def next_message() -> Any:
        msg = got.get(timeout=10)
        while isinstance(msg, Heartbeat):
            msg = got.get(timeout=10)
        assert not isinstance(msg, Exception), msg
        return msg

    snap = next_message()
    assert isinstance(snap, Snapshot)
    state: HostDesiredState = snap.state
    for i in range(2, 8):
        doc = WEB2.replace("web2", f"web{i}").replace("10.0.0.2", f"10.0.0.{i}")
        m.commit(m.plan_apply(load_documents(doc, f"web{i}.yaml")), SYSTEM)
        msg = next_message()
        assert isinstance(msg, Delta) and msg.delta.from_revision == state.revision
        state = apply_delta(state, msg.delta)
    assert state == m.desired_state("h1")
    cid = m.migrations.commands.send("h1", "ping", {"n": 1})
    m.commit(m.plan_apply(load_documents(WEB2.replace("10.0.0.2", "10.0.0.99"), "web2.yaml")), SYSTEM)
    first, second = next_message(), next_message()
    assert isinstance(first, Command) and first.id == cid, first
    assert isinstance(second, Delta) and second.delta.from_revision == state.revision
    assert apply_delta(state, second.delta) == m.desired_state("h1")
    client.close()
    t.join(timeout=5)
