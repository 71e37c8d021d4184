"""Auditor views over the live model: a group's effective members, and where a policy's rules are realized.

- `group_members(catalog, tenant, name)`: the group's workloads (with why each is a member: selector,
  static list, or a nested group) and addresses, and its CIDRs — docs/semantics.md §2, evaluated over the
  catalog on demand (the compiler's incremental index lives behind the manager's sync lock; this view
  re-derives the same answer, and a unit test holds the two equal).
- `policy_realization(manager, tenant, name)`: per rule, its id, the hosts and vNICs (direction) where
  the current desired states install it, whether each host's agent has realized that host's desired
  revision, and the hit counters each host last reported.

Both return plain JSON-ready dicts; `scope` (a tenant, or None for everything) hides what a tenant may
not see: other tenants' workloads and vNICs, and host names (Hosts do not exist for a tenant).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from omniwall import PROVIDER_TENANT
from omniwall.compiler.sets import split_literal
from omniwall.model.catalog import Catalog, split_ref
from omniwall.selectors import facts_of, parse

if TYPE_CHECKING:
    from .service import Manager

Key = tuple[str, str]


def _ip_key(ip: str) -> tuple[int, int]:
    a = ipaddress.ip_address(ip)
    return a.version, int(a)


def _net_key(net: str) -> tuple[int, int, int]:
    n = ipaddress.ip_network(net, strict=False)
    return n.version, int(n.network_address), n.prefixlen


def _members(catalog: Catalog, key: Key, path: tuple[Key, ...]) -> tuple[dict[Key, set[str]], set[str]]:
    """(workload -> reasons, literals) of group `key`; `path` breaks (invalid) nesting cycles."""
    g = catalog.groups.get(key)
    if g is None:
        return {}, set()
    tenant = key[0]
    why: dict[Key, set[str]] = {}
    if g.spec.selector is not None:
        sel = parse(g.spec.selector)
        for wk, w in catalog.workloads.items():
            if (tenant == PROVIDER_TENANT or wk[0] == tenant) and sel.matches(
                facts_of(w.metadata.labels, w.spec.attributes)
            ):
                why.setdefault(wk, set()).add("selector")
    for name in g.spec.workloads:
        if (tenant, name) in catalog.workloads:
            why.setdefault((tenant, name), set()).add("static")
    lits = set(g.spec.cidrs)
    for ref in g.spec.groups:
        nk = split_ref(ref, tenant)
        if nk in path or nk not in catalog.groups or not catalog.group_visible(tenant, nk):
            continue
        sub, sub_lits = _members(catalog, nk, (*path, nk))
        for wk in sub:
            why.setdefault(wk, set()).add(f"group {nk[0]}/{nk[1]}")
        lits |= sub_lits
    return why, lits


def group_members(catalog: Catalog, tenant: str, name: str, *, scope: str | None = None) -> dict[str, Any]:
    """Effective members of group tenant/name. `scope`: only that tenant's workloads (and no host names)."""
    why, lits = _members(catalog, (tenant, name), ((tenant, name),))
    workloads = []
    addresses: set[str] = set()
    hidden = 0
    for wk in sorted(why):
        if scope is not None and wk[0] != scope:
            hidden += 1
            continue
        w = catalog.workloads[wk]
        ips = [ip for v in w.spec.vnics for ip in v.ips]
        addresses.update(ips)
        workloads.append(
            {
                "workload": f"{wk[0]}/{wk[1]}",
                "tenant": wk[0],
                "name": wk[1],
                "host": None if scope is not None else w.spec.host,
                "addresses": ips,
                "via": sorted(why[wk]),
            }
        )
    cidrs = []
    for lit in sorted(lits, key=_net_key):
        host_addr, net = split_literal(lit)
        if host_addr is not None:
            addresses.add(host_addr)
        cidrs.append(net or str(ipaddress.ip_network(lit, strict=False)))
    out: dict[str, Any] = {
        "tenant": tenant,
        "group": name,
        "workloads": workloads,
        "cidrs": cidrs,
        "addresses": sorted(addresses, key=_ip_key),
    }
    if scope is not None:
        out["hiddenWorkloads"] = hidden  # members of other tenants (a shared provider group's selector)
    return out


def policy_realization(m: Manager, tenant: str, name: str, *, scope: str | None = None) -> dict[str, Any]:
    """Where each rule of policy tenant/name is installed and realized, with its hits per host."""
    pol = m.catalog.policies.get((tenant, name))
    states = m.desired.all()
    counters = m.hosts.counters()
    # rule name -> host -> {"ids": set, "vnics": {ifname: (workload, tenant, {directions})}}
    placed: dict[str, dict[str, dict[str, Any]]] = {}
    for host, st in sorted(states.items()):
        mine = {r.id: r for r in st.rules if r.tenant == tenant and r.policy == name}
        if not mine:
            continue
        for v in st.vnics:
            if scope is not None and v.tenant != scope:
                continue
            for direction, ids in (("egress", v.egress), ("ingress", v.ingress)):
                for rid in ids:
                    r = mine.get(rid)
                    if r is None:
                        continue
                    at = placed.setdefault(r.rule, {}).setdefault(host, {"ids": set(), "vnics": {}})
                    at["ids"].add(rid)
                    at["vnics"].setdefault(v.ifname, (v.workload, set()))[1].add(direction)
    rule_names = [r.name for r in pol.spec.rules] if pol is not None else sorted(placed)
    spec_rules = {r.name: r for r in pol.spec.rules} if pol is not None else {}
    rules = []
    for rn in rule_names:
        hosts = []
        ids: set[int] = set()
        for host, at in sorted(placed.get(rn, {}).items()):
            status = m.hosts.get(host)
            desired = states[host].revision
            hits = [counters.get(host, {}).get(rid, (0, 0)) for rid in sorted(at["ids"])]
            ids |= at["ids"]
            hosts.append(
                {
                    "host": None if scope is not None else host,
                    "desiredRevision": desired,
                    "realizedRevision": status.realized_revision,
                    "realized": status.realized_revision >= desired and status.last_error is None,
                    "connected": status.connected > 0,
                    "packets": sum(p for p, _ in hits),
                    "bytes": sum(b for _, b in hits),
                    "vnics": [
                        {"ifname": ifn, "workload": wl, "directions": sorted(dirs)}
                        for ifn, (wl, dirs) in sorted(at["vnics"].items())
                    ],
                }
            )
        spec = spec_rules.get(rn)
        rules.append(
            {
                "rule": rn,
                "ruleId": min(ids) if ids else None,
                "action": spec.action.value if spec is not None else None,
                "disabled": bool(spec.disabled) if spec is not None else False,
                "installed": bool(hosts),
                "realized": bool(hosts) and all(h["realized"] for h in hosts),
                "packets": sum(h["packets"] for h in hosts),
                "bytes": sum(h["bytes"] for h in hosts),
                "hosts": hosts,
            }
        )
    return {
        "tenant": tenant,
        "policy": name,
        "revision": m.revision,
        "category": pol.spec.category.value if pol is not None else None,
        "priority": pol.spec.priority if pol is not None else None,
        "realized": all(r["realized"] for r in rules if r["installed"]),
        "rules": rules,
    }


__all__ = ["group_members", "policy_realization"]
