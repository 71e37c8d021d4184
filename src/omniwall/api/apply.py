"""`POST /v1/apply`: a multi-document YAML or JSON body, all or nothing in one store txn.

`?dryRun=true` writes nothing and answers what would change: each object's action and YAML diff, and the
impact on the data plane (hosts and vNICs touched, rules and set elements added/changed/removed).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from omniwall.manager.contracts import load_documents
from omniwall.manager.objects import resource_key, split_key

from .auth import Principal, authenticate, check_created_identity, check_write, manager_of, scope_document
from .errors import ApiError

MAX_BODY = 16 * 1024 * 1024


def router() -> APIRouter:
    r = APIRouter(tags=["apply"])

    @r.post(
        "/v1/apply",
        summary="create or update many objects at once (all or nothing); dryRun=true shows diff and impact",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/yaml": {"schema": {"type": "string"}},
                    "application/json": {"schema": {}},
                },
            }
        },
    )
    async def apply(
        request: Request,
        dryRun: bool = Query(False, description="validate and report, write nothing"),
        p: Principal = Depends(authenticate),
    ) -> dict[str, Any]:
        body = await request.body()
        if len(body) > MAX_BODY:
            raise ApiError(413, f"body larger than {MAX_BODY} bytes")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "body is not UTF-8 text") from None
        source = request.headers.get("x-omniwall-source", "request")
        return await run_in_threadpool(_apply, request, p, text, source, dryRun)

    return r


def _apply(request: Request, p: Principal, text: str, source: str, dry_run: bool) -> dict[str, Any]:
    m = manager_of(request)
    docs = [scope_document(p, d) for d in load_documents(text, source)]
    for d in docs:
        kind, tenant, name = split_key(resource_key(d))
        check_write(p, kind, tenant, name, d)
    plan = m.plan_apply(docs, mode="apply")
    check_created_identity(p, plan)
    out: dict[str, Any] = {"dryRun": dry_run, "changes": m.object_diffs(plan)}
    if dry_run:
        out["revision"] = plan.base_revision
        out["impact"] = m.impact(plan, tenant=p.tenant if p.tenant_scoped else None)
        return out
    out["revision"] = m.commit(plan, p.actor)
    for c in out["changes"]:
        c.pop("diff", None)
    return out
