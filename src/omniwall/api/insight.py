"""Auditor views: who is in a group right now, and where a policy's rules are realized.

    GET /v1/groups/{name}/members?tenant=        effective members: workloads (and why) and addresses
    GET /v1/policies/{name}/realization?tenant=  per rule: id, hosts and vNICs, realized?, hits

`resources.read`. The object must be visible to the caller (404 otherwise, like a plain GET); a tenant
sees only its own workloads and vNICs in the answer, and no host names. Logic: manager/insight.py.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from omniwall.manager import insight

from .auth import Principal, authenticate, check_visible, manager_of, read_tenant


def _scope(p: Principal) -> str | None:
    return p.tenant if p.tenant_scoped else None


def router() -> APIRouter:
    r = APIRouter(tags=["Insight"])

    @r.get("/v1/groups/{name}/members", summary="a group's effective members: workloads and addresses")
    def members(
        request: Request, name: str, tenant: str | None = Query(None), p: Principal = Depends(authenticate)
    ) -> dict[str, Any]:
        m = manager_of(request)
        catalog, revision = m.snapshot_catalog()
        t = read_tenant(p, tenant)
        check_visible(p, catalog.groups.get((t, name)), catalog, f"Group/{t}/{name}")
        return {"revision": revision, **insight.group_members(catalog, t, name, scope=_scope(p))}

    @r.get(
        "/v1/policies/{name}/realization",
        summary="per rule: where it is installed, whether each host realized it, hit counters",
    )
    def realization(
        request: Request, name: str, tenant: str | None = Query(None), p: Principal = Depends(authenticate)
    ) -> dict[str, Any]:
        m = manager_of(request)
        t = read_tenant(p, tenant)
        check_visible(p, m.get("Policy", t, name), m.catalog, f"Policy/{t}/{name}")
        return insight.policy_realization(m, t, name, scope=_scope(p))

    return r


__all__ = ["router"]
