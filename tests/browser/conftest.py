"""Browser tests: Playwright driving Debian's chromium (`/usr/bin/chromium`, the Makefile installs it;
Playwright's own browser download cannot reach the internet here).

Skipped, visibly, when chromium or the playwright package is missing. `world` serves an in-process
manager (two tenants, a provider, the flow API in memory) on loopback with the tokens the tests sign in
with; `page` is a fresh browser tab whose script errors and CSP violations fail the test.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # apihelpers: serving, tokens

from apihelpers import issue_tokens, seeded_manager, serving
from browserkit import WORLD, World

from omniwall.api.app import create_app
from omniwall.store.memory import MemoryStore

CHROMIUM = os.environ.get("OMNIWALL_CHROMIUM", "/usr/bin/chromium")
playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


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


# Module scope, not session: Playwright's sync API keeps an asyncio loop marked running on the main
# thread while it is open, and every later test that calls asyncio.run() (agents, feeds) would fail.
@pytest.fixture(scope="module")
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
    ctx = browser.new_context(
        viewport={"width": 1400, "height": 900}, ignore_https_errors=True
    )  # a lab over TLS
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
