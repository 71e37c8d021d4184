"""The flow API (api/flows.py, api/live.py, api/metrics.py): ingest refusals and their counts, filters,
pagination, hits and unused rules, tenant isolation on every read route, the audit stream, metrics."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from apihelpers import auth, blank_client, seeded_manager, use_manager
from fastapi.testclient import TestClient

from omniwall.api.metrics import render
from omniwall.cli.flows_cmd import sse_events
from omniwall.flows.record import MAX_BATCH_BYTES, MAX_BATCH_RECORDS
from omniwall.manager.flows import FlowService
from omniwall.manager.flowstore import SqliteFlowStore
from omniwall.manager.service import SYSTEM, Manager
from omniwall.store.memory import MemoryStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

WORLD = """
kind: Tenant
metadata: {name: ta}
---
kind: Tenant
metadata: {name: tb}
---
kind: Host
metadata: {name: ha}
---
kind: Host
metadata: {name: hb}
---
kind: Workload
metadata: {name: web, tenant: ta, labels: {tier: web}}
spec: {host: ha, vnics: [{name: eth0, ips: [10.1.0.1]}]}
---
kind: Workload
metadata: {name: secretdb, tenant: tb, labels: {tier: db}}
spec: {host: hb, vnics: [{name: eth0, ips: [10.2.0.1]}]}
---
kind: Group
metadata: {name: webs, tenant: ta}
spec: {selector: 'tier == "web"'}
---
kind: Group
metadata: {name: hiddengroup, tenant: tb}
spec: {selector: 'tier == "db"'}
---
kind: Policy
metadata: {name: out, tenant: ta}
spec:
  appliedTo: [webs]
  rules:
  - {name: to-db, action: allow, direction: out, destinations: [10.2.0.0/16], services: [tcp/5432]}
  - {name: never, action: allow, direction: out, destinations: [192.0.2.0/24], services: [tcp/9]}
---
kind: Policy
metadata: {name: guard, tenant: tb}
spec:
  appliedTo: [hiddengroup]
  rules: [{name: confidential, action: drop, direction: in, sources: [any], services: [tcp/5432]}]
