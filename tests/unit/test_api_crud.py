"""REST v1 over an in-process app (FastAPI TestClient, SQLite in tmp_path): CRUD, filters, pagination,
validation, optimistic concurrency, apply (all or nothing, dry run), history/rollback, audit, cascade."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apihelpers import auth
from fastapi.testclient import TestClient

from omniwall.api.app import create_app
from omniwall.manager.service import Manager
from omniwall.store.sqlite import SqliteStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BASE = """
kind: Tenant
metadata: {name: acme}
---
kind: Host
metadata: {name: h1}
spec: {address: 192.0.2.1}
---
kind: Host
metadata: {name: h2}
spec: {address: 192.0.2.2}
"""


def workload(name: str, host: str = "h1", ip: str = "10.0.0.1", **labels: str) -> dict[str, Any]:
    return {
        "kind": "Workload",
        "metadata": {"name": name, "tenant": "acme", "labels": labels},
        "spec": {"host": host, "vnics": [{"name": "eth0", "ips": [ip]}]},
    }


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[TestClient, Manager, dict[str, str]]]:
    store = SqliteStore(tmp_path / "m.db")
    m = Manager(store)
    token, _ = m.tokens.create("provider-admin", name="alice")
    client = TestClient(create_app(m, watch=False))
    headers = auth(token)
    r = client.post("/v1/apply", content=BASE, headers=headers)
    assert r.status_code == 200, r.text
    yield client, m, headers
    store.close()


def test_create_get_update_delete(env: tuple[TestClient, Manager, dict[str, str]]) -> None:
    c, m, h = env
    r = c.post("/v1/workloads", json=workload("web1", tier="web"), headers=h)
    assert r.status_code == 200, r.text
    created = r.json()
    md = created["metadata"]
    assert md["revision"] == m.store.revision() and md["uid"] and md["created"]
    got = c.get("/v1/workloads/web1", params={"tenant": "acme"}, headers=h).json()
    assert got["spec"]["vnics"][0]["ips"] == ["10.0.0.1"]
    # create again: 409, the object exists
    assert c.post("/v1/workloads", json=workload("web1"), headers=h).status_code == 409
    body = workload("web1", ip="10.0.0.9", tier="web")
    body["metadata"]["revision"] = md["revision"]
    r = c.put("/v1/workloads/web1", json=body, headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["metadata"]["revision"] > md["revision"]
    assert r.json()["metadata"]["uid"] == md["uid"] and r.json()["metadata"]["created"] == md["created"]
    r = c.delete("/v1/workloads/web1", params={"tenant": "acme"}, headers=h)
    assert r.status_code == 200 and r.json()["deleted"][0]["name"] == "web1"
    assert c.get("/v1/workloads/web1", params={"tenant": "acme"}, headers=h).status_code == 404
    assert c.delete("/v1/workloads/web1", params={"tenant": "acme"}, headers=h).status_code == 404


def test_update_with_stale_revision_is_409_and_writes_nothing(
    env: tuple[TestClient, Manager, dict[str, str]],
) -> None:
    c, m, h = env
    rev = c.post("/v1/workloads", json=workload("web1"), headers=h).json()["metadata"]["revision"]
    first = workload("web1", ip="10.0.0.2")
    first["metadata"]["revision"] = rev
    second = workload("web1", ip="10.0.0.3")
    second["metadata"]["revision"] = rev  # both read the same revision; the second writer loses
    assert c.put("/v1/workloads/web1", json=first, headers=h).status_code == 200
    before = m.store.revision()
    r = c.put("/v1/workloads/web1", json=second, headers=h)
    assert r.status_code == 409
    assert "does not match" in r.json()["message"]
    assert m.store.revision() == before
    ips = c.get("/v1/workloads/web1", params={"tenant": "acme"}, headers=h).json()["spec"]["vnics"][0]["ips"]
    assert ips == ["10.0.0.2"]


def test_concurrent_commit_on_a_stale_plan_conflicts(env: tuple[TestClient, Manager, dict[str, str]]) -> None:
    """Two writers plan against the same model revision; the store txn lets only the first through."""
    from omniwall.manager.objects import parse_resource
    from omniwall.manager.service import SYSTEM, Conflict

    c, m, h = env
    c.post("/v1/workloads", json=workload("web1"), headers=h)
    p1 = m.plan_apply([parse_resource(workload("web1", ip="10.0.0.5"))])
    p2 = m.plan_apply([parse_resource(workload("web1", ip="10.0.0.6"))])
    m.commit(p1, SYSTEM)
    with pytest.raises(Conflict, match="changed concurrently"):
        m.commit(p2, SYSTEM)
    assert m.get("Workload", "acme", "web1").spec.vnics[0].ips == ["10.0.0.5"]  # type: ignore[union-attr]


def test_422_names_document_field_and_reason(env: tuple[TestClient, Manager, dict[str, str]]) -> None:
    c, m, h = env
    bad = workload("web1")
    bad["spec"]["vnics"][0]["ips"] = ["10.0.0.300"]
    before = m.store.revision()
    r = c.post("/v1/workloads", json=bad, headers=h)
    assert r.status_code == 422
    err = r.json()["errors"][0]
    assert "vnics" in err["path"] and "ips" in err["path"]
    assert "10.0.0.300" in err["reason"]
    assert "web1" in err["document"]
    # Cross-object: unknown host, via apply; the error names the document and field.
    text = "kind: Workload\nmetadata: {name: w, tenant: acme}\nspec: {host: nope, vnics: []}\n"
    r = c.post("/v1/apply", content=text, headers={**h, "X-Omniwall-Source": "w.yaml"})
    assert r.status_code == 422, r.text
    errs = r.json()["errors"]
    assert any(e["path"] == "spec.host" and "nope" in e["reason"] and "w.yaml" in e["document"] for e in errs)
    assert m.store.revision() == before


def test_list_label_and_field_filters_and_pagination(env: tuple[TestClient, Manager, dict[str, str]]) -> None:
    c, _, h = env
    for i in range(7):
        tier = "web" if i % 2 == 0 else "db"
        host = "h1" if i < 4 else "h2"
        r = c.post(
            "/v1/workloads", json=workload(f"w{i}", host=host, ip=f"10.0.0.{i + 1}", tier=tier), headers=h
        )
        assert r.status_code == 200, r.text

    def names(**params: Any) -> list[str]:
        r = c.get("/v1/workloads", params=params, headers=h)
        assert r.status_code == 200, r.text
        return [d["metadata"]["name"] for d in r.json()["items"]]

    assert names(labelSelector="tier=web") == ["w0", "w2", "w4", "w6"]
    assert names(labelSelector="tier!=web") == ["w1", "w3", "w5"]
    assert names(labelSelector="tier in (db,cache)") == ["w1", "w3", "w5"]
    assert names(labelSelector="!tier") == []
    assert names(fieldSelector="spec.host=h2") == ["w4", "w5", "w6"]
    assert names(labelSelector="tier=web", fieldSelector="spec.host=h2,metadata.name!=w4") == ["w6"]
    assert names(tenant="other") == []
    # pagination: limit + continue, no duplicates, no gaps
    seen, token, pages = [], None, 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if token:
            params["continue"] = token
        body = c.get("/v1/workloads", params=params, headers=h).json()
        seen += [d["metadata"]["name"] for d in body["items"]]
        pages += 1
        token = body["continue"]
        if not token:
            break
    assert seen == [f"w{i}" for i in range(7)] and pages == 3
    r = c.get("/v1/workloads", params={"labelSelector": "tier in web"}, headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["path"].startswith("query.labelSelector")


APP = """
kind: Application
metadata: {name: shop, tenant: acme}
---
kind: Group
metadata: {name: web, tenant: acme, application: shop}
spec: {selector: 'tier == "web"'}
---
kind: Policy
metadata: {name: shop-web, tenant: acme, application: shop}
spec:
  rules:
  - {name: http, sources: [any], destinations: [web], services: [tcp/80], action: allow}
