"""Read resources from multi-document YAML: per-object schema checks (pydantic), every error collected.

`load_text` / `load_files` raise one `ValidationError` listing every problem of every document and file
(YAML syntax with line and column; schema errors with document, object id, field path and reason), and
return nothing on error. Cross-object checks are `model.validate`'s job; it finds each object's document
through `source_of`.

YAML dialect: PyYAML's safe loader with three changes: a key repeated in one mapping is an error (PyYAML
keeps the last one silently), dates stay strings (`created: 2024-01-01` is not a datetime), and nesting
deeper than `MAX_DEPTH` collections is an error raised while composing, before the recursive parts of
PyYAML and pydantic could run out of stack (a 10,000-deep `[[[...]]]` used to end in a 500).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter
from pydantic import ValidationError as PydanticError

from omniwall import PROVIDER_TENANT
from omniwall.model.errors import FieldError, ValidationError, resource_id
from omniwall.model.resources import KINDS, Resource, _Resource, dump

_ADAPTER: TypeAdapter[Any] = TypeAdapter(Resource)
YAML_SUFFIXES = (".yaml", ".yml")
# Collections nested in one document: a resource needs 6 (spec.rules[i].services[j]); 32 leaves room.
MAX_DEPTH = 32
# Nodes of one document once aliases are expanded: `&a [x, x]`, `&b [*a, *a]`, ... doubles per line
# ("billion laughs"); PyYAML shares the objects, but pydantic would walk every copy.
MAX_NODES = 1_000_000

# ------------------------------------------------------------------------------------ where objects came from

# id(resource) -> (weak reference, "file#index"). Resources are frozen and compare by value, so the source
# cannot live on the object (two equal objects from two files would differ) nor in a dict keyed by it.
_SOURCES: dict[int, tuple[weakref.ref[Any], str]] = {}


def _remember(resource: _Resource, document: str) -> None:
    key = id(resource)
    _SOURCES[key] = (weakref.ref(resource, lambda _ref, key=key: _SOURCES.pop(key, None)), document)


def source_of(resource: object) -> str:
    """`file#index` of the document a resource was loaded from, "" if it was not loaded here."""
    entry = _SOURCES.get(id(resource))
    return entry[1] if entry and entry[0]() is resource else ""


# ------------------------------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """Safe loader; duplicate mapping keys are errors; timestamps stay strings; nesting is bounded."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # The composer recurses once per nesting level: count levels and stop before the stack does.
        if self.check_event(yaml.CollectionStartEvent):  # type: ignore[no-untyped-call]
            if self._depth >= MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
            self._depth += 1
            try:
                return super().compose_node(parent, index)  # type: ignore[no-untyped-call]
            finally:
                self._depth -= 1
        return super().compose_node(parent, index)  # type: ignore[no-untyped-call]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                    key_node.start_mark,
                )
            if isinstance(key, typing.Hashable):
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Values in `node` with every alias expanded; memoised per node (depth is bounded by the loader)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = MAX_NODES + 1  # an alias cycle counts as too large
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(n, memo) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    memo[id(node)] = size = min(size, MAX_NODES + 1)
    return size


def _yaml_documents(text: str, source: str) -> Iterable[tuple[int, Any]]:
    """(1-based document index, data) for every document; YAML errors become FieldErrors (raised)."""
    loader = _Loader(text)
    index = 0
    try:
        while loader.check_node():
            index += 1
            node = loader.get_node()
            if node is not None and _expanded_size(node, {}) > MAX_NODES:
                raise yaml.MarkedYAMLError(
                    None, None, f"more than {MAX_NODES} values once aliases are expanded", node.start_mark
                )
            yield index, loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else f"{source}#{index}"
        problem = e.problem or e.context or "invalid YAML"
        raise ValidationError([FieldError(where, "", f"invalid YAML: {problem}")]) from None
    except yaml.YAMLError as e:
        raise ValidationError([FieldError(f"{source}#{index}", "", f"invalid YAML: {e}")]) from None
    finally:
        loader.dispose()


# --------------------------------------------------------------------------------- pydantic -> FieldError

_TYPE_TAG_RE = re.compile(r"^(str|int|float|bool|[\w-]+\[.*\])$")
_TYPE_NOUNS = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "a boolean",
    "bool_parsing": "a boolean",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
}


def format_path(loc: Iterable[str | int]) -> str:
    """('spec', 'rules', 2, 'action') -> spec.rules[2].action; odd keys in brackets: labels["a b"]."""
    out = ""
    for seg in loc:
        if isinstance(seg, int):
            out += f"[{seg}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", seg):
            out += f".{seg}" if out else seg
        else:
            out += f'["{seg}"]'
    return out


