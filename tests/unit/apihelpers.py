"""Shared setup for the API/manager tests: a seeded manager, issued tokens, an app served on loopback.

Each test module keeps its own world (YAML) and decides which tokens it needs; these helpers only do the
plumbing that was repeated in every module.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from labhelpers import yaml_docs as yaml_docs  # re-exported: the API tests build their worlds with it
from omniwall.api.app import create_app
from omniwall.manager.contracts import load_documents
from omniwall.manager.service import SYSTEM, Manager
from omniwall.store.base import Store
from omniwall.store.memory import MemoryStore

# caller -> (role, scope keywords for `m.tokens.create`)
Grants = Mapping[str, tuple[str, Mapping[str, str]]]

# the usual callers of a feed test: the provider admin and one agent per host
ADMIN_AND_AGENTS: Grants = {
    "admin": ("provider-admin", {}),
    "h1": ("agent", {"host": "h1"}),
    "h2": ("agent", {"host": "h2"}),
}


def seeded_manager(store: Store, world: str, **manager_kw: Any) -> Manager:
    """A manager over `store` with the YAML `world` committed by the system."""
    m = Manager(store, **manager_kw)
    m.commit(m.plan_apply(load_documents(world, "world.yaml")), SYSTEM)
    return m


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def issue_tokens(m: Manager, grants: Grants) -> dict[str, str]:
    """One raw token per caller of `grants`."""
    return {caller: m.tokens.create(role, **scope)[0] for caller, (role, scope) in grants.items()}


def blank_client() -> TestClient:
    """A client over an empty manager; module-scoped fixtures swap in a world's manager per test
    (`use_manager`), since building the app takes a while."""
    return TestClient(create_app(Manager(MemoryStore()), watch=False))


def use_manager(client: TestClient, m: Manager) -> None:
    client.app.state.manager = m  # type: ignore[attr-defined]


@contextmanager
def serving(app: FastAPI, **config: Any) -> Iterator[str]:
    """Serve `app` with uvicorn on a loopback port in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.started
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        t.join(timeout=10)
        sock.close()


# World fragments (YAML) several modules build on, joined with the module's own workloads by `yaml_docs`.
ACME_TWO_HOSTS = """
kind: Tenant
metadata: {name: acme}
---
kind: Host
metadata: {name: h1}
---
kind: Host
metadata: {name: h2}
"""

# acme's web1 (tier=web, 10.0.0.1) on h1 and db1 (tier=db, 10.0.1.1) on h2 (the hosts of ACME_TWO_HOSTS)
WEB1_DB1 = """
kind: Workload
metadata: {name: web1, tenant: acme, labels: {tier: web}}
spec: {host: h1, vnics: [{name: eth0, ips: [10.0.0.1]}]}
---
kind: Workload
metadata: {name: db1, tenant: acme, labels: {tier: db}}
spec: {host: h2, vnics: [{name: eth0, ips: [10.0.1.1]}]}
"""

# acme on one host with one workload: web1 (tier=web, 10.0.0.1) on h1
ACME_WEB1 = """
kind: Tenant
metadata: {name: acme}
---
kind: Host
metadata: {name: h1}
---
kind: Workload
metadata: {name: web1, tenant: acme, labels: {tier: web}}
spec: {host: h1, vnics: [{name: eth0, ips: [10.0.0.1]}]}
"""

# tier=web workloads of acme may reach anything on tcp/80
WEB_OUT_HTTP = """
kind: Group
metadata: {name: web, tenant: acme}
spec: {selector: 'tier == "web"'}
---
kind: Policy
metadata: {name: p, tenant: acme}
spec:
  rules:
  - {name: r, sources: [web], destinations: [any], services: [tcp/80], action: allow}
"""

# tier=web workloads of acme may reach tier=db ones on tcp/5432
WEB_TO_DB_SQL = """
kind: Group
metadata: {name: web, tenant: acme}
spec: {selector: 'tier == "web"'}
---
kind: Group
metadata: {name: db, tenant: acme}
spec: {selector: 'tier == "db"'}
---
kind: Policy
metadata: {name: web-db, tenant: acme}
spec:
  rules:
  - {name: sql, sources: [web], destinations: [db], services: [tcp/5432], action: allow}
"""
