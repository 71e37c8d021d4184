"""REST v1 for every resource kind: list, create, get, update, delete, history, rollback.

Routes are generated per kind (`/v1/workloads`, `/v1/policies/{name}`, ...) so the OpenAPI document names
each one. Objects are addressed by name plus `?tenant=` (default: the caller's tenant, else `infra`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pydantic
from fastapi import APIRouter, Body, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from omniwall.manager.attributes import settle_posture, with_posture_records
from omniwall.manager.contracts import InvalidResources, Problem, problems_from_pydantic
from omniwall.manager.objects import PLURALS, RES_PREFIX, key_of, parse_resource, resource_key, with_metadata
from omniwall.manager.service import Manager
from omniwall.model.resources import _Resource
from omniwall.store import FutureRevisionError

from .auth import (
    Perm,
    Principal,
    authenticate,
    check_created_identity,
    check_platform_attributes,
    check_visible,
    check_write,
    manager_of,
    owns_key,
    read_tenant,
    require,
    scope_document,
    visible,
)
from .errors import ApiError, not_found
from .filters import decode_continue, encode_continue, field_selector, label_selector
from .limits import check_plan_quotas, may_seed_posture, read_json
from .schemas import DeleteResult, History, ObjectList, RollbackRequest, RollbackResult
from .schemas import error_responses as err

MAX_LIMIT = 1000


def render(m: Manager, r: _Resource) -> dict[str, Any]:
    """An object as the API shows it: the resource, plus `status` for Hosts (and migrated Workloads)."""
    d = r.model_dump(mode="json", exclude_none=True)
    if r.kind == "Host":  # type: ignore[attr-defined]
        d["status"] = m.host_status(r.metadata.name)
    elif r.kind == "Workload":  # type: ignore[attr-defined]
        mig = m.migrations.status_of(r.metadata.tenant, r.metadata.name)
        if mig is not None:
            d["status"] = {"migration": mig}
    return d


def parse_body(body: Any, kind: str, name: str | None = None) -> _Resource:
    if not isinstance(body, dict):
        raise InvalidResources([Problem("request body", ".", "must be a JSON object (one resource)")])
    body = dict(body)
    body.pop("status", None)  # server-managed (Host status, Workload migration): ignored on write
    body.setdefault("kind", kind)
    md = body.get("metadata")
    shown = md.get("name") if isinstance(md, dict) and isinstance(md.get("name"), str) else None
    doc = f"{str(body.get('kind'))[:40]}/{(shown or name or '?')[:80]}"
    if body.get("kind") != kind:
        raise InvalidResources(
            [Problem(doc, "kind", f"this endpoint takes {kind} objects, not {body.get('kind')!r}")]
        )
    try:
        r = parse_resource(body)
    except pydantic.ValidationError as err:
        raise InvalidResources(problems_from_pydantic(err, doc)) from err
    if name is not None and r.metadata.name != name:
        raise InvalidResources([Problem(doc, "metadata.name", f"must equal the name in the URL ({name!r})")])
    return r


CONSISTENT = (
    "read the store's current revision first (a linearizable read, one store round trip more); without "
    "it the answer is this manager's model, which follows other managers' writes within a watch round trip"
)


def _routes_for(router: APIRouter, plural: str, kind: str) -> None:
    tag = [kind]

    def list_objects(
        request: Request,
        p: Principal = Depends(authenticate),
        tenant: str | None = Query(None, description="only this tenant's objects"),
        labelSelector: str | None = Query(None, description="e.g. tier=web,env in (prod,stage)"),
        fieldSelector: str | None = Query(None, description="e.g. spec.host=h1,metadata.name!=x"),
        limit: int = Query(MAX_LIMIT, ge=1, le=MAX_LIMIT),
        continue_: str | None = Query(None, alias="continue"),
        consistent: bool = Query(False, description=CONSISTENT),
    ) -> dict[str, Any]:
        require(p, Perm.READ)
        m = manager_of(request)
        if consistent:
            m.sync()  # a linearizable read: the model catches up with the store's current revision
        lsel, fsel = label_selector(labelSelector), field_selector(fieldSelector)
        after = decode_continue(continue_, f"{RES_PREFIX}{kind}/")
        items: list[dict[str, Any]] = []
        next_token = None
        listed, rev = m.model.list_at(kind)  # the objects and the revision they are, taken together
        for r in listed:
            key = resource_key(r)
            if after is not None and key <= after:
                continue
            if tenant is not None and r.metadata.tenant != tenant and kind not in ("Tenant",):
                continue
            if kind == "Tenant" and tenant is not None and r.metadata.name != tenant:
                continue
            if not visible(p, r, m.catalog):
                continue
            d = render(m, r)
            if not (lsel(d) and fsel(d)):
                continue
            if len(items) == limit:
                next_token = encode_continue(resource_key_of(items[-1], kind))
                break
            items.append(d)
        return {
            "apiVersion": "omniwall.io/v1",
            "kind": f"{kind}List",
            "revision": rev,
            "items": items,
            "continue": next_token,
        }

    async def create_object(request: Request, p: Principal = Depends(authenticate)) -> dict[str, Any]:
        body = await read_json(request)
        return await run_in_threadpool(_create, request, p, body)

    def _create(request: Request, p: Principal, body: Any) -> dict[str, Any]:
        m = manager_of(request)
        r = scope_document(p, parse_body(body, kind))
        check_write(p, kind, r.metadata.tenant, r.metadata.name, r)
        (r,) = settle_posture(m, [r], may_seed=may_seed_posture(p))
        plan = m.plan_apply([r], mode="create")
        check_created_identity(p, plan)
        check_platform_attributes(p, plan)
        check_plan_quotas(request, m, plan)
        m.commit(with_posture_records(m, plan), p.actor)
        return render(m, _get(m, kind, r.metadata.tenant, r.metadata.name))

    def get_object(
        request: Request,
        name: str,
        tenant: str | None = Query(None),
        consistent: bool = Query(False, description=CONSISTENT),
        p: Principal = Depends(authenticate),
    ) -> dict[str, Any]:
        m = manager_of(request)
        if consistent:
            m.sync()
        t = read_tenant(p, tenant)
        r = check_visible(p, m.get(kind, t, name), m.catalog, f"{kind}/{t}/{name}")
        return render(m, r)

    async def update_object(
        request: Request,
        name: str,
        tenant: str | None = Query(None),
        p: Principal = Depends(authenticate),
    ) -> dict[str, Any]:
        body = await read_json(request)
        return await run_in_threadpool(_update, request, p, name, tenant, body)

    def _update(request: Request, p: Principal, name: str, tenant: str | None, body: Any) -> dict[str, Any]:
        m = manager_of(request)
        r = parse_body(body, kind, name)
        md = body.get("metadata") if isinstance(body, dict) else None
        if tenant is not None and "tenant" not in (md if isinstance(md, dict) else {}):
            r = with_metadata(r, tenant=tenant)
        r = scope_document(p, r)
        check_write(p, kind, r.metadata.tenant, name, r)
        plan = m.plan_apply([r], mode="update")
        check_platform_attributes(p, plan)
        check_plan_quotas(request, m, plan)
        m.commit(with_posture_records(m, plan), p.actor)
        return render(m, _get(m, kind, r.metadata.tenant, name))

    def delete_object(
        request: Request,
        name: str,
        tenant: str | None = Query(None),
        revision: int | None = Query(None, description="delete only if the object is at this revision"),
        p: Principal = Depends(authenticate),
    ) -> dict[str, Any]:
        m = manager_of(request)
        t = read_tenant(p, tenant)
        check_write(p, kind, t, name, m.get(kind, t, name))
        plan = m.plan_delete(kind, t, name, revision=revision)
        rev = m.commit(plan, p.actor)
        return {"revision": rev, "deleted": [c.summary() for c in plan.writes]}

    def object_history(
        request: Request, name: str, tenant: str | None = Query(None), p: Principal = Depends(authenticate)
    ) -> dict[str, Any]:
        require(p, Perm.READ)
        m = manager_of(request)
        t = read_tenant(p, tenant)
        if not owns_key(p, kind, t, name):
            raise not_found(f"{kind}/{t}/{name}")
        hist = m.history(kind, t, name)
        if not hist:
            raise not_found(f"{kind}/{t}/{name}")
        items = [
            {
                "revision": e.revision,
                "type": e.type,
                "object": o.model_dump(mode="json", exclude_none=True) if o else None,
            }
            for e, o in hist
        ]
        return {"kind": kind, "tenant": t, "name": name, "items": items}

    def rollback_object(
        request: Request,
        name: str,
        body: RollbackRequest = Body(..., examples=[{"revision": 12}]),
        tenant: str | None = Query(None),
        p: Principal = Depends(authenticate),
    ) -> dict[str, Any]:
        m = manager_of(request)
        t = read_tenant(p, tenant)
        target = body.revision
        if target < 1:
            raise InvalidResources([Problem("request body", "revision", "must be a revision number >= 1")])
        check_write(p, kind, t, name, m.get(kind, t, name))
        if target > m.revision:
            raise InvalidResources(
                [
                    Problem(
                        "request body", "revision", f"revision {target} is in the future (now {m.revision})"
                    )
                ]
            )
        try:
            old = m.value_at(kind, t, name, target)
        except FutureRevisionError:  # a write by another replica raced the check above
            raise InvalidResources([Problem("request body", "revision", "is in the future")]) from None
        if old is None:
            raise InvalidResources(
                [Problem(f"{kind}/{t}/{name}", "revision", f"the object did not exist at revision {target}")]
            )
        check_write(p, kind, t, name, old)
        # a deleted workload brought back gets the posture recorded for its name, not the old one
        (doc,) = settle_posture(m, [with_metadata(old, revision=None)], may_seed=False)
        plan = m.plan_apply([doc], mode="apply", verb="rollback")
        check_created_identity(p, plan)
        check_platform_attributes(p, plan)  # a rollback may bring a deleted workload back
        check_plan_quotas(request, m, plan)
        rev = m.commit(with_posture_records(m, plan), p.actor)
        cur = _get(m, kind, t, name)
        return {"revision": rev, "rolledBackTo": target, "object": render(m, cur)}

    body_doc = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{request_schema(kind)}"}}
            },
        }
    }
    one = {200: {"description": f"the {kind} as stored", "content": _json_ref(response_schema(kind))}}
    read_codes = (400, 401, 403, 404, 422)
    write_codes = (400, 401, 403, 404, 409, 413, 422)
    handlers: list[tuple[str, str, Callable[..., Any], str, dict[int | str, Any], dict[str, Any] | None]] = [
        (
            "GET",
            f"/v1/{plural}",
            list_objects,
            f"list {plural}",
            {200: {"model": ObjectList}, **err(*read_codes)},
            None,
        ),
        ("POST", f"/v1/{plural}", create_object, f"create a {kind}", {**one, **err(*write_codes)}, body_doc),
        ("GET", f"/v1/{plural}/{{name}}", get_object, f"read a {kind}", {**one, **err(*read_codes)}, None),
        (
            "PUT",
            f"/v1/{plural}/{{name}}",
            update_object,
            f"replace a {kind} (409 if metadata.revision is stale)",
            {**one, **err(*write_codes)},
            body_doc,
        ),
        (
            "DELETE",
            f"/v1/{plural}/{{name}}",
            delete_object,
            f"delete a {kind}",
            {200: {"model": DeleteResult}, **err(*write_codes)},
            None,
        ),
        (
            "GET",
            f"/v1/{plural}/{{name}}/history",
            object_history,
            f"every retained revision of a {kind}",
            {200: {"model": History}, **err(*read_codes)},
            None,
        ),
        (
            "POST",
            f"/v1/{plural}/{{name}}/rollback",
            rollback_object,
            f"restore a {kind} as it was at a revision",
            {200: {"model": RollbackResult}, **err(*write_codes)},
            None,
        ),
    ]
    for method, path, fn, summary, responses, extra in handlers:
        router.add_api_route(
            path,
            fn,
            methods=[method],
            tags=tag,
            summary=summary,
            name=f"{method.lower()}_{plural}{path.count('/')}",
            responses=responses,
            openapi_extra=extra,
        )


def request_schema(kind: str) -> str:
    """Name of the component schema of a kind's request body (added by `api.openapi`)."""
    return f"{kind}Resource"


def response_schema(kind: str) -> str:
    """Name of the component schema of a kind's object as the API answers it (`api.openapi`)."""
    return f"{kind}Object"


def _json_ref(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


def _get(m: Manager, kind: str, tenant: str, name: str) -> _Resource:
    r = m.get(kind, tenant, name)
    if r is None:  # deleted concurrently between commit and read
        raise ApiError(409, f"{kind}/{tenant}/{name} changed concurrently; read it again")
    return r


def resource_key_of(d: dict[str, Any], kind: str) -> str:
    md = d.get("metadata", {})
    return key_of(kind, md.get("tenant", ""), md.get("name", ""))


def router() -> APIRouter:
    r = APIRouter()
    for plural, kind in PLURALS.items():
        _routes_for(r, plural, kind)
    return r
