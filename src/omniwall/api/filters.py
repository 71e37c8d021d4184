"""List filters and pagination.

- `labelSelector`: Kubernetes syntax over `metadata.labels`: `tier=web`, `tier==web`, `tier!=web`,
  `env in (prod,stage)`, `env notin (dev)`, `quarantine` (has the key), `!quarantine`; comma = and.
- `fieldSelector`: `path=value` / `path!=value` over the object's JSON, dotted paths
  (`metadata.name=web`, `spec.host=h1`, `spec.category=application`); comma = and.
- Pagination: `limit` + the opaque `continue` token of the previous page (the last key it returned).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any

from .errors import ApiError

Predicate = Callable[[dict[str, Any]], bool]

_SET_RE = re.compile(r"^\s*(!?[A-Za-z0-9._/-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ_RE = re.compile(r"^\s*([A-Za-z0-9._/-]+)\s*(==|!=|=)\s*([A-Za-z0-9._/-]*)\s*$")
_HAS_RE = re.compile(r"^\s*(!?)\s*([A-Za-z0-9._/-]+)\s*$")


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in parts if p.strip()]


def label_selector(text: str | None) -> Predicate:
    if not text:
        return lambda _: True
    preds: list[Callable[[dict[str, str]], bool]] = []
    for i, term in enumerate(_split_top(text)):
        if m := _SET_RE.match(term):
            key, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in":
                preds.append(lambda ls, k=key, vs=vals: ls.get(k) in vs)
            else:
                preds.append(lambda ls, k=key, vs=vals: ls.get(k) not in vs)
        elif m := _EQ_RE.match(term):
            key, op, val = m.group(1), m.group(2), m.group(3)
            if op == "!=":
                preds.append(lambda ls, k=key, v=val: ls.get(k) != v)
            else:
                preds.append(lambda ls, k=key, v=val: ls.get(k) == v)
        elif m := _HAS_RE.match(term):
            neg, key = m.group(1) == "!", m.group(2)
            preds.append(lambda ls, k=key, n=neg: (k in ls) != n)
        else:
            raise ApiError(
                422,
                "invalid labelSelector",
                errors=[
                    {
                        "document": "request",
                        "path": f"query.labelSelector[{i}]",
                        "reason": f"cannot parse {term.strip()!r}",
                    }
                ],
            )

    def match(obj: dict[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels", {}) or {}
        return all(p(labels) for p in preds)

    return match


def _lookup(obj: Any, path: str) -> Any:
    cur = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "" if v is None else str(v)


def field_selector(text: str | None) -> Predicate:
    if not text:
        return lambda _: True
    preds: list[Predicate] = []
    for i, term in enumerate(_split_top(text)):
        m = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|!=|=)\s*(.*?)\s*$", term)
        if not m:
            raise ApiError(
                422,
                "invalid fieldSelector",
                errors=[
                    {
                        "document": "request",
                        "path": f"query.fieldSelector[{i}]",
                        "reason": f"cannot parse {term.strip()!r}",
                    }
                ],
            )
        path, op, val = m.groups()
        if op == "!=":
            preds.append(lambda o, p=path, v=val: _text(_lookup(o, p)) != v)
        else:
            preds.append(lambda o, p=path, v=val: _text(_lookup(o, p)) == v)
    return lambda o: all(p(o) for p in preds)


def encode_continue(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_continue(token: str | None, prefix: str = "") -> str | None:
    """The key a `continue` token stands for; 400 for a token this server could not have issued
    (an invalid token used to restart the listing from the top, silently)."""
    if token is None:
        return None
    try:
        key = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        key = ""
    if not key or encode_continue(key) != token or not key.startswith(prefix) or len(key) > 1024:
        raise ApiError(
            400,
            "invalid continue token",
            errors=[
                {"document": "request", "path": "query.continue", "reason": "not a token this server issued"}
            ],
        ) from None
    return key
