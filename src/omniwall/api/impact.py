"""The dry-run impact as one tenant may see it: only its own vNICs, the rules installed at them and the
address sets those rules read (a tenant's dry run used to count every tenant's rules and set elements on
the hosts it touched, which told it how busy its neighbours were).

Same shape as `Manager.impact`: `{"hosts": [...], "totals": {...}}`; a host is listed only when one of the
tenant's vNICs there changes (a tenant names its workloads' hosts itself, in `spec.host`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from omniwall.compiler.build import compile_catalog
from omniwall.compiler.ir import HostDesiredState, diff, empty_state
from omniwall.manager.service import Manager, Plan

COUNTS = ("rulesAdded", "rulesChanged", "rulesRemoved", "setElementsAdded", "setElementsRemoved")


def tenant_view(state: HostDesiredState, tenant: str) -> HostDesiredState:
    """The part of a host's desired state a tenant's vNICs use."""
    vnics = tuple(v for v in state.vnics if v.tenant == tenant)
    ids = {i for v in vnics for i in (*v.egress, *v.ingress)}
    rules = tuple(r for r in state.rules if r.id in ids)
    names = {n for r in rules for n in (r.src_set, r.dst_set) if n is not None}
    sets = tuple(s for s in state.sets if s.name in names)
    return replace(state, vnics=vnics, rules=rules, sets=sets)


def tenant_impact(m: Manager, plan: Plan, tenant: str) -> dict[str, Any]:
    if not plan.writes:
        return {"hosts": [], "totals": _totals([])}
    try:
        after = compile_catalog(plan.catalog, revision=plan.base_revision + 1)
    except Exception:  # the commit would report it; say nothing about other tenants' objects
        return {"error": "the change does not compile", "hosts": [], "totals": _totals([])}
    current = m.desired.all()
    hosts = []
    for host in sorted(set(after) | set(current)):
        old = tenant_view(current.get(host) or empty_state(host, 0), tenant)
        new = tenant_view(after.get(host) or empty_state(host, 0), tenant)
        new = replace(new, revision=old.revision + 1)
        d = diff(old, new)
        vnics = sorted({u.vnic.ifname for u in d.vnic_updates} | {r.ifname for r in d.vnic_removes})
        # what a person recognises: `tenant/name (ifname)` (a removed vNIC is named from the old state)
        owner = {v.ifname: v.workload for v in (*old.vnics, *new.vnics)}
        workloads = [f"{owner[i]} ({i})" if owner.get(i) else i for i in vnics]
        if d.empty:  # also every host without a vNIC of the tenant: both views are empty
            continue
        old_rules, old_sets = old.rule_map(), old.set_map()
        hosts.append(
            {
                "host": host,
                "vnics": vnics,
                "workloads": workloads,
                "rulesAdded": sum(1 for u in d.rule_updates if u.rule.id not in old_rules),
                "rulesChanged": sum(1 for u in d.rule_updates if u.rule.id in old_rules),
                "rulesRemoved": len(d.rule_removes),
                "setElementsAdded": sum(len(u.added_addresses) + len(u.added_cidrs) for u in d.set_updates),
                "setElementsRemoved": sum(
                    len(u.removed_addresses) + len(u.removed_cidrs) for u in d.set_updates
                )
                + sum(len(old_sets[r.name].addresses) + len(old_sets[r.name].cidrs) for r in d.set_removes),
            }
        )
    return {"hosts": hosts, "totals": _totals(hosts)}


def _totals(hosts: list[dict[str, Any]]) -> dict[str, int]:
    out = {k: sum(h[k] for h in hosts) for k in COUNTS}
    out["hosts"] = len(hosts)
    out["vnics"] = sum(len(h["vnics"]) for h in hosts)
    return out
