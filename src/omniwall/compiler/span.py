"""Span: which rules sit on a workload's vNICs, in evaluation order (docs/semantics.md §3).

A rule's span is either groups (its appliedTo groups, or its source groups on egress and destination
groups on ingress) or `any` (every vNIC of its tenant; every vNIC when the provider owns it). A workload's
egress/ingress lists therefore depend only on its tenant and on the set of span groups containing it: the
lists are cached under that signature, and workloads sharing app/tier/env share one computation (and one
tuple). The cache is dropped whenever any rule's placement changes; stored per-vNIC lists stay valid
because the caller re-computes exactly the workloads a placement change reaches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from omniwall import PROVIDER_TENANT
from omniwall.compiler.order import OrderKey
from omniwall.compiler.rules import EGRESS, INGRESS, CompiledRule

Key = tuple[str, str]
RuleKey = tuple[str, str, str]
Lists = tuple[tuple[int, ...], tuple[int, ...]]  # (egress ids, ingress ids), in evaluation order
_E, _I = 1, 2  # direction bits


def _mask(dirs: frozenset[str]) -> int:
    return (_E if EGRESS in dirs else 0) | (_I if INGRESS in dirs else 0)


class SpanIndex:
    """Keyed by rule id (ints hash for free; rule keys are 3-tuples whose hash is recomputed each time).
    A rule whose id moves is removed under the old id and added under the new one. Directions are kept
    as bit masks (`_E`, `_I`): or-ing and testing them is cheaper than frozensets of strings. Groups
    are their int ids (`gid`, membership's `Groups.gid`), as in a workload's `groups_of`."""

    def __init__(self, gid: Callable[[Key], int]) -> None:
        self._gid = gid
        self.by_group: dict[int, dict[int, int]] = {}  # gid -> rule id -> direction bits
        # scope None: provider `any` rules (every vNIC); scope tenant: that tenant's `any` rules
        self.any_by_scope: dict[str | None, dict[int, int]] = {}
        self.order: dict[int, OrderKey] = {}
        self.tenant_of: dict[int, str] = {}
        self._cache: dict[tuple[str, frozenset[int]], Lists] = {}
        self._base: dict[str, dict[int, int]] = {}  # tenant -> the `any` rules it gets
        # rule id -> its position in evaluation order: set by `rank()` (a bulk build, after every rule
        # is in), dropped by any add/remove; while set, lists sort by an int instead of an OrderKey
        self._rank: dict[int, int] | None = None

    def add(self, cr: CompiledRule) -> None:
        rid = cr.ir.id
        self.order[rid] = cr.order
        self.tenant_of[rid] = cr.tenant
        for g, dirs in cr.span_groups:
            gi = self._gid(g)
            rules = self.by_group.get(gi)
            if rules is None:
                rules = self.by_group[gi] = {}
            rules[rid] = _mask(dirs)
        if cr.any_dirs:
            scope = None if cr.tenant == PROVIDER_TENANT else cr.tenant
            self.any_by_scope.setdefault(scope, {})[rid] = _mask(cr.any_dirs)
        self.clear_cache()

    def remove(self, cr: CompiledRule) -> None:
        rid = cr.ir.id
        self.order.pop(rid, None)
        self.tenant_of.pop(rid, None)
        for g, _ in cr.span_groups:
            gi = self._gid(g)
            rules = self.by_group.get(gi)
            if rules is not None:
                rules.pop(rid, None)
                if not rules:
                    del self.by_group[gi]
        if cr.any_dirs:
            scope = None if cr.tenant == PROVIDER_TENANT else cr.tenant
            rules = self.any_by_scope.get(scope)
            if rules is not None:
                rules.pop(rid, None)
                if not rules:
                    del self.any_by_scope[scope]
        self.clear_cache()

    def clear_cache(self) -> None:
        self._cache.clear()
        self._base.clear()
        self._rank = None

    def rank(self) -> None:
        """Number the rules in evaluation order (one sort of every rule), so that the lists computed
        next sort by int. Worth it before computing many lists at once (the initial build); OrderKeys
        are unique per rule (tenant, policy, index), so the order is the same either way."""
        order = self.order
        self._rank = {rid: i for i, rid in enumerate(sorted(order, key=order.__getitem__))}

    def lists(self, tenant: str, groups: Iterable[int]) -> Lists:
        """`groups`: the gids of the groups containing the workload."""
        by_group = self.by_group
        sig = (tenant, frozenset(filter(by_group.__contains__, groups)))
        hit = self._cache.get(sig)
        if hit is not None:
            return hit
        base = self._base.get(tenant)
        if base is None:
            base = dict(self.any_by_scope.get(None, {}))
            if tenant != PROVIDER_TENANT:
                base.update(self.any_by_scope.get(tenant, {}))
            self._base[tenant] = base
        dirs = dict(base)
        tenant_of = self.tenant_of
        for g in sig[1]:
            for rid, d in by_group[g].items():
                # A tenant rule is installed only at that tenant's vNICs.
                owner = tenant_of[rid]
                if owner != tenant and owner != PROVIDER_TENANT:
                    continue
                have = dirs.get(rid)
                dirs[rid] = d if have is None else have | d
        rank = self._rank
        ordered = sorted(dirs, key=(self.order if rank is None else rank).__getitem__)
        egress: list[int] = []
        ingress: list[int] = []
        for i in ordered:
            d = dirs[i]
            if d & _E:
                egress.append(i)
            if d & _I:
                ingress.append(i)
        out = (tuple(egress), tuple(ingress))
        self._cache[sig] = out
        return out
