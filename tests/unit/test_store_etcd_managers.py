"""Several managers on one real etcd (issue 12): shared host status with liveness on leases, one
bootstrap token, token revocation through the watch, migrations carried on by another manager under an
election, 503 while etcd is away."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from apihelpers import auth
from etcdhelpers import Cluster, etcd_cluster, needs_etcd
from fastapi.testclient import TestClient

from omniwall.api.app import create_app
from omniwall.api.metrics import render
from omniwall.manager.audit import chained
from omniwall.manager.hostbook_etcd import EtcdHostStatusBook
from omniwall.manager.service import Manager
from omniwall.store import open_store

pytestmark = [needs_etcd, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

WORLD = "\n---\n".join(
    [
        "kind: Tenant\nmetadata: {name: acme}",
        "kind: Host\nmetadata: {name: h1}",
        "kind: Host\nmetadata: {name: h2}",
    ]
)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Cluster]:
    with etcd_cluster(tmp_path) as cluster:
        yield cluster


def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> float:
    """Seconds until `check()` holds (fails after `timeout`)."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - t0


def managers(etcd: Cluster, n: int) -> list[Manager]:
    return [Manager(chained(open_store(etcd.url))) for _ in range(n)]


def close(*ms: Manager) -> None:
    for m in ms:
        m.stop_watch()
        m.store.close()


def test_host_status_is_shared_and_liveness_follows_the_lease(etcd: Cluster) -> None:
    m1, m2 = managers(etcd, 2)
    assert isinstance(m1.hosts, EtcdHostStatusBook) and isinstance(m2.hosts, EtcdHostStatusBook)
    m1.hosts.ttl = m2.hosts.ttl = 2  # type: ignore[attr-defined]
    admin, _ = m1.tokens.create("provider-admin", name="alice")
    agent, _ = m1.tokens.create("agent", host="h1")
    c1, c2 = TestClient(create_app(m1, watch=False)), TestClient(create_app(m2, watch=False))
    assert c1.post("/v1/apply", content=WORLD, headers=auth(admin)).status_code == 200
    m2.sync()
    # the agent of h1 streams from m1 and acks there; m2 shows it
    m1.hosts.connect("h1", m1.now_iso())
    desired = m1.desired.revision("h1")
    body = {"realized_revision": desired, "counters": [{"rule_id": 7, "packets": 3, "bytes": 90}],
            "conntrack": {"count": 90, "max": 100}}  # fmt: skip
    assert c1.post("/v1/hosts/h1/status", json=body, headers=auth(agent)).status_code == 200

    def on_m2() -> dict[str, object]:
        return c2.get("/v1/status", headers=auth(admin)).json()["hosts"]["h1"]

    eventually(
        lambda: on_m2()["connected"] is True and on_m2()["realizedRevision"] == desired, what="m2 sees h1"
    )
    assert on_m2()["inSync"] is True and on_m2()["conntrack"]["alarm"] == "warning"
    assert m2.hosts.counters()["h1"] == {7: (3, 90)}
    assert b"omniwall_hosts_connected 1.0" in render(c2.app.state.metrics)  # type: ignore[attr-defined]
    # counters alone are coalesced: 50 reports within a second are at most a couple of writes
    writes = m1.hosts.write_count  # type: ignore[attr-defined]
    for i in range(50):
        body["counters"] = [{"rule_id": 7, "packets": 4 + i, "bytes": 100 + i}]
        c1.post("/v1/hosts/h1/status", json=body, headers=auth(agent))
    assert m1.hosts.write_count - writes <= 2  # type: ignore[attr-defined]
    eventually(lambda: m2.hosts.counters()["h1"] == {7: (53, 149)}, what="coalesced counters reach m2")
    # a clean disconnect shows at once elsewhere
    m1.hosts.disconnect("h1", m1.now_iso())
    took = eventually(lambda: on_m2()["connected"] is False, what="clean disconnect")
    assert took < 1.0
    # a manager that dies (its lease is no longer renewed) loses its hosts after the lease's TTL
    m1.hosts.connect("h2", m1.now_iso())
    eventually(lambda: m2.hosts.get("h2").connected > 0, what="h2 connected")
    book = m1.hosts
    assert isinstance(book, EtcdHostStatusBook)
    with book._cond:  # as if the process were killed: nothing renews its lease any more
        book._stopped = True
        book._cond.notify_all()
    took = eventually(lambda: m2.hosts.get("h2").connected == 0, timeout=10, what="lease expiry")
    assert 0.5 < took < 6
    assert m2.hosts.get("h1").realized_revision == desired  # the last report stays
    close(m1, m2)