"""
# What tenant ta must never read anywhere: tb's names and rules, and host names.
SECRETS = ("secretdb", "hiddengroup", "confidential", "guard", '"tb"', "tb/", '"hb"', '"ha"')


@pytest.fixture(scope="module")
def client() -> TestClient:
    return blank_client()  # building the app is slow: one per module, a fresh world per test


@pytest.fixture
def env(client: TestClient) -> Iterator[tuple[TestClient, Manager, dict[str, dict[str, str]]]]:
    m = seeded_manager(MemoryStore(), WORLD)
    flows = FlowService(SqliteFlowStore(":memory:"))
    use_manager(client, m)
    client.app.state.flows = flows  # type: ignore[attr-defined]
    headers = {
        who: auth(m.tokens.create(role, **scope)[0])
        for who, (role, scope) in {
            "admin": ("provider-admin", {}),
            "auditor": ("auditor", {}),
            "ta": ("tenant-viewer", {"tenant": "ta"}),
            "ha": ("agent", {"host": "ha"}),
            "hb": ("agent", {"host": "hb"}),
        }.items()
    }
    yield client, m, headers
    flows.close()


def rule_id(m: Manager, tenant: str, policy: str, rule: str) -> int:
    for st in m.desired.all().values():
        for r in st.rules:
            if (r.tenant, r.policy, r.rule) == (tenant, policy, rule):
                return r.id
    raise AssertionError(f"{tenant}/{policy}/{rule} is not compiled")


def rec(
    host: str,
    hop: str,
    workload: str,
    verdict: str,
    rid: int,
    rtenant: str,
    policy: str,
    rule: str,
    **kw: Any,
) -> dict[str, Any]:
    now = time.time()
    return {
        "start": now - 1,
        "end": now,
        "host": host,
        "hop": hop,
        "ifname": f"if-{host}",
        "workload": workload,
        "verdict": verdict,
        "rule_id": rid,
        "rule_tenant": rtenant,
        "policy": policy,
        "rule": rule,
        "category": "application",
        "revision": 2,
        "proto": "tcp",
        "src": "10.1.0.1",
        "dst": "10.2.0.1",
        "sport": 40000,
        "dport": 5432,
        **kw,
    }


def connection(c: TestClient, m: Manager, headers: dict[str, dict[str, str]]) -> None:
    """ta/web -> tb/secretdb:5432: allowed by ta's rule at ha, denied by tb's rule at hb."""
    a = rec("ha", "egress", "ta/web", "allowed", rule_id(m, "ta", "out", "to-db"), "ta", "out", "to-db")
    b = rec(
        "hb",
        "ingress",
        "tb/secretdb",
        "denied",
        rule_id(m, "tb", "guard", "confidential"),
        "tb",
        "guard",
        "confidential",
    )
    for host, r in (("ha", a), ("hb", b)):
        resp = c.post(f"/v1/hosts/{host}/flows", json={"host": host, "records": [r]}, headers=headers[host])
        assert resp.status_code == 202, resp.text
        assert resp.json() == {"host": host, "accepted": 1, "dropped": 0}
    assert c.app.state.flows.flush(10)  # type: ignore[attr-defined]


def test_a_tenant_sees_its_flows_but_no_foreign_name(
    env: tuple[TestClient, Manager, dict[str, dict[str, str]]],
) -> None:
    c, m, h = env
    connection(c, m, h)
    full = c.get("/v1/flows", headers=h["auditor"]).json()["items"]
    assert {f["dst_workload"] for f in full} == {"tb/secretdb"} and len(full) == 2  # the auditor sees all
    mine = c.get("/v1/flows", headers=h["ta"]).json()["items"]
    assert len(mine) == 2  # both hops touch ta/web
    by_verdict = {f["verdict"]: f for f in mine}
    assert by_verdict["allowed"]["rule"] == "to-db" and by_verdict["allowed"]["src_workload"] == "ta/web"
    denied = by_verdict["denied"]
    assert denied["rule"] == denied["policy"] == denied["rule_tenant"] == "(other tenant)"
    assert denied["dst"] == "10.2.0.1" and denied["dst_workload"] is None and denied["workload"] is None
    assert all(f["host"] is None and f["ifname"] is None for f in mine)
    answers = {
        "flows": c.get("/v1/flows", headers=h["ta"]).text,
        "graph": c.get("/v1/flows/graph", headers=h["ta"]).text,
        "graph by group": c.get("/v1/flows/graph", params={"by": "group"}, headers=h["ta"]).text,
        "hits": c.get("/v1/flows/hits", headers=h["ta"]).text,
        "unused": c.get("/v1/flows/unused", headers=h["ta"]).text,
        "stats": c.get("/v1/flows/stats", headers=h["ta"]).text,
    }
    with c.stream("GET", "/v1/flows/watch", params={"since": "1h", "limit": 2}, headers=h["ta"]) as s:
        answers["watch"] = s.read().decode()
    for route, text in answers.items():
        leaked = [s for s in SECRETS if s in text]
        assert not leaked, f"{route} names {leaked}: {text[:400]}"
    graph = json.loads(answers["graph by group"])
    assert {"group:ta/webs", "address:10.2.0.1"} == {n["id"] for n in graph["nodes"]}
    assert graph["edges"] == [
        {
            "source": "group:ta/webs",
            "target": "address:10.2.0.1",
            "verdicts": {"allowed": 1, "denied": 1},
            "total": 2,
        }
    ]
    # the auditor's graph names both workloads
    full_graph = c.get("/v1/flows/graph", headers=h["auditor"]).json()
    assert {n["id"] for n in full_graph["nodes"]} == {"workload:ta/web", "workload:tb/secretdb"}


def test_foreign_filters_are_not_found_for_a_tenant(
    env: tuple[TestClient, Manager, dict[str, dict[str, str]]],
) -> None:
    c, m, h = env
    connection(c, m, h)
    for q in (
        {"workload": "tb/secretdb"},
        {"group": "tb/hiddengroup"},
        {"policy": "tb/guard"},
        {"rule": "tb/guard/confidential"},
        {"host": "hb"},
    ):
        r = c.get("/v1/flows", params=q, headers=h["ta"])
        assert r.status_code == 404, (q, r.text)
        assert c.get("/v1/flows", params=q, headers=h["auditor"]).json()["items"], q
    # a foreign rule id just matches nothing for the tenant (it may only ask for its own rules)
    rid = rule_id(m, "tb", "guard", "confidential")
    assert c.get("/v1/flows", params={"rule": rid}, headers=h["ta"]).json()["items"] == []
    assert c.get("/v1/flows", params={"tenant": "tb"}, headers=h["ta"]).json()["items"] == []


def test_filters_and_pagination(env: tuple[TestClient, Manager, dict[str, dict[str, str]]]) -> None:
    c, m, h = env
    rid = rule_id(m, "ta", "out", "to-db")
    now = time.time()
    records = [
        rec(
            "ha",
            "egress",
            "ta/web",
            ("allowed", "denied")[i % 2],
            rid,
            "ta",
            "out",
            "to-db",
            end=now - 600 + i,
            dport=5432 + i % 3,
        )
        for i in range(25)
    ]
    assert (
        c.post("/v1/hosts/ha/flows", json={"host": "ha", "records": records}, headers=h["ha"]).status_code
        == 202
    )
    assert c.app.state.flows.flush(10)  # type: ignore[attr-defined]
    a = h["admin"]

    def items(**q: Any) -> list[dict[str, Any]]:
        r = c.get("/v1/flows", params=q, headers=a)
        assert r.status_code == 200, r.text
        return r.json()["items"]

    assert len(items(verdict="denied")) == 12
    assert len(items(port=5433)) == 8
    assert len(items(group="ta/webs", verdict="allowed")) == 13
    assert len(items(policy="ta/out")) == len(items(rule="ta/out/to-db")) == len(items(rule=str(rid))) == 25
    assert items(policy="ta/out", host="hb") == []
    assert len(items(since="5m")) == 0 and len(items(since="15m")) == 25
    t = items(limit=1000)[10]["end"]
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
    assert all(f["end"] < t for f in items(until=iso))
    # pages: newest first, disjoint, complete
    seen: list[int] = []
    token = None
    while True:
        r = c.get(
            "/v1/flows", params={"limit": 10, **({"continue": token} if token else {})}, headers=a
        ).json()
        seen += [f["id"] for f in r["items"]]
        token = r["continue"]
        if token is None:
            break
    assert seen == sorted(seen, reverse=True) and len(set(seen)) == 25


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"verdikt": "denied"}, "query.verdikt"),
        ({"verdict": "maybe"}, "query.verdict"),
        ({"since": "yesterday"}, "query.since"),
        ({"port": "99999"}, "query.port"),
        ({"rule": "a/b"}, "query.rule"),
        ({"workload": "ta/web", "group": "ta/webs"}, "query.group"),
    ],
)
def test_bad_filters_answer_422_naming_the_field(
    env: tuple[TestClient, Manager, dict[str, dict[str, str]]], params: dict[str, str], field: str
) -> None:
    c, _, h = env
    for path in ("/v1/flows", "/v1/flows/graph", "/v1/flows/watch"):
        r = c.get(path, params=params, headers=h["admin"])
        assert r.status_code == 422, (path, r.text)
        assert field in [e["path"] for e in r.json()["errors"]], r.text
    r = c.get("/v1/flows/hits", params={"window": "1 hour"}, headers=h["admin"])
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "query.window"


def test_ingest_refusals_are_clear_and_counted(
    env: tuple[TestClient, Manager, dict[str, dict[str, str]]],
) -> None:
    c, m, h = env
    rid = rule_id(m, "ta", "out", "to-db")
    good = rec("ha", "egress", "ta/web", "allowed", rid, "ta", "out", "to-db")
    post = c.post
    # another host's agent
    r = post("/v1/hosts/ha/flows", json={"host": "ha", "records": [good]}, headers=h["hb"])
    assert r.status_code == 403 and r.json()["permission"] == "hosts.status.write"
    # a reader is no agent
    assert post("/v1/hosts/ha/flows", json={"host": "ha"}, headers=h["admin"]).status_code == 403
    assert post("/v1/hosts/nope/flows", json={"host": "nope"}, headers=h["admin"]).status_code == 403
    # malformed: the field is named
    r = post("/v1/hosts/ha/flows", json={"host": "ha", "records": [{**good, "dport": -1}]}, headers=h["ha"])
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "records.0.dport", r.text
    r = post(
        "/v1/hosts/ha/flows", content=b"{not json", headers={**h["ha"], "content-type": "application/json"}
    )
    assert r.status_code == 422
    r = post("/v1/hosts/ha/flows", json={"host": "hb", "records": [good]}, headers=h["ha"])
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "host"
    r = post(
        "/v1/hosts/ha/flows", json={"host": "ha", "records": [good, {**good, "host": "hb"}]}, headers=h["ha"]
    )
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "records.1.host"
    # oversized: too many records, too many bytes
    r = post(
        "/v1/hosts/ha/flows",
        json={"host": "ha", "records": [good] * (MAX_BATCH_RECORDS + 1)},
        headers=h["ha"],
    )
    assert r.status_code == 413 and "MAX_BATCH_RECORDS" in r.json()["message"]
    r = post(
        "/v1/hosts/ha/flows",
        content=b" " * (MAX_BATCH_BYTES + 1),
        headers={**h["ha"], "content-type": "application/json"},
    )
    assert r.status_code == 413 and "MAX_BATCH_BYTES" in r.json()["message"]
    st = c.get("/v1/flows/stats", headers=h["admin"]).json()
    assert st["refusedBatches"] == {"wrong-host": 3, "malformed": 2, "oversized": 2}
    assert st["offered"] == 0 and st["rows"] == 0  # nothing of a refused batch is stored
    # and a good one goes through, with the agent's own losses kept
    r = post(
        "/v1/hosts/ha/flows",
        json={"host": "ha", "records": [good], "dropped": {"kernel": 5}},
        headers=h["ha"],
    )
    assert r.status_code == 202
    assert c.app.state.flows.flush(10)  # type: ignore[attr-defined]
    st = c.get("/v1/flows/stats", headers=h["admin"]).json()
    assert st["rows"] == st["stored"] == st["offered"] == 1
    assert st["hosts"]["ha"]["agentDropped"] == {"kernel": 5}


def test_hits_and_unused_rules(env: tuple[TestClient, Manager, dict[str, dict[str, str]]]) -> None:
    c, m, h = env
    unused = {
        (r["rule_tenant"], r["policy"], r["rule"])
        for r in c.get("/v1/flows/unused", headers=h["admin"]).json()["rules"]
    }
    assert {("ta", "out", "to-db"), ("ta", "out", "never"), ("tb", "guard", "confidential")} <= unused
    connection(c, m, h)
    unused = {
        (r["rule_tenant"], r["policy"], r["rule"])
        for r in c.get("/v1/flows/unused", headers=h["admin"]).json()["rules"]
    }
    assert ("ta", "out", "never") in unused and ("ta", "out", "to-db") not in unused
    hits = {r["rule"]: r for r in c.get("/v1/flows/hits", headers=h["admin"]).json()["rules"]}
    assert hits["to-db"]["verdicts"] == {"allowed": 1} and hits["confidential"]["verdicts"] == {"denied": 1}
    assert hits["to-db"]["last_hit"].endswith("Z")
    tenant_hits = c.get("/v1/flows/hits", headers=h["ta"]).json()["rules"]
    assert [r["rule"] for r in tenant_hits] == ["to-db"]


def test_watch_streams_new_records_live(env: tuple[TestClient, Manager, dict[str, dict[str, str]]]) -> None:
    c, m, h = env
    timer = threading.Timer(0.3, connection, (c, m, h))
    timer.start()
    try:
        with c.stream(
            "GET",
            "/v1/flows/watch",
            params={"verdict": "denied", "limit": 1, "stats": 0.1},
            headers=h["auditor"],
        ) as s:
            events = list(sse_events(iter(s.read().decode().splitlines())))
    finally:
        timer.join()
    flows = [d for k, d in events if k == "flow"]
    assert len(flows) == 1 and flows[0]["rule"] == "confidential" and flows[0]["id"] is None
    assert all(set(d) >= {"offered", "dropped", "agentDropped"} for k, d in events if k == "stats")


def test_audit_watch_streams_new_entries(env: tuple[TestClient, Manager, dict[str, dict[str, str]]]) -> None:
    c, m, h = env
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1))

    def write() -> None:
        time.sleep(1.2)
        from omniwall.manager.contracts import load_documents

        m.commit(
            m.plan_apply(load_documents("kind: Group\nmetadata: {name: late, tenant: ta}\n", "x")), SYSTEM
        )
        m.commit(
            m.plan_apply(load_documents("kind: Group\nmetadata: {name: late, tenant: tb}\n", "x")), SYSTEM
        )

    t = threading.Thread(target=write)
    t.start()
    try:
        with c.stream("GET", "/v1/audit/watch", params={"since": since, "limit": 1}, headers=h["ta"]) as s:
            events = list(sse_events(iter(s.read().decode().splitlines())))
    finally:
        t.join()
    assert [(k, d["kind"], d["tenant"], d["name"]) for k, d in events] == [("audit", "Group", "ta", "late")]
    r = c.get("/v1/audit/watch", params={"tenant": "tb"}, headers=h["ta"])
    assert r.status_code == 200 and "event:" not in r.text  # another tenant's log: an empty stream


def test_metrics_name_routes_and_flow_counters(
    env: tuple[TestClient, Manager, dict[str, dict[str, str]]],
) -> None:
    c, m, h = env
    connection(c, m, h)
    series = 'omniwall_api_request_duration_seconds_count{method="GET",route="/v1/flows",status="200"} '

    def count() -> float:
        text = render(c.app.state.metrics).decode()  # type: ignore[attr-defined]
        return float(text.split(series, 1)[1].split()[0]) if series in text else 0.0

    before = count()
    c.get("/v1/flows", params={"workload": "ta/web"}, headers=h["admin"])
    assert count() == before + 1
    text = render(c.app.state.metrics).decode()  # type: ignore[attr-defined]
    assert 'route="/v1/hosts/{host}/flows",status="202"' in text  # the template, not the host
    assert 'omniwall_flow_records_total{stage="stored"} 2.0' in text
    assert 'omniwall_flow_verdicts_total{policy="tb/guard",verdict="denied"} 1.0' in text
    assert "omniwall_model_revision " in text and "omniwall_hosts 2.0" in text


def test_the_flow_store_lives_in_its_own_file(tmp_path: Any) -> None:
    """`omniwall manager` puts flows next to the store, in a file of their own (server.FlowOptions)."""
    from omniwall.api.server import FlowOptions, flow_service

    db = str(tmp_path / "m.db")
    svc = flow_service(db, FlowOptions())
    try:
        assert svc.store.path == db + ".flows"  # type: ignore[attr-defined]
        assert (
            FlowOptions(db="/x/y").path_for(db) == "/x/y" and FlowOptions().path_for(":memory:") == ":memory:"
        )
    finally:
        svc.close()
    m = Manager(MemoryStore())
    assert m is not None


def test_cli_flows_table_json_and_follow(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, env: tuple[TestClient, Manager, dict[str, dict[str, str]]]
) -> None:
    """`omniwall flows` against a served manager: a table naming the rule, JSON, and --follow --since."""
    from apihelpers import serving
    from typer.testing import CliRunner

    from omniwall.cli.main import app as cli

    c, m, h = env
    connection(c, m, h)
    app = c.app
    with serving(app, timeout_graceful_shutdown=1) as url:  # type: ignore[arg-type]
        monkeypatch.setenv("OMNIWALL_SERVER", url)
        monkeypatch.setenv("OMNIWALL_TOKEN", h["ta"]["Authorization"].split()[1])
        monkeypatch.setenv("OMNIWALL_CONFIG", str(tmp_path / "none.yaml"))
        monkeypatch.setenv("COLUMNS", "200")
        runner = CliRunner()
        res = runner.invoke(cli, ["flows", "--since", "1h"])
        assert res.exit_code == 0, res.output
        assert "ta/out/to-db" in res.output and "(other tenant)" in res.output
        assert "secretdb" not in res.output
        res = runner.invoke(cli, ["flows", "--verdict", "denied", "-o", "json"])
        assert res.exit_code == 0, res.output
        (denied,) = json.loads(res.output)
        assert denied["dst"] == "10.2.0.1" and denied["dst_workload"] is None
        res = runner.invoke(cli, ["flows", "--follow", "--since", "1h", "--limit", "2", "-o", "json"])
        assert res.exit_code == 0, res.output
        assert sorted(json.loads(line)["verdict"] for line in res.output.splitlines()) == [
            "allowed",
            "denied",
        ]
        res = runner.invoke(cli, ["flows", "--workload", "tb/secretdb"])
        assert res.exit_code == 1 and "not found" in res.output


def test_the_contract_batch_is_accepted_as_is(
    env: tuple[TestClient, Manager, dict[str, dict[str, str]]],
) -> None:
    """What an agent builds with omniwall.flows.record (FlowBatch.to_json()) is what the route takes,
    a tenant default verdict included."""
    from omniwall.flows.record import DEFAULT_CATEGORY, DEFAULT_POLICY, FlowBatch, FlowRecord

    c, _, h = env
    now = time.time()
    r = FlowRecord(
        start=now - 1,
        end=now,
        host="hb",
        hop="ingress",
        ifname="if-hb",
        workload="tb/secretdb",
        verdict="denied",
        rule_id=4242,
        rule_tenant="tb",
        policy=DEFAULT_POLICY,
        rule="drop",
        category=DEFAULT_CATEGORY,
        revision=2,
        proto="udp",
        src="10.1.0.1",
        dst="10.2.0.1",
        dport=53,
        packets=7,
        count=7,
    )
    batch = FlowBatch("hb", (r,), {"kernel": 2, "agent": 1}).to_json()
    resp = c.post("/v1/hosts/hb/flows", json=batch, headers=h["hb"])
    assert resp.status_code == 202 and resp.json()["accepted"] == 1, resp.text
    assert c.app.state.flows.flush(10)  # type: ignore[attr-defined]
    (got,) = c.get("/v1/flows", params={"host": "hb"}, headers=h["admin"]).json()["items"]
    assert (got["policy"], got["rule"], got["count"], got["dst_workload"]) == (
        DEFAULT_POLICY,
        "drop",
        7,
        "tb/secretdb",
    )
    (seen,) = c.get("/v1/flows", headers=h["ta"]).json()["items"]  # ta's web is the source
    assert seen["rule"] == "(other tenant)" and seen["src_workload"] == "ta/web"


def test_the_ingest_decoder_matches_the_published_schema_and_the_record() -> None:
    """The route parses with a msgspec struct (speed) but publishes FlowRecordIn (pydantic): the same
    fields, in FlowRecord's order (rows_of reads them by position), the same required ones."""
    from dataclasses import fields

    import msgspec

    from omniwall.api import flows as api
    from omniwall.flows.record import FlowRecord

    names = msgspec.structs.fields(api._RecordIn)
    assert [f.name for f in names] == [f.name for f in fields(FlowRecord)]
    published = api._batch_schema()["properties"]["records"]["items"]
    assert {f.name for f in names if f.required} == set(published["required"])
    assert {f.name for f in names} == set(published["properties"])
    assert {f.name for f in msgspec.structs.fields(api._BatchIn)} == set(api.FlowBatchIn.__annotations__)


