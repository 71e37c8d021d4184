"""Where resources live in the store and how they are encoded.

Key layout (one keyspace, so an etcd store is a drop-in):
- `res/<Kind>/<tenant>/<name>`  a resource, JSON (`metadata.revision` is not stored: it is the key's
  mod_revision, filled in on read);
- `tokens/<id>`                 an API token (hashed secret);
- `audit/<time_ns:020d>-<id>`   one audit entry, written in the same txn as the change it records.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter

from omniwall import PROVIDER_TENANT
from omniwall.model.resources import KINDS, Resource, _Resource

RES_PREFIX = "res/"
TOKEN_PREFIX = "tokens/"
AUDIT_PREFIX = "audit/"

PLURALS: dict[str, str] = {
    "tenants": "Tenant",
    "hosts": "Host",
    "workloads": "Workload",
    "groups": "Group",
    "services": "Service",
    "applications": "Application",
    "policies": "Policy",
}
KIND_PLURAL = {kind: plural for plural, kind in PLURALS.items()}
# Kinds that live in the provider namespace (one per installation, not per tenant).
CLUSTER_KINDS = frozenset({"Tenant", "Host"})

_ADAPTER: TypeAdapter[Any] = TypeAdapter(Resource)


def kind_of(word: str) -> str:
    """`policies`, `policy`, `Policy` -> `Policy`; ValueError naming the known kinds otherwise."""
    w = word.strip()
    if w in KINDS:
        return w
    low = w.lower()
    if low in PLURALS:
        return PLURALS[low]
    for kind in KINDS:
        if kind.lower() == low:
            return kind
    raise ValueError(f"unknown kind {word!r}; known kinds: {', '.join(sorted(KINDS))}")


def object_tenant(kind: str, tenant: str, name: str) -> str:
    """The tenant an object belongs to: a Tenant object to itself, a Host to the provider."""
    if kind == "Tenant":
        return name
    if kind == "Host":
        return PROVIDER_TENANT
    return tenant


def key_of(kind: str, tenant: str, name: str) -> str:
    return f"{RES_PREFIX}{kind}/{object_tenant(kind, tenant, name)}/{name}"


def resource_key(r: _Resource) -> str:
    return key_of(r.kind, r.metadata.tenant, r.metadata.name)  # type: ignore[attr-defined]


def split_key(key: str) -> tuple[str, str, str]:
    """`res/Kind/tenant/name` -> (kind, tenant, name)."""
    kind, tenant, name = key[len(RES_PREFIX) :].split("/", 2)
    return kind, tenant, name


def kind_prefix(kind: str, tenant: str | None = None) -> str:
    return f"{RES_PREFIX}{kind}/" + (f"{tenant}/" if tenant is not None else "")


def encode(r: _Resource) -> str:
    data = r.model_dump(mode="json", exclude_none=True)
    data["metadata"].pop("revision", None)
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def decode(value: str, revision: int) -> _Resource:
    data = json.loads(value)
    data.setdefault("metadata", {})["revision"] = revision
    return _ADAPTER.validate_python(data)  # type: ignore[no-any-return]


def parse_resource(data: Any) -> _Resource:
    """A dict (API body) -> a resource; raises pydantic.ValidationError."""
    return _ADAPTER.validate_python(data)  # type: ignore[no-any-return]


def with_metadata(r: _Resource, **fields: Any) -> _Resource:
    """A copy of `r` with metadata fields replaced (resources are frozen)."""
    return r.model_copy(update={"metadata": r.metadata.model_copy(update=fields)})


def spec_equal(a: _Resource, b: _Resource) -> bool:
    """Same content, ignoring server-managed metadata (uid, revision, timestamps)."""
    ignore = {"uid", "revision", "created", "updated"}
    da = a.model_dump(mode="json", exclude_none=True)
    db = b.model_dump(mode="json", exclude_none=True)
    for d in (da, db):
        for f in ignore:
            d["metadata"].pop(f, None)
    return da == db


def changed_paths(old: dict[str, Any] | None, new: dict[str, Any] | None, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ (for audit entries); lists compare as a whole."""
    if old == new:
        return []
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [prefix or "."]
    out: list[str] = []
    for k in sorted(set(old) | set(new)):
        if k in ("revision", "updated", "created", "uid") and prefix == "metadata":
            continue
        out.extend(changed_paths(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k))
    return out
