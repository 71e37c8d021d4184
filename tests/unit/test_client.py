"""omniwall.client against a real manager app served on loopback (tests/unit/apihelpers.py): objects,
errors as ClientError with the server's message, retries (connection refused while the manager comes
up, 503 while its store is away) and none on 4xx, settings from the environment and config contexts."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from apihelpers import ACME_TWO_HOSTS, WEB_TO_DB_SQL, seeded_manager, serving, yaml_docs

from omniwall.api.app import create_app
from omniwall.client import Client, ClientError, Retry, Settings
from omniwall.store import StoreUnavailable
from omniwall.store.memory import MemoryStore

WORKLOADS = """
kind: Workload
metadata: {name: web-1, tenant: acme, labels: {tier: web}}
spec: {host: h1, vnics: [{name: eth0, ips: [10.0.0.1]}]}
---
kind: Workload
metadata: {name: db-1, tenant: acme, labels: {tier: db}}
spec: {host: h2, vnics: [{name: eth0, ips: [10.0.0.2]}]}
"""
WORLD = yaml_docs(ACME_TWO_HOSTS, WEB_TO_DB_SQL, WORKLOADS)


class FlakyStore(MemoryStore):
    """A store whose next `fail` reads raise StoreUnavailable, as an etcd cluster without quorum does."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = 0
        self.lock = threading.Lock()

    def range(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            if self.fail > 0:
                self.fail -= 1
                raise StoreUnavailable("no etcd member answers (test)")
        return super().range(*args, **kwargs)


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[str, str, FlakyStore]]:
    store = FlakyStore()
    m = seeded_manager(store, WORLD)
    token, _ = m.tokens.create("provider-admin", name="client-test")
    with serving(create_app(m, watch=True), timeout_graceful_shutdown=1) as url:
        yield url, token, store


@pytest.fixture
def api(world: tuple[str, str, FlakyStore]) -> Iterator[Client]:
    url, token, _ = world
    waits: list[float] = []
    with Client(url, token, sleep=waits.append) as c:
        c.waits = waits  # type: ignore[attr-defined]
        yield c


def test_objects_round_trip(api: Client) -> None:
    assert api.get("workload", "acme/web-1")["spec"]["host"] == "h1"
    assert api.get("Workloads", "web-1", tenant="acme")["metadata"]["labels"] == {"tier": "web"}
    assert [w["metadata"]["name"] for w in api.list("workloads", tenant="acme", selector="tier=db")] == [
        "db-1"
    ]
    out = api.apply(
        [
            {
                "kind": "Workload",
                "metadata": {"name": "app-1", "tenant": "acme", "labels": {"tier": "app"}},
                "spec": {"host": "h1", "vnics": [{"name": "eth0", "ips": ["10.0.0.3"]}]},
            }
        ],
        source="test_client",
    )
    assert [(c["action"], c["name"]) for c in out["changes"]] == [("create", "app-1")]
    dry = api.apply(WORKLOADS, dry_run=True)
    assert {c["action"] for c in dry["changes"]} == {"unchanged"}
    assert len(api.history("workload", "acme/app-1")["items"]) == 1
    gone = api.delete("workload", "acme/app-1")
    assert [d["name"] for d in gone["deleted"]] == ["app-1"]
    assert api.status()["revision"] == gone["revision"]
    assert api.members("acme/web")["workloads"][0]["workload"] == "acme/web-1"
    assert api.explain("acme/web-1", "acme/db-1", "tcp", 5432)["allowed"] is True
    assert api.explain("acme/db-1", "acme/web-1", "tcp", 5432)["allowed"] is False
    assert api.retries == 0


def test_errors_carry_status_and_the_servers_message_and_4xx_is_never_retried(api: Client) -> None:
    with pytest.raises(ClientError) as e:
        api.get("workload", "acme/nope")
    assert e.value.status == 404 and "acme/nope" in e.value.message and "(HTTP 404)" in str(e.value)
    bad = WORKLOADS.replace("10.0.0.1", "nope")
    with pytest.raises(ClientError) as e:
        api.apply(bad)
    assert e.value.status == 422 and e.value.errors and "ips" in e.value.errors[0]["path"]
    assert any("ips" in line for line in e.value.lines()[1:])
    with pytest.raises(ClientError) as e:
        api.get("gadget", "x")  # checked before anything is sent
    assert e.value.status is None and "unknown kind" in e.value.message
    with pytest.raises(ClientError) as e:
        api.get("workload", "a/b/c")
    assert "TENANT/NAME" in e.value.message
    assert api.retries == 0 and api.waits == []  # type: ignore[attr-defined]


def test_wrong_token_is_401_and_not_retried(world: tuple[str, str, FlakyStore]) -> None:
    url, _, _ = world
    with Client(url, "ow.nope.nope", sleep=lambda s: None) as c, pytest.raises(ClientError) as e:
        c.status()
    assert e.value.status == 401 and c.retries == 0


