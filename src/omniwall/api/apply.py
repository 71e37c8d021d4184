"""`POST /v1/apply`: a multi-document YAML or JSON body, all or nothing in one store txn.

`?dryRun=true` writes nothing and answers what would change: each object's action and YAML diff, and the
impact on the data plane (hosts and vNICs touched, rules and set elements added/changed/removed).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from omniwall.manager.attributes import settle_posture, with_posture_records
from omniwall.manager.contracts import load_documents
from omniwall.manager.objects import resource_key, split_key

from .auth import (
    Principal,
    authenticate,
    check_created_identity,
    check_platform_attributes,
    check_write,
    manager_of,
    scope_document,
)
from .errors import ApiError
from .impact import impact, tenant_impact
from .limits import check_plan_quotas, may_seed_posture
from .schemas import ApplyResult, error_responses

# Media types of a body `load_documents` reads (YAML is a superset of JSON). No Content-Type at all is
# taken as YAML (older clients); anything else is 415 rather than a guess.
APPLY_MEDIA_TYPES = frozenset(
    {"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", "application/json"}
)


def check_media_type(request: Request) -> None:
    ctype = request.headers.get("content-type")
    if ctype is None:
        return
    media = ctype.split(";", 1)[0].strip().lower()
    if media not in APPLY_MEDIA_TYPES:
        raise ApiError(
            415,
            f"unsupported Content-Type {media!r}",
            errors=[
                {
                    "document": "request",
                    "path": "header.content-type",
                    "reason": f"use one of {', '.join(sorted(APPLY_MEDIA_TYPES))}",
                }
            ],
        )


def router() -> APIRouter:
    r = APIRouter(tags=["apply"])

    @r.post(
        "/v1/apply",
        summary="create or update many objects at once (all or nothing); dryRun=true shows diff and impact",
        responses={200: {"model": ApplyResult}, **error_responses(400, 401, 403, 404, 409, 413, 415, 422)},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/yaml": {"schema": {"type": "string"}},
                    "application/json": {"schema": {"type": ["object", "array"]}},
                },
            }
        },
    )
    async def apply(
        request: Request,
        dryRun: bool = Query(False, description="validate and report, write nothing"),
        p: Principal = Depends(authenticate),
    ) -> dict[str, Any]:
        check_media_type(request)
        body = await request.body()  # bounded by limits.BodyLimit (413 while streaming)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(
                400,
                "body is not UTF-8 text",
                errors=[{"document": "request", "path": "body", "reason": "not UTF-8"}],
            ) from None
        # names the documents in errors: printable and short (it is echoed back)
        source = request.headers.get("x-omniwall-source", "")
        source = "".join(ch for ch in source[:200] if ch.isprintable()) or "request"
        return await run_in_threadpool(_apply, request, p, text, source, dryRun)

    return r


def _apply(request: Request, p: Principal, text: str, source: str, dry_run: bool) -> dict[str, Any]:
    m = manager_of(request)
    docs = [scope_document(p, d) for d in load_documents(text, source)]
    for d in docs:
        kind, tenant, name = split_key(resource_key(d))
        check_write(p, kind, tenant, name, d)
    docs = settle_posture(m, docs, may_seed=may_seed_posture(p))
    plan = m.plan_apply(docs, mode="apply")
    check_created_identity(p, plan)
    check_platform_attributes(p, plan)
    check_plan_quotas(request, m, plan)
    out: dict[str, Any] = {"dryRun": dry_run, "changes": m.object_diffs(plan)}
    if dry_run:
        out["revision"] = plan.base_revision
        if p.tenant_scoped and p.tenant is not None:
            out["impact"] = tenant_impact(m, plan, p.tenant)
        else:
            out["impact"] = impact(m, plan)
        return out
    out["revision"] = m.commit(with_posture_records(m, plan), p.actor)
    for c in out["changes"]:
        c.pop("diff", None)
    return out
