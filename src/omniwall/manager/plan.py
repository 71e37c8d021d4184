"""What a write is made of: the changes a plan found (`Change`), the plan itself (`Plan`, the model as it
would be after the commit) and the two ways a write fails before anything is written (`Conflict`,
`NotFound`). Plain data, shared by the write path, the dry-run reports and the API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from omniwall.model.catalog import Catalog
from omniwall.model.resources import _Resource

from .objects import key_of

Action = Literal["create", "update", "delete", "unchanged"]


class Conflict(Exception):
    """The object changed since the caller read it (or exists / does not exist when it must not / must)."""


class NotFound(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Change:
    action: Action
    kind: str
    tenant: str
    name: str
    old: _Resource | None
    new: _Resource | None

    @property
    def key(self) -> str:
        return key_of(self.kind, self.tenant, self.name)

    def summary(self) -> dict[str, Any]:
        return {"action": self.action, "kind": self.kind, "tenant": self.tenant, "name": self.name}


@dataclass
class Plan:
    changes: list[Change]
    catalog: Catalog  # the model as it would be after the commit
    base_revision: int  # the model revision the plan was made against
    verb: str = "apply"  # audit action override: apply | rollback | ...
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def writes(self) -> list[Change]:
        return [c for c in self.changes if c.action != "unchanged"]


def copy_catalog(c: Catalog) -> Catalog:
    return Catalog(
        tenants=dict(c.tenants),
        hosts=dict(c.hosts),
        workloads=dict(c.workloads),
        groups=dict(c.groups),
        services=dict(c.services),
        applications=dict(c.applications),
        policies=dict(c.policies),
    )


__all__ = ["Action", "Change", "Conflict", "NotFound", "Plan", "copy_catalog"]
