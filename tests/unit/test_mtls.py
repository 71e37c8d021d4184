"""Mutual TLS between agents and the manager, over real TLS on loopback (omniwall.pki, omniwall.tls,
api/server.py, api/auth.py): host certificates bind a connection to its host, a wrong CA fails the
handshake, certificates rotate in place, and agents refuse plain HTTP to a manager off this machine."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from apihelpers import ACME_TWO_HOSTS, seeded_manager

from omniwall import pki
from omniwall.agent.cli import agent as agent_command
from omniwall.api.server import make_server
from omniwall.manager.service import Manager
from omniwall.store.memory import MemoryStore
from omniwall.tls import TlsConfigError, check_manager_url, client_context, server_context


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.init_ca(d)
    pki.issue_manager(d, ["127.0.0.1", "localhost"])
    for h in ("h1", "h2"):
        pki.issue_host(d, h)
    return d


def _serve(m: Manager, d: Path, *, client_ca: bool = True) -> Iterator[tuple[str, Any]]:
    tls = server_context(d / "manager.crt", d / "manager.key", d / "ca.crt" if client_ca else None)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = make_server(m, "127.0.0.1", 0, tls=tls, client_ca=client_ca, log_level="warning")
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.started
        yield f"https://127.0.0.1:{sock.getsockname()[1]}", tls
    finally:
        srv.should_exit = True
        t.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def world(ca: Path) -> Iterator[tuple[str, Manager, dict[str, str], Any]]:
    m = seeded_manager(MemoryStore(), ACME_TWO_HOSTS)
    tokens = {
        "admin": m.tokens.create("provider-admin")[0],
        "h1": m.tokens.create("agent", host="h1")[0],
        "h2": m.tokens.create("agent", host="h2")[0],
    }
    for url, tls in _serve(m, ca):
        yield url, m, tokens, tls


def _client(d: Path, host: str | None) -> httpx.Client:
    ctx = client_context(
        d / "ca.crt",
        d / "hosts" / f"{host}.crt" if host else None,
        d / "hosts" / f"{host}.key" if host else None,
    )
    return httpx.Client(verify=ctx.context, timeout=10.0)


def _get(c: httpx.Client, url: str, token: str) -> httpx.Response:
    return c.get(url, headers={"Authorization": f"Bearer {token}"})


def test_pki_issues_a_host_certificate_naming_its_host(ca: Path) -> None:
    info = pki.describe(ca / "hosts" / "h1.crt")
    assert info["subject"] == "CN=h1" and "urn:omniwall:host:h1" in info["sans"]
    assert set(pki.describe(ca / "manager.crt")["sans"]) == {"127.0.0.1", "localhost"}
    assert (os.stat(ca / "hosts" / "h1.key").st_mode & 0o777) == 0o600
    assert (os.stat(ca / "ca.key").st_mode & 0o777) == 0o600
    with pytest.raises(pki.PkiError, match="already there"):
        pki.init_ca(ca)
    with pytest.raises(pki.PkiError, match="neither an IP address nor a DNS name"):
        pki.issue_manager(ca, ["bad name!"])


def test_a_host_certificate_reads_only_its_own_feed(
    world: tuple[str, Manager, dict[str, str], Any], ca: Path
) -> None:
    url, _, tokens, _ = world
    with _client(ca, "h1") as c:
        r = _get(c, f"{url}/v1/hosts/h1/desired", tokens["h1"])
        assert r.status_code == 200, r.text
        # host-1's certificate with host-2's (stolen) token: refused, on every per-host route
        r = _get(c, f"{url}/v1/hosts/h2/desired", tokens["h2"])
        assert r.status_code == 403 and "h1" in r.json()["message"], r.text
        r = c.get(
            f"{url}/v1/hosts/h2/feed",
            params={"follow": "false"},
            headers={"Authorization": f"Bearer {tokens['h2']}"},
        )
        assert r.status_code == 403
        r = c.post(
            f"{url}/v1/hosts/h2/status",
            json={"realized_revision": 0},
            headers={"Authorization": f"Bearer {tokens['h2']}"},
        )
        assert r.status_code == 403
        r = c.post(
            f"{url}/v1/hosts/h2/commands/c1", json={}, headers={"Authorization": f"Bearer {tokens['h2']}"}
        )
        assert r.status_code == 403  # host-2's commands
        # host-1's own token for host-2's feed: the token's own scope refuses it too
        assert _get(c, f"{url}/v1/hosts/h2/desired", tokens["h1"]).status_code == 403


def test_the_status_stream_is_bound_to_the_certificates_host(
    world: tuple[str, Manager, dict[str, str], Any], ca: Path
) -> None:
    """The agent's status stream (agent/upstream.py) over mTLS: its own host's lines are recorded; with
    host-1's certificate, host-2's (stolen) token is refused at the start, with the reason."""
    import asyncio

    from omniwall.agent.upstream import StatusUpstream

    url, m, tokens, _ = world
    ctx = client_context(ca / "ca.crt", ca / "hosts" / "h1.crt", ca / "hosts" / "h1.key").context

    async def go() -> tuple[str, str]:
        ended: dict[str, str] = {}
        own = StatusUpstream(url, "h1", tokens["h1"], lambda r: ended.setdefault("h1", r), ctx)
        await own.open()
        await own.send(b'{"realized_revision":%d,"error":null}' % m.desired.revision("h1"))
        stolen = StatusUpstream(url, "h2", tokens["h2"], lambda r: ended.setdefault("h2", r), ctx)
        await stolen.open()
        await stolen.send(b'{"realized_revision":99}')
        deadline = time.monotonic() + 10
        while ("h2" not in ended or m.hosts.get("h1").realized_revision != m.desired.revision("h1")) and (
            time.monotonic() < deadline
        ):
            await asyncio.sleep(0.02)
        await own.close()
        await stolen.close()
        return ended.get("h2", ""), ended.get("h1", "")

    stolen_end, own_end = asyncio.run(go())
    assert "HTTP 403" in stolen_end and "h1" in stolen_end, stolen_end
    assert m.hosts.get("h1").realized_revision == m.desired.revision("h1")
    assert m.hosts.get("h2").realized_revision != 99
    assert own_end == "closed by the agent"


def test_agent_tokens_need_their_certificate_people_do_not(
    world: tuple[str, Manager, dict[str, str], Any], ca: Path
) -> None:
    url, _, tokens, _ = world
    with _client(ca, None) as c:
        r = _get(c, f"{url}/v1/hosts/h1/desired", tokens["h1"])
        assert r.status_code == 403 and "client certificate" in r.json()["message"]
        assert _get(c, f"{url}/v1/whoami", tokens["admin"]).status_code == 200


def test_a_wrong_ca_fails_to_connect(
    world: tuple[str, Manager, dict[str, str], Any], ca: Path, tmp_path: Path
) -> None:
    url, _, tokens, _ = world
    pki.init_ca(tmp_path, name="someone else")
    other = client_context(tmp_path / "ca.crt")
    with httpx.Client(verify=other.context) as c, pytest.raises(httpx.ConnectError):
        _get(c, f"{url}/healthz", tokens["admin"])
    # a client certificate issued by another CA: the manager refuses the handshake
    pki.issue_host(tmp_path, "h1")
    ctx = client_context(ca / "ca.crt", tmp_path / "hosts" / "h1.crt", tmp_path / "hosts" / "h1.key")
    with (
        httpx.Client(verify=ctx.context) as c,
        pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
    ):
        _get(c, f"{url}/v1/hosts/h1/desired", tokens["h1"])


def test_certificates_rotate_in_place(world: tuple[str, Manager, dict[str, str], Any], ca: Path) -> None:
    url, _, tokens, tls = world
    ctx = client_context(ca / "ca.crt", ca / "hosts" / "h2.crt", ca / "hosts" / "h2.key")
    assert not ctx.reload_if_changed()  # nothing changed yet
    before = pki.describe(ca / "hosts" / "h2.crt")["serial"]
    time.sleep(0.01)
    pki.issue_host(ca, "h2")  # a new key and certificate for h2, files replaced atomically
    assert ctx.reload_if_changed()
    with httpx.Client(verify=ctx.context) as c:
        assert _get(c, f"{url}/v1/hosts/h2/desired", tokens["h2"]).status_code == 200
    assert pki.describe(ca / "hosts" / "h2.crt")["serial"] != before
    # the manager's own certificate: re-issued and reloaded without a restart
    old = ssl.get_server_certificate(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    pki.issue_manager(ca, ["127.0.0.1", "localhost"])
    assert tls.reload_if_changed()
    new = ssl.get_server_certificate(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    assert new != old
    with _client(ca, "h1") as c:
        assert _get(c, f"{url}/v1/hosts/h1/desired", tokens["h1"]).status_code == 200


def test_agents_refuse_plain_http_to_a_remote_manager(tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match="clear text"):
        check_manager_url("http://10.0.0.1:8443")
    check_manager_url("http://127.0.0.1:8443")
    check_manager_url("http://localhost:8443")
    check_manager_url("http://[::1]:8443")
    check_manager_url("https://10.0.0.1:8443")
    token = tmp_path / "t"
    token.write_text("ow.x.y\n")
    import typer

    with pytest.raises(typer.Exit) as e:
        agent_command(
            manager="http://10.0.0.1:8443", host="h1", token_file=token, backend="sim", state_dir=tmp_path
        )
    assert e.value.exit_code == 2


def test_the_manager_warns_about_plain_http_off_loopback() -> None:
    from omniwall.api.listen import plain_http_warning

    warning = plain_http_warning("0.0.0.0", 8443, tls=False)
    assert warning is not None and "0.0.0.0:8443" in warning and "clear text" in warning
    assert plain_http_warning("10.0.0.1", 8443, tls=False) is not None
    assert plain_http_warning("127.0.0.1", 8443, tls=False) is None
    assert plain_http_warning("0.0.0.0", 8443, tls=True) is None


def test_a_mismatched_certificate_and_key_keep_the_loaded_pair(ca: Path, tmp_path: Path) -> None:
    import shutil

    cert, key = tmp_path / "h.crt", tmp_path / "h.key"
    shutil.copy(ca / "hosts" / "h1.crt", cert)
    shutil.copy(ca / "hosts" / "h1.key", key)
    ctx = client_context(ca / "ca.crt", cert, key)
    time.sleep(0.01)
    shutil.copy(ca / "hosts" / "h2.crt", cert)  # half a rotation: h2's certificate, h1's key
    assert not ctx.reload_if_changed() and ctx.reloads == 0
    shutil.copy(ca / "hosts" / "h2.key", key)  # the rest of it
    assert ctx.reload_if_changed() and ctx.reloads == 1
