"""Identity events and posture reports through the API: what they write, what they refuse, and that the
`identity-source` / `posture-source` roles can do exactly this and nothing else."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from apihelpers import auth, blank_client, seeded_manager, use_manager
from fastapi.testclient import TestClient

from omniwall.manager import attributes
from omniwall.manager.service import SYSTEM, Manager
from omniwall.store.memory import MemoryStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

WORLD = """
kind: Tenant
metadata: {name: corp}
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
metadata: {name: vdi-7, tenant: corp}
spec: {host: h1, vnics: [{name: eth0, ips: [10.0.0.7]}], attributes: {os.family: windows}}
---
kind: Workload
metadata: {name: hr-app-1, tenant: corp, labels: {app: hr}}
spec: {host: h2, vnics: [{name: eth0, ips: [10.0.1.1]}]}
---
kind: Workload
metadata: {name: twin, tenant: corp}
spec: {host: h1, vnics: [{name: eth0, ips: [10.0.0.8]}]}
---
kind: Workload
metadata: {name: twin, tenant: other}
spec: {host: h2, vnics: [{name: eth0, ips: [10.0.2.8]}]}
---
kind: Group
metadata: {name: hr-users, tenant: corp}
spec: {selector: 'user in {"alice"}'}
---
kind: Group
metadata: {name: hr-app, tenant: corp}
spec: {selector: app == "hr"}
---
kind: Policy
metadata: {name: hr, tenant: corp}
spec:
  rules:
    - {name: users-to-app, sources: [hr-users], destinations: [hr-app], services: [tcp/443], action: allow}
---
kind: Group
metadata: {name: quarantined, tenant: infra}
spec: {selector: av.status == "infected"}
---
kind: Policy
metadata: {name: quarantine, tenant: infra}
spec:
  category: emergency
  rules:
    - {name: drop-from, sources: [quarantined], destinations: [any], action: drop}
    - {name: drop-to, sources: [any], destinations: [quarantined], action: drop}
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
SCOPE = {"tenant-admin": {"tenant": "corp"}, "tenant-viewer": {"tenant": "corp"}, "agent": {"host": "h1"}}
LOGIN = {"workload": "corp/vdi-7", "user": "alice", "action": "login"}
INFECTED = {"workload": "corp/vdi-7", "av.status": "infected"}


@pytest.fixture(scope="module")
def client() -> TestClient:
    return blank_client()


@pytest.fixture
def world(client: TestClient) -> Iterator[tuple[TestClient, Manager, dict[str, dict[str, str]]]]:
    m = seeded_manager(MemoryStore(), WORLD)
    headers = {role: auth(m.tokens.create(role, name=role, **SCOPE.get(role, {}))[0]) for role in ROLES}
    use_manager(client, m)
    yield client, m, headers


def attrs(m: Manager, tenant: str = "corp", name: str = "vdi-7") -> dict[str, Any]:
    w = m.get("Workload", tenant, name)
    assert w is not None
    return dict(w.spec.attributes)  # type: ignore[attr-defined]


def set_addresses(m: Manager, host: str, group: str) -> set[str]:
    st = m.desired_state(host)
    assert st is not None
    return {a for s in st.sets if s.name.endswith(group) or group in s.name for a in s.addresses}


# ------------------------------------------------------------------------------------------ identity


def test_login_logout_maintain_the_user_list(world: Any) -> None:
    client, m, h = world
    ident = h["identity-source"]
    r = client.post("/v1/identity/events", json=LOGIN, headers=ident)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["workload"] == "corp/vdi-7" and body["changed"] is True
    assert body["attributes"]["user"] == ["alice"] and body["revision"] == m.revision
    assert attrs(m)["os.family"] == "windows"  # other attributes kept

    r = client.post("/v1/identity/events", json={**LOGIN, "user": "bob"}, headers=ident)
    assert r.json()["attributes"]["user"] == ["alice", "bob"]

    before = m.store.revision()
    r = client.post("/v1/identity/events", json=LOGIN, headers=ident)  # alice again: nothing to write
    assert r.status_code == 200 and r.json()["changed"] is False
    assert m.store.revision() == before

    r = client.post("/v1/identity/events", json={**LOGIN, "action": "logout"}, headers=ident)
    assert r.json()["attributes"]["user"] == ["bob"]
    r = client.post("/v1/identity/events", json={**LOGIN, "user": "bob", "action": "logout"}, headers=ident)
    assert "user" not in r.json()["attributes"] and "user" not in attrs(m)
    r = client.post("/v1/identity/events", json={**LOGIN, "action": "logout"}, headers=ident)
    assert r.status_code == 200 and r.json()["changed"] is False


