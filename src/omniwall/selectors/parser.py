"""Parse selector text into a `Selector` with lark (LALR(1), grammar in grammar.lark).

Why lark: a declarative grammar file is easier to review than a hand-written parser, LALR gives the set
of expected tokens at the error position (so messages can say what was expected and where), and it
never evaluates the input. Parses are cached: the same selector text is parsed once per process.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from omniwall.selectors.ast import BARE_KEY_RE, All, And, Expr, Has, In, Not, Or, canonical


class SelectorError(ValueError):
    """A selector that does not parse. `column` (and `line`) are 1-based, pointing into `text`."""

    def __init__(self, text: str, column: int, reason: str, line: int = 1) -> None:
        self.text = text
        self.column = column
        self.line = line
        self.reason = reason
        where = f"line {line}, column {column}" if "\n" in text else f"column {column}"
        shown = text if len(text) <= 80 else text[:77] + "..."  # the column still points into `text`
        super().__init__(f"selector {shown!r}: {where}: {reason}")

    def __reduce__(self) -> tuple[type[SelectorError], tuple[str, int, str, int]]:
        return (SelectorError, (self.text, self.column, self.reason, self.line))


@dataclass(frozen=True)
class Selector:
    """A parsed selector. Equal selectors have equal trees, whatever their spelling (`text`)."""

    text: str = field(compare=False)
    expr: Expr
    keys: frozenset[str] = field(compare=False)

    def matches(self, facts: Mapping[str, object]) -> bool:
        return self.expr.matches(facts)

    def __str__(self) -> str:
        """Canonical form: re-parses to an equal selector."""
        return str(self.expr)


def facts_of(
    labels: Mapping[str, str] | None, attributes: Mapping[str, object] | None = None
) -> dict[str, object]:
    """A workload's fact namespace: attributes and labels merged; when both define a key, the label wins
    (labels are what an operator sets by hand; attributes come from inventory and identity feeds)."""
    facts: dict[str, object] = dict(attributes or {})
    facts.update(labels or {})
    return facts


# ------------------------------------------------------------------------------------------ tree -> AST

_ESCAPE_RE = re.compile(r"\\(u[0-9a-fA-F]{4}|.)")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def _unquote(token: str) -> str:
    def one(m: re.Match[str]) -> str:
        e = m.group(1)
        if len(e) == 5:
            return chr(int(e[1:], 16))
        return _ESCAPES.get(e, e)

    return _ESCAPE_RE.sub(one, token[1:-1])


@v_args(inline=True)
class _ToAst(Transformer[Token, Expr]):
    def bare_key(self, tok: Token) -> str:
        return str(tok)

    def quoted_key(self, tok: Token) -> str:
        return _unquote(tok)

    def string(self, tok: Token) -> str:
        return _unquote(tok)

    def number(self, tok: Token) -> str:
        return canonical(float(tok)) if "." in tok else canonical(int(tok))

    def boolean(self, tok: Token) -> str:
        return str(tok)

    def set_(self, *values: str | None) -> tuple[str, ...]:
        return tuple(sorted({v for v in values if v is not None}))

    def eq(self, key: str, value: str) -> Expr:
        return In(key, (value,), single=True)

    def ne(self, key: str, value: str) -> Expr:
        return In(key, (value,), negated=True, single=True)

    def in_(self, key: str, values: tuple[str, ...]) -> Expr:
        return In(key, values)

    def not_in(self, key: str, values: tuple[str, ...]) -> Expr:
        return In(key, values, negated=True)

    def has(self, key: str) -> Expr:
        return Has(key)

    def all_(self) -> Expr:
        return All()

    def not_(self, expr: Expr) -> Expr:
        return Not(expr)

    def and_expr(self, *items: Expr) -> Expr:
        return And(items)

    def or_expr(self, *items: Expr) -> Expr:
        return Or(items)


_PARSER = Lark(
    files("omniwall.selectors").joinpath("grammar.lark").read_text(encoding="utf-8"),
    parser="lalr",
    lexer="contextual",
    maybe_placeholders=True,
)

# ----------------------------------------------------------------------------------------------- errors

# How each terminal is named in a message, in the order they are listed.
TERMINAL_NAMES: dict[str, str] = {
    "_EQ": "'=='",
    "_NE": "'!='",
    "_IN": "'in'",
    "_NOT": "'not in'",
    "_AND": "'&&'",
    "_OR": "'||'",
    "KEY": "a key",
    "_LABEL": "'label(\"...\")'",
    "_HAS": "'has(key)'",
    "_ALL": "'all()'",
    "_BANG": "'!'",
    "_LPAR": "'('",
    "_RPAR": "')'",
    "_LBRACE": "'{'",
    "_RBRACE": "'}'",
    "_COMMA": "','",
    "STRING": 'a string ("...")',
    "NUMBER": "a number",
    "TRUE": "true",
    "FALSE": "false",
    "$END": "the end of the selector",
}
_HINTS = {
    "=": " (compare with '==')",
    "&": " (use '&&')",
    "|": " (use '||')",
    "'": " (strings use double quotes)",
}


def _expected(names: set[str]) -> str:
    order = list(TERMINAL_NAMES)
    shown = [TERMINAL_NAMES[n] for n in sorted(names, key=lambda n: order.index(n) if n in order else 99)]
    shown = [s for s in shown if s] or sorted(names)
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]


def _accepted(text: str, upto: int) -> set[str]:
    """Terminals the parser accepts after `text[:upto]`. Exact, unlike the LALR lookahead sets lark
    reports (which merge states: after `tier` they would also offer ')')."""
    ip = _PARSER.parse_interactive(text[:upto])
    try:
        for _ in ip.iter_parse():
            pass
        return set(ip.accepts())
    except UnexpectedInput:  # cannot happen for a prefix that lexed and parsed; stay safe
        return set()


def _line_col(text: str, pos: int) -> tuple[int, int]:
    before = text[:pos]
    return before.count("\n") + 1, pos - (before.rfind("\n") + 1) + 1


def _error(text: str, e: UnexpectedInput) -> SelectorError:
    if not text.strip():
        return SelectorError(text, 1, "empty selector (use all() to match everything)")
    if isinstance(e, UnexpectedCharacters):
        pos = e.pos_in_stream
        got = text[pos]
    elif isinstance(e, UnexpectedToken) and e.token.type != "$END":
        pos = e.token.start_pos if e.token.start_pos is not None else len(text)
        got = str(e.token)
    else:  # end of input: point just past the last character
        pos, got = len(text.rstrip()), ""
    line, column = _line_col(text, pos)
    if got == '"':
        return SelectorError(text, column, "unterminated string", line)
    accepted = _accepted(text, pos)
    expected = _expected(accepted)
    if not got:
        return SelectorError(text, column, f"unexpected end of selector, expected {expected}", line)
    hint = _HINTS.get(got, "")
    if "STRING" in accepted and BARE_KEY_RE.fullmatch(got):
        hint = f' (strings need double quotes: "{got}")'
    return SelectorError(text, column, f"expected {expected}, got {got!r}{hint}", line)


# Nesting of `!`, `&&`/`||` inside parentheses: the AST is walked recursively (transform, match, print),
# so a selector of 500 `!` used to exhaust the stack (a 500). Real selectors nest a handful of levels.
MAX_DEPTH = 64


def _too_deep(tree: Tree[Token]) -> Token | None:
    """The first token below `MAX_DEPTH` levels of the tree, if any (iterative: the tree may be deep)."""
    stack: list[tuple[Tree[Token] | Token, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Tree):
            stack.extend((child, depth + 1) for child in node.children if child is not None)
        elif depth > MAX_DEPTH:
            return node
    return None


@lru_cache(maxsize=65536)  # the compiler re-parses every group selector: keep them all
def parse(text: str) -> Selector:
    """Parse selector text; raises SelectorError naming the column of the first problem."""
    try:
        tree = _PARSER.parse(text)
    except UnexpectedInput as e:
        raise _error(text, e) from None
    deep = _too_deep(tree)
    if deep is not None:
        line, column = _line_col(text, deep.start_pos or 0)
        raise SelectorError(text, column, f"nested deeper than {MAX_DEPTH} levels", line)
    expr = _ToAst().transform(tree)
    return Selector(text=text, expr=expr, keys=frozenset(expr.keys()))
