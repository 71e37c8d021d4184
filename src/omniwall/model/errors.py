"""Validation errors: one type that names where (document, object, field path) and why.

All checks collect every error in one pass and raise a single `ValidationError`, so a user fixes a whole
file at once (Faucet's lesson, plus the location it lacks).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from omniwall import PROVIDER_TENANT


@dataclass(frozen=True)
class FieldError:
    """`document`: where the object came from (`examples/x.yaml#3`: file and 1-based document index,
    `file:line:column` for YAML syntax errors, "" when unknown, e.g. stored objects).
    `path`: dotted field path inside the object, list indexes 0-based (`spec.rules[2].services`).
    `resource`: the object, `Kind/tenant/name` (`Tenant/<name>`, `Host/<name>`), "" when unknown."""

    document: str
    path: str
    message: str
    resource: str = ""

    def __str__(self) -> str:
        where = " ".join(p for p in (self.document, self.resource) if p)
        return ": ".join(p for p in (where, self.path, self.message) if p)


class ValidationError(Exception):
    """Every problem found in one pass; nothing was applied."""

    def __init__(self, errors: Iterable[FieldError]) -> None:
        self.errors: list[FieldError] = list(errors)
        n = len(self.errors)
        lines = "\n".join(f"  {e}" for e in self.errors)
        super().__init__(f"{n} error{'s' if n != 1 else ''}:\n{lines}")

    def __reduce__(self) -> tuple[type[ValidationError], tuple[list[FieldError]]]:
        return (ValidationError, (self.errors,))


def resource_id(kind: str, tenant: str | None, name: str | None) -> str:
    """`Policy/tenant-a/web`; Tenants and Hosts have no tenant in their id (`Tenant/a`, `Host/h1`)."""
    if not name:
        return kind
    if kind in ("Tenant", "Host"):
        return f"{kind}/{name}"
    return f"{kind}/{tenant or PROVIDER_TENANT}/{name}"
