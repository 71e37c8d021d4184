"""Authorization matrix: every role x every endpoint x own / foreign tenant (or host).

The caller's tenant is `acme` (tenant roles) and its host `h1` (agent). "Foreign" objects belong to
tenant `other` / host `h2`. Expected: 2xx where the role has the permission and the object is in scope;
404 for objects of another tenant (never 403: they do not exist for the caller); 403 naming the missing
permission otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from omniwall.api.app import create_app
from omniwall.manager.contracts import load_documents
from omniwall.manager.service import SYSTEM, Manager
from omniwall.store.memory import MemoryStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

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
kind: Workload
metadata: {name: web1, tenant: acme, labels: {tier: web}}
spec: {host: h1, vnics: [{name: eth0, ips: [10.0.0.1]}]}
---
kind: Workload
metadata: {name: db1, tenant: other, labels: {tier: db}}
spec: {host: h2, vnics: [{name: eth0, ips: [10.0.1.1]}]}
---
kind: Policy
metadata: {name: p, tenant: acme}
spec: {rules: [{name: r, action: allow, services: [tcp/80]}]}
---
kind: Policy
metadata: {name: p, tenant: other}
spec: {rules: [{name: r, action: allow, services: [tcp/80]}]}
---
kind: Group
metadata: {name: shared, tenant: infra}
spec: {cidrs: [10.8.0.0/16], shareWith: [acme]}
---
kind: Group
metadata: {name: private, tenant: infra}
spec: {cidrs: [10.9.0.0/16]}
"""

ROLES = [
    "provider-admin",
    "tenant-admin",
    "tenant-viewer",
    "auditor",
    "agent",
    "identity-source",
    "posture-source",
]
SCOPE = {"tenant-admin": {"tenant": "acme"}, "tenant-viewer": {"tenant": "acme"}, "agent": {"host": "h1"}}
READERS = {"provider-admin", "tenant-admin", "tenant-viewer", "auditor"}
WRITERS = {"provider-admin", "tenant-admin"}
TENANT_ROLES = {"tenant-admin", "tenant-viewer"}


def policy(tenant: str, name: str = "p", category: str = "application", port: int = 81) -> dict[str, Any]:
    return {
        "kind": "Policy",
        "metadata": {"name": name, "tenant": tenant},
        "spec": {
            "category": category,
            "rules": [{"name": "r", "action": "allow", "services": [f"tcp/{port}"]}],
        },
    }


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    expect: dict[str, int]  # role -> status
    params: dict[str, Any] | None = None
    body: Any = None
    content: str | None = None
    permission: str | None = None  # expected in 403 bodies


def _read(own: bool) -> dict[str, int]:
    return {
        r: (200 if r in READERS and (own or r not in TENANT_ROLES) else 404 if r in READERS else 403)
        for r in ROLES
    }


def _write(own: bool) -> dict[str, int]:
    out = {}
    for r in ROLES:
        if r not in WRITERS:
            out[r] = 403
        elif r in TENANT_ROLES and not own:
            out[r] = 404
        else:
            out[r] = 200
    return out


def _provider_only_write() -> dict[str, int]:
    return {r: 200 if r == "provider-admin" else 403 for r in ROLES}