def test_login_moves_the_workload_into_the_identity_group(world: Any) -> None:
    client, m, h = world
    assert "10.0.0.7" not in set_addresses(m, "h2", "hr-users")
    client.post("/v1/identity/events", json=LOGIN, headers=h["identity-source"])
    assert "10.0.0.7" in set_addresses(m, "h2", "hr-users")  # hr-app-1's ingress now admits vdi-7
    client.post("/v1/identity/events", json={**LOGIN, "action": "logout"}, headers=h["identity-source"])
    assert "10.0.0.7" not in set_addresses(m, "h2", "hr-users")


def test_identity_event_is_audited(world: Any) -> None:
    client, _, h = world
    r = client.post("/v1/identity/events", json=LOGIN, headers=h["identity-source"])
    rev = r.json()["revision"]
    entries = client.get("/v1/audit", params={"kind": "Workload"}, headers=h["provider-admin"]).json()[
        "items"
    ]
    mine = [e for e in entries if e["revision"] == rev]
    assert len(mine) == 1
    e = mine[0]
    assert (e["actor"], e["role"], e["action"], e["tenant"], e["name"]) == (
        "identity-source",
        "identity-source",
        "update",
        "corp",
        "vdi-7",
    )
    assert e["changed"] == ["spec.attributes.user"]


def test_workload_addressing(world: Any) -> None:
    client, m, h = world
    ident = h["identity-source"]
    ok = client.post(
        "/v1/identity/events", json={**LOGIN, "workload": "vdi-7"}, headers=ident
    )  # unique bare name
    assert ok.status_code == 200 and ok.json()["workload"] == "corp/vdi-7"
    ok = client.post(
        "/v1/identity/events", json={**LOGIN, "workload": "twin", "tenant": "other"}, headers=ident
    )
    assert ok.status_code == 200 and ok.json()["workload"] == "other/twin"
    assert attrs(m, "other", "twin")["user"] == ["alice"] and "user" not in attrs(m, "corp", "twin")

    amb = client.post("/v1/identity/events", json={**LOGIN, "workload": "twin"}, headers=ident)
    assert amb.status_code == 422 and amb.json()["errors"][0]["path"] == "workload"
    for wl, tenant in (("corp/nope", None), ("nope", None), ("vdi-7", "other"), ("ghost/vdi-7", None)):
        body = {**LOGIN, "workload": wl, **({"tenant": tenant} if tenant else {})}
        r = client.post("/v1/identity/events", json=body, headers=ident)
        assert r.status_code == 404, (wl, tenant, r.text)
        assert r.json()["error"] == "not_found"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**LOGIN, "action": "signin"}, "action"),
        ({k: v for k, v in LOGIN.items() if k != "action"}, "action"),
        ({**LOGIN, "user": ""}, "user"),
        ({**LOGIN, "user": 7}, "user"),
        ({**LOGIN, "user": "a\nb"}, "user"),
        ({k: v for k, v in LOGIN.items() if k != "workload"}, "workload"),
        ({**LOGIN, "workload": 3}, "workload"),
        ({**LOGIN, "groups": ["hr"]}, "groups"),
        ({**LOGIN, "tenant": "other", "workload": "corp/vdi-7"}, "tenant"),
    ],
)
def test_bad_identity_event_is_422_naming_the_field(world: Any, body: dict[str, Any], field: str) -> None:
    client, m, h = world
    before = m.store.revision()
    r = client.post("/v1/identity/events", json=body, headers=h["identity-source"])
    assert r.status_code == 422, r.text
    assert [e["path"] for e in r.json()["errors"]] == [field]
    assert m.store.revision() == before


