"""Writes: plan -> commit, each write one store txn with its audit entries.

`plan_*` reads the in-memory model, validates the result and returns the changes; `commit` writes them
plus their audit entries in one txn that compares every touched key's revision against the one the plan
saw (a concurrent writer makes it fail with `Conflict`, nothing written). After a commit the model is
synced at once, so a client reads its own writes. No authorization happens here; `api/` decides who may
call what. The dry run's object diffs are here too; its data-plane impact is `api/impact.py`.
"""

from __future__ import annotations

import difflib
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Literal

import yaml

from omniwall.model.resources import _Resource
from omniwall.store import Compare, Delete, Put

from .audit import Actor, AuditEntry, audit_put
from .contracts import InvalidResources, Problem, validate_set
from .model import Model
from .objects import changed_paths, encode, object_tenant, resource_key, spec_equal, split_key, with_metadata
from .plan import Change, Conflict, NotFound, Plan, copy_catalog
from .sourcefacts import protect_source_facts


class Writes:
    def __init__(self, model: Model, now_iso: Callable[[], str]) -> None:
        self.model = model
        self.now_iso = now_iso

    def plan_apply(
        self,
        resources: Iterable[_Resource],
        *,
        mode: Literal["apply", "create", "update"] = "apply",
        verb: str = "apply",
        from_source: bool = False,
    ) -> Plan:
        """Create or update `resources` (one txn). `metadata.revision`, when given, must match the stored
        object's (optimistic concurrency); mode `create` requires absence, `update` presence.
        Workloads keep their identity/posture attributes unless `from_source` (manager/attributes.py)."""
        existing, base_rev = self.model.snapshot_catalog()
        catalog = copy_catalog(existing)
        now = self.now_iso()
        changes: list[Change] = []
        originals: list[_Resource] = []  # as given: the loader remembers their source documents
        seen: dict[str, int] = {}
        problems: list[Problem] = []
        for i, r in enumerate(resources):
            key = resource_key(r)
            kind, tenant, name = split_key(key)
            doc = f"{kind}/{name}" if kind in ("Tenant", "Host") else f"{kind}/{tenant}/{name}"
            if key in seen:
                problems.append(
                    Problem(
                        doc,
                        "metadata.name",
                        f"defined twice in one request (documents {seen[key]} and {i + 1})",
                    )
                )
                continue
            seen[key] = i + 1
            if r.kind == "Host" and r.metadata.tenant != object_tenant("Host", "", name):  # type: ignore[attr-defined]
                problems.append(Problem(doc, "metadata.tenant", "Host objects belong to the provider tenant"))
                continue
            old = self.model.get(kind, tenant, name, catalog=existing)
            given = r
            if r.kind == "Workload" and not from_source:  # type: ignore[attr-defined]
                r = protect_source_facts(old, r, doc, problems)
            if r.kind == "Tenant":  # type: ignore[attr-defined]
                r = with_metadata(r, tenant=tenant)  # a Tenant lives in its own namespace: compare as stored
            want = r.metadata.revision
            if mode == "create" and old is not None:
                raise Conflict(f"{doc} already exists (revision {old.metadata.revision})")
            if mode == "update" and old is None:
                raise NotFound(f"{doc} not found")
            if want is not None and want != (old.metadata.revision if old else 0):
                have = old.metadata.revision if old else "absent"
                raise Conflict(f"{doc}: metadata.revision {want} does not match the stored revision {have}")
            if old is not None and spec_equal(old, r):
                changes.append(Change("unchanged", kind, tenant, name, old, old))
                continue
            new = with_metadata(
                r,
                tenant=tenant,
                uid=old.metadata.uid if old else str(uuid.uuid4()),
                created=old.metadata.created if old else now,
                updated=now,
                revision=None,
            )
            changes.append(Change("update" if old else "create", kind, tenant, name, old, new))
            originals.append(given)
            catalog.add(new)
        if problems:
            raise InvalidResources(problems)
        if originals:
            validate_set(originals, existing, catalog)
        return Plan(changes, catalog, base_rev, verb)

    def plan_delete(self, kind: str, tenant: str, name: str, *, revision: int | None = None) -> Plan:
        """Delete one object; an Application takes everything it owns along, in the same txn."""
        catalog, base_rev = self.model.snapshot_catalog()
        old = self.model.get(kind, tenant, name, catalog=catalog)
        tenant = object_tenant(kind, tenant, name)
        if old is None:
            raise NotFound(f"{kind}/{name} not found")
        if revision is not None and revision != old.metadata.revision:
            raise Conflict(
                f"{kind}/{name}: revision {revision} does not match "
                f"the stored revision {old.metadata.revision}"
            )
        changes = [Change("delete", kind, tenant, name, old, None)]
        catalog.remove(kind, tenant, name)
        if kind == "Application":
            for r in list(catalog):
                if r.metadata.tenant == tenant and r.metadata.application == name and r.kind != "Application":  # type: ignore[attr-defined]
                    k, t, n = split_key(resource_key(r))
                    changes.append(Change("delete", k, t, n, r, None))
                    catalog.remove(k, t, n)
        return Plan(changes, catalog, base_rev, "delete")

    def commit(self, plan: Plan, actor: Actor, request: str | None = None) -> int:
        """Write the plan's changes and their audit entries in one txn; returns the new revision."""
        writes = plan.writes
        if not writes:
            return self.model.revision
        request = request or uuid.uuid4().hex[:12]
        now = self.now_iso()
        ns = time.time_ns()
        compares: list[Compare] = []
        ops: list[Put | Delete] = []
        for i, c in enumerate(writes):
            compares.append(Compare(c.key, (c.old.metadata.revision or 0) if c.old else 0))
            ops.append(Delete(c.key) if c.new is None else Put(c.key, encode(c.new)))
            old_d = c.old.model_dump(mode="json", exclude_none=True) if c.old else None
            new_d = c.new.model_dump(mode="json", exclude_none=True) if c.new else None
            action = c.action if plan.verb in ("apply", "delete") else plan.verb
            entry = AuditEntry(
                time=now,
                actor=actor.name,
                actor_id=actor.id,
                role=actor.role,
                action=action,
                kind=c.kind,
                tenant=c.tenant,
                name=c.name,
                changed=tuple(changed_paths(old_d, new_d)) if old_d and new_d else (),
                previous_revision=c.old.metadata.revision if c.old else None,
                request=request,
                extra={"cascade": True} if plan.verb == "delete" and i > 0 else {},
            )
            ops.append(audit_put(entry, ns + i))
        ops.extend(plan.notes.get("store_puts", ()))  # records written with the change (posture)
        res = self.model.store.txn(compares, ops)
        if not res.succeeded:
            names = ", ".join(split_key(f.key)[0] + "/" + split_key(f.key)[2] for f in res.failed)
            raise Conflict(f"changed concurrently, nothing written: {names}; read it again and retry")
        self.model.sync(res.revision)  # a client reads its own writes
        return res.revision

    def object_diffs(self, plan: Plan) -> list[dict[str, Any]]:
        out = []
        for c in plan.changes:
            d = c.summary()
            if c.action != "unchanged":
                d["diff"] = _yaml_diff(c)
            out.append(d)
        return out


def _yaml_diff(c: Change) -> str:
    def text(r: _Resource | None) -> list[str]:
        if r is None:
            return []
        d = r.model_dump(mode="json", exclude_none=True)
        for f in ("uid", "revision", "created", "updated"):
            d["metadata"].pop(f, None)
        return yaml.safe_dump(d, sort_keys=False).splitlines(keepends=True)

    label = f"{c.kind}/{c.tenant}/{c.name}"
    return "".join(difflib.unified_diff(text(c.old), text(c.new), f"a/{label}", f"b/{label}"))


__all__ = ["Writes"]