def _unwrap(tp: Any) -> Any:
    """X | None -> X; list[X] / dict[K, X] -> X (the element a further path segment points into)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(tp) if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if models else tp
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    return tp


def _fields_at(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str] | None:
    """The field names of the model found at `loc` inside `model`, if there is one."""
    tp: Any = model
    for seg in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(seg, str):
            if seg not in tp.model_fields:
                return None
            tp = tp.model_fields[seg].annotation
        elif typing.get_origin(tp) in (list, tuple):
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    tp = _unwrap(tp)
    return sorted(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _got(value: Any) -> str:
    text = repr(value)
    return f" (got {text if len(text) <= 60 else text[:57] + '...'})"


def _reason(kind: str, loc: tuple[str | int, ...], err: Mapping[str, Any]) -> str:
    etype, msg = err["type"], err["msg"]
    if etype == "missing":
        return "required field is missing"
    if etype == "extra_forbidden":
        allowed = _fields_at(KINDS[kind], loc[:-1]) or []
        name = str(loc[-1]) if loc else ""
        close = difflib.get_close_matches(name, allowed, n=1)
        if close:
            return f"unknown field (did you mean {close[0]!r}?)"
        return f"unknown field (allowed: {', '.join(allowed)})" if allowed else "unknown field"
    if etype == "value_error":
        return str(msg).removeprefix("Value error, ")
    if etype == "assertion_error":
        return str(msg).removeprefix("Assertion failed, ")
    inp = err.get("input")
    if etype == "string_type" and isinstance(inp, bool | int | float):
        return f'{msg} (got {inp!r}; quote it in YAML: "{inp}")'
    return msg + (_got(inp) if not isinstance(inp, dict | list) else "")


def _field_errors(document: str, kind: str, rid: str, error: PydanticError) -> list[FieldError]:
    """pydantic's errors, one FieldError per field path (the failed members of a union merged)."""
    by_path: dict[str, list[tuple[tuple[str | int, ...], dict[str, Any]]]] = {}
    for err in error.errors(include_url=False):
        loc = tuple(err["loc"])
        if loc and loc[0] == kind:  # the discriminated union's tag
            loc = loc[1:]
        union_member = any(isinstance(s, str) and _TYPE_TAG_RE.match(s) for s in loc)
        clean = tuple(s for s in loc if not (isinstance(s, str) and _TYPE_TAG_RE.match(s)))
        by_path.setdefault(format_path(clean), []).append((clean, {**err, "_union": union_member}))
    out = []
    for path, errs in by_path.items():
        if len(errs) > 1 and all(e["_union"] and e["type"] in _TYPE_NOUNS for _, e in errs):
            nouns = list(dict.fromkeys(_TYPE_NOUNS[e["type"]] for _, e in errs))
            expected = ", ".join(nouns[:-1]) + " or " + nouns[-1]
            out.append(FieldError(document, path, f"expected {expected}{_got(errs[0][1]['input'])}", rid))
            continue
        for reason in dict.fromkeys(_reason(kind, loc, e) for loc, e in errs):
            out.append(FieldError(document, path, reason, rid))
    return out


def _raw_id(kind: str, data: Mapping[str, Any]) -> str:
    meta = data.get("metadata")
    if not isinstance(meta, Mapping):
        return kind
    name, tenant = meta.get("name"), meta.get("tenant", PROVIDER_TENANT)
    return resource_id(kind, str(tenant), str(name) if isinstance(name, str) else None)


def _document(data: Any, document: str, errors: list[FieldError]) -> _Resource | None:
    """Validate one YAML document; append its errors and return None, or return the resource."""
    if not isinstance(data, Mapping):
        got = type(data).__name__
        errors.append(
            FieldError(document, "", f"a document must be a mapping with kind, metadata and spec, got {got}")
        )
        return None
    kind = data.get("kind")
    kinds = ", ".join(sorted(KINDS))
    if kind is None:
        errors.append(FieldError(document, "kind", f"required field is missing (one of {kinds})"))
        return None
    if not isinstance(kind, str) or kind not in KINDS:
        close = difflib.get_close_matches(str(kind), list(KINDS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"one of {kinds}"
        errors.append(FieldError(document, "kind", f"unknown kind {kind!r} ({hint})"))
        return None
    rid = _raw_id(kind, data)
    try:
        resource: _Resource = _ADAPTER.validate_python(data)
    except PydanticError as e:
        errors.extend(_field_errors(document, kind, rid, e))
        return None
    _remember(resource, document)
    return resource


# -------------------------------------------------------------------------------------------------- API


def _load(text: str, source: str, errors: list[FieldError]) -> list[_Resource]:
    out = []
    try:
        for index, data in _yaml_documents(text, source):
            if data is None:  # empty document (`---` followed by nothing)
                continue
            r = _document(data, f"{source}#{index}", errors)
            if r is not None:
                out.append(r)
    except ValidationError as e:
        errors.extend(e.errors)
    return out


def load_text(text: str, source: str = "<stdin>") -> list[Any]:
    """Every resource of a multi-document YAML text, in order. Raises ValidationError (all problems)."""
    errors: list[FieldError] = []
    out = _load(text, source, errors)
    if errors:
        raise ValidationError(errors)
    return out


def _expand(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; a directory stands for its *.yaml / *.yml files, recursively, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix in YAML_SUFFIXES and f.is_file()))
        else:
            out.append(p)
    return out


def load_files(paths: Iterable[str | Path]) -> list[Any]:
    """Every resource of every file (directories: their YAML files), in order; all errors in one raise."""
    errors: list[FieldError] = []
    out: list[_Resource] = []
    for path in _expand(paths):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            errors.append(FieldError(str(path), "", f"cannot read file: {e.strerror or e}"))
            continue
        except UnicodeDecodeError as e:
            errors.append(FieldError(str(path), "", f"not UTF-8 text: {e.reason} at byte {e.start}"))
            continue
        out.extend(_load(text, str(path), errors))
    if errors:
        raise ValidationError(errors)
    return out


_TOP_ORDER = ("apiVersion", "kind", "metadata", "spec")


def dump_yaml(resources: Iterable[Any]) -> str:
    """Multi-document YAML that `load_text` reads back into equal resources."""
    docs = []
    for r in resources:
        data = dump(r)
        ordered = {k: data[k] for k in _TOP_ORDER if k in data} | {
            k: v for k, v in data.items() if k not in _TOP_ORDER
        }
        docs.append(yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True, default_flow_style=False))
    return "---\n".join(docs)
