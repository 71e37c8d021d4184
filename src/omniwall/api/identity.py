"""Identity events and posture reports: workload attributes set by outside sources (docs/identity-posture.md).

    POST /v1/identity/events   {"workload", "tenant"?, "user", "action": "login"|"logout"}   identity.write
    POST /v1/posture/reports   {"workload", "tenant"?, "av.status", ...}                      posture.write

Each call is one audited txn on one Workload (manager/attributes.py); the reply names the workload,
whether anything changed, the store revision that holds the result and the attributes afterwards.
The body is checked by hand rather than by a pydantic model so a 422 names the offending field plainly
(`action`, `av.status`) in the API's one error shape.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from omniwall.manager import attributes
from omniwall.manager.contracts import InvalidResources, Problem

from .auth import Perm, Principal, authenticate, manager_of, require
from .limits import read_json
from .schemas import error_responses

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


class IdentityEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workload: str = Field(description="`tenant/name`, or a name unique across tenants")
    tenant: str | None = None
    user: str
    action: Literal["login", "logout"]


class PostureReport(BaseModel):
    """`workload` (+ `tenant`), then posture attributes: `av.status`, `edr.state`, ... (null removes)."""

    model_config = ConfigDict(extra="allow")

    workload: str
    tenant: str | None = None


class AttributeResult(BaseModel):
    workload: str
    changed: bool
    revision: int
    attributes: dict[str, Any]


def _body(example: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema, "example": example}},
        }
    }


def _identity(request: Request, p: Principal, body: dict[str, Any]) -> dict[str, Any]:
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


def _posture(request: Request, p: Principal, body: dict[str, Any]) -> dict[str, Any]:
    workload = _string(body, "workload")
    tenant = _string(body, "tenant", required=False)
    facts = {k: v for k, v in body.items() if k not in ADDRESS_FIELDS}
    assert workload is not None
    out = attributes.posture_report(manager_of(request), p.actor, workload, facts, tenant)
    return out.to_json()


def router() -> APIRouter:
    r = APIRouter(tags=["Identity and posture"])

    @r.post(
        "/v1/identity/events",
        summary="a user logged in to or out of a workload",
        responses={200: {"model": AttributeResult}, **error_responses(400, 401, 403, 404, 409, 413, 422)},
        openapi_extra=_body({"workload": "corp/vdi-7", "user": "alice", "action": "login"}, IdentityEvent),
    )
    async def identity_event(request: Request, p: Principal = Depends(authenticate)) -> dict[str, Any]:
        require(p, Perm.IDENTITY_WRITE)
        body = _object(await read_json(request))  # bounded size and nesting, before any parsing
        return await run_in_threadpool(_identity, request, p, body)

    @r.post(
        "/v1/posture/reports",
        summary="a scanner's posture facts about a workload",
        responses={200: {"model": AttributeResult}, **error_responses(400, 401, 403, 404, 409, 413, 422)},
        openapi_extra=_body({"workload": "corp/vdi-7", "av.status": "infected"}, PostureReport),
    )
    async def posture_report(request: Request, p: Principal = Depends(authenticate)) -> dict[str, Any]:
        require(p, Perm.POSTURE_WRITE)
        body = _object(await read_json(request))
        return await run_in_threadpool(_posture, request, p, body)

    return r


__all__ = ["router"]
