"""Tenant isolation (issue 9, findings 3 and 4): what a tenant's token gets back never names another
tenant's objects, hosts only that tenant uses, unshared provider groups, or their addresses.

- Every route of the OpenAPI document x every tenant role x own / foreign path parameters: no 5xx, no 2xx
  on a foreign object, and every answer scanned for the foreign markers below.
- explain: both ends foreign answers exactly like both ends unknown; own -> foreign address answers
  exactly like own -> an address nobody has (finding 3).
- errors: a collision with a foreign address, a near-miss of a foreign-only host's name, a reference to
  an unshared provider group answer like their harmless counterparts (finding 4).
- dry run: a tenant's impact counts are the same whether or not another tenant has workloads on the same
  host (finding 4).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from apihelpers import auth, issue_tokens, seeded_manager, yaml_docs
from fastapi.testclient import TestClient

from omniwall.api.app import create_app
from omniwall.manager.service import Manager
from omniwall.store.memory import MemoryStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

OWN = """
kind: Tenant
metadata: {name: acme}
---
kind: Host
metadata: {name: hshared}
---
kind: Workload
metadata: {name: web1, tenant: acme, labels: {tier: web}}
spec: {host: hshared, vnics: [{name: eth0, ips: [10.0.0.1]}]}
---
kind: Workload
metadata: {name: web2, tenant: acme, labels: {tier: web}}
spec: {host: hshared, vnics: [{name: eth0, ips: [10.0.0.2]}]}
---
kind: Group
metadata: {name: web, tenant: acme}
spec: {selector: 'tier == "web"'}
---
kind: Service
metadata: {name: http, tenant: acme}
spec: {ports: [80]}
---
kind: Policy
metadata: {name: pol, tenant: acme}
spec:
  rules:
  - {name: r, sources: [web], destinations: [any], services: [http], action: allow}
---
kind: Group
metadata: {name: shared-ok, tenant: infra}
spec: {cidrs: [10.8.0.0/16], shareWith: [acme]}
"""
# Everything foreign carries a marker: "zeta" in names, 10.66/16 and 10.77/16 in addresses.
FOREIGN = """
kind: Tenant
metadata: {name: zeta}
---
kind: Host
metadata: {name: hvzeta}
---
kind: Workload
metadata: {name: zeta-db1, tenant: zeta, labels: {zeta-tier: zeta-db}}
spec: {host: hvzeta, vnics: [{name: eth0, ips: [10.66.0.1]}]}
---
kind: Workload
metadata: {name: zeta-db2, tenant: zeta}
spec: {host: hshared, vnics: [{name: eth0, ips: [10.66.0.2]}]}
---
kind: Group
metadata: {name: zeta-all, tenant: zeta}
spec: {selector: all(), cidrs: [10.66.128.0/24]}
---
kind: Policy
metadata: {name: zeta-pol, tenant: zeta}
spec:
  rules:
  - {name: zeta-r, sources: [zeta-all], destinations: [any], action: allow}
  - {name: zeta-r2, sources: [zeta-all], destinations: [infra/webs], action: allow}
