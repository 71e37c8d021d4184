"""Thin adapters to the modules the manager calls but other engineers own (loader, validator, compiler).

They are imported lazily so the manager keeps working while one of them is missing or being rewritten:
without `model.loader` documents are parsed with PyYAML + the pydantic schema, without `model.validate`
only per-object (schema) validation runs, without `compiler.build` every host gets an empty desired
state. Each fallback logs a warning once; none of them is meant to be used in a release.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydantic
import yaml

from omniwall.compiler.ir import HostDesiredState, empty_state
from omniwall.model.catalog import Catalog
from omniwall.model.resources import _Resource

log = logging.getLogger(__name__)
_warned: set[str] = set()

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


def _warn_once(what: str) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning("%s is not available; using the manager's reduced fallback", what)


def problems_from_pydantic(err: pydantic.ValidationError, document: str) -> list[Problem]:
    out = []
    for e in err.errors():
        loc = [str(p) for p in e.get("loc", ())]
        # The discriminated union puts the kind first in the location; it is not a field.
        if loc and loc[0] in ("Tenant", "Host", "Workload", "Group", "Service", "Application", "Policy"):
            loc = loc[1:]
        path = ".".join(p if not p.isdigit() else f"[{p}]" for p in loc).replace(".[", "[")
        out.append(Problem(document, path or ".", e.get("msg", "invalid")))
    return out


def _problems_from_model_error(err: Exception) -> list[Problem] | None:
    """`model.errors.ValidationError` carries FieldError(document, path, message) items."""
    for attr in ("errors", "field_errors", "problems"):
        items = getattr(err, attr, None)
        if callable(items):
            items = items()
        if isinstance(items, list | tuple):
            return [
                Problem(
                    str(getattr(e, "document", "")),
                    str(getattr(e, "path", "")),
                    str(getattr(e, "message", e)),
                    str(getattr(e, "resource", "")),
                )
                for e in items
            ]
    return None


def _model_validation_error() -> type[Exception] | None:
    try:
        from omniwall.model.errors import ValidationError
    except ImportError:
        return None
    return ValidationError


def load_documents(text: str, source: str) -> list[_Resource]:
    """Multi-document YAML or JSON -> resources; InvalidResources naming the document and field."""
    model_err = _model_validation_error()
    try:
        from omniwall.model.loader import load_text
    except ImportError:
        _warn_once("omniwall.model.loader")
        return _fallback_load(text, source)
    try:
        return list(load_text(text, source))
    except Exception as err:
        if model_err is not None and isinstance(err, model_err):
            problems = _problems_from_model_error(err)
            if problems is not None:
                raise InvalidResources(problems) from err
        if isinstance(err, pydantic.ValidationError):
            raise InvalidResources(problems_from_pydantic(err, source)) from err
        if isinstance(err, yaml.YAMLError | ValueError):
            raise InvalidResources([Problem(source, ".", str(err))]) from err
        raise


def _fallback_load(text: str, source: str) -> list[_Resource]:
    from omniwall.manager.objects import parse_resource

    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise InvalidResources([Problem(source, ".", f"not YAML or JSON: {err}")]) from err
    out: list[_Resource] = []
    problems: list[Problem] = []
    for i, doc in enumerate(docs):
        items = doc.get("items") if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]
        for j, item in enumerate(items or []):
            name = f"{source}#{i + 1}" + (f".items[{j}]" if len(items or []) > 1 else "")
            if isinstance(item, dict):
                md = item.get("metadata") or {}
                name = f"{item.get('kind', '?')}/{md.get('name', '?')} ({name})"
            try:
                out.append(parse_resource(item))
            except pydantic.ValidationError as err:
                problems.extend(problems_from_pydantic(err, name))
    if problems:
        raise InvalidResources(problems)
    return out


def validate_set(changed: list[_Resource], existing: Catalog, merged: Catalog) -> None:
    """Cross-object validation of the store as it would be after a write; InvalidResources if not valid.

    Prefers `validate(changed, existing=...)` (only the written objects are judged, so an existing
    dangling reference does not block unrelated writes); falls back to validating the whole set."""
    model_err = _model_validation_error()
    try:
        from omniwall.model.validate import validate
    except ImportError:
        _warn_once("omniwall.model.validate")
        return
    try:
        if "existing" in inspect.signature(validate).parameters:
            validate(changed, existing=existing)  # `existing` = the store as it is; changed replace by key
        else:
            validate(list(merged))
    except Exception as err:
        if model_err is not None and isinstance(err, model_err):
            problems = _problems_from_model_error(err)
            if problems is not None:
                raise InvalidResources(problems) from err
        raise


def default_compile() -> CompileFn:
    try:
        from omniwall.compiler.build import compile_catalog
    except ImportError:
        _warn_once("omniwall.compiler.build")
        return _fallback_compile

    def run(catalog: Catalog, revision: int) -> dict[str, HostDesiredState]:
        return compile_catalog(catalog, revision=revision)  # type: ignore[no-any-return]

    return run


def incremental_compiler() -> Any:
    """`IncrementalCompiler` class (catalog, revision) -> .update(changed, removed, revision), .state(h),
    .states(); None when it is not available."""
    try:
        from omniwall.compiler.incremental import IncrementalCompiler
    except ImportError:
        _warn_once("omniwall.compiler.incremental")
        return None
    return IncrementalCompiler


def _fallback_compile(catalog: Catalog, revision: int) -> dict[str, HostDesiredState]:
    return {h: empty_state(h, revision) for h in catalog.hosts}


def describe(err: Any) -> str:
    return f"{type(err).__name__}: {err}"