def test_a_record_missing_a_field_is_refused_naming_it(
    env: tuple[TestClient, Manager, dict[str, dict[str, str]]],
) -> None:
    c, m, h = env
    good = rec("ha", "egress", "ta/web", "allowed", rule_id(m, "ta", "out", "to-db"), "ta", "out", "to-db")
    bad = {k: v for k, v in good.items() if k != "verdict"}
    r = c.post("/v1/hosts/ha/flows", json={"host": "ha", "records": [good, bad]}, headers=h["ha"])
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "records.1.verdict", r.text
    r = c.post(
        "/v1/hosts/ha/flows", json={"host": "ha", "records": [{**good, "verdict": "maybe"}]}, headers=h["ha"]
    )
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "records.0.verdict", r.text


def test_a_full_queue_answers_429_and_the_agent_keeps_the_batch(
    env: tuple[TestClient, Manager, dict[str, dict[str, str]]],
) -> None:
    """Overload is backpressure, not loss: 429 + Retry-After before the body is read, counted."""
    c, m, h = env
    svc = c.app.state.flows  # type: ignore[attr-defined]
    good = rec("ha", "egress", "ta/web", "allowed", rule_id(m, "ta", "out", "to-db"), "ta", "out", "to-db")
    before = c.get("/v1/flows/stats", headers=h["admin"]).json()
    svc.queue_records, svc.pending = 100, 100  # the writer is 100 records behind, the queue holds 100
    try:
        r = c.post("/v1/hosts/ha/flows", json={"host": "ha", "records": [good]}, headers=h["ha"])
    finally:
        svc.queue_records, svc.pending = 500_000, 0
    assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
    st = c.get("/v1/flows/stats", headers=h["admin"]).json()
    assert st["deferredBatches"] == before["deferredBatches"] + 1 and st["offered"] == before["offered"]
    r = c.post("/v1/hosts/ha/flows", json={"host": "ha", "records": [good]}, headers=h["ha"])
    assert r.status_code == 202 and r.json()["accepted"] == 1


