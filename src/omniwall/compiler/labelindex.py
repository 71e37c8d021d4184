"""The label index: every selector in use, with its member set of workloads, kept current as workloads
come, go and change their labels or attributes.

- Selectors are indexed by the keys they mention. When a workload's facts change, only the selectors that
  mention a changed key are re-evaluated for that workload (never all workloads x all selectors); a
  selector that mentions no key (`all()`) only reacts to workloads being added or removed.
- Scope: a tenant group's selector matches only that tenant's workloads (scope = the tenant); a provider
  group's selector matches every workload (scope = None).
- First evaluation of a selector over its scope uses an inverted index (key, value) -> workloads to find
  candidates when the selector requires `key == value` / `key in {...}` somewhere in a top-level
  conjunction; candidates are then confirmed with `Selector.matches`, so semantics stay the selector
  module's. Other selectors are evaluated once per distinct projection of the workloads' facts onto the
  selector's keys (the result depends on nothing else).
- A selector that does not parse (validation normally prevents it) matches nothing: fail closed.

Workloads are small integers (`wid`s) handed out by the caller; member sets are sets of wids.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from omniwall import PROVIDER_TENANT
from omniwall.selectors import Selector, parse
from omniwall.selectors.ast import And, In
from omniwall.selectors.ast import fact_values as _fact_values

Scope = str | None  # tenant, or None = every tenant (provider)
Change = tuple[int, int, bool]  # (selector id, wid, now a member)


@dataclass(slots=True)
class _Sel:
    sid: int
    scope: Scope
    text: str
    selector: Selector | None  # None: did not parse, matches nothing
    keys: frozenset[str]
    req: tuple[str, tuple[str, ...]] | None = None
    members: set[int] = field(default_factory=set)
    refs: int = 0


def _hashable(value: object) -> object:
    if isinstance(value, list | tuple | set | frozenset):
        return tuple(value)
    return value


def _pairs(facts: Mapping[str, object]) -> list[tuple[str, str]]:
    """(key, canonical value) of every fact; a list fact gives one pair per element."""
    out = []
    for k, value in facts.items():
        if type(value) is str:  # labels: the canonical value is the string itself (kept cheap)
            out.append((k, value))
        else:
            out.extend((k, v) for v in _fact_values(facts, k) or ())
    return out


def _required_values(selector: Selector) -> tuple[str, tuple[str, ...]] | None:
    """(key, values) such that every match has one of `values` for `key`, if the selector says so at the
    top level (`k == v`, `k in {..}`, or one of those in a top-level `&&`). Relies on the AST when the
    selector module exposes it; without it, None (no shortcut, still correct)."""
    expr = getattr(selector, "expr", None)
    items = expr.items if isinstance(expr, And) else (expr,)
    best: tuple[str, tuple[str, ...]] | None = None
    for e in items:
        if isinstance(e, In) and not e.negated and (best is None or len(e.values) < len(best[1])):
            best = (e.key, e.values)
    return best


class LabelIndex:
    def __init__(self) -> None:
        self._sels: dict[int, _Sel] = {}
        self._sid_of: dict[tuple[Scope, str], int] = {}
        self._next_sid = 1
        # Candidate indexes, per scope. A selector with a required (key, value) (see _required_values)
        # can only match workloads having that value: it is found through `_req`. Any other selector is
        # found through the keys it mentions (`_noreq_by_key`), or is re-checked on every add
        # (`_noreq_by_scope`, which includes the keyless `all()`).
        self._req: dict[tuple[Scope, str, str], set[int]] = {}
        self._noreq_by_key: dict[tuple[Scope, str], set[int]] = {}
        self._noreq_by_scope: dict[Scope, set[int]] = {}
        self._facts: dict[int, Mapping[str, object]] = {}
        self._tenant: dict[int, str] = {}
        self._tenant_wids: dict[str, set[int]] = {}
        self._wid_sids: dict[int, set[int]] = {}
        self._inverted: dict[tuple[str, str], set[int]] = {}

    # ------------------------------------------------------------------------------------ lookups
    def members(self, sid: int) -> set[int]:
        return self._sels[sid].members

    def sids_of(self, wid: int) -> set[int]:
        return self._wid_sids.get(wid, set())

    def __len__(self) -> int:
        return len(self._sels)

    # ------------------------------------------------------------------------------------ selectors
    def acquire(self, scope: Scope, text: str) -> int:
        """The id of selector `text` in `scope`, evaluated over the scope's workloads on first use."""
        sid = self._sid_of.get((scope, text))
        if sid is not None:
            self._sels[sid].refs += 1
            return sid
        try:
            selector: Selector | None = parse(text)
        except ValueError:
            selector = None
        sid = self._next_sid
        self._next_sid += 1
        keys = selector.keys if selector is not None else frozenset()
        s = _Sel(sid, scope, text, selector, keys, refs=1)
        self._sels[sid] = s
        self._sid_of[(scope, text)] = sid
        if selector is not None:
            s.req = _required_values(selector)
            self._candidates_index(s, True)
            s.members = self._evaluate(s)
            for wid in s.members:
                self._wid_sids[wid].add(sid)
        return sid

    def release(self, sid: int) -> None:
        s = self._sels[sid]
        s.refs -= 1
        if s.refs > 0:
            return
        del self._sels[sid]
        del self._sid_of[(s.scope, s.text)]
        if s.selector is not None:
            self._candidates_index(s, False)
        for wid in s.members:
            self._wid_sids[wid].discard(sid)

    def _candidates_index(self, s: _Sel, add: bool) -> None:
        if s.req is not None:
            slots = [(self._req, (s.scope, s.req[0], v)) for v in s.req[1]]
        else:
            slots = [(self._noreq_by_key, (s.scope, k)) for k in s.keys]
            slots.append((self._noreq_by_scope, s.scope))  # type: ignore[arg-type]
        for table, key in slots:
            if add:
                table.setdefault(key, set()).add(s.sid)  # type: ignore[attr-defined]
            else:
                ids = table[key]  # type: ignore[index]
                ids.discard(s.sid)
                if not ids:
                    del table[key]  # type: ignore[attr-defined]

    def _having(self, key: str, values: tuple[str, ...]) -> list[set[int]]:
        """The index's own sets of workloads having some canonical value of `key` among `values` (one
        per value present; not copied: callers must not change them)."""
        inv = self._inverted
        return [ws for v in values if (ws := inv.get((key, v)))]

    def _scope_wids(self, scope: Scope) -> Iterable[int]:
        if scope is None:
            return self._facts.keys()
        return self._tenant_wids.get(scope, ())

    def _evaluate(self, s: _Sel) -> set[int]:
        assert s.selector is not None
        sel = s.selector
        if s.req is not None:
            # Candidates: workloads having a required value of every positive `in`/`==` of a top-level
            # conjunction (intersection of the inverted index's sets, smallest first).
            expr = getattr(sel, "expr", None)
            items = expr.items if isinstance(expr, And) else (expr,)
            positive = [e for e in items if isinstance(e, In) and not e.negated]
            negative = [e for e in items if isinstance(e, In) and e.negated]
            # Never copy or scan a set as big as a label value's whole population (`tier == "web"` is a
            # quarter of every tenant's workloads): with one selector of that kind per tenant, that was
            # quadratic in the inventory. Start from the smallest part (the tenant's workloads, or the
            # rarest required value) and only probe the others.
            parts = [self._having(e.key, e.values) for e in positive]
            if s.scope is not None:
                parts.append([self._tenant_wids.get(s.scope, set())])
            parts.sort(key=lambda sets: sum(map(len, sets)))
            cands = set().union(*parts[0])
            for sets in parts[1:]:
                if not cands:
                    break
                if len(sets) == 1:
                    cands &= sets[0]  # iterates over the smaller side
                else:
                    cands = {w for w in cands if any(w in ws for ws in sets)}
            for e in negative:
                for ws in self._having(e.key, e.values):
                    cands = cands - ws  # iterates over the smaller side, like the filter it replaces
            if len(positive) + len(negative) == len(items):
                # A conjunction of `in`/`not in` is exactly this: `In.matches` is "some canonical fact
                # value is among the values" (negated: none is), which is what the index is keyed by.
                return cands
            return {w for w in cands if sel.matches(self._facts[w])}
        keys = sorted(s.keys)
        memo: dict[tuple[object, ...], bool] = {}
        out: set[int] = set()
        for w in self._scope_wids(s.scope):
            facts = self._facts[w]
            proj = tuple(_hashable(facts.get(k)) for k in keys)
            hit = memo.get(proj)
            if hit is None:
                hit = memo[proj] = sel.matches(facts)
            if hit:
                out.add(w)
        return out

    # ------------------------------------------------------------------------------------ workloads
    def _index(self, wid: int, facts: Mapping[str, object], add: bool) -> None:
        for k, v in _pairs(facts):
            if add:
                ws = self._inverted.get((k, v))
                if ws is None:
                    self._inverted[(k, v)] = {wid}
                else:
                    ws.add(wid)
            else:
                ws = self._inverted.get((k, v))
                if ws is not None:
                    ws.discard(wid)
                    if not ws:
                        del self._inverted[(k, v)]

    def _set(self, sid: int, wid: int, member: bool, out: list[Change]) -> None:
        s = self._sels[sid]
        if member == (wid in s.members):
            return
        if member:
            s.members.add(wid)
            self._wid_sids[wid].add(sid)
        else:
            s.members.discard(wid)
            self._wid_sids[wid].discard(sid)
        out.append((sid, wid, member))

    def _scopes(self, tenant: str) -> tuple[Scope, ...]:
        return (None,) if tenant == PROVIDER_TENANT else (tenant, None)

    def add_workload(self, wid: int, tenant: str, facts: Mapping[str, object]) -> list[Change]:
        """A new workload: evaluated against the selectors of its scope (its tenant's and the provider's)
        that could match it."""
        self._facts[wid] = facts
        self._tenant[wid] = tenant
        self._tenant_wids.setdefault(tenant, set()).add(wid)
        self._wid_sids[wid] = set()
        self._index(wid, facts, True)
        if not self._sels:
            return []
        cands: set[int] = set()
        pairs = _pairs(facts)
        for scope in self._scopes(tenant):
            cands |= self._noreq_by_scope.get(scope, set())
            for k, v in pairs:
                cands |= self._req.get((scope, k, v), set())
        out: list[Change] = []
        for sid in sorted(cands):
            sel = self._sels[sid].selector
            if sel is not None and sel.matches(facts):
                self._set(sid, wid, True, out)
        return out

    def update_workload(self, wid: int, facts: Mapping[str, object]) -> list[Change]:
        """Facts changed: re-evaluate only the selectors that mention a changed key."""
        old = self._facts[wid]
        changed = {k for k in old.keys() | facts.keys() if old.get(k) != facts.get(k)}
        if not changed:
            self._facts[wid] = facts
            return []
        self._index(wid, old, False)
        self._facts[wid] = facts
        self._index(wid, facts, True)
        tenant = self._tenant[wid]
        sels = self._sels
        # Re-evaluate only selectors mentioning a changed key that either hold the workload now, or
        # could hold it with its new facts.
        cands = {sid for sid in self._wid_sids.get(wid, ()) if not sels[sid].keys.isdisjoint(changed)}
        pairs = _pairs(facts)
        for scope in self._scopes(tenant):
            for k in changed:
                cands |= self._noreq_by_key.get((scope, k), set())
            for k, v in pairs:
                for sid in self._req.get((scope, k, v), ()):
                    if not sels[sid].keys.isdisjoint(changed):
                        cands.add(sid)
        out: list[Change] = []
        for sid in sorted(cands):
            sel = sels[sid].selector
            if sel is not None:
                self._set(sid, wid, sel.matches(facts), out)
        return out

    def remove_workload(self, wid: int) -> list[Change]:
        out: list[Change] = []
        for sid in sorted(self._wid_sids.get(wid, ())):
            self._set(sid, wid, False, out)
        self._wid_sids.pop(wid, None)
        facts = self._facts.pop(wid, None)
        if facts is not None:
            self._index(wid, facts, False)
        tenant = self._tenant.pop(wid, None)
        if tenant is not None:
            self._tenant_wids[tenant].discard(wid)
        return out
