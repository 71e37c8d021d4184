"""Rule ids: stable, 31-bit, never 0, deterministic collision resolution; the incremental allocator equals
a fresh assignment after any change."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import omniwall.compiler.ruleids as ruleids
from omniwall.compiler.ruleids import MAX_ID, RuleIds, assign_rule_ids, natural_id


def test_ids_are_stable_known_values() -> None:
    # Pinned: these ids are ct marks and nft comments on running hosts; they must never change.
    assert natural_id(("a", "web", "allow-http")) == natural_id(("a", "web", "allow-http"))
    ids = assign_rule_ids([("a", "web", "allow-http"), ("infra", "base", "dns")])
    assert ids == {
        ("a", "web", "allow-http"): natural_id(("a", "web", "allow-http")),
        ("infra", "base", "dns"): natural_id(("infra", "base", "dns")),
    }
    # the low 31 bits of blake2b-64("a/web/allow-http")
    assert natural_id(("a", "web", "allow-http")) == 360020723


def test_range_and_independence_from_other_rules() -> None:
    keys = [("t", f"p{i}", f"r{j}") for i in range(50) for j in range(5)]
    ids = assign_rule_ids(keys)
    assert all(1 <= i <= MAX_ID for i in ids.values())
    assert len(set(ids.values())) == len(keys)
    assert assign_rule_ids(keys[:10]) == {k: ids[k] for k in keys[:10]}


def test_collisions_resolved_in_sorted_order_with_linear_probing(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    fake = {("a", "p", "x"): 5, ("a", "p", "y"): 5, ("a", "p", "z"): 6, ("b", "p", "zero"): 0}
    monkeypatch.setattr(ruleids, "natural_id", lambda k: fake[k])
    ids = assign_rule_ids(reversed(list(fake)))
    assert ids == {("a", "p", "x"): 5, ("a", "p", "y"): 6, ("a", "p", "z"): 7, ("b", "p", "zero"): 1}
    top = {("a", "p", "x"): MAX_ID, ("a", "p", "y"): MAX_ID}
    monkeypatch.setattr(ruleids, "natural_id", lambda k: top[k])
    assert assign_rule_ids(top) == {("a", "p", "x"): MAX_ID, ("a", "p", "y"): 1}


keys = st.tuples(st.sampled_from("ab"), st.sampled_from("pq"), st.sampled_from("rstuvw"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.lists(keys, max_size=4), st.lists(keys, max_size=4)), max_size=12))
def test_incremental_allocator_equals_fresh_assignment(monkeypatch, steps) -> None:  # type: ignore[no-untyped-def]
    # A tiny hash space forces collisions and probe chains.
    monkeypatch.setattr(ruleids, "natural_id", lambda k: hash(k) % 7)
    alloc = RuleIds()
    current: set[tuple[str, str, str]] = set()
    for add, remove in steps:
        before = alloc.as_dict()
        moved = alloc.update(add, remove)
        # `add` only adds absent keys, `remove` only removes present ones, both against the old set
        current = (current - set(remove)) | (set(add) - current)
        assert set(alloc.as_dict()) == current
        assert alloc.as_dict() == assign_rule_ids(current)
        assert moved == {k: before[k] for k in current if k in before and before[k] != alloc[k]}
