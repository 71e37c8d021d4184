"""Evaluation order of the rules at one hop (docs/semantics.md §4.2): category, then policy priority
(lower first), then policy tenant and name, then the rule's position in its policy."""

from __future__ import annotations

from omniwall.compiler.ir import CATEGORIES

CATEGORY_INDEX: dict[str, int] = {c: i for i, c in enumerate(CATEGORIES)}

OrderKey = tuple[int, int, str, str, int]


def order_key(category: str, priority: int, tenant: str, policy: str, index: int) -> OrderKey:
    # An unknown category (validation rejects it) sorts after every known one rather than crashing.
    return (CATEGORY_INDEX.get(category, len(CATEGORIES)), priority, tenant, policy, index)
