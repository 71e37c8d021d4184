"""Identity events and posture reports: workload attributes set by outside sources (docs/identity-posture.md).

    POST /v1/identity/events   {"workload", "tenant"?, "user", "action": "login"|"logout"}   identity.write
    POST /v1/posture/reports   {"workload", "tenant"?, "av.status", ...}                      posture.write

Each call is one audited txn on one Workload (manager/attributes.py); the reply names the workload,
whether anything changed, the store revision that holds the result and the attributes afterwards.
The body is checked by hand rather than by a pydantic model so a 422 names the offending field plainly
(`action`, `av.status`) in the API's one error shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request

from omniwall.manager import attributes
from omniwall.manager.contracts import InvalidResources, Problem

from .auth import Perm, Principal, authenticate, manager_of, require

IDENTITY_FIELDS = ("workload", "tenant", "user", "action")
ADDRESS_FIELDS = ("workload", "tenant")


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidResources([Problem("request body", ".", "must be a JSON object")])
    return body


def _string(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    v = body.get(name)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v.strip():
        what = "required: a non-empty string" if required else "must be a non-empty string when given"
        raise InvalidResources([Problem("request body", name, what)])
    return v


def router() -> APIRouter:
    r = APIRouter(tags=["Identity and posture"])

    @r.post("/v1/identity/events", summary="a user logged in to or out of a workload")
    def identity_event(
        request: Request,
        body: Any = Body(..., examples=[{"workload": "corp/vdi-7", "user": "alice", "action": "login"}]),
        p: Principal = Depends(authenticate),
    ) -> dict[str, Any]:
        require(p, Perm.IDENTITY_WRITE)
        body = _object(body)
        unknown = sorted(set(body) - set(IDENTITY_FIELDS))
        if unknown:
            raise InvalidResources(
                [
                    Problem("request body", k, f"unknown field (fields: {', '.join(IDENTITY_FIELDS)})")
                    for k in unknown
                ]
            )
        workload = _string(body, "workload")
        tenant = _string(body, "tenant", required=False)
        user = attributes.check_user(body.get("user"))
        action = body.get("action")
        if action not in ("login", "logout"):
            raise InvalidResources([Problem("request body", "action", "must be 'login' or 'logout'")])
        assert workload is not None
        out = attributes.identity_event(manager_of(request), p.actor, workload, user, action, tenant)
        return out.to_json()

    @r.post("/v1/posture/reports", summary="a scanner's posture facts about a workload")
    def posture_report(
        request: Request,
        body: Any = Body(..., examples=[{"workload": "corp/vdi-7", "av.status": "infected"}]),
        p: Principal = Depends(authenticate),
    ) -> dict[str, Any]:
        require(p, Perm.POSTURE_WRITE)
        body = _object(body)
        workload = _string(body, "workload")
        tenant = _string(body, "tenant", required=False)
        facts = {k: v for k, v in body.items() if k not in ADDRESS_FIELDS}
        assert workload is not None
        out = attributes.posture_report(manager_of(request), p.actor, workload, facts, tenant)
        return out.to_json()

    return r


__all__ = ["router"]
