"""The dry run's data-plane impact: which hosts and vNICs a plan changes, how many rules and set elements
are added, changed and removed, from the compiler's deltas (`Manager.preview`: the plan's writes applied
to the manager's incremental compiler and taken back, no full compile per dry run).

Two views, one shape `{"hosts": [...], "totals": {...}}`:
- `impact(m, plan)`: every vNIC, rule and set element (the provider's view);
- `tenant_impact(m, plan, tenant)`: only the tenant's own vNICs, the rules installed at them and the
  address sets those rules read (a tenant's dry run used to count every tenant's rules and set elements
  on the hosts it touched, which told it how busy its neighbours were). A host is listed only when one
  of the tenant's vNICs there changes (a tenant names its workloads' hosts itself, in `spec.host`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from omniwall.compiler.ir import HostDelta, HostDesiredState, apply_delta, diff
from omniwall.manager.contracts import describe
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


def impact(m: Manager, plan: Plan) -> dict[str, Any]:
    if not plan.writes:
        return {"hosts": [], "totals": _totals([])}
    try:
        changes = m.preview(plan)
    except Exception as err:
        return {"error": describe(err), "hosts": [], "totals": _totals([])}
    hosts = [_host_report(old, d) for old, d in changes]
    return {"hosts": hosts, "totals": _totals(hosts)}


def tenant_impact(m: Manager, plan: Plan, tenant: str) -> dict[str, Any]:
    if not plan.writes:
        return {"hosts": [], "totals": _totals([])}
    try:
        changes = m.preview(plan)
    except Exception:  # the commit would report it; say nothing about other tenants' objects
        return {"error": "the change does not compile", "hosts": [], "totals": _totals([])}
    hosts = []
    for old, d in changes:
        # only hosts the plan changes are looked at; there, the tenant's part before and after
        new = apply_delta(old, replace(d, from_revision=old.revision, to_revision=old.revision + 1))
        before = tenant_view(old, tenant)
        td = diff(before, tenant_view(new, tenant))
        if td.empty:  # also every host without a vNIC of the tenant: both views are empty
            continue
        hosts.append(_host_report(before, td))
    return {"hosts": hosts, "totals": _totals(hosts)}


def _host_report(old: HostDesiredState, d: HostDelta) -> dict[str, Any]:
    vnics = sorted({u.vnic.ifname for u in d.vnic_updates} | {r.ifname for r in d.vnic_removes})
    # what a person recognises: `tenant/name (ifname)` (a removed vNIC is named from the old state)
    owner = {v.ifname: v.workload for v in old.vnics}
    owner.update((u.vnic.ifname, u.vnic.workload) for u in d.vnic_updates)
    old_rules, old_sets = old.rule_map(), old.set_map()
    return {
        "host": d.host,
        "vnics": vnics,
        "workloads": [f"{owner[i]} ({i})" if owner.get(i) else i for i in vnics],
        "rulesAdded": sum(1 for u in d.rule_updates if u.rule.id not in old_rules),
        "rulesChanged": sum(1 for u in d.rule_updates if u.rule.id in old_rules),
        "rulesRemoved": len(d.rule_removes),
        "setElementsAdded": sum(len(u.added_addresses) + len(u.added_cidrs) for u in d.set_updates),
        "setElementsRemoved": sum(len(u.removed_addresses) + len(u.removed_cidrs) for u in d.set_updates)
        + sum(len(old_sets[r.name].addresses) + len(old_sets[r.name].cidrs) for r in d.set_removes),
    }


def _totals(hosts: list[dict[str, Any]]) -> dict[str, int]:
    out = {k: sum(h[k] for h in hosts) for k in COUNTS}
    out["hosts"] = len(hosts)
    out["vnics"] = sum(len(h["vnics"]) for h in hosts)
    return out