def _cases() -> list[Case]:
    cases: list[Case] = [
        Case(
            "list workloads",
            "GET",
            "/v1/workloads",
            {r: 200 if r in READERS else 403 for r in ROLES},
            permission="resources.read",
        ),
    ]
    for own, tenant in ((True, "acme"), (False, "other")):
        tag = "own" if own else "foreign"
        wl = "web1" if own else "db1"
        cases += [
            Case(f"get workload {tag}", "GET", f"/v1/workloads/{wl}", _read(own), {"tenant": tenant}),
            Case(f"history {tag}", "GET", "/v1/policies/p/history", _read(own), {"tenant": tenant}),
            Case(f"stats {tag}", "GET", "/v1/policies/p/stats", _read(own), {"tenant": tenant}),
            Case(
                f"create policy {tag}",
                "POST",
                "/v1/policies",
                _write(own),
                body=policy(tenant, "new"),
                permission="resources.write",
            ),
            Case(
                f"update policy {tag}",
                "PUT",
                "/v1/policies/p",
                _write(own),
                {"tenant": tenant},
                body=policy(tenant),
            ),
            Case(f"delete policy {tag}", "DELETE", "/v1/policies/p", _write(own), {"tenant": tenant}),
            Case(
                f"rollback policy {tag}",
                "POST",
                "/v1/policies/p/rollback",
                _write(own),
                {"tenant": tenant},
                body={"revision": 1},
            ),
            Case(
                f"apply {tag}",
                "POST",
                "/v1/apply",
                _write(own),
                content=json.dumps(policy(tenant, "applied")),
            ),
            Case(
                f"dry-run apply {tag}",
                "POST",
                "/v1/apply",
                _write(own),
                {"dryRun": "true"},
                content=json.dumps(policy(tenant, "applied")),
            ),
        ]
    # Provider objects and provider-only permissions.
    provider_read = {
        r: 200 if r in {"provider-admin", "auditor"} else 404 if r in TENANT_ROLES else 403 for r in ROLES
    }
    cases += [
        Case("get host", "GET", "/v1/hosts/h1", provider_read),
        Case(
            "get shared provider group",
            "GET",
            "/v1/groups/shared",
            {r: 200 if r in READERS else 403 for r in ROLES},
            {"tenant": "infra"},
        ),
        Case("get unshared provider group", "GET", "/v1/groups/private", provider_read, {"tenant": "infra"}),
        Case(
            "create host",
            "POST",
            "/v1/hosts",
            _provider_only_write(),
            body={"kind": "Host", "metadata": {"name": "h9"}},
            permission="resources.write",
        ),
        Case(
            "create tenant",
            "POST",
            "/v1/tenants",
            _provider_only_write(),
            body={"kind": "Tenant", "metadata": {"name": "t9"}},
        ),
        # Even the provider may not put an emergency policy into a tenant: the validator refuses it (422).
        Case(
            "provider-category policy in own tenant",
            "POST",
            "/v1/policies",
            {**_provider_only_write(), "provider-admin": 422},
            body=policy("acme", "emerg", "emergency"),
        ),
        Case(
            "write provider group",
            "PUT",
            "/v1/groups/shared",
            {r: 200 if r == "provider-admin" else 404 if r == "tenant-admin" else 403 for r in ROLES},
            {"tenant": "infra"},
            body={
                "kind": "Group",
                "metadata": {"name": "shared", "tenant": "infra"},
                "spec": {"cidrs": ["10.8.0.0/16"], "shareWith": ["acme", "other"]},
            },
        ),
        Case(
            "audit",
            "GET",
            "/v1/audit",
            {r: 200 if r in READERS else 403 for r in ROLES},
            permission="audit.read",
        ),
        Case("list tokens", "GET", "/v1/tokens", _provider_only_write(), permission="tokens.admin"),
        Case(
            "create token",
            "POST",
            "/v1/tokens",
            _provider_only_write(),
            body={"role": "auditor"},
            permission="tokens.admin",
        ),
        Case(
            "compact",
            "POST",
            "/v1/compact",
            _provider_only_write(),
            body={"revision": 1},
            permission="store.compact",
        ),
        Case("status", "GET", "/v1/status", {r: 200 if r in READERS else 403 for r in ROLES}),
    ]
    feed_roles = {"provider-admin", "auditor", "agent"}
    for own, host in ((True, "h1"), (False, "h2")):
        tag = "own" if own else "foreign"
        cases += [
            Case(
                f"feed {tag} host",
                "GET",
                f"/v1/hosts/{host}/feed",
                {r: 200 if r in feed_roles and (own or r != "agent") else 403 for r in ROLES},
                {"follow": "false"},
                permission="hosts.feed.read",
            ),
            Case(
                f"desired {tag} host",
                "GET",
                f"/v1/hosts/{host}/desired",
                {r: 200 if r in feed_roles and (own or r != "agent") else 403 for r in ROLES},
            ),
            Case(
                f"status report {tag} host",
                "POST",
                f"/v1/hosts/{host}/status",
                {r: 200 if r == "agent" and own else 403 for r in ROLES},
                body={"realized_revision": 1},
                permission="hosts.status.write",
            ),
        ]
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def client() -> TestClient:
    # Building the app takes a while (route analysis); each test swaps in a fresh manager instead.
    return TestClient(create_app(Manager(MemoryStore()), watch=False))