def test_non_object_body_is_422(world: Any) -> None:
    client, _, h = world
    for path, role in (("/v1/identity/events", "identity-source"), ("/v1/posture/reports", "posture-source")):
        r = client.post(
            path, content=json.dumps(["x"]), headers={**h[role], "Content-Type": "application/json"}
        )
        assert r.status_code == 422, r.text


def test_concurrent_logins_all_land() -> None:
    m = seeded_manager(MemoryStore(), WORLD)
    users = [f"u{i}" for i in range(24)]

    def login(chunk: list[str]) -> None:
        for u in chunk:
            attributes.identity_event(m, SYSTEM, "corp/vdi-7", u, "login")

    threads = [threading.Thread(target=login, args=(users[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(attrs(m)["user"]) == sorted(users)


# ------------------------------------------------------------------------------------------ posture


def test_posture_report_sets_and_clears_attributes(world: Any) -> None:
    client, m, h = world
    post = h["posture-source"]
    assert "10.0.0.7" not in set_addresses(m, "h1", "quarantined")
    r = client.post(
        "/v1/posture/reports", json={**INFECTED, "av.engine": "clam", "av.signatures": 7}, headers=post
    )
    assert r.status_code == 200, r.text
    a = attrs(m)
    assert (a["av.status"], a["av.engine"], a["av.signatures"], a["os.family"]) == (
        "infected",
        "clam",
        7,
        "windows",
    )
    assert "10.0.0.7" in set_addresses(m, "h1", "quarantined")  # the emergency policy now isolates it

    r = client.post(
        "/v1/posture/reports", json={"workload": "corp/vdi-7", "av": {"status": "clean"}}, headers=post
    )
    assert r.status_code == 200 and attrs(m)["av.status"] == "clean"  # nested form = dotted form
    assert "10.0.0.7" not in set_addresses(m, "h1", "quarantined")

    r = client.post("/v1/posture/reports", json={"workload": "corp/vdi-7", "av.engine": None}, headers=post)
    assert "av.engine" not in attrs(m) and attrs(m)["av.status"] == "clean"
    before = m.store.revision()
    r = client.post(
        "/v1/posture/reports", json={"workload": "corp/vdi-7", "av.status": "clean"}, headers=post
    )
    assert r.json()["changed"] is False and m.store.revision() == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"workload": "corp/vdi-7", "user": "mallory"}, "user"),  # identity's attribute, not posture's
        ({"workload": "corp/vdi-7", "os.family": "linux"}, "os.family"),  # inventory, not posture
        ({"workload": "corp/vdi-7", "status": "infected"}, "status"),
        ({"workload": "corp/vdi-7", "av.status": ["a"]}, "av.status"),
        ({"workload": "corp/vdi-7", "av.status": "x" * 300}, "av.status"),
        ({"workload": "corp/vdi-7"}, "av.status"),  # nothing reported
        ({"av.status": "infected"}, "workload"),
    ],
)
def test_bad_posture_report_is_422_naming_the_field(world: Any, body: dict[str, Any], field: str) -> None:
    client, m, h = world
    before = m.store.revision()
    r = client.post("/v1/posture/reports", json=body, headers=h["posture-source"])
    assert r.status_code == 422, r.text
    assert field in [e["path"] for e in r.json()["errors"]]
    assert m.store.revision() == before


def test_posture_unknown_workload_is_404(world: Any) -> None:
    client, _, h = world
    r = client.post(
        "/v1/posture/reports", json={**INFECTED, "workload": "corp/ghost"}, headers=h["posture-source"]
    )
    assert r.status_code == 404


# ------------------------------------------------------------------------------------------ authorization

ENDPOINTS = {
    "identity": ("/v1/identity/events", LOGIN, "identity.write", {"provider-admin", "identity-source"}),
    "posture": ("/v1/posture/reports", INFECTED, "posture.write", {"provider-admin", "posture-source"}),
}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_who_may_post_events(world: Any, endpoint: str, role: str) -> None:
    client, m, h = world
    path, body, perm, allowed = ENDPOINTS[endpoint]
    before = m.store.revision()
    r = client.post(path, json=body, headers=h[role])
    if role in allowed:
        assert r.status_code == 200, r.text
        assert m.store.revision() == before + 1
    else:
        assert r.status_code == 403, r.text
        assert r.json()["permission"] == perm
        assert m.store.revision() == before


