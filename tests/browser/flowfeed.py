"""Flow records for a connection as the agents on its path would report them, posted to the ingest route.

Used where a test or a page needs records without a kernel: each reached hop of the sim's verdict over
the manager's current desired states becomes one FlowRecord (the same attribution the agents derive from
the ct mark or the NFLOG prefix), posted by that host's agent token to `POST /v1/hosts/{host}/flows`.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import httpx

from omniwall.flows.record import DEFAULT_CATEGORY, DEFAULT_POLICY, FlowBatch, FlowRecord
from omniwall.manager.service import Manager
from omniwall.sim.explain import explain

_sport = itertools.count(40000)
VERDICT = {"allow": "allowed", "drop": "denied", "reject": "rejected"}


def hop_records(m: Manager, src: str, dst: str, proto: str, port: int | None) -> list[FlowRecord]:
    """One record per reached hop of the request `src -> dst`, attributed to the deciding rule."""
    catalog, _ = m.snapshot_catalog()
    states = m.desired.all()
    e = explain(catalog, states, src, dst, proto, port)
    pv = e.connection.request
    now = time.time()
    sport = next(_sport)
    out = []
    for h in pv.hops:
        if not h.reached:
            continue
        verdict = "would-deny" if h.monitored else VERDICT.get(h.verdict, "denied")
        if h.rule is not None:
            rid, rt, pol, rn, cat = h.rule.id, h.rule.tenant, h.rule.policy, h.rule.rule, h.rule.category
        else:
            rid, rt, pol, rn, cat = 0, h.tenant, DEFAULT_POLICY, h.would or h.verdict, DEFAULT_CATEGORY
        out.append(
            FlowRecord(
                start=now,
                end=now,
                host=h.host,
                hop=h.direction,
                ifname=h.ifname,
                workload=h.workload,
                verdict=verdict,  # type: ignore[arg-type]
                rule_id=rid,
                rule_tenant=rt,
                policy=pol,
                rule=rn,
                category=cat,
                revision=states[h.host].revision,
                proto=proto,
                src=pv.packet.src,
                dst=pv.packet.dst,
                sport=sport,
                dport=port or 0,
                packets=1 if verdict != "allowed" else 4,
                bytes=60 if verdict != "allowed" else 400,
            )
        )
    return out


def post_records(url: str, agent_tokens: dict[str, str], records: list[FlowRecord], **kw: Any) -> None:
    """POST each host's records with that host's agent token (202 expected)."""
    by_host: dict[str, list[FlowRecord]] = {}
    for r in records:
        by_host.setdefault(r.host, []).append(r)
    for host, recs in by_host.items():
        resp = httpx.post(
            f"{url}/v1/hosts/{host}/flows",
            json=FlowBatch(host, tuple(recs)).to_json(),
            headers={"Authorization": f"Bearer {agent_tokens[host]}"},
            timeout=10,
            **kw,
        )
        assert resp.status_code == 202, resp.text
