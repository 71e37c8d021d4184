"""The console over a real managed lab: real probes in workload namespaces, verdicts logged by the host
kernels, records shipped by the agents, shown live in the browser.

Needs root (namespaces, nftables); the flow tests also need the agents' flow collector
(`omniwall.agent.flows`). Skipped, visibly, otherwise. One lab serves the module (bringing it up takes
most of the time).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from browserkit import sign_in

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "three-tier"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the managed lab needs root (namespaces, nftables)")
AGENT_FLOWS = importlib.util.find_spec("omniwall.agent.flows") is not None
needs_agent_flows = pytest.mark.skipif(
    not AGENT_FLOWS, reason="this tree's agents ship no flow records (omniwall.agent.flows missing)"
)


def probe(lab: Any, src: str, dst: str, proto: str, port: int) -> bool:
    """`lab.probe` in a thread of its own: Playwright's sync API keeps an event loop in this one."""
    with ThreadPoolExecutor(1) as ex:
        return bool(ex.submit(lab.probe, src, dst, proto, port).result())


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Any, Any]]:
    from omniwall.lab.managed import managed_lab

    with managed_lab([EXAMPLE]) as (lab, cp):
        yield lab, cp


@needs_agent_flows
def test_a_denied_probe_appears_in_the_live_flow_table_naming_its_rule(
    lab: tuple[Any, Any], page: Any
) -> None:
    lab_, cp = lab
    sign_in(page, cp.url, cp.admin_token, "flows?verdict=denied&workload=tenant-a/infected-1")
    page.wait_for_selector("#flow-state:text('live')")
    # the emergency quarantine drops everything the infected workload sends but remediation
    assert not probe(lab_, "tenant-a/infected-1", "tenant-a/app-1", "tcp", 8080)
    sent = time.monotonic()
    rule = "infra/quarantine/drop-from-quarantined"
    row = page.locator("#flow-rows tr[data-verdict=denied]", has_text=rule)
    row.first.wait_for(timeout=15_000)
    seen = time.monotonic() - sent
    text = row.first.text_content()
    assert "tcp/8080" in text and "10.1.0.2" in text, text
    print(f"denied probe -> row in the browser: {seen:.2f} s")


def test_a_rule_kernel_hit_count_rises_after_traffic(lab: tuple[Any, Any], page: Any) -> None:
    lab_, cp = lab
    sign_in(page, cp.url, cp.admin_token, "policies")
    cell = page.locator("[data-policy='tenant-a/shop'] tr[data-rule=web-to-app] td.hits")
    cell.wait_for()
    before = int(cell.get_attribute("data-packets") or 0)
    for _ in range(3):
        assert probe(lab_, "tenant-a/web-1", "tenant-a/app-1", "tcp", 8080)
    # agents report counters every few seconds and the page polls: no reload
    page.wait_for_function(
        """(b) => {
             const c = document.querySelector(
               "[data-policy='tenant-a/shop'] tr[data-rule=web-to-app] td.hits");
             return c && Number(c.dataset.packets) > b; }""",
        arg=before,
        timeout=30_000,
    )
    if AGENT_FLOWS:  # and the flow records count the same connections
        flows = page.locator("[data-policy='tenant-a/shop'] tr[data-rule=web-to-app] td.flow-hits")
        assert flows.text_content() not in ("—", "0")


@needs_agent_flows
def test_the_demo_background_traffic_keeps_the_flow_table_alive(lab: tuple[Any, Any], page: Any) -> None:
    from omniwall.demo import BackgroundTraffic, demo_flows

    lab_, cp = lab
    sign_in(page, cp.url, cp.admin_token, "flows")
    page.wait_for_selector("#flow-state:text('live')")
    traffic = BackgroundTraffic(lab_, demo_flows(), period=0.5)
    assert traffic.allowed and traffic.denied
    traffic.start()
    try:
        # rows that arrived over the stream (class "new"), allowed and denied
        page.locator("#flow-rows tr.new[data-verdict=allowed]").first.wait_for(timeout=15_000)
        page.locator("#flow-rows tr.new[data-verdict=denied]").first.wait_for(timeout=15_000)
    finally:
        traffic.stop()
    assert not traffic._thread.is_alive()
