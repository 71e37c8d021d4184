"""Hostile input to every write route (issue 9, findings 5, 6, 8, 9): each case must answer 4xx with an
error that names the field (or the body/header/query parameter at fault), never 5xx, and change nothing:
the store's revision and its whole listing (every key and its revision) are compared before and after.

Callers are a tenant admin of `acme` (the hostile tenant) and, for provider kinds, the provider admin.
One manager serves every case: a case that wrongly wrote something fails, naming itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from apihelpers import ACME_WEB1, WEB_OUT_HTTP, auth, issue_tokens, seeded_manager, yaml_docs
from fastapi.testclient import TestClient

from omniwall.api.app import create_app
from omniwall.api.limits import Limits
from omniwall.manager.service import Manager
from omniwall.store.memory import MemoryStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

WORLD = yaml_docs(
    ACME_WEB1,
    """
kind: Tenant
metadata: {name: other}
---
kind: Workload
metadata: {name: db1, tenant: other}
spec: {host: h1, vnics: [{name: eth0, ips: [10.0.1.1]}]}
---
kind: Service
metadata: {name: http, tenant: acme}
spec: {protocol: tcp, ports: [80]}
---
kind: Application
metadata: {name: shop, tenant: acme}
""",
    WEB_OUT_HTTP,
)

PLURAL = {
    "Tenant": "tenants",
    "Host": "hosts",
    "Workload": "workloads",
    "Group": "groups",
    "Service": "services",
    "Application": "applications",
    "Policy": "policies",
}
# A valid spec per kind, that each case breaks in one place.
SPECS: dict[str, dict[str, Any]] = {
    "Tenant": {},
    "Host": {},
    "Workload": {"host": "h1", "vnics": [{"name": "eth0", "ips": ["10.0.0.50"]}]},
    "Group": {"selector": 'tier == "db"'},
    "Service": {"protocol": "tcp", "ports": [443]},
    "Application": {},
    "Policy": {"rules": [{"name": "r", "sources": ["web"], "destinations": ["any"], "action": "allow"}]},
}
PROVIDER_KINDS = ("Tenant", "Host")


@dataclass
class Case:
    id: str
    method: str
    path: str
    caller: str = "tenant"
    body: Any = None  # JSON-encoded unless `raw`
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


def doc(kind: str, name: str = "x", labels: Any = None, spec: Any = None, **meta: Any) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, **meta}
    if labels is not None:
        md["labels"] = labels
    return {"kind": kind, "metadata": md, "spec": SPECS[kind] if spec is None else spec}


def caller_of(kind: str) -> str:
    return "admin" if kind in PROVIDER_KINDS else "tenant"


DEEP = "[" * 10_000 + "]" * 10_000
DEEP_OBJ = '{"a":' * 10_000 + "1" + "}" * 10_000
BAD_TEXT = {
    "nul": "a\x00b",
    "esc": "a\x1b[31mb",
    "newline": "a\nb",
    "rtl-override": "abc\u202efed",
    "zero-width": "a\u200bb",
    "empty": "",
    "too-long": "x" * 300,
}


def body_cases() -> Iterator[Case]:
    """Malformed bodies on every route that takes one."""
    routes: list[tuple[str, str, str, str]] = []
    for kind, plural in PLURAL.items():
        c = caller_of(kind)
        routes.append((f"create-{kind}", "POST", f"/v1/{plural}", c))
        routes.append((f"update-{kind}", "PUT", f"/v1/{plural}/x", c))
    routes += [
        ("rollback", "POST", "/v1/groups/web/rollback", "tenant"),
        ("identity", "POST", "/v1/identity/events", "admin"),
        ("posture", "POST", "/v1/posture/reports", "admin"),
        ("token", "POST", "/v1/tokens", "admin"),
    ]
    for rid, method, path, c in routes:
        yield Case(f"{rid}-deep-array", method, path, c, raw=DEEP.encode())
        yield Case(f"{rid}-deep-object", method, path, c, raw=DEEP_OBJ.encode())
        yield Case(f"{rid}-not-utf8", method, path, c, raw=b'{"kind": "\xff\xfe"}')
        yield Case(f"{rid}-not-json", method, path, c, raw=b"{kind: ")
        yield Case(f"{rid}-array", method, path, c, body=[1, 2])
        yield Case(f"{rid}-null", method, path, c, body=None, raw=b"null")
        yield Case(
            f"{rid}-content-length-too-large",
            method,
            path,
            c,
            raw=b"{}",
            headers={"content-length": str(64 * 1024 * 1024)},
        )
        yield Case(
            f"{rid}-streamed-too-large", method, path, c, raw=b'{"a": "' + b"x" * (2 * 1024 * 1024) + b'"}'
        )


def resource_cases() -> Iterator[Case]:
    """Per kind, on create (POST) and replace (PUT): broken metadata and labels."""
    for kind, plural in PLURAL.items():
        c = caller_of(kind)
        name = "x"
        for verb, method, path in (
            ("create", "POST", f"/v1/{plural}"),
            ("update", "PUT", f"/v1/{plural}/{name}"),
        ):
            p = f"{verb}-{kind}"
            for what, text in BAD_TEXT.items():
                yield Case(f"{p}-label-key-{what}", method, path, c, doc(kind, labels={text: "v"}))
                yield Case(f"{p}-label-value-{what}", method, path, c, doc(kind, labels={"k": text}))
            yield Case(f"{p}-label-nested", method, path, c, doc(kind, labels={"k": {"a": {"b": 1}}}))
            yield Case(f"{p}-label-number", method, path, c, doc(kind, labels={"k": 1}))
            yield Case(
                f"{p}-too-many-labels", method, path, c, doc(kind, labels={f"k{i}": "v" for i in range(65)})
            )
            yield Case(f"{p}-huge-label", method, path, c, doc(kind, labels={"k": "v" * 500_000}))
            yield Case(f"{p}-name-upper", method, path, c, doc(kind, name="X"))
            yield Case(f"{p}-name-nul", method, path, c, doc(kind, name="a\x00"))
            yield Case(f"{p}-name-long", method, path, c, doc(kind, name="a" * 64))
            yield Case(f"{p}-unknown-field", method, path, c, {**doc(kind), "extra": 1})
            yield Case(f"{p}-wrong-kind", method, path, c, {**doc(kind), "kind": "Nope"})
            yield Case(f"{p}-metadata-string", method, path, c, {**doc(kind), "metadata": "x"})
            yield Case(f"{p}-spec-list", method, path, c, {**doc(kind), "spec": []})


def spec_cases() -> Iterator[Case]:
    w, g, s, pol = "/v1/workloads", "/v1/groups", "/v1/services", "/v1/policies"

    def workload(**spec: Any) -> dict[str, Any]:
        return doc("Workload", spec={**SPECS["Workload"], **spec})

    for what, text in BAD_TEXT.items():
        yield Case(
            f"vnic-name-{what}", "POST", w, body=workload(vnics=[{"name": text, "ips": ["10.0.0.60"]}])
        )
        yield Case(f"attribute-key-{what}", "POST", w, body=workload(attributes={text: "v"}))
        if what != "empty":
            yield Case(f"attribute-value-{what}", "POST", w, body=workload(attributes={"os.name": text}))
    yield Case("vnic-name-space", "POST", w, body=workload(vnics=[{"name": "a b"}]))
    yield Case("attribute-dict", "POST", w, body=workload(attributes={"a": {"b": 1}}))
    yield Case("attribute-list-long", "POST", w, body=workload(attributes={"a": ["x"] * 65}))
    yield Case("too-many-attributes", "POST", w, body=workload(attributes={f"a{i}": "x" for i in range(65)}))
    yield Case("named-port-bad", "POST", w, body=workload(ports={"http": "tcp/0"}))
    yield Case("named-port-name-nul", "POST", w, body=workload(ports={"h\x00": "tcp/80"}))
    yield Case("workload-unknown-host", "POST", w, body=workload(host="h9"))
    yield Case(
        "workload-foreign-address", "POST", w, body=workload(vnics=[{"name": "eth0", "ips": ["10.0.1.1"]}])
    )
    yield Case("workload-bad-mac", "POST", w, body=workload(vnics=[{"name": "eth0", "mac": "zz"}]))
    yield Case("workload-dup-vnic", "POST", w, body=workload(vnics=[{"name": "e"}, {"name": "e"}]))
    for i, ports in enumerate([[True], [False], [0], [65536], ["1-"], ["80-70"], [1.5], [None], ["x"], [-1]]):
        yield Case(
            f"service-ports-{i}", "POST", s, body=doc("Service", spec={"protocol": "tcp", "ports": ports})
        )
    yield Case("service-protocol", "POST", s, body=doc("Service", spec={"protocol": "gre"}))
    yield Case(
        "service-icmp-type", "POST", s, body=doc("Service", spec={"protocol": "icmp", "icmpType": 256})
    )
    yield Case("service-icmp-ports", "POST", s, body=doc("Service", spec={"protocol": "icmp", "ports": [1]}))
    for i, sel in enumerate(
        [
            "!" * 600 + "has(a)",
            "!" * 490 + "has(a)",
            "(" * 100 + "a == 1" + ")" * 99,  # unbalanced (balanced parentheses do not nest the tree)
            "!(" * 70 + "a == 1" + ")" * 70,
            "tier = web",
            "",
            'a == "\x00',
            "has(",
        ]
    ):
        yield Case(f"group-selector-{i}", "POST", g, body=doc("Group", spec={"selector": sel}))
    yield Case("group-cidr", "POST", g, body=doc("Group", spec={"cidrs": ["10.0.0.0/33"]}))
    yield Case("group-share-by-tenant", "POST", g, body=doc("Group", spec={"shareWith": ["*"]}))
    yield Case("group-foreign-ref", "POST", g, body=doc("Group", spec={"groups": ["other/g"]}))
    yield Case("group-unknown-workload", "POST", g, body=doc("Group", spec={"workloads": ["db1"]}))

    def policy(rule: dict[str, Any], **spec: Any) -> dict[str, Any]:
        base = {"name": "r", "sources": ["web"], "destinations": ["any"], "action": "allow"}
        return doc("Policy", spec={"rules": [{**base, **rule}], **spec})

    yield Case("policy-category", "POST", pol, body=policy({}, category="emergency"))
    yield Case("policy-priority", "POST", pol, body=policy({}, priority=-1))
    yield Case("policy-action", "POST", pol, body=policy({"action": "maybe"}))
    yield Case("policy-sources-empty", "POST", pol, body=policy({"sources": []}))
    yield Case("policy-any-mixed", "POST", pol, body=policy({"sources": ["any", "web"]}))
    yield Case("policy-service", "POST", pol, body=policy({"services": ["tcp/99999"]}))
    yield Case("policy-foreign-service", "POST", pol, body=policy({"services": ["other/http"]}))
    yield Case("policy-unshared-group", "POST", pol, body=policy({"destinations": ["infra/nope"]}))
    yield Case(
        "policy-dup-rules",
        "POST",
        pol,
        body=doc(
            "Policy", spec={"rules": [{"name": "r", "action": "allow"}, {"name": "r", "action": "drop"}]}
        ),
    )
    yield Case("policy-rule-name", "POST", pol, body=policy({"name": "R\x00"}))


def apply_cases() -> Iterator[Case]:
    y = {"content-type": "application/yaml"}
    good = "kind: Group\nmetadata: {name: ok}\nspec: {}\n"
    texts = {
        "deep-flow": "a: " + "[" * 10_000 + "]" * 10_000,
        "deep-json": DEEP,
        "deep-labels": "kind: Group\nmetadata: {name: d, labels: " + "{a: " * 5000 + "1" + "}" * 5000 + "}\n",
        "deep-block": "".join(" " * i + "a:\n" for i in range(200)),
        "billion-laughs": "a: &a [x,x,x,x,x,x,x,x,x,x]\n"
        + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join(["*" + chr(97 + i)] * 10) + "]\n" for i in range(8)
        ),
        "alias-cycle": "a: &a [1, *a]\n",
        "invalid-yaml": "kind: [\n",
        "duplicate-key": "kind: Group\nkind: Group\nmetadata: {name: d}\n",
        "scalar": "42\n",
        "unknown-kind": "kind: Nope\nmetadata: {name: n}\n",
        "second-bad": good + "---\nkind: Group\nmetadata: {name: B}\n",
        "label-nul": 'kind: Group\nmetadata: {name: n, labels: {a: "\\0"}}\n',
        "label-rtl": 'kind: Group\nmetadata: {name: n, labels: {"a\\u202e": b}}\n',
        "ports-true": "kind: Service\nmetadata: {name: n}\nspec: {ports: [true]}\n",
        "selector-bangs": "kind: Group\nmetadata: {name: n}\nspec: {selector: '" + "!" * 600 + "has(a)'}\n",
        "foreign-tenant-doc": "kind: Group\nmetadata: {name: n, tenant: other}\n",
        "host-as-tenant": "kind: Host\nmetadata: {name: h9}\n",
        "tenant-policy-emergency": "kind: Policy\nmetadata: {name: e}\nspec: {category: emergency}\n",
        "not-utf8": None,
    }
    for name, text in texts.items():
        raw = b"kind: \xff\xfe\n" if text is None else text.encode()
        yield Case(f"apply-{name}", "POST", "/v1/apply", raw=raw, headers=y)
        yield Case(f"apply-dry-{name}", "POST", "/v1/apply", raw=raw, headers=y, params={"dryRun": "true"})
    for ctype in ("image/png", "text/html", "application/x-www-form-urlencoded", "multipart/form-data"):
        yield Case(
            f"apply-content-type-{ctype}",
            "POST",
            "/v1/apply",
            raw=good.encode(),
            headers={"content-type": ctype},
        )


def other_cases() -> Iterator[Case]:
    r = "/v1/groups/web/rollback"
    for i, body in enumerate(
        [
            {"revision": 10**9},
            {"revision": 0},
            {"revision": -1},
            {"revision": "x"},
            {"revision": True},
            {},
            {"revision": 1, "x": 1},
            {"revision": 1.5},
        ]
    ):
        yield Case(f"rollback-{i}", "POST", r, body=body)
    yield Case("delete-bad-revision", "DELETE", "/v1/groups/web", params={"revision": "x"})
    yield Case("delete-stale-revision", "DELETE", "/v1/groups/web", params={"revision": 999})
    yield Case("delete-foreign", "DELETE", "/v1/groups/g", params={"tenant": "other"})
    ident = "/v1/identity/events"
    for i, body in enumerate(
        [
            {"workload": "acme/web1", "user": "a\x00", "action": "login"},
            {"workload": "acme/web1", "user": "", "action": "login"},
            {"workload": "acme/web1", "user": "a", "action": "sudo"},
            {"workload": "acme/web1", "user": "a", "action": "login", "x": 1},
            {"workload": "", "user": "a", "action": "login"},
        ]
    ):
        yield Case(f"identity-{i}", "POST", ident, "admin", body=body)
    post = "/v1/posture/reports"
    for i, body in enumerate(
        [
            {"workload": "acme/web1", "av.status": "a\x00"},
            {"workload": "acme/web1", "os.name": "x"},
            {"workload": "acme/web1", "av.status": ["x"]},
            {"workload": "acme/web1"},
            {"workload": "acme/web1", "av." + "a" * 300: "x"},  # used to be stored, then unreadable
            {"workload": "acme/web1", **{f"av.k{i}": "x" for i in range(70)}},
            {"workload": "acme/web1", "av.status": ""},
            {"workload": "acme/web1", "av.status": "a\u202eb"},
            {"workload": "acme/web1", "av": {"a": {"b": {"c": {"d": 1}}}} | {"x": "a" * 300}},
        ]
    ):
        yield Case(f"posture-{i}", "POST", post, "admin", body=body)
    yield Case("posture-by-tenant", "POST", post, body={"workload": "acme/web1", "av.status": "clean"})


CASES = [*body_cases(), *resource_cases(), *spec_cases(), *apply_cases(), *other_cases()]


def test_at_least_200_cases_over_every_write_route() -> None:
    assert len(CASES) >= 200
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[TestClient, Manager, dict[str, dict[str, str]]]]:
    m = seeded_manager(MemoryStore(), WORLD)
    tokens = issue_tokens(
        m, {"admin": ("provider-admin", {}), "tenant": ("tenant-admin", {"tenant": "acme"})}
    )
    with TestClient(create_app(m, watch=False), raise_server_exceptions=False) as client:
        yield client, m, {k: auth(v) for k, v in tokens.items()}


def snapshot(m: Manager) -> tuple[int, list[tuple[str, int]]]:
    items, rev = m.store.range("")
    return rev, [(kv.key, kv.mod_revision) for kv in items]


def send(client: TestClient, case: Case, headers: dict[str, str]) -> Any:
    content = case.raw if case.raw is not None else json.dumps(case.body).encode()
    hdrs = {"content-type": "application/json", **headers, **case.headers}
    return client.request(case.method, case.path, content=content, headers=hdrs, params=case.params)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_refused_naming_the_field(world: Any, case: Case) -> None:
    client, m, headers = world
    before = snapshot(m)
    r = send(client, case, headers[case.caller])
    assert 400 <= r.status_code < 500, f"{r.status_code}: {r.text[:300]}"
    body = r.json()
    assert body["error"] and body["message"]
    if r.status_code not in (403, 404, 409):  # those name the permission or the object instead
        errors = body.get("errors") or []
        assert errors and all(e.get("path") or e.get("document") for e in errors), body
    assert snapshot(m) == before, "a refused request changed the store"


# ------------------------------------------------------------------------------- limits and quotas


@pytest.fixture
def small() -> Iterator[tuple[TestClient, Manager, dict[str, str]]]:
    m = seeded_manager(MemoryStore(), WORLD)
    tokens = issue_tokens(m, {"tenant": ("tenant-admin", {"tenant": "acme"})})
    app = create_app(m, watch=False)
    app.state.limits = Limits(max_objects_per_tenant=8, max_rule_expansion=50, max_body_bytes=4096)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, m, auth(tokens["tenant"])


def test_object_quota_refuses_growth_and_allows_deletes(small: Any) -> None:
    client, m, h = small
    docs = "\n---\n".join(f"kind: Service\nmetadata: {{name: s{i}}}\nspec: {{ports: [80]}}" for i in range(6))
    before = snapshot(m)
    r = client.post("/v1/apply", content=docs, headers=h)
    assert r.status_code == 422 and "quota" in r.json()["errors"][0]["reason"], r.text
    assert snapshot(m) == before
    assert client.delete("/v1/services/http", headers=h).status_code == 200


def test_rule_expansion_quota(small: Any) -> None:
    """Finding 6: many any->any rules over many workloads would make a huge host state."""
    client, m, h = small
    rules = [
        {"name": f"r{i}", "sources": ["any"], "destinations": ["any"], "action": "allow"} for i in range(30)
    ]
    body = {"kind": "Policy", "metadata": {"name": "big"}, "spec": {"rules": rules}}
    before = snapshot(m)
    r = client.post("/v1/policies", json=body, headers=h)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["path"] == "spec.rules" and "quota" in r.json()["errors"][0]["reason"]
    assert snapshot(m) == before


def test_configured_body_limit_applies_while_streaming(small: Any) -> None:
    client, m, h = small

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while reading
        yield b'{"kind": "Group", "metadata": {"name": "g2", "labels": {"a": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}}}'

    before = snapshot(m)
    r = client.post("/v1/groups", content=chunks(), headers={**h, "content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["errors"][0]["path"] == "body"
    assert snapshot(m) == before


def test_limits_from_environment() -> None:
    lim = Limits.from_env({"OMNIWALL_MAX_APPLY_BYTES": "1000", "OMNIWALL_MAX_RULE_EXPANSION": "5"})
    assert (lim.max_apply_bytes, lim.max_rule_expansion, lim.max_body_bytes) == (
        1000,
        5,
        Limits().max_body_bytes,
    )
    with pytest.raises(ValueError, match="OMNIWALL_MAX_BODY_BYTES"):
        Limits.from_env({"OMNIWALL_MAX_BODY_BYTES": "lots"})


def test_invalid_continue_token_is_400(world: Any) -> None:
    """Finding 9: an invalid token used to restart the listing silently."""
    client, _, h = world
    for token in ("!!!", "YWJj", "cmVzL1BvbGljeS9hY21lL3A"):  # garbage, "abc", a Policy key on /groups
        r = client.get("/v1/groups", params={"continue": token}, headers=h["tenant"])
        assert r.status_code == 400 and r.json()["errors"][0]["path"] == "query.continue", (token, r.text)


def test_sqlite_files_are_private(tmp_path: Any) -> None:
    """Finding 9: the database and its WAL were created 0644."""
    import os

    from omniwall.store.sqlite import SqliteStore

    path = tmp_path / "m.db"
    old = os.umask(0o022)
    try:
        st = SqliteStore(path)
        st.put("k", "v")
        for f in tmp_path.iterdir():
            assert f.stat().st_mode & 0o077 == 0, f
        st.close()
        os.chmod(path, 0o644)
        SqliteStore(path).close()
        assert path.stat().st_mode & 0o077 == 0
    finally:
        os.umask(old)


def test_rule_expansion_index_agrees_with_matching() -> None:
    """The quota's fact index gives the same members as evaluating each selector on each workload."""
    from omniwall.api.limits import _Expansion
    from omniwall.model.catalog import Catalog
    from omniwall.model.loader import load_text
    from omniwall.selectors import facts_of, parse

    text = "\n---\n".join(
        f"kind: Workload\nmetadata: {{name: w{i}, tenant: t, labels: {{tier: x{i % 3}}}}}\n"
        f"spec: {{host: h, attributes: {{user: [u{i % 2}, u9], n: {i % 4}}}}}"
        for i in range(12)
    )
    c = Catalog.of(load_text(text))
    x = _Expansion(c, "t")
    for sel in ('tier == "x1"', 'tier in {"x0", "x2"}', 'user == "u1"', "n == 2", 'tier != "x1"', "has(n)"):
        s = parse(sel)
        expected = {
            k for k, w in c.workloads.items() if s.matches(facts_of(w.metadata.labels, w.spec.attributes))
        }
        assert set(x.select(s)) == expected, sel