def test_503_is_retried_after_retry_after(world: tuple[str, str, FlakyStore], api: Client) -> None:
    _, _, store = world
    store.fail = 2
    page = api.audit(limit=5)
    assert page["items"] and api.retries == 2
    assert api.waits == [1.0, 1.0]  # type: ignore[attr-defined]
    store.fail = 100  # longer than the retries: the manager's message comes through
    try:
        with pytest.raises(ClientError) as e:
            api.audit(limit=5)
        assert e.value.status == 503 and "store is unavailable" in e.value.message
        assert api.retries == 2 + api.retry.attempts - 1
    finally:
        store.fail = 0


def test_a_manager_that_is_not_up_yet_is_waited_for() -> None:
    """Connection refused (a bound port nobody listens on yet) is retried with backoff; the manager
    starts listening during the second wait and the call succeeds."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    m = seeded_manager(MemoryStore(), WORLD)
    tok, _ = m.tokens.create("provider-admin", name="late")
    srv = uvicorn.Server(uvicorn.Config(create_app(m, watch=False), log_level="warning"))
    waits: list[float] = []

    def sleep(s: float) -> None:
        waits.append(s)
        if len(waits) == 2:
            threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True).start()
            while not srv.started:
                threading.Event().wait(0.02)

    try:
        with Client(f"http://127.0.0.1:{port}", tok, sleep=sleep) as c:
            assert c.status()["revision"] >= 1
            assert waits == [0.2, 0.4] and c.retries == 2
    finally:
        srv.should_exit = True
        sock.close()


def test_no_manager_at_all_ends_in_one_error() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # never listens: every connection is refused
    waits: list[float] = []
    try:
        with Client(f"http://127.0.0.1:{sock.getsockname()[1]}", "t", sleep=waits.append) as c:
            with pytest.raises(ClientError) as e:
                c.create_token("auditor")  # a POST that never left is retried too
            assert e.value.status is None and "cannot reach the manager" in e.value.message
            assert waits == [0.2, 0.4, 0.8] and c.retry == Retry()
    finally:
        sock.close()


def test_watch_audit_streams_committed_entries(api: Client) -> None:
    api.apply(WORKLOADS.replace("10.0.0.2", "10.0.0.9"), source="watch-test")
    entries = list(api.watch_audit(kind="Workload", since="5m", limit=1))
    assert entries and entries[0]["kind"] == "Workload" and entries[0]["tenant"] == "acme"


def test_tokens(api: Client) -> None:
    made = api.create_token("auditor", name="from-client")
    assert made["token"].startswith("ow.") and made["role"] == "auditor"
    with Client(api.server, made["token"]) as auditor:
        assert auditor.whoami()["role"] == "auditor"
        with pytest.raises(ClientError) as e:
            auditor.delete("workload", "acme/web-1")
        assert e.value.status == 403
    assert made["id"] in {t["id"] for t in api.list_tokens()}
    api.revoke_token(made["id"])
    assert made["id"] not in {t["id"] for t in api.list_tokens() if not t.get("revoked")}


def test_settings_from_arguments_environment_and_config_contexts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("OMNIWALL_SERVER", "OMNIWALL_TOKEN", "OMNIWALL_CA", "OMNIWALL_CERT", "OMNIWALL_KEY"):
        monkeypatch.delenv(var, raising=False)
    cfg = tmp_path / "config.yaml"
    monkeypatch.setenv("OMNIWALL_CONFIG", str(cfg))
    monkeypatch.delenv("OMNIWALL_CONTEXT", raising=False)
    with pytest.raises(ClientError, match="no token"):
        Settings.resolve()
    (tmp_path / "lab.token").write_text("ow.lab.secret\n")
    cfg.write_text(
        "current-context: lab\n"
        "contexts:\n"
        f"  lab: {{server: 'https://127.0.0.1:9443/', token_file: {tmp_path / 'lab.token'}, ca: /x/ca.crt}}\n"
        "  prod: {server: 'https://fw.example.net', token: ow.prod.secret}\n"
    )
    s = Settings.resolve()
    assert (s.server, s.token, s.ca) == ("https://127.0.0.1:9443", "ow.lab.secret", "/x/ca.crt")
    monkeypatch.setenv("OMNIWALL_CONTEXT", "prod")
    assert Settings.resolve().server == "https://fw.example.net"
    assert Settings.resolve(context="lab").token == "ow.lab.secret"
    monkeypatch.setenv("OMNIWALL_SERVER", "http://127.0.0.1:1")
    monkeypatch.setenv("OMNIWALL_TOKEN", "ow.env.secret")
    s = Settings.resolve()
    assert (s.server, s.token, s.ca) == ("http://127.0.0.1:1", "ow.env.secret", None)  # file not read
    assert Settings.resolve(token="ow.arg.secret").token == "ow.arg.secret"
    with pytest.raises(ClientError, match="context 'nope'"):
        Settings.resolve(context="nope")
    with pytest.raises(ClientError, match="--ca"):
        Settings("https://x", "t", ca=str(tmp_path / "missing.crt")).verify()