---
kind: Group
metadata: {name: webs, tenant: infra}
spec: {selector: 'tier == "web"', shareWith: [zeta]}
---
kind: Group
metadata: {name: zeta-private, tenant: infra}
spec: {cidrs: [10.77.0.0/16]}
"""
# Names and addresses a tenant's request never contains; the foreign path parameters below (zeta-db1,
# hvzeta, tenant zeta) may be echoed back to the caller who sent them, and are scanned for elsewhere.
MARKERS = re.compile(r"zeta-db2|zeta-all|zeta-pol|zeta-r\b|zeta-private|zeta-tier|10\.66\.|10\.77\.")
SENT = re.compile(r"zeta-db1|hvzeta|zeta")
FOREIGN_PARAMS = {"name": "zeta-db1", "host": "hvzeta", "tenant": "zeta"}
OWN_PARAMS = {"name": "web1", "host": "hshared", "tenant": "acme"}
ROLES = ("tenant-admin", "tenant-viewer")
# Provider-wide roles that may only write (identity/posture events): they read nothing, foreign or not.
# Provider admins and auditors see every tenant by design; agents see their own host's desired state,
# which holds every tenant's vNICs on that host (the authorization matrix keeps them to that host).
WRITE_ONLY = ("identity-source", "posture-source")


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[TestClient, Manager, dict[str, dict[str, str]]]]:
    m = seeded_manager(MemoryStore(), yaml_docs(OWN, FOREIGN))
    grants = {r: (r, {"tenant": "acme"}) for r in ROLES} | {r: (r, {}) for r in WRITE_ONLY}
    tokens = issue_tokens(m, grants | {"admin": ("provider-admin", {})})
    with TestClient(create_app(m, watch=False), raise_server_exceptions=False) as client:
        yield client, m, {k: auth(v) for k, v in tokens.items()}


# Live streams never end for a caller allowed to read them; their tenant scoping is tested on the
# events they carry (tests/unit/test_api_flows.py: flows and audit streams).
STREAMS = {("GET", "/v1/flows/watch"), ("GET", "/v1/audit/watch")}


def routes(client: TestClient) -> list[tuple[str, str]]:
    spec = client.get("/openapi.json").json()
    every = [(method.upper(), path) for path, ops in spec["paths"].items() for method in ops]
    return [r for r in every if r not in STREAMS]


def fill(path: str, params: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: params.get(m.group(1), "x1"), path)


def leaks(text: str) -> list[str]:
    return sorted(set(MARKERS.findall(text)))


def test_every_route_every_tenant_role_own_and_foreign(world: Any) -> None:
    client, m, h = world
    before = m.store.revision()
    problems: list[str] = []
    checked = 0
    for method, template in routes(client):
        for scope, params in (("own", OWN_PARAMS), ("foreign", FOREIGN_PARAMS)):
            if method != "GET" and scope == "own":
                continue  # writes to own objects are the authorization matrix's business
            path = fill(template, params)
            query = {"tenant": params["tenant"]} if "{name}" in template else {}
            for role in ROLES + (WRITE_ONLY if method == "GET" else ()):
                body = {"kind": "Workload", "metadata": {"name": params["name"], "tenant": params["tenant"]}}
                r = client.request(
                    method,
                    path,
                    params=query,
                    headers={**h[role], "content-type": "application/json"},
                    content=None if method in ("GET", "DELETE") else json.dumps(body),
                )
                checked += 1
                where = f"{role} {method} {path}"
                if r.status_code >= 500:
                    problems.append(f"{where}: {r.status_code}")
                if scope == "foreign" and 200 <= r.status_code < 300 and "{" in template:
                    problems.append(f"{where}: {r.status_code} on a foreign object")
                found = leaks(r.text) + (SENT.findall(r.text) if scope == "own" else [])
                if found:
                    problems.append(f"{where}: leaks {sorted(set(found))} in {r.text[:200]}")
    assert checked > 100
    assert not problems, "\n".join(problems)
    assert m.store.revision() == before


def test_listings_and_reads_name_nothing_foreign(world: Any) -> None:
    client, _, h = world
    for role in ROLES:
        for plural in ("tenants", "workloads", "groups", "services", "applications", "policies"):
            for params in ({}, {"tenant": "zeta"}, {"labelSelector": "zeta-tier=zeta-db"}):
                r = client.get(f"/v1/{plural}", params=params, headers=h[role])
                found = leaks(r.text) + SENT.findall(r.text)
                assert r.status_code == 200 and not found, (role, plural, params, r.text[:300])


def explain(client: TestClient, h: dict[str, str], src: str, dst: str) -> tuple[int, str]:
    r = client.get("/v1/explain", params={"from": src, "to": dst, "proto": "tcp", "port": 80}, headers=h)
    return r.status_code, r.text


@pytest.mark.parametrize("role", ROLES)
def test_explain_says_nothing_about_foreign_addresses(world: Any, role: str) -> None:
    """Finding 3: tenant-a used to read allow/drop for tenant-b's address pairs."""
    client, _, h = world
    foreign = explain(client, h[role], "10.66.0.1", "10.66.0.2")
    nobody = explain(client, h[role], "10.99.0.1", "10.99.0.2")
    assert foreign[0] == 422 and foreign == nobody
    for src in ("web1", "10.0.0.1"):
        status, text = explain(client, h[role], src, "10.66.0.2")
        status2, text2 = explain(client, h[role], src, "10.99.0.2")
        assert status == status2 == 200
        assert text.replace("10.66.0.2", "ADDR") == text2.replace("10.99.0.2", "ADDR")
        status, text = explain(client, h[role], "10.66.0.1", src)
        status2, text2 = explain(client, h[role], "10.99.0.1", src)
        assert status == status2 == 200
        assert text.replace("10.66.0.1", "ADDR") == text2.replace("10.99.0.1", "ADDR")
    for ref in ("zeta/zeta-db1", "zeta-db1"):
        status, text = explain(client, h[role], "web1", ref)
        assert status == 404 and not leaks(text), text


