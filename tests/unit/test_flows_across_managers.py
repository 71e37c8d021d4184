"""Flows across managers (docs/ha.md): three managers on a real etcd (two served in this process, the
third an `omniwall manager` process, killed with SIGKILL at the end), each storing the flow records its
own agents post; one query on one manager sees them all, merged, paged exactly once,
scoped for a tenant, summed in hits and graph, streamed live; a manager killed -> answers marked partial."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from apihelpers import auth, seeded_manager
from etcdhelpers import Cluster, etcd_cluster, manager_processes, needs_etcd

from omniwall.api.server import make_server
from omniwall.manager.audit import chained
from omniwall.manager.flows import FlowService
from omniwall.manager.flowstore import SqliteFlowStore
from omniwall.manager.service import Manager
from omniwall.store import open_store

pytestmark = [needs_etcd, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

WORLD = """
kind: Tenant
metadata: {name: acme}
---
kind: Tenant
metadata: {name: other}
---
kind: Host
metadata: {name: h1}
---
kind: Host
metadata: {name: h2}
---
kind: Host
metadata: {name: h3}
---
kind: Workload
metadata: {name: w1, tenant: acme}
spec: {host: h1, vnics: [{name: eth0, ips: [10.0.0.1]}]}
---
kind: Workload
metadata: {name: w2, tenant: acme}
spec: {host: h2, vnics: [{name: eth0, ips: [10.0.0.2]}]}
---
kind: Workload
metadata: {name: db, tenant: other}
spec: {host: h3, vnics: [{name: eth0, ips: [10.0.1.1]}]}
"""
HOSTS = ("h1", "h2", "h3")
PER_HOST = 10
T0 = time.time() - 60


def record(host: str, i: int, **kw: Any) -> dict[str, Any]:
    """Host h<n>'s i-th record; the three hosts' times interleave (h1 at .0, h2 at .1, h3 at .2)."""
    n = HOSTS.index(host)
    end = T0 + i + n / 10
    src, wl = {"h1": ("10.0.0.1", "acme/w1"), "h2": ("10.0.0.2", "acme/w2"), "h3": ("10.0.0.2", "other/db")}[
        host
    ]
    rec = {
        "start": end - 0.5, "end": end, "host": host, "hop": "egress" if host != "h3" else "ingress",
        "ifname": "eth0", "workload": wl, "verdict": ("allowed", "denied", "denied")[n], "rule_id": 7 + n,
        "rule_tenant": "acme" if host != "h3" else "other", "policy": "p", "rule": f"r{n}",
        "category": "application", "revision": 1, "proto": "tcp", "src": src,
        "dst": "10.0.1.1" if host == "h3" else "10.0.0.9", "sport": 40000 + i, "dport": 80,
    }  # fmt: skip
    return {**rec, **kw}


def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.05)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Cluster]:
    with etcd_cluster(tmp_path) as cluster:
        yield cluster


class Served:
    """A manager on etcd served by uvicorn on a thread (as `omniwall manager` serves it)."""

    def __init__(self, etcd: Cluster, flows: Path) -> None:
        self.manager = Manager(chained(open_store(etcd.url)))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        svc = FlowService(SqliteFlowStore(str(flows)))
        self.srv = make_server(self.manager, "127.0.0.1", port, log_level="warning", flows=svc)
        self.srv.config.timeout_graceful_shutdown = 1  # peer streams stay open until their reader goes
        self.thread = threading.Thread(target=self.srv.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{port}"

    def wait(self) -> None:
        deadline = time.monotonic() + 30
        while not self.srv.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.srv.started

    def stop(self) -> None:
        self.srv.should_exit = True

    def join(self) -> None:
        self.thread.join(timeout=15)
        self.sock.close()
        self.srv.config.app.state.flows.close()
        self.manager.store.close()


@contextmanager
def served(etcd: Cluster, tmp: Path, n: int) -> Iterator[list[Served]]:
    """`n` managers served in this process; stopped together (each stop waits on its store's watch)."""
    out: list[Served] = []
    try:
        for i in range(n):
            out.append(Served(etcd, tmp / f"m{i}.flows"))
        for s in out:
            s.wait()
        yield out
    finally:
        for s in out:
            s.stop()
        for s in out:
            s.join()


class Watch:
    """A reader of GET /v1/flows/watch on a thread: events into a queue."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.stopped = threading.Event()
        self.client = httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(5, read=30))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        kind = ""
        params = {"stats": 60, "heartbeat": 0.3}  # a comment line at least every 0.3 s: `stop` is seen
        try:
            with self.client.stream("GET", "/v1/flows/watch", params=params) as r:
                for line in r.iter_lines():
                    if self.stopped.is_set():
                        return  # closing the response: the manager sees the reader go
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        self.events.put((kind, json.loads(line[6:])))
        except httpx.HTTPError:
            pass

    def until(self, check: Callable[[str, Any], bool], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "event not seen in time"
            try:
                kind, data = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if check(kind, data):
                return data

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.client.close()


def test_one_query_on_one_manager_sees_the_flows_of_all_three(etcd: Cluster, tmp_path: Path) -> None:
    m = seeded_manager(chained(open_store(etcd.url)), WORLD)
    admin = auth(m.tokens.create("provider-admin", name="alice")[0])
    viewer = auth(m.tokens.create("tenant-viewer", tenant="other", name="olga")[0])
    agents = {h: auth(m.tokens.create("agent", host=h)[0]) for h in HOSTS}
    m.store.close()
    env = {"OMNIWALL_ETCD_LEASE_TTL": "2"}
    with ExitStack() as stack:
        proc = stack.enter_context(manager_processes(tmp_path, etcd.url, count=1, env=env))[0]
        urls = [s.url for s in stack.enter_context(served(etcd, tmp_path, 2))] + [proc.url]
        clients = [httpx.Client(base_url=u, timeout=10) for u in urls]
        c0 = clients[0]
        # each agent ships to "its" manager: h1 -> m0, h2 -> m1, h3 -> m2
        for h, c in zip(HOSTS, clients, strict=True):
            batch = {"host": h, "records": [record(h, i) for i in range(PER_HOST)]}
            r = c.post(f"/v1/hosts/{h}/flows", json=batch, headers=agents[h])
            assert r.status_code == 202 and r.json()["accepted"] == PER_HOST, r.text
        # every manager registered; m0 finds its two peers
        eventually(lambda: c0.get("/v1/flows", headers=admin).json().get("managers") == 3, what="3 managers")

        page = c0.get("/v1/flows", params={"limit": 1000}, headers=admin).json()
        assert page["partial"] is False and page["errors"] == [] and page["continue"] is None
        assert {i["host"] for i in page["items"]} == set(HOSTS) and len(page["items"]) == 3 * PER_HOST
        ends = [i["end"] for i in page["items"]]
        assert ends == sorted(ends, reverse=True)  # one time order over the three stores
        assert len({i["store"] for i in page["items"]}) == 3

        # pages of 7 over three stores: every row exactly once, in time order
        seen: list[tuple[str, int]] = []
        ends = []
        cont: str | None = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 7, **({"continue": cont} if cont else {})}
            got = c0.get("/v1/flows", params=params, headers=admin).json()
            seen += [(i["store"], i["id"]) for i in got["items"]]
            ends += [i["end"] for i in got["items"]]
            pages += 1
            cont = got["continue"]
            if cont is None:
                break
        assert len(seen) == len(set(seen)) == 3 * PER_HOST and pages == 5
        assert ends == sorted(ends, reverse=True)
        # filters travel: only h2's denied rows, asked on m0, stored on m1
        h2 = c0.get("/v1/flows", params={"host": "h2", "verdict": "denied"}, headers=admin).json()
        assert len(h2["items"]) == PER_HOST and {i["host"] for i in h2["items"]} == {"h2"}

        # a tenant's query is scoped on every peer: "other" sees only the rows touching other/db (m2's)
        mine = c0.get("/v1/flows", headers=viewer).json()
        assert len(mine["items"]) == PER_HOST and not mine["partial"]
        assert all(i["dst_workload"] == "other/db" and i["src_workload"] is None for i in mine["items"])
        assert all(i["host"] is None for i in mine["items"])

        # rule hits and graph edges are sums over the managers
        hits = c0.get("/v1/flows/hits", headers=admin).json()
        assert {(h["rule_id"], h["total"]) for h in hits["rules"]} == {(7, 10), (8, 10), (9, 10)}
        assert not hits["partial"]
        graph = c0.get("/v1/flows/graph", headers=admin).json()
        assert sum(e["total"] for e in graph["edges"]) == 3 * PER_HOST
        other_hits = c0.get("/v1/flows/hits", headers=viewer).json()["rules"]
        assert [(h["rule_id"], h["total"]) for h in other_hits] == [(9, 10)]

        # the peer route is for managers only: a user token is refused, a forged peer key too
        assert c0.post("/v1/flows/peer", json={"op": "hits"}, headers=admin).status_code == 403
        forged = {"X-Omniwall-Peer": "someone not-a-key"}
        assert c0.post("/v1/flows/peer", json={"op": "hits"}, headers=forged).status_code == 401

        # live: a reader on m0 gets a record posted to m2
        watch = Watch(urls[0], admin)
        try:
            watch.until(lambda k, d: k == "peers" and len(d["managers"]) == 2 and not d["partial"])
            rec = record("h3", 99, end=time.time())
            r = clients[2].post(
                "/v1/hosts/h3/flows", json={"host": "h3", "records": [rec]}, headers=agents["h3"]
            )
            assert r.status_code == 202
            got = watch.until(lambda k, d: k == "flow" and d["sport"] == 40099)
            assert got["host"] == "h3"

            # kill -9 m2: the answer on m0 is marked partial, naming m2's store; m0's and m1's rows stay
            m2_store = next(i["store"] for i in page["items"] if i["host"] == "h3")
            proc.kill()
            now = c0.get("/v1/flows", params={"limit": 1000}, headers=admin).json()
            assert now["partial"] is True and [e["store"] for e in now["errors"]] == [m2_store]
            assert {i["host"] for i in now["items"]} == {"h1", "h2"}
            assert c0.get("/v1/flows/hits", headers=admin).json()["partial"] is True
            assert c0.get("/v1/flows/graph", headers=admin).json()["partial"] is True
            # the live reader is told too
            watch.until(lambda k, d: k == "peers" and d["partial"] and len(d["managers"]) == 1)
            # after m2's lease expired it is no longer a peer, and its store is still reported missing
            eventually(
                lambda: "no live manager" in json.dumps(c0.get("/v1/flows", headers=admin).json()["errors"]),
                what="m2's store reported missing after its lease",
            )
        finally:
            watch.close()
        for c in clients:
            c.close()