def test_no_token_is_401(world: Any) -> None:
    client, _, _ = world
    assert client.post("/v1/identity/events", json=LOGIN).status_code == 401
    assert (
        client.post(
            "/v1/posture/reports", json=INFECTED, headers={"Authorization": "Bearer ow.x.y"}
        ).status_code
        == 401
    )


# Everything else the API offers, as (method, path, params, body): identity/posture sources get 403 on each.
OTHER_CALLS: list[tuple[str, str, dict[str, str] | None, Any]] = [
    ("GET", "/v1/workloads", None, None),
    ("GET", "/v1/workloads/vdi-7", {"tenant": "corp"}, None),
    (
        "PUT",
        "/v1/workloads/vdi-7",
        {"tenant": "corp"},
        {"kind": "Workload", "metadata": {"name": "vdi-7", "tenant": "corp"}, "spec": {"host": "h1"}},
    ),
    ("POST", "/v1/groups", None, {"kind": "Group", "metadata": {"name": "g", "tenant": "corp"}, "spec": {}}),
    ("DELETE", "/v1/policies/hr", {"tenant": "corp"}, None),
    ("POST", "/v1/apply", None, {"kind": "Group", "metadata": {"name": "g", "tenant": "corp"}, "spec": {}}),
    ("GET", "/v1/policies/hr/history", {"tenant": "corp"}, None),
    ("GET", "/v1/audit", None, None),
    ("GET", "/v1/tokens", None, None),
    ("POST", "/v1/tokens", None, {"role": "identity-source"}),
    ("POST", "/v1/compact", None, {"revision": 1}),
    ("GET", "/v1/status", None, None),
    ("GET", "/v1/hosts/h1/feed", {"follow": "false"}, None),
    ("GET", "/v1/hosts/h1/desired", None, None),
    ("POST", "/v1/hosts/h1/status", None, {"realized_revision": 1}),
]


@pytest.mark.parametrize("role", ["identity-source", "posture-source"])
@pytest.mark.parametrize("call", OTHER_CALLS, ids=[f"{c[0]} {c[1]}" for c in OTHER_CALLS])
def test_sources_may_do_nothing_else(world: Any, role: str, call: tuple[str, str, Any, Any]) -> None:
    client, m, h = world
    method, path, params, body = call
    before = m.store.revision()
    r = client.request(method, path, params=params, json=body, headers=h[role])
    assert r.status_code == 403, f"{role} {method} {path}: {r.status_code} {r.text[:200]}"
    assert r.json()["permission"]
    assert m.store.revision() == before


def test_whoami_shows_the_provider_wide_role(world: Any) -> None:
    client, _, h = world
    me = client.get("/v1/whoami", headers=h["identity-source"]).json()
    assert me["role"] == "identity-source" and me["tenant"] is None


# ------------------------------------------------------------------------------------------ ownership


def _workload_doc(client: TestClient, h: dict[str, str], **attributes: Any) -> dict[str, Any]:
    doc = client.get("/v1/workloads/vdi-7", params={"tenant": "corp"}, headers=h).json()
    for f in ("uid", "revision", "created", "updated"):
        doc["metadata"].pop(f, None)
    doc["spec"]["attributes"] = attributes
    return doc