---
kind: Group
metadata: {name: other, tenant: acme}
spec: {cidrs: [10.9.0.0/16]}
"""


def test_apply_is_all_or_nothing(env: tuple[TestClient, Manager, dict[str, str]]) -> None:
    c, m, h = env
    broken = (
        APP + "---\nkind: Service\nmetadata: {name: s, tenant: acme}\nspec: {protocol: udp, ports: [0]}\n"
    )
    before = m.store.revision()
    r = c.post("/v1/apply", content=broken, headers=h)
    assert r.status_code == 422
    assert any("ports" in e["path"] for e in r.json()["errors"])
    assert m.store.revision() == before
    assert c.get("/v1/groups", headers=h).json()["items"] == []
    r = c.post("/v1/apply", content=APP, headers=h)
    assert r.status_code == 200, r.text
    assert [ch["action"] for ch in r.json()["changes"]] == ["create"] * 4
    # All four objects share one revision: one txn.
    revs = {
        d["metadata"]["revision"]
        for kind in ("groups", "policies", "applications")
        for d in c.get(f"/v1/{kind}", headers=h).json()["items"]
    }
    assert revs == {r.json()["revision"]}
    again = c.post("/v1/apply", content=APP, headers=h).json()
    assert [ch["action"] for ch in again["changes"]] == ["unchanged"] * 4
    base = c.post("/v1/apply", content=BASE, headers=h).json()  # Tenant and Hosts too
    assert [ch["action"] for ch in base["changes"]] == ["unchanged"] * 3
    assert again["revision"] == r.json()["revision"]  # nothing written


def test_dry_run_changes_nothing_and_reports_diff(env: tuple[TestClient, Manager, dict[str, str]]) -> None:
    c, m, h = env
    assert c.post("/v1/apply", content=APP, headers=h).status_code == 200
    before = m.store.revision()
    audit_before = len(c.get("/v1/audit", headers=h).json()["items"])
    changed = APP.replace("tcp/80", "tcp/8080")
    r = c.post("/v1/apply", params={"dryRun": "true"}, content=changed, headers=h)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["dryRun"] is True
    by_name = {ch["name"]: ch for ch in out["changes"]}
    assert by_name["shop-web"]["action"] == "update"
    assert "-    - tcp/80" in by_name["shop-web"]["diff"] and "+    - tcp/8080" in by_name["shop-web"]["diff"]
    assert by_name["web"]["action"] == "unchanged"
    assert "impact" in out and "totals" in out["impact"]
    assert m.store.revision() == before
    assert len(c.get("/v1/audit", headers=h).json()["items"]) == audit_before
    pol = c.get("/v1/policies/shop-web", params={"tenant": "acme"}, headers=h).json()
    assert pol["spec"]["rules"][0]["services"] == ["tcp/80"]


def test_history_and_rollback(env: tuple[TestClient, Manager, dict[str, str]]) -> None:
    c, m, h = env
    r1 = c.post("/v1/workloads", json=workload("web1", ip="10.0.0.1"), headers=h).json()["metadata"][
        "revision"
    ]
    c.put("/v1/workloads/web1", json=workload("web1", ip="10.0.0.2"), headers=h)
    c.put("/v1/workloads/web1", json=workload("web1", ip="10.0.0.3"), headers=h)
    hist = c.get("/v1/workloads/web1/history", params={"tenant": "acme"}, headers=h).json()["items"]
    assert [it["object"]["spec"]["vnics"][0]["ips"][0] for it in hist] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert hist[0]["revision"] == r1
    r = c.post("/v1/workloads/web1/rollback", params={"tenant": "acme"}, json={"revision": r1}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["object"]["spec"]["vnics"][0]["ips"] == ["10.0.0.1"]
    assert r.json()["revision"] == m.store.revision()
    audit = c.get("/v1/audit", params={"kind": "workload", "name": "web1"}, headers=h).json()["items"]
    assert [e["action"] for e in audit] == ["create", "update", "update", "rollback"]
    assert audit[-1]["changed"] == ["spec.vnics"]
    # before the object existed: nothing to roll back to
    r = c.post("/v1/workloads/web1/rollback", params={"tenant": "acme"}, json={"revision": 1}, headers=h)
    assert r.status_code == 422 and "did not exist" in r.json()["errors"][0]["reason"]
    # compacted history: 410 with a clear message
    m.store.compact(m.store.revision())
    r = c.post("/v1/workloads/web1/rollback", params={"tenant": "acme"}, json={"revision": r1}, headers=h)
    assert r.status_code == 410 and "compacted" in r.json()["message"]


def test_audit_entries_and_queries(env: tuple[TestClient, Manager, dict[str, str]], tmp_path: Path) -> None:
    c, m, h = env
    bob, _ = m.tokens.create("tenant-admin", tenant="acme", name="bob")
    hb = {"Authorization": f"Bearer {bob}"}
    c.post("/v1/workloads", json=workload("web1"), headers=h)
    r = c.post("/v1/workloads", json=workload("web2", ip="10.0.0.2"), headers=hb)
    assert r.status_code == 200, r.text
    entries = c.get("/v1/audit", headers=h).json()["items"]
    e = entries[-1]
    assert (e["actor"], e["role"], e["action"], e["kind"], e["tenant"], e["name"]) == (
        "bob",
        "tenant-admin",
        "create",
        "Workload",
        "acme",
        "web2",
    )
    assert e["revision"] == r.json()["metadata"]["revision"]
    assert [x["name"] for x in c.get("/v1/audit", params={"actor": "bob"}, headers=h).json()["items"]] == [
        "web2"
    ]
    assert {
        x["tenant"] for x in c.get("/v1/audit", params={"tenant": "infra"}, headers=h).json()["items"]
    } == {"infra"}
    later = c.get("/v1/audit", params={"since": "2999-01-01T00:00:00Z"}, headers=h).json()["items"]
    assert later == []
    earlier = c.get("/v1/audit", params={"until": "2000-01-01T00:00:00Z"}, headers=h).json()["items"]
    assert earlier == []
    page = c.get("/v1/audit", params={"limit": 2}, headers=h).json()
    assert len(page["items"]) == 2 and page["continue"]
    rest = c.get("/v1/audit", params={"continue": page["continue"]}, headers=h).json()["items"]
    assert [x["name"] for x in page["items"] + rest] == [x["name"] for x in entries]


def test_deleting_an_application_deletes_what_it_owns_in_one_txn(
    env: tuple[TestClient, Manager, dict[str, str]],
) -> None:
    c, m, h = env
    assert c.post("/v1/apply", content=APP, headers=h).status_code == 200
    r = c.delete("/v1/applications/shop", params={"tenant": "acme"}, headers=h)
    assert r.status_code == 200, r.text
    deleted = {(d["kind"], d["name"]) for d in r.json()["deleted"]}
    assert deleted == {("Application", "shop"), ("Group", "web"), ("Policy", "shop-web")}
    assert [g["metadata"]["name"] for g in c.get("/v1/groups", headers=h).json()["items"]] == ["other"]
    rev = r.json()["revision"]
    assert {e.revision for e in m.store.events(rev)} == {rev}
    assert len([e for e in m.store.events(rev) if e.type == "delete"]) == 3


def test_openapi_lists_every_kind(env: tuple[TestClient, Manager, dict[str, str]]) -> None:
    c, _, _ = env
    paths = c.get("/openapi.json").json()["paths"]
    for plural in ("tenants", "hosts", "workloads", "groups", "services", "applications", "policies"):
        assert f"/v1/{plural}" in paths and f"/v1/{plural}/{{name}}/rollback" in paths
    assert "/v1/apply" in paths and "/v1/hosts/{host}/feed" in paths


def test_bad_token_is_401(env: tuple[TestClient, Manager, dict[str, str]]) -> None:
    c, m, h = env
    assert c.get("/v1/workloads").status_code == 401
    assert c.get("/v1/workloads", headers={"Authorization": "Bearer ow.nope.nope"}).status_code == 401
    tid = c.get("/v1/whoami", headers=h).json()["id"]
    other, rec = m.tokens.create("auditor", name="eve")
    assert c.get("/v1/workloads", headers={"Authorization": f"Bearer {other}"}).status_code == 200
    assert c.delete(f"/v1/tokens/{rec.id}", headers=h).status_code == 200
    assert c.get("/v1/workloads", headers={"Authorization": f"Bearer {other}"}).status_code == 401
    assert tid != rec.id
    r = c.post("/v1/tokens", json={"role": "agent", "host": "h1", "name": "agent-h1"}, headers=h)
    assert r.status_code == 200 and r.json()["token"].startswith("ow.")
    assert c.delete(f"/v1/tokens/{r.json()['id']}", headers=h).status_code == 200
    audit = c.get("/v1/audit", params={"kind": "Token"}, headers=h).json()["items"]
    assert [(e["action"], e["actor"]) for e in audit] == [
        ("revoke", "alice"),
        ("create", "alice"),
        ("revoke", "alice"),
    ]
    assert audit[1]["extra"] == {"role": "agent", "host": "h1"} and "agent-h1" in audit[1]["name"]
    forged = other.rsplit(".", 1)[0] + ".x" + other.rsplit(".", 1)[1][1:]
    assert c.get("/v1/whoami", headers={"Authorization": f"Bearer {forged}"}).status_code == 401


def test_bootstrap_token_file_is_private(tmp_path: Path) -> None:
    from omniwall.api.server import build

    db = str(tmp_path / "x.db")
    m, written = build(db)
    assert written is not None and written.stat().st_mode & 0o777 == 0o600
    token = written.read_text().strip()
    assert m.tokens.verify(token) is not None and m.tokens.verify(token).role == "provider-admin"  # type: ignore[union-attr]
    m.store.close()
    m2, again = build(db)  # second start: the admin exists, no new file
    assert again is None
    m2.store.close()


def test_concurrent_writers_and_readers_stay_consistent(
    env: tuple[TestClient, Manager, dict[str, str]],
) -> None:
    """Writers race on one object with optimistic concurrency while readers list: every commit either wins
    whole or raises Conflict, readers never crash, and the final value is the last winner's."""
    import threading

    from omniwall.manager.objects import parse_resource
    from omniwall.manager.service import SYSTEM, Conflict

    _, m, _ = env
    m.commit(m.plan_apply([parse_resource(workload("web1", ip="10.9.9.9"))]), SYSTEM)
    wins: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(n: int) -> None:
        for i in range(15):
            ip = f"10.{n}.0.{i + 1}"
            while True:
                try:
                    m.commit(m.plan_apply([parse_resource(workload("web1", ip=ip))]), SYSTEM)
                    wins.append(ip)
                    break
                except Conflict:
                    continue
                except BaseException as err:  # pragma: no cover - the assertion below reports it
                    errors.append(err)
                    return

    def reader() -> None:
        while not stop.is_set():
            try:
                m.list("Workload")
                m.snapshot_catalog()
            except BaseException as err:  # pragma: no cover
                errors.append(err)
                return

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads + readers:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stop.set()
    for t in readers:
        t.join(timeout=10)
    assert errors == []
    assert len(wins) == 45
    final = m.get("Workload", "acme", "web1")
    assert final is not None and final.spec.vnics[0].ips == [wins[-1]]  # type: ignore[attr-defined]
    hist = m.history("Workload", "acme", "web1")
    assert len(hist) == 46  # the create and every win, nothing lost, nothing doubled
