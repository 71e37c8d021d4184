"""The typed OpenAPI document: request-body schemas of the resource routes, from `model.resources`, and
the error answers every route shares.

- The resource routes read their bodies themselves (bounded, nesting checked, errors naming the field),
  so FastAPI cannot infer the schema; this adds one component per kind (`WorkloadResource`, ...) with
  its nested definitions, which the routes' `requestBody` and `200` answers reference.
- Every operation can answer 400 (unparseable body), 401 (token), 403 (permission), 404 (not found or
  another tenant's), 413 (body limit), 422 (validation) and 429 (authentication rate limit), all with
  the one error body (`schemas.ErrorBody`): listed for every operation that does not list them itself.
  Route-specific statuses (409, 410, 415, 503) are declared by the routes.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from omniwall.model.resources import KINDS

from .resources import request_schema, response_schema
from .schemas import DESCRIPTIONS, ErrorBody

COMMON = (400, 401, 403, 404, 413, 422, 429)


def resource_schemas() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, model in KINDS.items():
        prefix = f"{kind}Resource"
        js = model.model_json_schema(ref_template=prefix + ".{model}", mode="validation")
        for name, d in js.pop("$defs", {}).items():
            out[f"{prefix}.{name}"] = _retarget(d, prefix)
        out[request_schema(kind)] = body = _retarget(js, prefix)
        # As stored: the same, plus the server-managed `status` (Host status, Workload migration).
        out[response_schema(kind)] = {
            **body,
            "title": f"{kind} (as stored)",
            "properties": {**body["properties"], "status": {"type": "object", "additionalProperties": True}},
        }
    return out


def _retarget(node: Any, prefix: str) -> Any:
    """`$ref: WorkloadResource.Vnic` -> `#/components/schemas/WorkloadResource.Vnic`."""
    if isinstance(node, dict):
        return {
            k: (f"#/components/schemas/{v}" if k == "$ref" and isinstance(v, str) else _retarget(v, prefix))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_retarget(v, prefix) for v in node]
    return node


def install(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(resource_schemas())
        components.setdefault(
            "ErrorBody", ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        )
        defs = components["ErrorBody"].pop("$defs", {})
        components.update(defs)
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                responses = op.setdefault("responses", {})
                if "HTTPValidationError" in str(responses.get("422")):
                    del responses["422"]  # FastAPI's default shape; errors.py answers with ErrorBody
                for code in COMMON:
                    responses.setdefault(
                        str(code),
                        {
                            "description": DESCRIPTIONS[code],
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
                            },
                        },
                    )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