def test_the_provider_still_explains_everything(world: Any) -> None:
    client, _, h = world
    status, text = explain(client, h["admin"], "10.66.0.1", "10.66.0.2")
    assert status == 200 and "zeta/zeta-db2" in text


def write_error(client: TestClient, h: dict[str, str], doc: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/apply?dryRun=true", content=json.dumps(doc), headers=h)
    assert r.status_code == 422, r.text
    return r.json()


def workload(ip: str, host: str = "hshared", name: str = "w9") -> dict[str, Any]:
    return {"kind": "Workload", "metadata": {"name": name}, "spec": {"host": host, "vnics": [{"ips": [ip]}]}}


def test_errors_name_no_foreign_object(world: Any) -> None:
    """Finding 4: "address 10.2.0.3 is already used by Workload/tenant-b/db-1", "did you mean 'host-3'?"."""
    client, _, h = world
    ta = h["tenant-admin"]
    taken = write_error(client, ta, workload("10.66.0.1"))
    assert not leaks(json.dumps(taken).replace("10.66.0.1", "")) and "zeta" not in json.dumps(taken), taken
    assert taken["errors"][0]["reason"] == "address 10.66.0.1 is already in use"
    # a near-miss of a host only zeta uses: no suggestion
    near = write_error(client, ta, workload("10.0.0.9", host="hvzetb"))
    assert near["errors"][0]["reason"] == "unknown host 'hvzetb'"
    # an unshared provider group is as unknown as a missing one
    rule = {"name": "r", "sources": ["web"], "destinations": ["infra/zeta-private"], "action": "allow"}
    pol = {"kind": "Policy", "metadata": {"name": "p2"}, "spec": {"rules": [rule]}}
    unshared = write_error(client, ta, pol)["errors"][0]["reason"]
    rule["destinations"] = ["infra/zeta-privat"]
    missing = write_error(client, ta, pol)["errors"][0]["reason"]
    assert unshared == "unknown group 'infra/zeta-private'" and missing == "unknown group 'infra/zeta-privat'"
    # a near-miss of a foreign group's name suggests nothing foreign
    rule["destinations"] = ["zeta-al"]
    assert not leaks(json.dumps(write_error(client, ta, pol)))


def dry_run_impact(m: Manager, token: str) -> dict[str, Any]:
    client = TestClient(create_app(m, watch=False))
    text = json.dumps(
        workload("10.0.0.3", name="web3") | {"metadata": {"name": "web3", "labels": {"tier": "web"}}}
    )
    r = client.post("/v1/apply?dryRun=true", content=text, headers=auth(token))
    assert r.status_code == 200, r.text
    return r.json()["impact"]


def test_dry_run_counts_only_the_tenants_view() -> None:
    """Finding 4: a tenant's dry-run impact counted other tenants' set elements on the same host."""
    alone = seeded_manager(MemoryStore(), OWN)
    crowded = seeded_manager(MemoryStore(), yaml_docs(OWN, FOREIGN))
    grants = {"t": ("tenant-admin", {"tenant": "acme"})}
    a = dry_run_impact(alone, issue_tokens(alone, grants)["t"])
    c = dry_run_impact(crowded, issue_tokens(crowded, grants)["t"])
    assert a["totals"]["vnics"] == 1 and a["totals"]["setElementsAdded"] >= 1, a
    assert c == a
    assert not leaks(json.dumps(c))