class _GatedStore(SqliteFlowStore):
    """A flow store whose writes wait for the test, or fail: what the agent is told must follow them."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.gate = threading.Event()
        self.fail = False

    def insert(self, rows: Any) -> None:
        self.gate.wait(10)
        if self.fail:
            raise OSError("disk full")
        super().insert(rows)


def test_ingest_acknowledges_only_what_is_committed(env: tuple[TestClient, Manager, Any]) -> None:
    c, _, h = env
    store = _GatedStore()
    c.app.state.flows = FlowService(store)  # type: ignore[attr-defined]
    body = {"host": "ha", "records": [rec("ha", "egress", "ta/web", "allowed", 1, "ta", "out", "to-db")]}
    answers: list[Any] = []
    poster = threading.Thread(
        target=lambda: answers.append(c.post("/v1/hosts/ha/flows", json=body, headers=h["ha"]))
    )
    poster.start()
    time.sleep(0.5)
    assert not answers and store.rows() == 0  # not written: not acknowledged
    store.gate.set()
    poster.join(10)
    assert answers[0].status_code == 202 and store.rows() == 1
    # a write that fails is not acknowledged either: the agent keeps the batch and retries
    store.fail = True
    r = c.post("/v1/hosts/ha/flows", json=body, headers=h["ha"])
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    c.app.state.flows.close()  # type: ignore[attr-defined]
