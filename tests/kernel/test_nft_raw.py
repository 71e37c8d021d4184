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

from omniwall.compiler.ir import HostDesiredState, IRRule, IRSet, IRVnic, ServiceMatch, diff
from omniwall.dataplane.nft.libnft import Nft, NftError
from omniwall.dataplane.nft.render import render_table

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("root_untouched")]


def R(
    rid: int, action: str = "allow", src: str | None = None, dst: str | None = None, services=(), **kw: Any
):
    return IRRule(
        rid, "t", "p", f"r{rid}", kw.pop("category", "application"), action, src, dst, services, **kw
    )


def rich_state(revision: int = 3) -> HostDesiredState:
    """Every shape the renderer has: all actions, log, monitor, stateless (notrack, raw ingress
    dispatch), icmp type/code, port lists/ranges/one port/full range, interval sets (adjacent, at the
    address space's ends), several own addresses (anonymous sets, v4 and v6), none, connection
    limits, the hop index (identities, concatenated maps with ranges, network ipcache)."""
    tcp80 = ServiceMatch("tcp", ((80, 80), (8000, 8080)))
    rules = [
        R(1, "allow", None, "web", (tcp80,)),
        R(2, "drop", "bad", None, log=True, category="emergency"),
        R(3, "pass", None, None, (ServiceMatch("icmp", (), 8),), category="emergency"),
        R(4, "reject"),
        R(
            5,
            "allow",
            "web",
            "nets",
            (ServiceMatch("udp", ((53, 53),)),),
            stateful=False,
            category="environment",
        ),
        R(6, "drop", None, "web", (ServiceMatch("tcp", ((22, 22),)),), monitor=True),
        R(
            7,
            "reject",
            "nets",
            None,
            (ServiceMatch("tcp", ((1000, 2000),)), ServiceMatch("icmpv6", (), 128, 0)),
            log=True,
        ),
        R(8, "allow", "web", None, (ServiceMatch("udp"), ServiceMatch("tcp", ((443, 443),))), stateful=False),
        R(9, "reject", None, "bad", (ServiceMatch("icmp", (), 3, 4),)),
        R(10, "allow", "far", None, (ServiceMatch("tcp", ((5000, 5010), (6000, 6000))),)),
        R(11, "allow", "adj", None, (ServiceMatch("tcp", ((0, 65535),)),)),
        R(12, "drop", None, "edge", (ServiceMatch("udp", ((1, 1), (65535, 65535))),)),
        R(
            13,
            "allow",
            "nets",
            None,
            (ServiceMatch("tcp", ((7000, 7000),)), ServiceMatch("udp", ((7000, 7001),))),
            stateful=False,
        ),
    ]
    sets = [
        IRSet(
            "adj",
            ("10.5.0.9",),
            ("10.3.1.0/24", "10.3.2.0/24", "10.2.0.0/16", "fd00:3::/64", "fd00:3:0:1::/64"),
        ),
        IRSet("bad", ("10.9.9.9", "fd00::99")),
        IRSet("edge", (), ("255.255.255.0/24", "0.0.0.0/8")),
        IRSet("far", ("10.7.0.1", "10.7.0.2", "fd00:7::1")),
        IRSet("nets", ("10.0.0.5",), ("10.1.0.0/16", "fd00:1::/64")),
        IRSet("web", ("10.0.0.1", "fd00::1")),
    ]
    vnics = [
        IRVnic(
            "owa",
            "t/a",
            "t",
            ("10.0.0.1", "fd00::1"),
            egress=(2, 3, 5, 1, 10),
            ingress=(2, 1, 4, 8),
            conn_limit=100,
            conn_rate=50,
        ),
        IRVnic(
            "owb",
            "t/b",
            "t",
            ("10.0.0.2",),
            ingress=(5, 6, 7, 9, 10),
            egress=(10, 6),
            default_action="reject",
        ),
        IRVnic(
            "owc",
            "t/c",
            "t",
            ("10.0.0.3", "10.0.0.4"),
            egress=(1, 10),
            ingress=(10,),
            default_action="drop",
            default_monitor=True,
            conn_limit=5,
        ),
        IRVnic("owd", "t/d", "t", (), egress=(7,), default_action="allow"),
        IRVnic(
            "owe",
            "t/e",
            "t",
            ("10.0.5.1", "10.0.5.2", "fd00:e::1", "fd00:e::2"),
            egress=(11, 12, 1),
            ingress=(11, 13, 12),
        ),
    ]
    return HostDesiredState("h", revision, tuple(vnics), tuple(rules), tuple(sets))


# what the renderer emits (statement kinds, and match left-hand sides and right-hand forms)
ALL_KINDS = {
    "stmt:accept", "stmt:counter", "stmt:counter:named", "stmt:ct count", "stmt:continue", "stmt:drop",
    "stmt:goto", "stmt:jump", "stmt:limit", "stmt:log", "stmt:mangle", "stmt:notrack", "stmt:reject:icmpx",
    "stmt:reject:tcp reset", "stmt:return", "stmt:vmap:concat", "stmt:vmap:meta", "stmt:vmap:payload",
    "match:ct:list", "match:meta:value", "match:meta:prefix", "match:payload:value", "match:payload:range",
    "match:payload:@set", "match:payload:set", "match:payload:merged icmp",
    "set:ipv4_addr", "set:ipv6_addr", "set:ifname", "set:inet_service:interval", "set:ipv4_addr:interval",
    "set:ipv6_addr:interval", "map:ifname", "map:ipv4_addr", "map:ipv6_addr", "map:ipv4_addr:interval",
    "map:ipv6_addr:interval", "map:ifname.inet_proto.inet_service", "map:ifname.inet_proto",
    "map:ifname.inet_proto.inet_service:interval", "obj:counter", "obj:quota",
}  # fmt: skip


def kinds(commands: list[dict[str, Any]]) -> set[str]:
    out: set[str] = set()
    for cmd in commands:
        ((verb, obj),) = cmd.items()
        ((kind, body),) = obj.items()
        if verb == "add" and kind in ("set", "map"):
            typ = body["type"]
            name = ".".join(typ) if isinstance(typ, list) else typ
            out.add(f"{kind}:{name}" + (":interval" if "interval" in body.get("flags", []) else ""))
        elif verb == "add" and kind in ("counter", "quota"):
            out.add(f"obj:{kind}")
        elif verb == "add" and kind == "rule":
            exprs = body["expr"]
            for e in exprs:
                ((k, v),) = e.items()
                if k == "match":
                    left = next(iter(v["left"]))
                    r = v["right"]
                    if left == "payload" and v["left"]["payload"]["field"] == "code":
                        out.add("match:payload:merged icmp")
                        continue
                    form = (
                        "@set" if isinstance(r, str) and r.startswith("@")
                        else "prefix" if isinstance(r, str) and r.endswith("*")
                        else "list" if isinstance(r, list)
                        else next(iter(r)) if isinstance(r, dict)
                        else "value"
                    )  # fmt: skip
                    out.add(f"match:{left}:{form}")
                elif k == "vmap":
                    out.add(f"stmt:vmap:{next(iter(v['key']))}")
                elif k == "reject":
                    out.add(f"stmt:reject:{v['type']}")
                elif k == "counter":
                    out.add("stmt:counter" + (":named" if v else ""))
                else:
                    out.add(f"stmt:{k}")
    return out


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
