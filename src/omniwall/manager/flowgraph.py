"""The traffic graph over flow records (GET /v1/flows/graph): nodes and edges with counts per verdict.

Input: rows aggregated by the store over (src, src_workload, src_tenant, dst, dst_workload, dst_tenant,
verdict) with their summed counts. `by="workload"`: each end is its workload, or its address when it has
none or the reader (`scope`, a tenant) may not see it. `by="group"`: each end is every group it is a
current member of among those the reader sees (manager/insight.py's membership, evaluated now), else as
by workload. Pure: the catalog comes in, JSON-ready dicts go out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from omniwall.model.catalog import Catalog

from . import insight


def build_graph(rows: list[tuple[Any, ...]], by: str, scope: str | None, catalog: Catalog) -> dict[str, Any]:
    """Aggregated (src, src_workload, src_tenant, dst, dst_workload, dst_tenant, verdict, count) rows ->
    nodes and edges. A workload the reader may not see is its address; by group, an end in no group the
    reader sees is its workload (or address)."""
    groups = _group_index(catalog, scope) if by == "group" else None
    nodes: dict[str, dict[str, str]] = {}
    edges: dict[tuple[str, str], dict[str, int]] = {}

    def ends(addr: str, wl: str | None, tenant: str | None) -> list[str]:
        visible_wl = wl if wl is not None and (scope is None or tenant == scope) else None
        if groups is not None:
            ids = groups(addr, visible_wl)
            if ids:
                for gid in ids:
                    nodes.setdefault(gid, {"id": gid, "kind": "group", "name": gid.split(":", 1)[1]})
                return ids
        if visible_wl is not None:
            nid = f"workload:{visible_wl}"
            nodes.setdefault(nid, {"id": nid, "kind": "workload", "name": visible_wl})
        else:
            nid = f"address:{addr}"
            nodes.setdefault(nid, {"id": nid, "kind": "address", "name": addr})
        return [nid]

    for src, swl, st, dst, dwl, dt, verdict, count in rows:
        for s in ends(src, swl, st):
            for d in ends(dst, dwl, dt):
                e = edges.setdefault((s, d), {})
                e[verdict] = e.get(verdict, 0) + int(count)
    return {
        "nodes": sorted(nodes.values(), key=lambda n: n["id"]),
        "edges": [
            {"source": s, "target": d, "verdicts": v, "total": sum(v.values())}
            for (s, d), v in sorted(edges.items())
        ],
    }


def _group_index(catalog: Catalog, scope: str | None) -> Callable[[str, str | None], list[str]]:
    """(address, visible workload) -> ids of the groups (visible to the reader) it is a member of."""
    by_wl: dict[str, list[str]] = {}
    by_addr: dict[str, list[str]] = {}
    nets: list[tuple[Any, str]] = []
    for t, n in sorted(catalog.groups):
        if scope is not None and not catalog.group_visible(scope, (t, n)):
            continue
        gid = f"group:{t}/{n}"
        members = insight.group_members(catalog, t, n)
        for w in members["workloads"]:
            by_wl.setdefault(w["workload"], []).append(gid)
        for a in members["addresses"]:
            by_addr.setdefault(a, []).append(gid)
        for c in members["cidrs"]:
            nets.append((ipaddress.ip_network(c), gid))
    cache: dict[tuple[str, str | None], list[str]] = {}

    def lookup(addr: str, wl: str | None) -> list[str]:
        key = (addr, wl)
        hit = cache.get(key)
        if hit is None:
            ids = set(by_wl.get(wl, ())) if wl else set()
            ids.update(by_addr.get(addr, ()))
            try:
                ip = ipaddress.ip_address(addr)
                ids.update(g for net, g in nets if ip.version == net.version and ip in net)
            except ValueError:
                pass
            hit = cache[key] = sorted(ids)
        return hit

    return lookup


__all__ = ["build_graph"]
