"""Selector language (DESIGN §3): `tier == "web" && env in {"prod","stage"} && !has(quarantine)`.

Parsed by lark from grammar.lark, evaluated by walking a frozen tree; never `eval`. Reference:
docs/reference.md "Selectors".
"""

from omniwall.selectors.ast import canonical
from omniwall.selectors.parser import Selector, SelectorError, facts_of, parse

__all__ = ["Selector", "SelectorError", "canonical", "facts_of", "parse"]
