"""Selector expression tree: frozen nodes that evaluate against a facts mapping and print canonically.

Values are compared as strings: a literal `3`, `3.0`, `"3"` and a fact `3` are all the string `"3"`;
`true`/`false` and fact booleans are `"true"`/`"false"` (see `canonical`). This keeps one namespace for
labels (always strings) and attributes (strings, numbers, booleans, lists of strings).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

# A key that can be written bare; anything else is printed as label("...").
BARE_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
# Words that are keywords somewhere in the grammar; printed quoted so the output always re-parses.
RESERVED = frozenset({"has", "all", "label", "in", "not", "true", "false"})


def canonical(value: object) -> str:
    """The string a fact or literal value compares as."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def fact_values(facts: Mapping[str, object], key: str) -> tuple[str, ...] | None:
    """The canonical values of `key` (a list fact gives several), or None when the key is missing."""
    value = facts.get(key)
    if value is None:
        return None
    if isinstance(value, list | tuple | set | frozenset):
        return tuple(canonical(v) for v in value)
    return (canonical(value),)


def quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def render_key(key: str) -> str:
    if BARE_KEY_RE.fullmatch(key) and key not in RESERVED:
        return key
    return f"label({quote(key)})"


# Binding strength, for printing parentheses only where needed.
_OR, _AND, _UNARY = 1, 2, 3


class Expr:
    """Base of every node."""

    def matches(self, facts: Mapping[str, object]) -> bool:
        raise NotImplementedError

    def keys(self) -> Iterator[str]:
        raise NotImplementedError

    def render(self) -> tuple[str, int]:
        """(text, binding strength of its outermost operator)."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.render()[0]


def _wrap(expr: Expr, at_least: int) -> str:
    text, strength = expr.render()
    return text if strength >= at_least else f"({text})"


@dataclass(frozen=True)
class All(Expr):
    def matches(self, facts: Mapping[str, object]) -> bool:
        return True

    def keys(self) -> Iterator[str]:
        return iter(())

    def render(self) -> tuple[str, int]:
        return "all()", _UNARY


@dataclass(frozen=True)
class Has(Expr):
    key: str

    def matches(self, facts: Mapping[str, object]) -> bool:
        return fact_values(facts, self.key) is not None

    def keys(self) -> Iterator[str]:
        yield self.key

    def render(self) -> tuple[str, int]:
        return f"has({render_key(self.key)})", _UNARY


@dataclass(frozen=True)
class In(Expr):
    """`key == v` is `In(key, (v,))`; `negated` gives `!=` / `not in`, the exact negation."""

    key: str
    values: tuple[str, ...]
    negated: bool = False
    single: bool = False  # printed as == / != (one value, written that way)

    def matches(self, facts: Mapping[str, object]) -> bool:
        have = fact_values(facts, self.key)
        hit = have is not None and any(v in self.values for v in have)
        return hit != self.negated

    def keys(self) -> Iterator[str]:
        yield self.key

    def render(self) -> tuple[str, int]:
        key = render_key(self.key)
        if self.single:
            return f"{key} {'!=' if self.negated else '=='} {quote(self.values[0])}", _UNARY
        values = ", ".join(quote(v) for v in self.values)
        return f"{key} {'not in' if self.negated else 'in'} {{{values}}}", _UNARY


@dataclass(frozen=True)
class Not(Expr):
    expr: Expr

    def matches(self, facts: Mapping[str, object]) -> bool:
        return not self.expr.matches(facts)

    def keys(self) -> Iterator[str]:
        return self.expr.keys()

    def render(self) -> tuple[str, int]:
        return "!" + _wrap(self.expr, _UNARY), _UNARY


@dataclass(frozen=True)
class And(Expr):
    items: tuple[Expr, ...]

    def matches(self, facts: Mapping[str, object]) -> bool:
        return all(e.matches(facts) for e in self.items)

    def keys(self) -> Iterator[str]:
        for e in self.items:
            yield from e.keys()

    def render(self) -> tuple[str, int]:
        return " && ".join(_wrap(e, _AND + 1) for e in self.items), _AND


@dataclass(frozen=True)
class Or(Expr):
    items: tuple[Expr, ...]

    def matches(self, facts: Mapping[str, object]) -> bool:
        return any(e.matches(facts) for e in self.items)

    def keys(self) -> Iterator[str]:
        for e in self.items:
            yield from e.keys()

    def render(self) -> tuple[str, int]:
        return " || ".join(_wrap(e, _OR + 1) for e in self.items), _OR
