"""The typed OpenAPI document: request-body schemas of the resource routes, from `model.resources`.

The resource routes read their bodies themselves (bounded, nesting checked, errors naming the field), so
FastAPI cannot infer the schema; this adds one component per kind (`WorkloadResource`, ...) with its
nested definitions, which the routes' `requestBody` and `200` answers reference.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from omniwall.model.resources import KINDS

from .resources import request_schema


def resource_schemas() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, model in KINDS.items():
        prefix = f"{kind}Resource"
        js = model.model_json_schema(ref_template=prefix + ".{model}", mode="validation")
        for name, d in js.pop("$defs", {}).items():
            out[f"{prefix}.{name}"] = _retarget(d, prefix)
        out[request_schema(kind)] = _retarget(js, prefix)
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
        schema.setdefault("components", {}).setdefault("schemas", {}).update(resource_schemas())
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
