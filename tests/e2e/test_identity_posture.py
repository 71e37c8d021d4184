"""Identity groups and posture quarantine end to end: examples/vdi in the managed lab (a manager process,
one agent per host namespace on the nftables backend), events posted with `identity-source` /
`posture-source` tokens, judged with real traffic.

"Cut" is defined precisely (see `Stream`): a long-lived TCP connection that carries 32 bytes each way
every 10 ms is cut when, once every host has realized the change, *no further payload is delivered in
either direction* for `QUIET` seconds (the client's and the server's receive counters stand still),
while a control connection that the change does not concern keeps delivering in both directions.

Needs root (network namespaces, nftables); skipped, visibly, otherwise. One lab serves the module; each
test restores the identity/posture state it changed, so the order does not matter.
"""

from __future__ import annotations

import contextlib
import select
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from labhelpers import NEEDS_ROOT

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "vdi"
SETTLE = 0.3  # after every host acked: packets already in flight may still land
QUIET = 1.5  # a cut connection delivers nothing for this long (the live one: ~150 sends each way)

pytestmark = NEEDS_ROOT


# ------------------------------------------------------------------------------------------ helpers


class Stream:
    """A long-lived TCP connection from workload `src` to `dst`:`port`, both ends driven from this
    process (the sockets are created in the workloads' namespaces). Every 10 ms each end sends 32 bytes
    (when its send buffer has room) and reads what arrived; `rx` counts bytes received per end."""

    def __init__(self, lab: Any, src: str, dst: str, port: int) -> None:
        from omniwall.lab.traffic import tcp_pair

        s, d = lab.plan.workload(src), lab.plan.workload(dst)
        self.name = f"{s.key} -> {d.key}:{port}"
        client, server = tcp_pair(lab, src, dst, port)
        self.ends = {"client": client, "server": server}
        self.rx = {"client": 0, "server": 0}
        self.last_rx = {"client": time.monotonic(), "server": time.monotonic()}
        self.errors: dict[str, str] = {}
        for sock in self.ends.values():
            sock.setblocking(False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name=f"stream {self.name}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        payload = b"x" * 32
        by_fd = {sock.fileno(): end for end, sock in self.ends.items()}
        while not self._stop.is_set():
            for end, sock in self.ends.items():
                if end in self.errors:
                    continue
                try:
                    sock.send(payload)
                except BlockingIOError:
                    pass  # no ACKs come back: the send buffer is full
                except OSError as e:
                    self.errors[end] = type(e).__name__
            readable, _, _ = select.select(
                [s for e, s in self.ends.items() if e not in self.errors], [], [], 0.01
            )
            for sock in readable:
                end = by_fd[sock.fileno()]
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as e:
                    self.errors[end] = type(e).__name__
                    continue
                if not data:
                    self.errors[end] = "EOF"
                    continue
                self.rx[end] += len(data)
                self.last_rx[end] = time.monotonic()
            time.sleep(0.01)

    def counts(self) -> tuple[int, int]:
        return self.rx["client"], self.rx["server"]

    def delivering(self, window: float = 0.5) -> bool:
        """Did both ends receive new payload within `window` s?"""
        before = self.counts()
        time.sleep(window)
        after = self.counts()
        return after[0] > before[0] and after[1] > before[1]

    def cut(self, quiet: float = QUIET) -> bool:
        """No payload delivered in either direction for `quiet` s (after `SETTLE` for packets in flight)."""
        time.sleep(SETTLE)
        before = self.counts()
        time.sleep(quiet)
        return self.counts() == before

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for sock in self.ends.values():
            with contextlib.suppress(OSError):
                sock.close()


@contextlib.contextmanager
def stream(lab: Any, src: str, dst: str, port: int) -> Iterator[Stream]:
    s = Stream(lab, src, dst, port)
    try:
        yield s
    finally:
        s.close()


class Source:
    """An identity or posture source: its own token (role `identity-source` / `posture-source`)."""

    def __init__(self, cp: Any, role: str) -> None:
        out = cp.api("POST", "/v1/tokens", json={"role": role, "name": f"e2e-{role}"})
        self.cp = cp
        self.client = httpx.Client(
            base_url=cp.url, headers={"Authorization": f"Bearer {out['token']}"}, timeout=30, verify=cp.verify
        )

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.client.post(path, json=body)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def post_and_wait(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Post, then wait until every host's agent realized the resulting revision."""
        out = self.post(path, body)
        self.cp.wait_in_sync(revision=out["revision"], timeout=30)
        return out

    def close(self) -> None:
        self.client.close()


def identity(src: Source, workload: str, user: str, action: str) -> dict[str, Any]:
    return src.post_and_wait("/v1/identity/events", {"workload": workload, "user": user, "action": action})


def posture(src: Source, workload: str, status: str) -> dict[str, Any]:
    return src.post_and_wait("/v1/posture/reports", {"workload": workload, "av.status": status})


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def managed() -> Iterator[tuple[Any, Any]]:
    from omniwall.lab import netns
    from omniwall.lab.managed import control_dir, managed_lab

    with managed_lab([EXAMPLE], ipv6=False) as (lab, cp):
        yield lab, cp
    assert netns.list_names(lab.prefix) == [], "the lab's namespaces outlived it"
    assert not control_dir(lab.prefix).exists(), "the lab's manager/agents directory outlived it"


@pytest.fixture(scope="module")
def idp(managed: tuple[Any, Any]) -> Iterator[Source]:
    s = Source(managed[1], "identity-source")
    yield s
    s.close()


@pytest.fixture(scope="module")
def scanner(managed: tuple[Any, Any]) -> Iterator[Source]:
    s = Source(managed[1], "posture-source")
    yield s
    s.close()


# ------------------------------------------------------------------------------------------ identity


def test_example_matrix_agrees_with_the_sim(managed: tuple[Any, Any]) -> None:
    """Before any event: every workload pair of examples/vdi judged by real traffic equals the sim."""
    lab, _ = managed
    entries = lab.matrix(expect=True)
    assert len(entries) == 5 * 6  # every workload -> each of the 5 with a responder
    assert [e.json_line() for e in entries if not e.agrees] == []


def test_sources_cannot_write_policy(managed: tuple[Any, Any], idp: Source, scanner: Source) -> None:
    """The tokens the tests use are as weak as they should be: they cannot touch policy."""
    for src in (idp, scanner):
        r = src.client.delete("/v1/policies/quarantine", params={"tenant": "infra"})
        assert r.status_code == 403, r.text
        assert src.client.get("/v1/workloads").status_code == 403
    assert (
        idp.client.post(
            "/v1/posture/reports", json={"workload": "corp/vdi-7", "av.status": "clean"}
        ).status_code
        == 403
    )
    assert (
        scanner.client.post(
            "/v1/identity/events", json={"workload": "corp/vdi-7", "user": "alice", "action": "login"}
        ).status_code
        == 403
    )


def test_login_grants_access_logout_revokes_it_and_cuts_open_connections(
    managed: tuple[Any, Any], idp: Source
) -> None:
    lab, cp = managed
    assert not lab.probe("corp/vdi-7", "corp/hr-app-1", "tcp", 443, timeout=0.5)
    try:
        out = identity(idp, "corp/vdi-7", "alice", "login")
        assert out["changed"] and out["attributes"]["user"] == ["alice"]
        obj = cp.api("GET", "/v1/workloads/vdi-7", params={"tenant": "corp"})
        assert obj["spec"]["attributes"]["user"] == ["alice"]

        assert lab.probe("corp/vdi-7", "corp/hr-app-1", "tcp", 443)  # vdi-7 (host-1) -> HR app (host-2)
        assert not lab.probe("corp/vdi-8", "corp/hr-app-1", "tcp", 443, timeout=0.5)  # nobody on vdi-8
        identity(idp, "corp/vdi-7", "bob", "login")  # a second user on the same desktop changes nothing
        assert lab.probe("corp/vdi-7", "corp/hr-app-1", "tcp", 443)

        with (
            stream(lab, "corp/vdi-7", "corp/hr-app-1", 8443) as hr,
            stream(lab, "corp/vdi-7", "corp/wiki-1", 8080) as wiki,  # control: still allowed after logout
        ):
            assert hr.delivering() and wiki.delivering()
            out = identity(idp, "corp/vdi-7", "alice", "logout")
            assert out["attributes"]["user"] == ["bob"]
            assert hr.cut(), f"{hr.name} still delivers after logout: {hr.counts()}"
            assert wiki.delivering(), f"{wiki.name} was cut too: {wiki.counts()} {wiki.errors}"
        assert not lab.probe("corp/vdi-7", "corp/hr-app-1", "tcp", 443, timeout=0.5)
        assert lab.probe("corp/vdi-7", "corp/wiki-1", "tcp", 80)
    finally:
        for user in ("alice", "bob"):
            identity(idp, "corp/vdi-7", user, "logout")
    assert "user" not in cp.api("GET", "/v1/workloads/vdi-7", params={"tenant": "corp"})["spec"]["attributes"]


def test_identity_follows_the_user_to_another_desktop(managed: tuple[Any, Any], idp: Source) -> None:
    lab, _ = managed
    try:
        identity(idp, "vdi-8", "alice", "login")  # bare name: unique across tenants
        assert lab.probe("corp/vdi-8", "corp/hr-app-1", "tcp", 443)  # same host as the HR app
        assert not lab.probe("corp/vdi-7", "corp/hr-app-1", "tcp", 443, timeout=0.5)
    finally:
        identity(idp, "vdi-8", "alice", "logout")
    assert not lab.probe("corp/vdi-8", "corp/hr-app-1", "tcp", 443, timeout=0.5)


# ------------------------------------------------------------------------------------------ posture


def test_infected_report_isolates_everywhere_and_clean_report_restores(
    managed: tuple[Any, Any], idp: Source, scanner: Source
) -> None:
    lab, _ = managed
    identity(idp, "corp/vdi-7", "alice", "login")
    try:
        assert lab.probe("corp/vdi-7", "corp/hr-app-1", "tcp", 443)
        assert lab.probe("corp/vdi-7", "corp/wiki-1", "tcp", 80)
        assert not lab.probe("corp/vdi-7", "infra/remediation-1", "tcp", 80, timeout=0.5)
        with (
            stream(lab, "corp/vdi-7", "corp/hr-app-1", 8443) as cross_host,
            stream(lab, "corp/vdi-7", "corp/wiki-1", 8080) as same_host,
            stream(lab, "corp/vdi-8", "corp/wiki-1", 8080) as control,
        ):
            assert cross_host.delivering() and same_host.delivering() and control.delivering()
            out = posture(scanner, "corp/vdi-7", "infected")
            assert out["attributes"]["av.status"] == "infected"
            # existing connections cut, on both hosts
            assert cross_host.cut(), f"{cross_host.name}: {cross_host.counts()}"
            assert same_host.cut(), f"{same_host.name}: {same_host.counts()}"
            assert control.delivering(), f"{control.name} was cut too: {control.errors}"
        # new connections refused, both ways; the remediation server is the one exception
        assert not lab.probe("corp/vdi-7", "corp/hr-app-1", "tcp", 443, timeout=0.5)
        assert not lab.probe("corp/vdi-7", "corp/wiki-1", "tcp", 80, timeout=0.5)
        assert not lab.probe("corp/vdi-8", "corp/vdi-7", "icmp", timeout=0.5)
        assert lab.probe("corp/vdi-7", "infra/remediation-1", "tcp", 80)
        # nobody else noticed
        assert lab.probe("corp/vdi-8", "corp/wiki-1", "tcp", 80)
        assert lab.probe("partner/web-1", "partner/db-1", "tcp", 5432)

        out = posture(scanner, "corp/vdi-7", "clean")
        assert out["attributes"]["av.status"] == "clean"
        assert lab.probe("corp/vdi-7", "corp/hr-app-1", "tcp", 443)  # alice is still logged in
        assert lab.probe("corp/vdi-7", "corp/wiki-1", "tcp", 80)
        assert not lab.probe("corp/vdi-7", "infra/remediation-1", "tcp", 80, timeout=0.5)
        with stream(lab, "corp/vdi-7", "corp/hr-app-1", 8443) as again:
            assert again.delivering()
    finally:
        scanner.post_and_wait("/v1/posture/reports", {"workload": "corp/vdi-7", "av.status": None})
        identity(idp, "corp/vdi-7", "alice", "logout")


def test_posture_events_are_audited_with_the_source_role(managed: tuple[Any, Any], scanner: Source) -> None:
    _, cp = managed
    out = posture(scanner, "corp/vdi-8", "clean")
    try:
        entries = cp.api("GET", "/v1/audit", params={"kind": "Workload", "name": "vdi-8"})["items"]
        mine = [e for e in entries if e["revision"] == out["revision"]]
        assert len(mine) == 1 and mine[0]["role"] == "posture-source"
        assert mine[0]["changed"] == ["spec.attributes.av.status"]
    finally:
        scanner.post_and_wait("/v1/posture/reports", {"workload": "corp/vdi-8", "av.status": None})
