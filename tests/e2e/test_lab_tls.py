"""The managed lab over mutual TLS (lab/managed.py, docs/security.md): agents present their host's
certificate, the manager binds each to its host, and a host certificate rotates while the kernel keeps
enforcing. Needs root (namespaces, nftables); skipped, visibly, otherwise."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from labhelpers import NEEDS_ROOT

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "three-tier"

pytestmark = NEEDS_ROOT

# (source, destination, proto, port, allowed) of the three-tier example
PROBES = [
    ("tenant-a/web-1", "tenant-a/app-1", "tcp", 8080, True),
    ("tenant-a/web-1", "tenant-a/db-1", "tcp", 5432, False),
]


@pytest.fixture(scope="module")
def managed() -> Iterator[tuple[Any, Any]]:
    from omniwall.lab.managed import managed_lab

    with managed_lab([EXAMPLE], ipv6=False) as (lab, cp):
        yield lab, cp


def _enforced(lab: Any) -> list[str]:
    return [f"{s}->{d} {p}/{n}" for s, d, p, n, ok in PROBES if lab.probe(s, d, p, n) != ok]


def _ruleset(lab: Any, host: str) -> str:
    out = lab.exec_host(host, ["nft", "list", "table", "inet", "omniwall"])
    assert out.returncode == 0, out.stderr
    text = re.sub(r"counter packets \d+ bytes \d+", "counter", out.stdout)
    return re.sub(r"quota _rev \{[^}]*\}", "quota _rev", text)  # the revision moves with any store write


def _serial(path: Path) -> str:
    from omniwall import pki

    return pki.describe(path)["serial"].lower()


def _seen_serial(cp: Any, host: str) -> str:
    cert = cp.status()["hosts"][host].get("clientCertificate") or {}
    return str(cert.get("serial", "")).lstrip("0")


def test_the_lab_runs_on_https_with_host_certificates(managed: tuple[Any, Any]) -> None:
    lab, cp = managed
    assert cp.url.startswith("https://127.0.0.1:")
    status = cp.status()
    for h in ("host-1", "host-2", "host-3"):
        s = status["hosts"][h]
        assert s["connected"] and s["inSync"], (h, s)
        # the manager saw this host's own certificate (agents without one would get 403)
        assert _seen_serial(cp, h) == _serial(cp.host_cert(h)[0]).lstrip("0")
    assert _enforced(lab) == []
    # plain HTTP is not served at all on the lab's port
    with pytest.raises(httpx.HTTPError):
        httpx.get(cp.url.replace("https://", "http://") + "/healthz", timeout=2.0)


def test_a_stolen_token_is_useless_without_its_host_key(managed: tuple[Any, Any]) -> None:
    from omniwall.tls import client_context

    _, cp = managed
    stolen = cp.agent_token_file("host-2").read_text().strip()
    cert, key = cp.host_cert("host-1")
    ctx = client_context(cp.ca_file, cert, key).context
    headers = {"Authorization": f"Bearer {stolen}"}
    with httpx.Client(base_url=cp.url, verify=ctx, timeout=10) as c:
        r = c.get("/v1/hosts/host-2/desired", headers=headers)
        assert r.status_code == 403 and "host-1" in r.json()["message"], r.text
    # no client certificate at all: refused as well
    with httpx.Client(base_url=cp.url, verify=cp.verify, timeout=10) as c:
        assert c.get("/v1/hosts/host-2/desired", headers=headers).status_code == 403


def test_a_wrong_ca_fails_to_connect(managed: tuple[Any, Any], tmp_path: Path) -> None:
    from omniwall import pki
    from omniwall.tls import client_context

    _, cp = managed
    pki.init_ca(tmp_path, name="not the lab's CA")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{cp.url}/healthz", verify=client_context(tmp_path / "ca.crt").context, timeout=5)


def test_host_certificate_rotation_keeps_enforcing(managed: tuple[Any, Any]) -> None:
    lab, cp = managed
    before = {h: _ruleset(lab, h) for h in ("host-1", "host-2")}
    old = _seen_serial(cp, "host-1")
    pid = cp.record.agents["host-1"]
    cert, _ = cp.rotate_host_cert("host-1")
    new = _serial(cert).lstrip("0")
    assert new != old
    os.kill(pid, signal.SIGHUP)  # re-read the certificate now (it is used from the next connection on)
    time.sleep(0.3)
    assert Path(f"/proc/{pid}").exists() and _enforced(lab) == []
    # the next connection carries the new certificate: force one by restarting the manager
    cp.stop_manager()
    try:
        assert _enforced(lab) == []  # manager down, rotation under way: the kernel keeps enforcing
    finally:
        cp.start_manager()
    cp.wait_in_sync(timeout=60)
    deadline = time.monotonic() + 30
    while _seen_serial(cp, "host-1") != new and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _seen_serial(cp, "host-1") == new
    assert cp.record.agents["host-1"] == pid  # the same agent process, no restart
    assert {h: _ruleset(lab, h) for h in before} == before
    assert _enforced(lab) == []
