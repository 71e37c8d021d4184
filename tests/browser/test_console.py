"""The web console against an in-process manager: sign-in, scoping, read-only, escaping, live updates.

Flow records reach the manager the way agents send them (`POST /v1/hosts/{host}/flows` with each host's
agent token), built from the sim's verdict at every hop (flowfeed.py); the managed-lab test
(test_console_lab.py) drives the same pages from real kernels.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
from browserkit import HOSTILE, HOSTILE_SELECTOR, World, sign_in
from flowfeed import hop_records, post_records

from omniwall.console.routes import CSP

EXPLAIN = "explain?from=acme/web-1&to=acme/db-1&port=5432"
PAGES = ("flows", "map", "policies", "groups", "hosts", "audit", EXPLAIN)


def _post(world: World, src: str, dst: str, proto: str, port: int | None, times: int = 1) -> None:
    for _ in range(times):
        post_records(world.url, world.agents, hop_records(world.manager, src, dst, proto, port))


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_assets_are_served_with_a_strict_csp(world: World) -> None:
    r = httpx.get(f"{world.url}/ui/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == CSP
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP
    assert r.headers["x-content-type-options"] == "nosniff"
    # no inline script: every <script> has a src
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", r.text))
    js = httpx.get(f"{world.url}/ui/pages/flows.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in js.text
    for bad in ("/ui/nope.js", "/ui/..%2f..%2fpyproject.toml", "/ui/%2e%2e/routes.py", "/ui/../__init__.py"):
        assert httpx.get(f"{world.url}{bad}").status_code == 404, bad
    assert httpx.get(f"{world.url}/ui", follow_redirects=True).url.path == "/ui/"


def test_sign_in_shows_the_principal_and_refuses_a_bad_token(world: World, page: Any) -> None:
    page.goto(f"{world.url}/ui/")
    page.fill("#token", "not-a-token")
    page.click("#signin")
    page.wait_for_selector("#signin-form .error")
    assert "not valid" in page.text_content("#signin-form .error")
    sign_in(page, world.url, world.tokens["acme-viewer"])
    assert page.text_content("#principal-role") == "tenant-viewer"
    assert page.text_content("#principal-scope") == "tenant acme"
    # the token lives in this tab's sessionStorage, never in the URL
    assert world.tokens["acme-viewer"] not in page.url
    assert page.evaluate("sessionStorage.getItem('omniwall.token')") == world.tokens["acme-viewer"]
    page.click("#signout")
    page.wait_for_selector("#signin-form")
    assert page.evaluate("sessionStorage.getItem('omniwall.token')") is None


def test_a_denied_flow_appears_live_naming_its_rule_and_explains_itself(world: World, page: Any) -> None:
    sign_in(page, world.url, world.tokens["admin"], "flows?verdict=denied")
    page.wait_for_selector("#flow-state:text('live')")
    _post(world, "acme/web-1", "acme/db-1", "tcp", 22)  # the no-ssh rule drops it at db-1's ingress
    row = page.locator("#flow-rows tr[data-verdict=denied]", has_text="acme/web-db/no-ssh").first
    row.wait_for(timeout=5000)  # no reload: the SSE stream brought it
    assert "tcp/22" in row.text_content()
    row.locator("a.explain").click()
    page.wait_for_selector("#explanation .hop")
    text = page.text_content("#explanation")
    assert "acme/web-db/no-ssh" in text and "denied" in text


def test_pause_holds_new_rows_until_resumed(world: World, page: Any) -> None:
    sign_in(page, world.url, world.tokens["admin"], "flows?port=5432")
    page.wait_for_selector("#flow-state:text('live')")
    before = page.locator("#flow-rows tr").count()
    page.click("#pause")
    _post(world, "acme/web-1", "acme/db-1", "tcp", 5432)
    page.wait_for_selector("#flow-pending:text-matches('[1-9][0-9]* new while paused')")
    assert page.locator("#flow-rows tr").count() == before
    page.click("#pause")  # resume
    page.wait_for_function(f"document.querySelectorAll('#flow-rows tr').length > {before}")


def test_a_tenant_viewer_sees_only_its_own_flows_and_objects(world: World, page: Any) -> None:
    _post(world, "acme/web-1", "acme/db-1", "tcp", 5432)
    _post(world, "203.0.113.7", "globex/secret-app", "tcp", 443)
    sign_in(page, world.url, world.tokens["acme-viewer"], "flows")
    page.locator("#flow-rows tr", has_text="acme/web-1").first.wait_for()
    assert page.locator("#nav a", has_text="Hosts").count() == 0
    for where in ("flows", "map", "policies", "groups", "audit"):
        page.goto(f"{world.url}/ui/#/{where}")
        page.wait_for_selector(f"#page-{where}")
        page.wait_for_timeout(700)  # let the page's first answers arrive
        text = page.text_content("#view")
        for foreign in ("globex", "secret-app", "10.2.0.1", "203.0.113.7", "hv-east", "hv-west"):
            assert foreign not in text, f"{where} shows {foreign!r}"
    # the other tenant's viewer does see its flow
    sign_in(page, world.url, world.tokens["globex-viewer"], "flows")
    page.locator("#flow-rows tr", has_text="globex/secret-app").first.wait_for()
    assert "acme" not in page.text_content("#view")


def test_the_auditor_sees_everything_and_can_change_nothing(world: World, page: Any) -> None:
    methods: list[str] = []
    page.on("request", lambda r: methods.append(f"{r.method} {r.url}"))
    sign_in(page, world.url, world.tokens["auditor"])
    for where in PAGES:
        page.goto(f"{world.url}/ui/#/{where}")
        name = where.split("?")[0]
        page.wait_for_selector(f"#page-{name}")
        page.wait_for_timeout(500)
        # every control is a view control (filters, pause, sign-out): nothing that writes
        controls = page.locator("#view button, #view input, #view select, #view textarea, #who button")
        kinds = controls.evaluate_all("els => els.map(e => e.dataset.control || e.outerHTML)")
        assert all(k == "view" for k in kinds), f"{where}: {kinds}"
        for i in range(page.locator("#view button").count()):
            page.locator("#view button").nth(i).click()
        page.wait_for_timeout(200)
    assert page.locator("#nav a", has_text="Hosts").count() == 1  # the auditor sees every tenant and host
    writes = [m for m in methods if not m.startswith("GET ")]
    assert not writes, writes
    # and the API refuses a change with the auditor's token, from the page as from anywhere
    status = page.evaluate(
        """async (t) => (await fetch('/v1/policies/web-db?tenant=acme',
             {method: 'DELETE', headers: {Authorization: 'Bearer ' + t}})).status""",
        world.tokens["auditor"],
    )
    assert status == 403
    before = world.manager.revision
    r = httpx.post(
        f"{world.url}/v1/apply",
        content="kind: Tenant\nmetadata: {name: evil}\n",
        headers={**_auth(world.tokens["auditor"]), "Content-Type": "application/yaml"},
    )
    assert r.status_code == 403 and world.manager.revision == before


def test_a_rule_hit_count_rises_after_traffic(world: World, page: Any) -> None:
    sign_in(page, world.url, world.tokens["admin"], "policies")
    cell = page.locator("[data-policy='acme/web-db'] tr[data-rule=sql] td.flow-hits")
    cell.wait_for()
    before = int(cell.text_content().replace(",", "").replace("—", "0") or 0)
    _post(world, "acme/web-1", "acme/db-1", "tcp", 5432, times=3)
    # the page polls: the count rises without a reload (2 hops x 3 connections)
    page.wait_for_function(
        """(b) => {
             const c = document.querySelector("[data-policy='acme/web-db'] tr[data-rule=sql] td.flow-hits");
             return c && Number(c.textContent.replace(/[^0-9]/g, '')) >= b + 6; }""",
        arg=before,
        timeout=10_000,
    )
    assert page.locator("[data-policy='acme/web-db'] tr[data-rule=sql] td.last-hit").text_content() != "never"


def test_names_that_look_like_html_render_as_text(world: World, page: Any) -> None:
    sign_in(page, world.url, world.tokens["admin"], "groups")
    page.wait_for_selector("[data-group='acme/web']")
    text = page.text_content("#view")
    assert HOSTILE in text  # the label value, character for character
    assert HOSTILE_SELECTOR in text  # the selector string
    assert page.locator("#view img, #view b, #view script, #view i").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_the_map_draws_allowed_and_denied_edges(world: World, page: Any) -> None:
    _post(world, "acme/web-1", "acme/db-1", "tcp", 5432)
    _post(world, "acme/web-1", "acme/db-1", "tcp", 22)
    sign_in(page, world.url, world.tokens["admin"], "map")
    page.wait_for_selector("svg#map")
    edge = page.locator("svg#map path.edge[data-src='workload:acme/web-1'][data-dst='workload:acme/db-1']")
    assert edge.count() == 1
    assert "mixed" in (edge.get_attribute("class") or "")  # allowed and denied on the same edge
    assert page.locator("svg#map g.node text", has_text="acme/web-1").count() == 1


def test_the_audit_log_shows_a_change_live(world: World, page: Any) -> None:
    sign_in(page, world.url, world.tokens["auditor"], "audit")
    page.wait_for_selector("#audit-state:text('live')")
    r = httpx.post(
        f"{world.url}/v1/services",
        json={
            "kind": "Service",
            "metadata": {"name": "live-audit", "tenant": "acme"},
            "spec": {"protocol": "tcp"},
        },
        headers=_auth(world.tokens["admin"]),
    )
    assert r.status_code == 200, r.text
    # no reload: /v1/audit/watch brings the entry
    page.locator("#audit-rows tr", has_text="Service/acme/live-audit").first.wait_for(timeout=5000)