@pytest.fixture
def world(client: TestClient) -> Iterator[tuple[TestClient, Manager, dict[str, str]]]:
    m = Manager(MemoryStore())
    m.commit(m.plan_apply(load_documents(WORLD, "world.yaml")), SYSTEM)
    tokens = {}
    for role in ROLES:
        tokens[role], _ = m.tokens.create(role, **SCOPE.get(role, {}))
    client.app.state.manager = m  # type: ignore[attr-defined]
    yield client, m, tokens


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_authorization_matrix(
    world: tuple[TestClient, Manager, dict[str, str]], case: Case, role: str
) -> None:
    client, m, tokens = world
    before = m.store.revision()
    kw: dict[str, Any] = {"params": case.params, "headers": {"Authorization": f"Bearer {tokens[role]}"}}
    if case.body is not None:
        kw["json"] = case.body
    if case.content is not None:
        kw["content"] = case.content
    r = client.request(case.method, case.path, **kw)
    want = case.expect[role]
    assert r.status_code == want, f"{role} {case.name}: {r.status_code} {r.text[:300]}"
    if want == 403:
        assert r.json()["permission"], r.text
        if case.permission and role not in WRITERS | READERS:
            assert r.json()["permission"] == case.permission
    if want >= 400 or case.method == "GET" or (case.params or {}).get("dryRun"):
        # refused calls and reads write nothing (token creation aside, which the matrix allows only once)
        assert m.store.revision() == before


def test_tenant_lists_show_only_their_objects(world: tuple[TestClient, Manager, dict[str, str]]) -> None:
    client, _, tokens = world
    h = {"Authorization": f"Bearer {tokens['tenant-viewer']}"}
    wls = client.get("/v1/workloads", headers=h).json()["items"]
    assert [(w["metadata"]["tenant"], w["metadata"]["name"]) for w in wls] == [("acme", "web1")]
    groups = client.get("/v1/groups", headers=h).json()["items"]
    assert [g["metadata"]["name"] for g in groups] == ["shared"]
    assert client.get("/v1/hosts", headers=h).json()["items"] == []
    tenants = client.get("/v1/tenants", headers=h).json()["items"]
    assert [t["metadata"]["name"] for t in tenants] == ["acme"]
    audit = client.get("/v1/audit", headers=h).json()["items"]
    assert audit and {e["tenant"] for e in audit} == {"acme"}
    assert client.get("/v1/audit", params={"tenant": "other"}, headers=h).json()["items"] == []


def test_tenant_documents_default_to_the_token_tenant(
    world: tuple[TestClient, Manager, dict[str, str]],
) -> None:
    client, m, tokens = world
    h = {"Authorization": f"Bearer {tokens['tenant-admin']}"}
    text = "kind: Group\nmetadata: {name: mine}\nspec: {cidrs: [10.7.0.0/16]}\n"
    r = client.post("/v1/apply", content=text, headers=h)
    assert r.status_code == 200, r.text
    assert m.get("Group", "acme", "mine") is not None


def test_provider_category_403_names_the_permission(
    world: tuple[TestClient, Manager, dict[str, str]],
) -> None:
    client, _, tokens = world
    h = {"Authorization": f"Bearer {tokens['tenant-admin']}"}
    r = client.post("/v1/apply", content=json.dumps(policy("acme", "e", "infrastructure")), headers=h)
    assert r.status_code == 403
    assert r.json()["permission"] == "policy.provider-category"
    assert "infrastructure" in r.json()["message"]
