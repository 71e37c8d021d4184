"""Console latency: a denied packet in a lab workload -> its row visible in the browser's live flow table
(issue 10: p99 < 1 s; BENCHMARKS.md "Console").

    sudo .venv/bin/python bench/console.py [--probes 40] [--json FILE]

A managed lab (examples/three-tier: manager process, one agent process per host namespace, nftables, the
agents' flow collector) and headless Debian chromium (Playwright) signed in to the console's flow table,
filtered to denied verdicts. Paired rounds, in random order per round:

- **full path**: tenant-a/infected-1 sends one TCP SYN to tenant-a/app-1 on a port of its own (the
  emergency quarantine drops it at the egress hop); the host kernel logs it (NFLOG), the agent aggregates
  and ships it, the manager stores and streams it (SSE), the page draws the row. Latency = the probe's
  socket connect started -> a row naming that port is in the DOM (Playwright polls the DOM on each
  animation frame, so at most ~16 ms late).
- **baseline (manager + browser only)**: the same record POSTed to the ingest route with the host's agent
  token, as the agent would: latency = POST sent -> row in the DOM. The difference is the agent's share
  (kernel log delivery, aggregation interval, batch shipping).

Prints p50/p90/p99/max of both and the load (`uptime`). Needs root and the agents' flow collector.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import ssl
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "three-tier"
CHROMIUM = os.environ.get("OMNIWALL_CHROMIUM", "/usr/bin/chromium")
SRC, DST = "tenant-a/infected-1", "tenant-a/app-1"


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summary(xs: list[float]) -> dict[str, float]:
    return {
        "n": len(xs),
        "p50_ms": 1000 * statistics.median(xs),
        "p90_ms": 1000 * pct(xs, 0.90),
        "p99_ms": 1000 * pct(xs, 0.99),
        "max_ms": 1000 * max(xs),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probes", type=int, default=40, help="rounds (one full-path and one baseline each)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("error: needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    import importlib.util

    if importlib.util.find_spec("omniwall.agent.flows") is None:
        print("error: this tree's agents ship no flow records (omniwall.agent.flows)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    from omniwall.flows.record import FlowBatch, FlowRecord
    from omniwall.lab.managed import managed_lab
    from omniwall.lab.probe import Probe, run_probes

    full: list[float] = []
    base: list[float] = []
    with managed_lab([EXAMPLE]) as (lab, cp), sync_playwright() as pw:
        src, dst = lab.plan.workload(SRC), lab.plan.workload(DST)
        host = src.host
        agent_token = cp.agent_token_file(host).read_text().strip()
        # the baseline posts as the host's agent does: its token and, when the lab runs TLS, its client
        # certificate (agent tokens are refused without it)
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
        if cp.url.startswith("https:"):
            tls.load_cert_chain(*map(str, cp.host_cert(host)))
        agent = httpx.Client(
            base_url=cp.url, verify=tls, headers={"Authorization": f"Bearer {agent_token}"}, timeout=10
        )
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(ignore_https_errors=True)
        page.goto(f"{cp.url}/ui/")
        page.fill("#token", cp.admin_token)
        page.click("#signin")
        page.wait_for_selector("#principal-role")
        page.goto(f"{cp.url}/ui/#/flows?verdict=denied")
        page.wait_for_selector("#flow-state:text('live')")

        def row_seen(port: int, timeout: float = 10.0) -> float:
            page.locator(f"#flow-rows td.svc:text-is('tcp/{port}')").first.wait_for(timeout=timeout * 1000)
            return time.monotonic()

        def full_round(port: int) -> float:
            probe = Probe(src.netns, dst.address(4), "tcp", port, src.key, dst.key, src.address(4))
            started = time.monotonic()
            threading.Thread(target=run_probes, args=([probe],), kwargs={"timeout": 0.3}, daemon=True).start()
            return row_seen(port) - started

        def base_round(port: int) -> float:
            now = time.time()
            rec = FlowRecord(
                now,
                now,
                host,
                "egress",
                "bench0",
                SRC,
                "denied",
                1,
                "infra",
                "bench",
                "baseline",
                "emergency",
                0,
                "tcp",
                src.address(4),
                dst.address(4),
                sport=40000,
                dport=port,
                packets=1,
                bytes=60,
            )
            body = FlowBatch(host, (rec,)).to_json()
            started = time.monotonic()
            r = agent.post(f"/v1/hosts/{host}/flows", json=body)
            assert r.status_code == 202, r.text
            return row_seen(port) - started

        for i in range(3):  # warm-up: first SSE events, first NFLOG messages
            full_round(30000 + i)
        for i in range(args.probes):
            order = [("full", full_round), ("base", base_round)]
            random.shuffle(order)
            for kind, fn in order:
                port = (31000 if kind == "full" else 41000) + i
                (full if kind == "full" else base).append(fn(port))
            time.sleep(0.2)
        browser.close()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    out = {
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(), "uptime": load},
        "full_path": summary(full),
        "baseline_ingest_to_browser": summary(base),
        "ratio_p50_full_over_baseline": statistics.median(full) / statistics.median(base),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
