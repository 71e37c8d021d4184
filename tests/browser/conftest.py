"""Browser tests: Playwright driving Debian's chromium (`/usr/bin/chromium`, the Makefile installs it;
Playwright's own browser download cannot reach the internet here).

Skipped, visibly, when chromium or the playwright package is missing. `world` serves an in-process
manager (two tenants, a provider, the flow API in memory) on loopback with the tokens the tests sign in
with; `page` is a fresh browser tab whose console errors and failed requests fail the test.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # apihelpers: serving, tokens

from apihelpers import issue_tokens, seeded_manager, serving

from omniwall.api.app import create_app
from omniwall.manager.service import Manager
from omniwall.store.memory import MemoryStore

CHROMIUM = os.environ.get("OMNIWALL_CHROMIUM", "/usr/bin/chromium")
playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

# An object whose label looks like markup: the console must show it as text (names cannot hold it, labels
# and selector strings can).
HOSTILE = '<img src=x onerror="window.__pwned=1"><b>bold</b>'
HOSTILE_SELECTOR = "<script>window.__pwned=2</script><i>x</i>"

WORLD = f"""
kind: Tenant
metadata: {{name: acme}}
---
kind: Tenant
metadata: {{name: globex}}
---
kind: Host
metadata: {{name: hv-east}}
---
kind: Host
metadata: {{name: hv-west}}
---
kind: Workload
metadata: {{name: web-1, tenant: acme, labels: {{tier: web}}}}
spec: {{host: hv-east, vnics: [{{name: eth0, ips: [10.1.0.1]}}]}}
---
kind: Workload
metadata: {{name: db-1, tenant: acme, labels: {{tier: db, note: '{HOSTILE}'}}}}
spec: {{host: hv-west, vnics: [{{name: eth0, ips: [10.1.0.2]}}]}}
---
kind: Workload
metadata: {{name: secret-app, tenant: globex, labels: {{tier: app}}}}
spec: {{host: hv-west, vnics: [{{name: eth0, ips: [10.2.0.1]}}]}}
---
kind: Group
metadata: {{name: web, tenant: acme, labels: {{owner: '{HOSTILE}'}}}}
spec: {{selector: 'tier == "web"'}}
---
kind: Group
metadata: {{name: db, tenant: acme}}
spec: {{selector: 'note == "{HOSTILE_SELECTOR}" || tier == "db"'}}
---
kind: Group
metadata: {{name: globex-apps, tenant: globex}}
spec: {{selector: 'tier == "app"'}}
---
kind: Policy
metadata: {{name: web-db, tenant: acme}}
spec:
  rules:
  - {{name: sql, sources: [web], destinations: [db], services: [tcp/5432], action: allow}}
  - {{name: no-ssh, sources: [any], destinations: [db], services: [tcp/22], action: drop}}
---
kind: Policy
metadata: {{name: globex-private, tenant: globex}}
spec:
  rules:
  - {{name: inbound, sources: [any], destinations: [globex-apps], services: [tcp/443], action: allow}}
"""


@dataclass
class World:
    url: str
    manager: Manager
    tokens: dict[str, str]  # caller -> token
    agents: dict[str, str]  # host -> agent token


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    m = seeded_manager(MemoryStore(), WORLD)
    tokens = issue_tokens(
        m,
        {
            "admin": ("provider-admin", {}),
            "auditor": ("auditor", {}),
            "acme-viewer": ("tenant-viewer", {"tenant": "acme"}),
            "globex-viewer": ("tenant-viewer", {"tenant": "globex"}),
        },
    )
    agents = issue_tokens(m, {h: ("agent", {"host": h}) for h in ("hv-east", "hv-west")})
    with serving(create_app(m, watch=False)) as url:
        yield World(url, m, tokens, agents)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh tab; script errors on the page (and CSP violations, which Chromium logs as console
    errors) fail the test."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = ctx.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on(
        "console",
        lambda m: (
            problems.append(f"console {m.type}: {m.text}")
            if m.type == "error" and "Content Security Policy" in m.text
            else None
        ),
    )
    pg.set_default_timeout(10_000)
    yield pg
    ctx.close()
    assert not problems, "\n".join(problems)


def sign_in(page: Any, url: str, token: str, where: str = "flows") -> None:
    page.goto(f"{url}/ui/")
    page.evaluate("sessionStorage.clear()")  # whoever was signed in in this tab before
    page.reload()
    page.fill("#token", token)
    page.click("#signin")
    page.wait_for_selector("#principal-role")
    page.goto(f"{url}/ui/#/{where}")
    page.wait_for_selector(f"#page-{where.split('?')[0]}")
