"""The manager's adapters to the loader, the validator and the compiler: their errors become `Problem`s
(document, field path, reason) that the API returns as 422 bodies.

No fallbacks: an earlier version degraded to "every host gets an empty desired state" when the compiler
was missing, which would have made every agent remove its rules (fail open). A missing module is now an
import error at start.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydantic
import yaml

from omniwall.compiler.ir import HostDesiredState
from omniwall.model.catalog import Catalog
from omniwall.model.errors import ValidationError
from omniwall.model.loader import load_text
from omniwall.model.resources import _Resource
from omniwall.model.validate import validate

CompileFn = Callable[[Catalog, int], dict[str, HostDesiredState]]


@dataclass(frozen=True, slots=True)
class Problem:
    """One validation error: which document, which field, why."""

    document: str  # where it came from (`file#3`), else the object (`Policy/acme/web`)
    path: str
    reason: str
    resource: str = ""  # `Kind/tenant/name` when known

    def to_json(self) -> dict[str, str]:
        out = {"document": self.document or self.resource, "path": self.path, "reason": self.reason}
        if self.resource:
            out["resource"] = self.resource
        return out


class InvalidResources(Exception):
    """Raised with every problem found; nothing was written."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(f"{p.document}: {p.path}: {p.reason}" for p in problems))
        self.problems = problems


_UNION_TAG = re.compile(r"^(str|int|float|bool|[\w-]+\[.*\])$")


def problems_from_pydantic(err: pydantic.ValidationError, document: str) -> list[Problem]:
    out: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for e in err.errors():
        loc = [str(p) for p in e.get("loc", ())]
        # The discriminated union puts the kind first in the location; it is not a field.
        if loc and loc[0] in ("Tenant", "Host", "Workload", "Group", "Service", "Application", "Policy"):
            loc = loc[1:]
        # A union's member type (`spec.ports[0].int`) is not a field either.
        loc = [p for p in loc if not _UNION_TAG.match(p)]
        path = ".".join(p if not p.isdigit() else f"[{p}]" for p in loc).replace(".[", "[")
        reason = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if (path, reason) not in seen:
            seen.add((path, reason))
            out.append(Problem(document, path or ".", reason))
    return out


def _problems(err: ValidationError) -> list[Problem]:
    return [Problem(e.document, e.path, e.message, e.resource or "") for e in err.errors]


def load_documents(text: str, source: str) -> list[_Resource]:
    """Multi-document YAML or JSON -> resources; InvalidResources naming the document and field."""
    try:
        return list(load_text(text, source))
    except ValidationError as err:
        raise InvalidResources(_problems(err)) from err
    except pydantic.ValidationError as err:
        raise InvalidResources(problems_from_pydantic(err, source)) from err
    except (yaml.YAMLError, ValueError) as err:
        raise InvalidResources([Problem(source, ".", str(err))]) from err


def validate_set(changed: list[_Resource], existing: Catalog, merged: Catalog) -> None:
    """Cross-object validation of a write against the store as it is (only the written objects are
    judged, so an existing dangling reference does not block unrelated writes)."""
    del merged  # kept in the signature for callers; `validate` merges `changed` over `existing` itself
    try:
        validate(changed, existing=existing)
    except ValidationError as err:
        raise InvalidResources(_problems(err)) from err


def describe(err: Any) -> str:
    return f"{type(err).__name__}: {err}"
