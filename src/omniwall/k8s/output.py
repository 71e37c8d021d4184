"""Print generated resources compactly: fields at their default value are left out (the loader puts
them back), `apiVersion`, `kind`, `metadata`, `spec` first."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import yaml

from omniwall.model.resources import _Resource

_TOP_ORDER = ("apiVersion", "kind", "metadata", "spec")


def compact(resource: _Resource) -> dict[str, Any]:
    data = resource.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    data["apiVersion"] = resource.apiVersion
    data["kind"] = resource.kind  # type: ignore[attr-defined]
    data.setdefault("spec", {})
    return {k: data[k] for k in _TOP_ORDER if k in data} | {
        k: v for k, v in data.items() if k not in _TOP_ORDER
    }


def to_yaml(resources: Iterable[_Resource]) -> str:
    docs = [yaml.safe_dump(compact(r), sort_keys=False, default_flow_style=False) for r in resources]
    return "---\n".join(docs)


def to_json(resources: Iterable[_Resource]) -> str:
    return json.dumps([compact(r) for r in resources], indent=2) + "\n"
