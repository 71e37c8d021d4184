"""The raw nfnetlink encoding of rules (nlrules.py) against libnftables, its reference: the same
commands loaded both ways in two namespaces must list identically (`nft list table`, text and JSON),
for every expression kind the renderer emits, for whole tables and for incremental changes."""

from __future__ import annotations

import random
import subprocess
from dataclasses import replace

import pytest
from nftcheck import canonical, mutate

from nft_rich import ALL_KINDS, kinds, rich_state
from omniwall.compiler.ir import ServiceMatch, diff
from omniwall.dataplane.nft.libnft import Nft, NftError
from omniwall.dataplane.nft.render import allowed_from_conntrack, render_table

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("root_untouched")]


def text(nft: Nft) -> str:
    """`nft list table` as the command prints it (no handles), and the JSON listing, canonical."""
    assert nft.netns is not None
    out = subprocess.run(
        ["ip", "netns", "exec", nft.netns, "nft", "list", "table", "inet", "omniwall"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return out + "\n".join(canonical(nft.list_table("inet", "omniwall") or []))


@pytest.fixture
def pair(topo):
    """(raw, json): Nft contexts in two fresh namespaces."""
    made = [Nft(topo.add_host("raw")), Nft(topo.add_host("json"), raw_rules=False)]
    try:
        yield made[0], made[1]
    finally:
        for n in made:
            n.close()


def test_rich_state_covers_every_kind_the_renderer_emits():
    cmds = render_table(rich_state(), flow_group=16)
    assert kinds(cmds) == ALL_KINDS


@pytest.mark.parametrize("flow_group", [16, None, "ct"])
def test_whole_table_lists_like_libnftables(pair, flow_group):
    """The "ct" case: every rule stateful, so allowed records come from conntrack (`fwd`'s same-host
    egress rules: the packet mark's load, compare and set)."""
    raw, ref = pair
    st = rich_state()
    if flow_group == "ct":
        st = replace(st, rules=tuple(replace(r, stateful=True) for r in st.rules))
        assert allowed_from_conntrack(st, 16)
        flow_group = 16
    cmds = render_table(st, flow_group=flow_group)
    raw.transact(cmds)
    ref.transact(cmds)
    assert raw.raw_writes == 1 and ref.raw_writes == 0  # really both ways
    assert text(raw) == text(ref)
    assert canonical(raw.list_table("inet", "omniwall")) == canonical(ref.list_table("inet", "omniwall"))
    # replacing the table (add; delete; add) works raw too, and the sets are learnt again
    raw.transact(cmds)
    assert raw.raw_writes == 2 and text(raw) == text(ref)


def test_incremental_changes_list_like_libnftables(topo, backends):
    """The backend's own plans (whole table, rule/vNIC deltas, whole-state differences, members-only
    batches), applied raw in one namespace and through libnftables in the other."""
    raw = backends(topo.add_host("raw"), flow_group=16)
    ref = backends(topo.add_host("json"), flow_group=16, raw_rules=False)
    rnd = random.Random(4321)
    s = rich_state(1)
    raw.sync(s)
    ref.sync(s)
    for step in range(30):
        n = mutate(s, rnd)
        d = diff(s, n)
        raw.apply(s, d, n)
        ref.apply(s, d, n)
        assert text(raw.nft) == text(ref.nft), f"step {step}"
        s = n
    assert ref.nft.raw_writes == 0
    assert raw.nft.raw_writes > 10  # most changes went raw (interval element deltas go via libnftables)


def test_adopted_table_changes_go_raw(topo, backends):
    """After a restart the sets are learnt from the listing, so the next change need not fall back."""
    ns = topo.add_host("h")
    first = backends(ns)
    s = rich_state(1)
    first.sync(s)
    again = backends(ns)
    again.sync(s)  # adopts: no write
    assert again.nft.writes == 0
    r = s.rule_map()[10]
    r2 = replace(r, services=(ServiceMatch("tcp", ((5555, 5555),)),))
    n = replace(s, revision=2, rules=tuple(r2 if x.id == 10 else x for x in s.rules))
    again.apply(s, diff(s, n), n)
    assert again.nft.raw_writes == 1


def test_unknown_forms_fall_back_to_libnftables(pair):
    raw, _ref = pair
    cmds = render_table(rich_state())
    raw.transact(cmds)
    mark = {"add": {"rule": {"family": "inet", "table": "omniwall", "chain": "_state",
                             "expr": [{"match": {"op": "==", "left": {"meta": {"key": "length"}},
                                                 "right": 7}},
                                      {"accept": None}]}}}  # fmt: skip
    raw.transact([mark])
    assert raw.raw_writes == 1 and raw.writes == 2  # the second went through libnftables
    assert "meta length 7 accept" in text(raw)


def test_refused_raw_batch_raises_libnftables_error(pair):
    raw, _ref = pair
    raw.transact(render_table(rich_state()))
    bad = {"add": {"rule": {"family": "inet", "table": "omniwall", "chain": "fwd",
                            "expr": [{"goto": {"target": "no_such_chain"}}]}}}  # fmt: skip
    with pytest.raises(NftError) as e:
        raw.transact([bad])
    assert "no_such_chain" in e.value.message or "No such file" in e.value.message
    assert "no_such_chain" not in text(raw)