@pytest.mark.parametrize("role", ["tenant-admin", "provider-admin"])
def test_ordinary_writes_keep_identity_and_posture_attributes(world: Any, role: str) -> None:
    """A routine PUT or apply of the workload (its file knows nothing of sessions or scans) neither logs
    the user out nor lifts the quarantine; other attributes change as written."""
    client, m, h = world
    client.post("/v1/identity/events", json=LOGIN, headers=h["identity-source"])
    client.post("/v1/posture/reports", json=INFECTED, headers=h["posture-source"])
    doc = _workload_doc(client, h[role], **{"os.family": "linux", "user": ["mallory"], "av.status": "clean"})
    r = client.put("/v1/workloads/vdi-7", params={"tenant": "corp"}, json=doc, headers=h[role])
    assert r.status_code == 200, r.text
    a = attrs(m)
    assert (a["os.family"], a["user"], a["av.status"]) == ("linux", ["alice"], "infected")
    doc = _workload_doc(client, h[role])
    r = client.post("/v1/apply", content=json.dumps(doc), headers=h[role])
    assert r.status_code == 200, r.text
    a = attrs(m)
    assert "os.family" not in a and a["user"] == ["alice"] and a["av.status"] == "infected"
    assert "10.0.0.7" in set_addresses(m, "h1", "quarantined")
    # only the sources lift what the sources set
    client.post("/v1/posture/reports", json={**INFECTED, "av.status": "clean"}, headers=h["posture-source"])
    assert "10.0.0.7" not in set_addresses(m, "h1", "quarantined")


@pytest.mark.parametrize("label", ["user", "av.status", "posture.score"])
def test_source_owned_keys_are_refused_as_labels(world: Any, label: str) -> None:
    """A label shadows the attribute of the same name in selectors: `av.status: clean` as a label would
    escape the quarantine."""
    client, m, h = world
    client.post("/v1/posture/reports", json=INFECTED, headers=h["posture-source"])
    doc = _workload_doc(client, h["tenant-admin"])
    doc["metadata"]["labels"] = {label: "clean"}
    before = m.store.revision()
    r = client.put("/v1/workloads/vdi-7", params={"tenant": "corp"}, json=doc, headers=h["tenant-admin"])
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["path"] == f"metadata.labels.{label}"
    assert m.store.revision() == before and attrs(m)["av.status"] == "infected"


def test_a_new_workload_may_be_seeded_with_source_attributes_by_the_provider(world: Any) -> None:
    client, m, h = world
    doc = {
        "kind": "Workload",
        "metadata": {"name": "seeded", "tenant": "corp"},
        "spec": {"host": "h1", "vnics": [{"ips": ["10.0.0.9"]}], "attributes": {"av.status": "infected"}},
    }
    r = client.post("/v1/workloads", json=doc, headers=h["provider-admin"])
    assert r.status_code == 200, r.text
    assert attrs(m, "corp", "seeded")["av.status"] == "infected"


def test_a_tenant_cannot_preset_posture_on_create(world: Any) -> None:
    """Finding 8: `av.status: clean` on create is not taken from a tenant (no posture.write): the workload
    gets the posture recorded for its name (here: none)."""
    client, m, h = world
    doc = {
        "kind": "Workload",
        "metadata": {"name": "seeded", "tenant": "corp"},
        "spec": {"host": "h1", "vnics": [{"ips": ["10.0.0.9"]}], "attributes": {"av.status": "clean"}},
    }
    r = client.post("/v1/workloads", json=doc, headers=h["tenant-admin"])
    assert r.status_code == 200, r.text
    assert "av.status" not in attrs(m, "corp", "seeded")


@pytest.mark.parametrize("via", ["create", "apply", "rollback"])
def test_delete_and_recreate_does_not_lift_the_quarantine(world: Any, via: str) -> None:
    """Finding 8: the last posture report for a workload name persists and is re-applied."""
    client, m, h = world
    ta = h["tenant-admin"]
    clean_rev = m.store.revision()
    assert client.post("/v1/posture/reports", json=INFECTED, headers=h["posture-source"]).status_code == 200
    doc = _workload_doc(client, ta, **{"av.status": "clean"})
    r = client.delete("/v1/workloads/vdi-7", params={"tenant": "corp"}, headers=ta)
    assert r.status_code == 200, r.text
    if via == "create":
        r = client.post("/v1/workloads", json=doc, headers=ta)
    elif via == "apply":
        r = client.post("/v1/apply", content=json.dumps(doc), headers=ta)
    else:  # back to a revision before the report
        back = {"revision": clean_rev}
        r = client.post("/v1/workloads/vdi-7/rollback", params={"tenant": "corp"}, json=back, headers=ta)
    assert r.status_code == 200, r.text
    assert attrs(m)["av.status"] == "infected"
    assert "10.0.0.7" in set_addresses(m, "h1", "quarantined")
