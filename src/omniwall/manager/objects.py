"""Where resources live in the store and how they are encoded.

Key layout (one keyspace, so an etcd store is a drop-in):
- `res/<Kind>/<tenant>/<name>`  a resource, JSON (`metadata.revision` is not stored: it is the key's
  mod_revision, filled in on read);
- `tokens/<id>`                 an API token (hashed secret);
- `audit/<time_ns:020d>-<id>`   one audit entry, written in the same txn as the change it records.
"""

from __future__ import annotations

import enum
import json
import types
import typing
from typing import Any

from pydantic import BaseModel, TypeAdapter

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


def decode(value: str, revision: int, *, trusted: bool = False) -> _Resource:
    """A stored object. `trusted` (the bulk load at start-up): the object was validated when it was
    written, so it is constructed without running the validators again (~3x cheaper, a minute at a
    million objects); anything the current schema does not know in its structure (an unknown or
    missing field, a nested object that is not one, an enum value it does not have) falls back to
    full validation, which rejects it as before. Field values are not re-checked (names, addresses):
    that was done at write time."""
    data = json.loads(value)
    data.setdefault("metadata", {})["revision"] = revision
    if trusted:
        try:
            return _construct(KINDS[data["kind"]], data)
        except (_Untrusted, KeyError, TypeError, ValueError):
            pass
    return _ADAPTER.validate_python(data)  # type: ignore[no-any-return]


class _Untrusted(Exception):
    pass


# Per model class, a constructor generated once (like dataclasses' __init__): one dict display, no
# Python-level loop per field; a generic loop cost as much as pydantic's validation itself.
_CONSTRUCTORS: dict[type, Any] = {}


def _converter(ann: Any) -> Any:
    """How to turn a JSON value into the field's value: None = as it is (str, int, bool, list[str],
    dict[str, str]...), else a callable (nested model, list of models, enum)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return lambda v, cls=ann: _construct(cls, v)
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return ann
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        convs = [c for a in args if a is not type(None) if (c := _converter(a)) is not None]
        if len(convs) > 1:
            raise TypeError(f"no trusted construction for {ann}")
        if convs:
            c = convs[0]
            return lambda v, c=c: None if v is None else c(v)
        return None
    if origin is list and args:
        inner = _converter(args[0])
        if inner is not None:
            return lambda v, c=inner: [c(x) for x in v]
    if origin is dict and args and _converter(args[1]) is not None:
        raise TypeError(f"no trusted construction for {ann}")
    return None


def _constructor(cls: type[BaseModel]) -> Any:
    env: dict[str, Any] = {"cls": cls, "Untrusted": _Untrusted, "new": cls.__new__, "put": object.__setattr__}
    names = frozenset(cls.model_fields)
    env["names"] = names
    required = [n for n, f in cls.model_fields.items() if f.is_required()]
    items = []
    for i, (name, f) in enumerate(cls.model_fields.items()):
        if f.alias is not None and f.alias != name:
            raise TypeError(f"{cls.__name__}.{name}: aliases need validation")
        conv = _converter(f.annotation)
        if conv is not None:
            env[f"c{i}"] = conv
        if f.is_required():
            value = f"data[{name!r}]"
        elif f.default_factory is not None:
            env[f"f{i}"] = f.default_factory
            value = f"(data[{name!r}] if {name!r} in data else f{i}())"
        else:
            d = f.default
            if not (d is None or isinstance(d, str | int | float | bool | enum.Enum | tuple | frozenset)):
                raise TypeError(f"{cls.__name__}.{name}: mutable default {d!r}")
            env[f"d{i}"] = d
            value = f"data.get({name!r}, d{i})"
        if conv is not None:
            value = f"c{i}({value})" if f.is_required() or f.default_factory is None else value
            if f.default_factory is not None:
                value = f"(c{i}(data[{name!r}]) if {name!r} in data else f{i}())"
            elif not f.is_required():
                value = f"(c{i}(data[{name!r}]) if {name!r} in data else d{i})"
        items.append(f"{name!r}: {value}")
    src = (
        "def construct(data):\n"
        "    if type(data) is not dict or not names.issuperset(data)"
        + "".join(f" or {n!r} not in data" for n in required)
        + ":\n        raise Untrusted(cls.__name__)\n"
        f"    obj = new(cls)\n"
        f"    put(obj, '__dict__', {{{', '.join(items)}}})\n"
        "    put(obj, '__pydantic_fields_set__', set(data))\n"
        "    put(obj, '__pydantic_extra__', None)\n"
        "    put(obj, '__pydantic_private__', None)\n"
        "    return obj\n"
    )
    exec(src, env)  # generated from the model's own field list, nothing external
    return env["construct"]


def _construct(cls: type[BaseModel], data: Any) -> Any:
    c = _CONSTRUCTORS.get(cls)
    if c is None:
        c = _CONSTRUCTORS[cls] = _constructor(cls)
    return c(data)


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
