"""Counters of a policy's rules, summed over every host's last report (GET .../policies/{name}/stats)."""

from __future__ import annotations

from typing import Any

from omniwall.model.catalog import Catalog

from .desired import DesiredStates
from .hosts import HostStatusBook


def policy_stats(
    catalog: Catalog, desired: DesiredStates, hosts: HostStatusBook, tenant: str, name: str
) -> dict[str, Any]:
    pol = catalog.policies.get((tenant, name))
    ids: dict[int, str] = {}
    for st in desired.all().values():
        for r in st.rules:
            if r.tenant == tenant and r.policy == name:
                ids[r.id] = r.rule
    totals: dict[int, list[int]] = {rid: [0, 0, 0] for rid in ids}
    for _host, counters in hosts.counters().items():
        for rid, (packets, nbytes) in counters.items():
            if rid in totals:
                totals[rid][0] += packets
                totals[rid][1] += nbytes
                totals[rid][2] += 1
    by_rule = {ids[rid]: (rid, t) for rid, t in totals.items()}
    rule_names = [r.name for r in pol.spec.rules] if pol is not None else sorted(by_rule)  # type: ignore[attr-defined]
    rules = []
    for rn in rule_names:
        rid, t = by_rule.get(rn, (None, [0, 0, 0]))
        rules.append({"rule": rn, "ruleId": rid, "packets": t[0], "bytes": t[1], "hosts": t[2]})
    return {
        "tenant": tenant,
        "policy": name,
        "rules": rules,
        "packets": sum(r["packets"] for r in rules),
        "bytes": sum(r["bytes"] for r in rules),
    }


__all__ = ["policy_stats"]
