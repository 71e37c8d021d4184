"""The raw nfnetlink encoding of rules (nlrules.py) against libnftables, its reference: the same
commands loaded both ways in two namespaces must list identically (`nft list table`, text and JSON),
for every expression kind the renderer emits, for whole tables and for incremental changes."""

from __future__ import annotations

import json
import random
import subprocess
from dataclasses import replace
from typing import Any

import pytest
from topo import state

from nft_rich import ALL_KINDS, kinds, rich_state
from omniwall.compiler.ir import HostDesiredState, IRVnic, ServiceMatch, diff
from omniwall.dataplane.nft.libnft import Nft, NftError
from omniwall.dataplane.nft.render import render_table

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("root_untouched")]


def canonical(listing: list[dict[str, Any]]) -> list[str]:
    """A JSON listing without handles, set elements sorted (hash order is not ours)."""
    out = []
    for obj in listing:
        ((kind, body),) = obj.items()
        body = {k: v for k, v in body.items() if k != "handle"}
        if "elem" in body:
            body["elem"] = sorted(json.dumps(e, sort_keys=True) for e in body["elem"])
        out.append(json.dumps({kind: body}, sort_keys=True))
    return out


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


@pytest.mark.parametrize("flow_group", [16, None])
def test_whole_table_lists_like_libnftables(pair, flow_group):
    raw, ref = pair
    cmds = render_table(rich_state(), flow_group=flow_group)
    raw.transact(cmds)
    ref.transact(cmds)
    assert raw.raw_writes == 1 and ref.raw_writes == 0  # really both ways
    assert text(raw) == text(ref)
    assert canonical(raw.list_table("inet", "omniwall")) == canonical(ref.list_table("inet", "omniwall"))
    # replacing the table (add; delete; add) works raw too, and the sets are learnt again
    raw.transact(cmds)
    assert raw.raw_writes == 2 and text(raw) == text(ref)


def _mutate(s: HostDesiredState, rnd: random.Random) -> HostDesiredState:
    sets, rules, vnics = (
        {x.name: x for x in s.sets},
        {r.id: r for r in s.rules},
        {v.ifname: v for v in s.vnics},
    )
    k = rnd.randrange(7)
    if k == 0:
        name = rnd.choice(sorted(sets))
        addrs = {f"10.1.{rnd.randrange(3)}.{rnd.randrange(200)}" for _ in range(rnd.randrange(4))}
        sets[name] = replace(sets[name], addresses=tuple(sorted(addrs | {"fd00:1::1"})))
    elif k == 1:
        name = rnd.choice(sorted(sets))
        cidrs = rnd.choice(
            [(), ("10.8.0.0/16",), ("fd00:8::/64", "10.8.0.0/16"), ("10.8.0.0/16", "10.9.1.0/24")]
        )
        sets[name] = replace(sets[name], cidrs=tuple(sorted(cidrs)))
    elif k == 2:
        rid = rnd.choice(sorted(rules))
        rules[rid] = replace(rules[rid], action=rnd.choice(["allow", "drop", "reject", "pass"]))
    elif k == 3:
        rid = rnd.choice(sorted(rules))
        port = rnd.randrange(1, 60000)
        svc = rnd.choice(
            [ServiceMatch("tcp", ((port, port),)), ServiceMatch("udp", ((port, port + 9), (9, 9)))]
        )
        rules[rid] = replace(rules[rid], services=(svc,))
    elif k == 4:
        n = rnd.randrange(3, 6)
        ids = tuple(rnd.sample(sorted(rules), 2))
        vnics[f"owx{n}"] = IRVnic(f"owx{n}", f"t/x{n}", "t", (f"10.0.9.{n}", f"fd00:9::{n:x}"), ids, ids[:1])
    elif k == 5 and len(vnics) > 2:
        del vnics[rnd.choice(sorted(vnics))]
    else:
        name = rnd.choice(sorted(vnics))
        ids = sorted(rules)
        vnics[name] = replace(vnics[name], ingress=tuple(rnd.sample(ids, rnd.randint(0, len(ids)))))
    used = {i for v in vnics.values() for i in (*v.egress, *v.ingress)}
    rules = {i: r for i, r in rules.items() if i in used}
    used_sets = {x for r in rules.values() for x in (r.src_set, r.dst_set) if x}
    return state(s.revision + 1, list(vnics.values()), list(rules.values()), [sets[x] for x in used_sets])


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
        n = _mutate(s, rnd)
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
                             "expr": [{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 7}},
                                      {"accept": None}]}}}  # fmt: skip
    raw.transact([mark])
    assert raw.raw_writes == 1 and raw.writes == 2  # the second went through libnftables
    assert "meta mark 0x00000007 accept" in text(raw)


def test_refused_raw_batch_raises_libnftables_error(pair):
    raw, _ref = pair
    raw.transact(render_table(rich_state()))
    bad = {"add": {"rule": {"family": "inet", "table": "omniwall", "chain": "fwd",
                            "expr": [{"goto": {"target": "no_such_chain"}}]}}}  # fmt: skip
    with pytest.raises(NftError) as e:
        raw.transact([bad])
    assert "no_such_chain" in e.value.message or "No such file" in e.value.message
    assert "no_such_chain" not in text(raw)
