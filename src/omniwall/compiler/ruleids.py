"""Stable 31-bit rule ids (docs/semantics.md §7).

A rule's id is the low 31 bits of blake2b("tenant/policy/rule"): the same rule gets the same id on every
manager, after every restart, whatever else changes. Collisions (about one in 2**31 per pair) are resolved
deterministically: keys are taken in sorted order and each takes the first free id at or after its
natural one (linear probing, wrapping to 1; 0 is never used because it means "no mark" in conntrack).
So an id only moves when a collision appears or disappears in its probe chain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

RuleKey = tuple[str, str, str]  # (tenant, policy, rule)
MAX_ID = 2**31 - 1
DEFAULT_ID_BIT = 2**31  # default-action ids: 2**31..2**32-1, never a rule id (those are < 2**31)
DEFAULT_POLICY = "(default)"  # = flows.record.DEFAULT_POLICY (no import: the compiler stays standalone)


def natural_id(key: RuleKey) -> int:
    """The id a rule gets when nothing collides with it (may be 0: probing skips 0)."""
    digest = hashlib.blake2b("/".join(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & MAX_ID


def default_rule_id(tenant: str, action: str) -> int:
    """The id of a tenant's default action (`drop`, `reject`, `allow`): stable like a rule id, in its own
    range (high bit set, so it never collides with a rule id and still fits the 32-bit ct mark). Flow
    records and NFLOG prefixes name a default verdict by it. Memoised: every IRVnic derives it (a
    million at 1M workloads, a blake2b each), from a handful of (tenant, action) pairs."""
    i = _DEFAULT_IDS.get((tenant, action))
    if i is None:
        if len(_DEFAULT_IDS) >= 65_536:  # bounded: tenants come and go over a process's life
            _DEFAULT_IDS.clear()
        i = _DEFAULT_IDS[(tenant, action)] = DEFAULT_ID_BIT | natural_id((tenant, DEFAULT_POLICY, action))
    return i


_DEFAULT_IDS: dict[tuple[str, str], int] = {}


def is_default_id(rule_id: int) -> bool:
    return rule_id >= DEFAULT_ID_BIT


def _next(i: int) -> int:
    return 1 if i >= MAX_ID else i + 1


def assign_rule_ids(keys: Iterable[RuleKey]) -> dict[RuleKey, int]:
    """Ids for a whole set of rules: sorted order, linear probing, never 0."""
    taken: set[int] = set()
    out: dict[RuleKey, int] = {}
    for key in sorted(set(keys)):
        i = natural_id(key)
        while i == 0 or i in taken:
            i = _next(i)
        taken.add(i)
        out[key] = i
    return out


class RuleIds:
    """The id assignment of a changing set of rules, equal at every moment to `assign_rule_ids` of the
    current keys. Adding or removing a key is O(1) while no id has been probed (the overwhelmingly common
    case); otherwise the assignment is recomputed (O(n log n), rare)."""

    def __init__(self, keys: Iterable[RuleKey] = ()) -> None:
        self._ids: dict[RuleKey, int] = assign_rule_ids(keys)
        self._owner: dict[int, RuleKey] = {i: k for k, i in self._ids.items()}
        self._probed = sum(1 for k, i in self._ids.items() if natural_id(k) != i)

    def __getitem__(self, key: RuleKey) -> int:
        return self._ids[key]

    def get(self, key: RuleKey) -> int | None:
        return self._ids.get(key)

    def __len__(self) -> int:
        return len(self._ids)

    def as_dict(self) -> dict[RuleKey, int]:
        return dict(self._ids)

    def update(self, add: Iterable[RuleKey] = (), remove: Iterable[RuleKey] = ()) -> dict[RuleKey, int]:
        """Apply a change of the key set; returns the keys that existed before and after and whose id
        moved, with their old id (new keys are not reported)."""
        add = list(dict.fromkeys(k for k in add if k not in self._ids))
        remove = list(dict.fromkeys(k for k in remove if k in self._ids))
        if not add and not remove:
            return {}
        fast = self._probed == 0
        if fast:
            naturals = {k: natural_id(k) for k in add}
            values = list(naturals.values())
            fast = 0 not in values and len(set(values)) == len(values)
            fast = fast and not any(i in self._owner and self._owner[i] not in remove for i in values)
        if fast:
            for k in remove:
                del self._owner[self._ids.pop(k)]
            for k, i in naturals.items():
                self._ids[k] = i
                self._owner[i] = k
            return {}
        before = self._ids
        keys = (set(before) - set(remove)) | set(add)
        self._ids = assign_rule_ids(keys)
        self._owner = {i: k for k, i in self._ids.items()}
        self._probed = sum(1 for k, i in self._ids.items() if natural_id(k) != i)
        return {k: before[k] for k, i in self._ids.items() if k in before and before[k] != i}
