"""Connection limits (docs/conntrack-limits.md): the Tenant field, the provider's ceiling, the IR field
with its JSON round trip and deltas, the nft rules, and the usage reader's alarm levels."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest
from pydantic import ValidationError
from test_nft_render import FakeTable, _mutations, base_state, full

from omniwall.compiler.build import compile_catalog
from omniwall.compiler.incremental import IncrementalCompiler, effective_limit
from omniwall.compiler.ir import HostDesiredState, apply_delta, delta_from_json, diff
from omniwall.compiler.testing import host, tenant, workload
from omniwall.dataplane.nft.names import connlimit_counter
from omniwall.dataplane.nft.render import render_delta, render_table, render_vnic_chains, shapes_of
from omniwall.model.catalog import Catalog
from omniwall.model.resources import ConnectionLimit, TenantSpec, Vnic


def _spec(per: int | None = None, rate: int | None = None) -> TenantSpec:
    return TenantSpec(connectionLimit=ConnectionLimit(perWorkload=per, newPerSecond=rate))


# ------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"perWorkload": 0}, "perWorkload"),
        ({"perWorkload": -5}, "perWorkload"),
        ({"newPerSecond": 10_000_001}, "newPerSecond"),
        ({"newPerSecond": True}, "newPerSecond"),
        ({"perWorkload": "100"}, "perWorkload"),
        ({"perWorkload": 1.5}, "perWorkload"),
        ({"perTenant": 5}, "perTenant"),
    ],
)
def test_bad_limits_are_refused_naming_the_field(value: dict[str, Any], field: str):
    with pytest.raises(ValidationError) as e:
        TenantSpec.model_validate({"connectionLimit": value})
    assert field in str(e.value)


def test_limits_default_to_none():
    assert TenantSpec().connectionLimit is None
    assert TenantSpec.model_validate({"connectionLimit": {}}).connectionLimit == ConnectionLimit()


# ----------------------------------------------------------------------------------- the ceiling


@pytest.mark.parametrize(
    ("own", "provider", "expected"),
    [
        (TenantSpec(), TenantSpec(), (None, None)),
        (TenantSpec(), _spec(1000, 50), (1000, 50)),  # the provider's limit is the default
        (_spec(500), _spec(1000, 50), (500, 50)),  # lower than the ceiling: kept
        (_spec(5000, 10), _spec(1000, 50), (1000, 10)),  # higher: held to the ceiling
        (_spec(5000, 10), TenantSpec(), (5000, 10)),  # no ceiling
    ],
)
def test_effective_limit_never_exceeds_the_providers(own, provider, expected):
    assert effective_limit(own, provider) == expected


def _catalog(infra: TenantSpec, a: TenantSpec) -> list[Any]:
    return [
        host("h1"),
        tenant("infra", **infra.model_dump(exclude_unset=True)),
        tenant("a", **a.model_dump(exclude_unset=True)),
        workload("a", "w1", "h1", [Vnic(name="eth0", ips=["10.0.0.1"])]),
        workload("infra", "p1", "h1", [Vnic(name="eth0", ips=["10.0.0.9"])]),
    ]


def _limits(st: HostDesiredState) -> dict[str, tuple[int | None, int | None]]:
    return {v.workload: (v.conn_limit, v.conn_rate) for v in st.vnics}


def test_compiled_vnics_carry_the_effective_limit():
    states = compile_catalog(Catalog.of(_catalog(_spec(1000, 50), _spec(20000))))
    assert _limits(states["h1"]) == {"a/w1": (1000, 50), "infra/p1": (1000, 50)}


def test_limit_changes_reach_the_vnics_incrementally():
    res = _catalog(TenantSpec(), TenantSpec())
    comp = IncrementalCompiler(Catalog.of(res), revision=1)
    before = comp.state("h1")
    assert _limits(before) == {"a/w1": (None, None), "infra/p1": (None, None)}
    # the tenant's own limit: only its vNICs change
    d1 = comp.update([tenant("a", connectionLimit={"perWorkload": 300})])
    s1 = apply_delta(before, d1["h1"])
    assert [u.vnic.workload for u in d1["h1"].vnic_updates] == ["a/w1"]
    assert _limits(s1) == {"a/w1": (300, None), "infra/p1": (None, None)}
    # the provider's ceiling: every tenant's vNICs
    d2 = comp.update([tenant("infra", connectionLimit={"perWorkload": 100, "newPerSecond": 9})])
    s2 = apply_delta(s1, d2["h1"])
    assert _limits(s2) == {"a/w1": (100, 9), "infra/p1": (100, 9)}
    fresh = compile_catalog(
        Catalog.of(_catalog(_spec(100, 9), TenantSpec(connectionLimit=ConnectionLimit(perWorkload=300))))
    )
    assert replace(s2, revision=0) == fresh["h1"]
    # the JSON round trip (feed, blob) keeps the fields
    assert HostDesiredState.loads(s2.dumps()) == s2
    assert apply_delta(s1, delta_from_json(d2["h1"].to_json())) == s2


# ----------------------------------------------------------------------------------------- render


def _limited(st: HostDesiredState, **kw: int | None) -> HostDesiredState:
    return replace(st, vnics=tuple(replace(v, **kw) if v.ifname == "tapa" else v for v in st.vnics))


def test_limit_rules_come_first_in_the_egress_entry_chain():
    st = _limited(base_state(), conn_limit=100, conn_rate=40)
    v = st.vnic_map()["tapa"]
    chains = render_vnic_chains(v, st.rule_map(), shapes_of(st))
    entry, limits = chains["e_tapa"], chains["e_tapa_l"]
    assert entry[0] == {"expr": [{"jump": {"target": "e_tapa_l"}}], "comment": "limits"}
    assert [r["comment"] for r in limits] == ["connrate", "connlimit"]
    rate, count = limits[0]["expr"], limits[1]["expr"]
    new = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["new"]}}
    assert rate[0] == count[0] == new
    assert {"limit": {"rate": 40, "per": "second", "burst": 5, "inv": True}} in rate
    assert {"ct count": {"val": 100, "inv": True}} in count
    for r in (rate, count):
        assert r[-2:] == [{"counter": connlimit_counter("tapa")}, {"drop": None}]
    assert "i_tapa_l" not in chains and chains["i_tapa"][0]["comment"] == "v4"
    table = render_table(st)
    decl = {"add": {"counter": {"family": "inet", "table": "omniwall", "name": "cl_tapa"}}}
    assert decl in table
    assert table.index(decl) < min(
        i
        for i, c in enumerate(table)
        if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == "e_tapa_l"
    )
    assert not any("counter" in c.get("add", {}) for c in render_table(base_state()))


class CountingFake(FakeTable):
    """FakeTable plus named counters: created before a rule names one, never deleted while named."""

    def _one(self, t: dict[str, Any] | None, cmd: dict[str, Any]) -> dict[str, Any] | None:
        ((verb, body),) = cmd.items()
        if "counter" in body:
            assert t is not None
            name = body["counter"]["name"]
            counters = t.setdefault("counters", [])
            if verb == "add":
                counters[:] = sorted({*counters, name})
            else:
                assert name in counters, f"delete of missing counter {name}"
                named = {e["counter"] for rs in t["chains"].values() for r in rs for e in r["expr"]
                         if isinstance(e.get("counter"), str)}  # fmt: skip
                assert name not in named, f"counter {name} deleted while referenced"
                counters.remove(name)
                if not counters:
                    del t["counters"]
            return t
        if verb == "add" and "rule" in body and t is not None:
            for e in body["rule"]["expr"]:
                if isinstance(e.get("counter"), str):
                    assert e["counter"] in t.get("counters", []), f"rule names missing counter {e}"
        return super()._one(t, cmd)


@pytest.mark.parametrize("seed", range(12))
def test_incremental_limits_equal_a_full_render(seed: int):
    rnd = random.Random(seed)
    s = base_state()
    fake = CountingFake()
    fake.apply(render_table(s))
    for _ in range(6):
        n = _mutations(s, rnd)
        vnics = [
            replace(
                v,
                conn_limit=rnd.choice([None, 10, 5000]),
                conn_rate=rnd.choice([None, None, 100]),
            )
            if rnd.random() < 0.5
            else v
            for v in n.vnics
        ]
        n = replace(n, vnics=tuple(vnics))
        assert apply_delta(s, diff(s, n)) == n
        try:
            cmds = render_delta(s, n)
        except ValueError:  # RawLayoutChanged: the backend renders the whole table
            cmds = render_table(n)
        fake.apply(cmds)
        want = CountingFake()
        want.apply(render_table(n))
        assert fake.t == want.t, f"seed {seed}"
        assert {k: v for k, v in (fake.t or {}).items() if k != "counters"} == full(n)
        s = n


def test_a_policy_change_leaves_the_limit_chain_and_its_count_alone():
    """`ct count` keeps its connections in the rule: re-adding it would let a tenant reset its count by
    editing its own policies. Only a change of the limits themselves rewrites `e_<if>_l`."""
    old = _limited(base_state(), conn_limit=100, conn_rate=40)
    vnics = tuple(replace(v, egress=v.egress[1:]) if v.ifname == "tapa" else v for v in old.vnics)
    new = replace(old, revision=2, vnics=vnics)

    def touches(cmds: list[dict[str, Any]], chain: str) -> bool:
        return any(
            (body.get("chain") or body.get("rule") or {}).get("name", (body.get("rule") or {}).get("chain"))
            == chain
            for c in cmds
            for body in c.values()
        )

    cmds = render_delta(old, new)
    # the chains whose rules changed are rewritten (only those: the entry chain `e_tapa` is as it was)
    assert touches(cmds, "e_tapa_0v4") and not touches(cmds, "e_tapa_l")
    fake = CountingFake()
    fake.apply(render_table(old))
    fake.apply(cmds)
    want = CountingFake()
    want.apply(render_table(new))
    assert fake.t == want.t
    assert touches(render_delta(old, _limited(new, conn_limit=50)), "e_tapa_l")
