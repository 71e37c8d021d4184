"""Pydantic models that document request and response bodies in the OpenAPI document (`/openapi.json`).

The routes build their answers as dicts; these models describe them (`responses=`), so generated clients
and API fuzzers learn the shapes and every status code a route can answer. `extra="allow"` where a body
carries more than is listed (resources are described by their own schema, `model.resources`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from .errors import CODES


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorItem(_Open):
    document: str
    path: str
    reason: str
    resource: str | None = None


class ErrorBody(_Open):
    """Every non-2xx answer: a code, a message, and for 4xx on input the fields at fault."""

    error: str
    message: str
    errors: list[ErrorItem] | None = None
    permission: str | None = None


DESCRIPTIONS = {
    400: "malformed request (body not JSON/UTF-8, bad continue token, revision in the future)",
    401: "missing or invalid bearer token",
    403: "the token's role lacks the named permission",
    404: "no such object (or another tenant's)",
    405: "method not allowed",
    409: "conflict: stale metadata.revision, or the object already exists",
    410: "revision compacted away",
    413: "request body too large",
    415: "unsupported Content-Type",
    422: "invalid input: each error names the document, field path and reason",
    429: "too many requests",
    503: "unavailable",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status with its description and the one error body."""
    assert all(c in CODES for c in codes)
    return {c: {"model": ErrorBody, "description": DESCRIPTIONS.get(c, CODES[c])} for c in codes}


class ChangeSummary(_Open):
    action: str
    kind: str
    tenant: str
    name: str
    diff: str | None = None


class ImpactHost(_Open):
    host: str
    vnics: list[str]
    workloads: list[str] = []  # `tenant/name (ifname)` of each vNIC, in the order of `vnics`
    rulesAdded: int
    rulesChanged: int
    rulesRemoved: int
    setElementsAdded: int
    setElementsRemoved: int


class Impact(_Open):
    hosts: list[ImpactHost]
    totals: dict[str, int]
    error: str | None = None


class ApplyResult(_Open):
    dryRun: bool
    revision: int
    changes: list[ChangeSummary]
    impact: Impact | None = None


class ObjectList(_Open):
    apiVersion: str
    kind: str
    revision: int
    items: list[dict[str, Any]]
    # Opaque: pass it back as `?continue=` for the next page; null on the last page.
    continue_: str | None = Field(None, alias="continue")

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class DeleteResult(_Open):
    revision: int
    deleted: list[dict[str, Any]]


class HistoryEntry(_Open):
    revision: int
    type: str
    object: dict[str, Any] | None


class History(_Open):
    kind: str
    tenant: str
    name: str
    items: list[HistoryEntry]


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    revision: StrictInt


class RollbackResult(_Open):
    revision: int
    rolledBackTo: int
    object: dict[str, Any]
