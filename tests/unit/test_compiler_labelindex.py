"""The label index agrees with brute force (`Selector.matches` on every workload of the scope) after any
sequence of workload adds, fact changes and removals, and selector acquire/release, including the
shortcuts (inverted index for `==`/`in`/`!=`/`not in` conjunctions) and tenant scoping."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from omniwall.compiler.labelindex import LabelIndex
from omniwall.selectors import facts_of, parse

SELECTORS = [
    'tier == "web"',
    'tier in {"web", "db"}',
    'tier != "web"',
    'tier not in {"web", "db"}',
    'tier == "web" && env == "prod"',
    'tier == "web" && env != "prod"',
    'env == "prod" && tier not in {"db"} && has(zone)',
    'user == "alice"',
    'user in {"bob", "carol"} && !has(env)',
    "all()",
    "has(env)",
    "!has(tier)",
    'tier == "web" || env == "dev"',
    "n == 3",
    "ok == true",
    'label("app.io/name") == "x"',
]
TENANTS = ["infra", "a", "b"]

facts = st.builds(
    facts_of,
    st.dictionaries(
        st.sampled_from(["tier", "env", "zone", "app.io/name"]),
        st.sampled_from(["web", "db", "prod", "dev", "x", "z1"]),
        max_size=3,
    ),
    st.dictionaries(
        st.sampled_from(["user", "n", "ok", "env"]),
        st.one_of(
            st.sampled_from(["alice", "bob", "dev"]),
            st.lists(st.sampled_from(["alice", "bob", "carol"]), max_size=2),
            st.sampled_from([3, 3.0, 4, True, False]),
        ),
        max_size=2,
    ),
)

ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 7), st.sampled_from(TENANTS), facts),
        st.tuples(st.just("del"), st.integers(0, 7)),
        st.tuples(st.just("acquire"), st.sampled_from([None, "a", "b"]), st.sampled_from(SELECTORS)),
        st.tuples(st.just("release"), st.integers(0, 100)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops)
def test_members_equal_brute_force(ops: list[tuple[Any, ...]]) -> None:
    li = LabelIndex()
    world: dict[int, tuple[str, dict[str, object]]] = {}
    held: list[tuple[int, str | None, str]] = []
    for op in ops:
        if op[0] == "put":
            _, wid, tenant, f = op
            if wid in world and world[wid][0] != tenant:
                continue  # a workload never changes tenant
            if wid in world:
                li.update_workload(wid, f)
            else:
                li.add_workload(wid, tenant, f)
            world[wid] = (tenant, f)
        elif op[0] == "del":
            if op[1] in world:
                li.remove_workload(op[1])
                del world[op[1]]
        elif op[0] == "acquire":
            held.append((li.acquire(op[1], op[2]), op[1], op[2]))
        elif held:
            sid, _, _ = held.pop(op[1] % len(held))
            li.release(sid)
        for sid, scope, text in held:
            sel = parse(text)
            want = {w for w, (t, f) in world.items() if (scope is None or t == scope) and sel.matches(f)}
            assert li.members(sid) == want, (scope, text)
            for w in want:
                assert sid in li.sids_of(w)


def test_change_reevaluates_only_selectors_mentioning_changed_keys() -> None:
    li = LabelIndex()
    li.add_workload(1, "a", {"tier": "web", "env": "prod"})
    web = li.acquire("a", 'tier == "web"')
    prod = li.acquire("a", 'env == "prod"')
    other = li.acquire("b", 'tier == "web"')
    assert (li.members(web), li.members(prod), li.members(other)) == ({1}, {1}, set())
    changes = li.update_workload(1, {"tier": "db", "env": "prod"})
    assert changes == [(web, 1, False)]
    assert li.update_workload(1, {"tier": "db", "env": "prod", "zone": "z"}) == []


def test_unparseable_selector_matches_nothing() -> None:
    li = LabelIndex()
    li.add_workload(1, "a", {"tier": "web"})
    sid = li.acquire("a", "tier ==")
    assert li.members(sid) == set()
