"""The nft planner without root: every plan is executed by the strict fake table (nft_fake.py), which
refuses what the kernel refuses, and must land exactly where a full render of the target lands; the
read-back of the fake's listing must give the target back. Revocation targets are checked per path."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from nft_fake import FakeTable
from test_nft_render import R, _mutations, base_state, full, state

from omniwall.compiler.ir import (
    HostDelta,
    HostDesiredState,
    IRSet,
    IRVnic,
    RuleUpdate,
    ServiceMatch,
    SetUpdate,
    VnicUpdate,
    apply_delta,
    diff,
)
from omniwall.dataplane.nft import blob
from omniwall.dataplane.nft.names import STATE_BUCKETS
from omniwall.dataplane.nft.planner import BULK_LOAD_MIN_ELEMENTS, NftPlanner, Plan, normalized
from omniwall.dataplane.nft.render import render_table

PREFIXES = ("ow",)


def planner() -> NftPlanner:
    return NftPlanner(1, 16, PREFIXES)


def execute(fake: FakeTable, plan: Plan, p: NftPlanner) -> None:
    """What the applier does: the transaction, then the raw batch; the book moves on success only."""
    work = FakeTable()
    work.t = fake.t
    if plan.commands:
        work.apply(plan.commands)
    if plan.ops:
        work.ops(plan.ops)
    fake.t = work.t
    p.committed(plan)


def full16(s: HostDesiredState) -> dict:
    return full_table(render_table(s, 1, PREFIXES, 16))


def full_table(cmds: list) -> dict:
    f = FakeTable()
    f.apply(cmds)
    assert f.t is not None
    return f.t


def _round_trip(fake: FakeTable, p: NftPlanner, want: HostDesiredState) -> None:
    back = p.read_back(fake.listing())
    assert back is not None, "the table the plans built does not read back"
    assert normalized(back) == normalized(want)


@pytest.mark.parametrize("seed", range(30))
def test_changes_land_where_a_full_render_lands(seed: int) -> None:
    rnd = random.Random(seed)
    p = planner()
    s = base_state()
    fake = FakeTable()
    execute(fake, p.full(s, exists=False), p)
    kinds = set()
    for _ in range(6):
        n = _mutations(s, rnd)
        d = diff(s, n)
        target = apply_delta(s, d)
        plan = p.change(s, d, target)
        kinds.add(plan.kind)
        execute(fake, plan, p)  # the fake raises on any dangling reference or bad order
        assert fake.t == full16(target), f"seed {seed}: {plan.kind} plan differs from a full render"
        _round_trip(fake, p, target)
        s = target
    assert kinds


def _one_rule_host(rules: int = 60) -> HostDesiredState:
    sets = [IRSet(f"g{k}", tuple(f"10.{k}.0.{i}" for i in range(1, 6))) for k in range(6)]
    rs = [
        R(i, "allow", src=f"g{i % 6}", dst=f"g{(i + 1) % 6}", services=(ServiceMatch("tcp", ((i, i),)),))
        for i in range(1, rules + 1)
    ]
    vnics = [
        IRVnic(f"ow{k}", "t/w", "t", (f"10.{k % 6}.0.1",), egress=tuple(range(1 + k * 10, 11 + k * 10)))
        for k in range(rules // 10)
    ]
    return state(1, vnics, rs, sets)


def test_one_rule_change_renders_only_what_the_delta_names() -> None:
    p = planner()
    s = _one_rule_host()
    fake = FakeTable()
    execute(fake, p.full(s, exists=False), p)
    r = s.rule_map()[15]
    r2 = replace(r, services=(ServiceMatch("tcp", ((99, 99),)),))
    n = replace(s, revision=2, rules=tuple(r2 if x is r else x for x in s.rules))
    d = diff(s, n)
    assert [u.vnic.ifname for u in d.vnic_updates] == ["ow1"]
    plan = p.change(s, d, n)
    assert plan.kind == "delta" and plan.revoke == "after_change" and not plan.ops
    execute(fake, plan, p)
    assert fake.t == full16(n)
    _round_trip(fake, p, n)
    touched_chains = {c["add"]["rule"]["chain"] for c in plan.commands if "rule" in c.get("add", {})}
    # ow1's chains, path chains, and the rule's bucket of the stored IR (ow1 itself is unchanged)
    assert not any(c.startswith(("e_ow0", "e_ow2", "i_ow0")) for c in touched_chains), touched_chains
    assert {c for c in touched_chains if c.startswith("_state")} == {"_state_15"}
    # of ow1's own chains, only those whose rules changed are rewritten (its ingress, default and
    # entry chains are as they were)
    flushed = {c["flush"]["chain"]["name"] for c in plan.commands if "chain" in c.get("flush", {})}
    assert flushed and not any(c.startswith("i_ow1") or c in ("e_ow1", "e_ow1_d") for c in flushed), flushed
    assert {c for c in touched_chains if c.startswith("e_ow1")} <= flushed  # no rule appended twice
    # the next change starts from the book the commit left
    n2 = replace(n, revision=3, vnics=tuple(replace(v, default_action="reject") if v.ifname == "ow2" else v
                                            for v in n.vnics))  # fmt: skip
    plan2 = p.change(n, diff(n, n2), n2)
    assert plan2.kind == "delta"
    execute(fake, plan2, p)
    assert fake.t == full16(n2)


def test_members_only_delta_is_one_raw_batch_with_revocation_targets() -> None:
    p = planner()
    s = base_state()  # 'web' is used by allow rules 1 and 5; 'bad' by drop rule 2
    fake = FakeTable()
    execute(fake, p.full(s, exists=False), p)
    d = HostDelta(
        "h",
        1,
        2,
        set_updates=(
            SetUpdate("web", removed_addresses=("fd00::1",), added_addresses=("10.0.0.9",)),
            SetUpdate("bad", added_addresses=("10.9.9.10",)),
        ),
    )
    target = apply_delta(s, d)
    plan = p.change(s, d, target)
    if plan.kind != "fast":  # fd00::1 is tapa's own address: its local side changes -> general path
        assert plan.kind in ("delta", "diff")
        d = HostDelta("h", 1, 2, set_updates=(SetUpdate("bad", added_addresses=("10.9.9.10",)),))
        target = apply_delta(s, d)
        plan = p.change(s, d, target)
    assert plan.kind == "fast" and not plan.commands and plan.revoke == "involving"
    # an address joining a set a refusing rule uses may tighten its connections; nothing else does
    assert plan.suspects == {"10.9.9.10"}
    execute(fake, plan, p)
    assert fake.t == full16(target)
    _round_trip(fake, p, target)
    # leaving a granting set: a suspect; joining one: not
    d2 = HostDelta("h", 2, 3, set_updates=(SetUpdate("nets", removed_addresses=("10.0.0.5",)),))
    t2 = apply_delta(target, d2)
    plan2 = p.change(target, d2, t2)
    if plan2.kind == "fast":
        assert plan2.suspects == {"10.0.0.5"}
    execute(fake, plan2, p)
    assert fake.t == full16(t2)


def test_a_refused_fast_batch_changes_nothing() -> None:
    p = planner()
    s = base_state()
    fake = FakeTable()
    execute(fake, p.full(s, exists=False), p)
    before = fake.t
    bogus = HostDelta("h", 1, 2, set_updates=(SetUpdate("bad", removed_addresses=("10.55.0.1",)),))
    plan = p.change(s, bogus, apply_delta(s, bogus))
    with pytest.raises(AssertionError, match="delete of missing element"):
        execute(fake, plan, p)
    assert fake.t == before


def test_bulk_load_splits_structure_and_members() -> None:
    p = planner()
    big = tuple(
        sorted(f"10.{64 + i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(BULK_LOAD_MIN_ELEMENTS + 1))
    )
    s = state(
        1, [IRVnic("owa", "t/a", "t", ("10.0.0.1",), egress=(1,))], [R(1, src="big")], [IRSet("big", big)]
    )
    plan = p.full(s, exists=False)
    assert plan.kind == "bulk"
    # the members and the revision only in the raw batch: a table whose second step failed has no revision
    assert not any("quota" in c.get("add", {}) for c in plan.commands)
    assert not any(c.get("add", {}).get("element", {}).get("name") == "a4_big" for c in plan.commands)
    fake = FakeTable()
    fake.apply(plan.commands)
    assert p.read_back(fake.listing()) is None  # not adoptable between the two steps
    fake.ops(plan.ops)
    assert fake.t == full16(s)
    _round_trip(fake, p, s)
    assert p.full(s, exists=True).kind == "table"


def test_read_back_refuses_drift_and_reads_the_legacy_blob() -> None:
    p = planner()
    s = base_state()
    fake = FakeTable()
    execute(fake, p.full(s, exists=False), p)
    _round_trip(fake, p, s)
    listing = fake.listing()
    # a chain the state does not have: drifted
    assert p.read_back([*listing, {"rule": {"chain": "e_intruder"}}]) is None
    # a bucket of the stored IR missing: not adoptable
    assert p.read_back([o for o in listing if o.get("rule", {}).get("chain") != "_state_07"]) is None


def test_sync_plan_has_the_whole_table_as_fallback() -> None:
    p = planner()
    s = base_state()
    n = _mutations(s, random.Random(3))
    plan = p.sync(normalized(s), normalized(n))
    if plan.kind == "diff":
        assert plan.fallback == render_table(normalized(n), 1, PREFIXES, 16)
    fake = FakeTable()
    fake.apply(render_table(s, 1, PREFIXES, 16))
    execute(fake, plan, p)
    assert fake.t == full16(normalized(n))


def test_vnic_update_and_rule_update_keep_identities() -> None:
    """A rule change that keeps every named remote set: the identities stay, only the hop's index
    entries change (no ipcache element in the transaction)."""
    p = planner()
    s = base_state()
    fake = FakeTable()
    execute(fake, p.full(s, exists=False), p)
    r1 = s.rule_map()[1]
    r1b = replace(r1, services=(ServiceMatch("tcp", ((81, 81),)),))
    users = [v for v in s.vnics if 1 in (*v.egress, *v.ingress)]
    d = HostDelta(
        "h", 1, 2, rule_updates=(RuleUpdate(r1b),), vnic_updates=tuple(VnicUpdate(v) for v in users)
    )
    n = apply_delta(s, d)
    plan = p.change(s, d, n)
    assert plan.kind == "delta"
    names = {
        c[v]["element"]["name"] for c in plan.commands for v in ("add", "delete") if "element" in c.get(v, {})
    }
    assert not any(x.startswith("ipc_") for x in names), names
    execute(fake, plan, p)
    assert fake.t == full16(n)
    assert full(n)  # the default renderer agrees on the state being renderable


def test_stored_ir_buckets_round_trip_and_the_legacy_blob_decodes() -> None:
    s = base_state()
    members = {x.name: list(x.addresses) for x in s.sets}
    buckets = blob.encode_buckets(s)
    assert sorted(buckets) == list(range(STATE_BUCKETS))
    assert blob.assemble(blob.decode_buckets(blob.encode_header(s), buckets), s.revision, members) == s
    # one bucket missing or corrupt: not adoptable
    assert blob.decode_buckets(blob.encode_header(s), {k: v for k, v in buckets.items() if k != 3}) is None
    assert blob.decode_buckets(blob.encode_header(s), {**buckets, 5: ["ow2:garbage"]}) is None
    # a table written before the buckets (one blob in `_state`) still decodes
    legacy = blob.decode_buckets(blob.encode(s), {})
    assert legacy is not None and blob.assemble(legacy, s.revision, members) == s
    # a change rewrites only the buckets it names
    only = blob.encode_buckets(s, {blob.rule_bucket(5)})
    assert list(only) == [blob.rule_bucket(5)] and only[5 % STATE_BUCKETS] == buckets[5 % STATE_BUCKETS]
