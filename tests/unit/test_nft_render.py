"""Pure tests of the nft renderer: IR -> libnftables JSON, full and incremental.

`FakeTable` (nft_fake.py) is a strict model of what the kernel does with our commands (Faucet's
fake-OF-table idea): it refuses references to missing sets/chains, deleting something still
referenced, and deleting missing elements, so "incremental delta applied to the old table == full
render of the new state" is checked without root.
"""

from __future__ import annotations

import ipaddress
import json
import random
import struct
from dataclasses import replace
from typing import Any

import pytest
from nft_fake import FakeTable

from omniwall.compiler.ir import HostDesiredState, IRRule, IRSet, IRVnic, ServiceMatch
from omniwall.dataplane.nft import blob, nlbatch
from omniwall.dataplane.nft.names import safe, vnic_chain
from omniwall.dataplane.nft.render import (
    RawLayoutChanged,
    check_prefixes,
    merge_ranges,
    port_set_name,
    port_sets,
    render_delta,
    render_rule,
    render_table,
    render_vnic_chains,
    rule_matches,
    service_variants,
    shapes_of,
    stateless_ingress,
)


def R(rid: int, action: str = "allow", src=None, dst=None, services=(), **kw: Any) -> IRRule:
    return IRRule(
        rid, "t", "p", f"r{rid}", kw.pop("category", "application"), action, src, dst, services, **kw
    )


def state(rev: int, vnics, rules, sets=()) -> HostDesiredState:
    return HostDesiredState(
        "h",
        rev,
        tuple(sorted(vnics, key=lambda v: v.ifname)),
        tuple(sorted(rules, key=lambda r: r.id)),
        tuple(sorted(sets, key=lambda s: s.name)),
    )


TCP80 = ServiceMatch("tcp", ((80, 80), (8000, 8080)))


def base_state() -> HostDesiredState:
    rules = [
        R(1, "allow", None, "web", (TCP80,)),
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
    ]
    sets = [
        IRSet("bad", ("10.9.9.9", "fd00::99")),
        IRSet("nets", ("10.0.0.5",), ("10.1.0.0/16", "fd00:1::/64")),
        IRSet("web", ("10.0.0.1", "fd00::1")),
    ]
    vnics = [
        IRVnic("tapa", "t/a", "t", ("10.0.0.1", "fd00::1"), egress=(2, 3, 5, 1), ingress=(2, 1, 4)),
        IRVnic("tapb", "t/b", "t", ("10.0.0.2",), ingress=(5,), default_action="reject"),
    ]
    return state(1, vnics, rules, sets)


def full(s: HostDesiredState) -> dict[str, Any]:
    return full_with(s)


def full_with(s: HostDesiredState, **kw: Any) -> dict[str, Any]:
    f = FakeTable()
    f.apply(render_table(s, **kw))
    assert f.t is not None
    return f.t


# ------------------------------------------------------------------------------------------ tests


def test_names_are_deterministic_and_hashed_when_needed():
    assert safe("tapa") == "tapa"
    assert safe("veth-a") != safe("veth_a")  # sanitizing never merges two names
    assert safe("veth-a") == safe("veth-a")
    long = "x" * 200
    assert len(safe(long)) <= 64 and safe(long) != safe(long + "y")
    assert vnic_chain("egress", "tapa") == "e_tapa"
    assert vnic_chain("ingress", "tapa", 2) == "i_tapa_2"


def test_port_ranges_merge():
    assert merge_ranges([(80, 80), (8000, 8080), (79, 81), (8081, 8090)]) == [(79, 81), (8000, 8090)]


def test_service_variants():
    assert service_variants(()) == [(None, None, [])]
    assert service_variants((TCP80, ServiceMatch("any"))) == [(None, None, [])]
    v = service_variants((TCP80, ServiceMatch("tcp", ((81, 90),)), ServiceMatch("udp")))
    assert [(fam, proto) for fam, proto, _ in v] == [(None, "tcp"), (None, "udp")]
    tcp_ports = v[0][2][1]["match"]["right"]  # a port list: a named set shared by equal lists
    assert tcp_ports == "@" + port_set_name([(80, 90), (8000, 8080)]) and tcp_ports.startswith("@p_")
    one = service_variants((ServiceMatch("tcp", ((5201, 5300),)),))
    assert one[0][2][1]["match"]["right"] == {"range": [5201, 5300]}  # one range: inline
    assert len(v[1][2]) == 1  # udp without ports: protocol only
    icmp = service_variants((ServiceMatch("icmp", (), 3, 4), ServiceMatch("icmpv6", (), 128)))
    assert [(fam, proto) for fam, proto, _ in icmp] == [(4, "icmp"), (6, "icmpv6")]
    assert len(icmp[0][2]) == 3  # l4proto, type, code


def test_rule_matches_one_rule_per_family_and_set_part():
    s = base_state()
    shapes = shapes_of(s)
    # web has no cidrs, nets has v4 and v6 cidrs: per family 1 src part x 2 dst parts, x udp
    m = rule_matches(s.rule_map()[5], shapes)
    assert len(m) == 4
    text = json.dumps(m)
    assert "@a4_web" in text and "@c4_nets" in text and "@c6_nets" in text and "@a6_nets" in text
    # no set on either side: one family-less rule
    assert len(rule_matches(R(9), shapes)) == 1
    # icmp service only renders the IPv4 family
    m = rule_matches(R(9, src="web", services=(ServiceMatch("icmp"),)), shapes)
    assert len(m) == 1 and m[0][1][0]["match"]["left"]["payload"]["protocol"] == "ip"


def test_rule_statements():
    shapes = shapes_of(base_state())
    (allow,) = render_rule(R(7), "next", shapes, 3)
    assert allow["comment"] == "7"
    assert allow["expr"][-2:] == [{"mangle": {"key": {"ct": {"key": "mark"}}, "value": 7}}, {"return": None}]
    assert {"counter": None} in allow["expr"]
    (stateless,) = render_rule(R(7, stateful=False), "next", shapes, 3)
    assert "mangle" not in json.dumps(stateless)
    (drop,) = render_rule(R(8, "drop", log=True), "next", shapes, 3)
    assert {"log": {"prefix": "ow:8:drop ", "group": 3}} in drop["expr"] and drop["expr"][-1] == {
        "drop": None
    }
    rej = render_rule(R(9, "reject"), "next", shapes, 3)
    assert [r["expr"][-1]["reject"]["type"] for r in rej] == ["tcp reset", "icmpx"]
    rej_tcp = render_rule(R(9, "reject", services=(TCP80,)), "next", shapes, 3)
    assert [r["expr"][-1]["reject"]["type"] for r in rej_tcp] == ["tcp reset"]
    (pas,) = render_rule(R(10, "pass"), "e_x_1", shapes, 3)
    assert pas["expr"][-1] == {"goto": {"target": "e_x_1"}}
    (mon,) = render_rule(R(11, "reject", monitor=True), "next", shapes, 3)
    assert {"log": {"prefix": "ow:11:would-drop ", "group": 3}} in mon["expr"]
    assert mon["expr"][-1] == {"return": None}


def test_port_lists_share_one_named_set():
    s = base_state()
    lst = (ServiceMatch("tcp", ((5300, 5300), (5201, 5201))),)
    rules = (*s.rules, R(90, services=lst), R(91, src="web", services=lst))
    s2 = replace(s, rules=rules)
    name = port_set_name([(5201, 5201), (5300, 5300)])
    assert name in port_sets(s2)
    t = full(s2)
    assert t["sets"][name] == {"5201": True, "5300": True}
    decls = [c for c in render_table(s2) if c.get("add", {}).get("set", {}).get("name") == name]
    assert len(decls) == 1


def test_vnic_chains_segments_tail_antispoof_notrack():
    s = base_state()
    a = s.vnic_map()["tapa"]
    chains = render_vnic_chains(a, s.rule_map(), shapes_of(s))
    # egress: emergency (2,3), environment (5), application (1) -> 3 segments + tail
    # per family: 3 segments; the entry chain dispatches on the family
    segs = [f"e_tapa_{k}v{f}" for f in (4, 6) for k in range(3)]
    assert [n for n in chains if n.startswith("e_")] == ["e_tapa", *segs, "e_tapa_d"]
    assert [r["expr"][-1] for r in chains["e_tapa"]] == [
        {"goto": {"target": "e_tapa_0v4"}},
        {"goto": {"target": "e_tapa_0v6"}},
    ]
    assert chains["e_tapa"][0]["expr"][0]["match"]["right"] == "ipv4"
    for f in (4, 6):
        assert chains[f"e_tapa_0v{f}"][-1]["expr"] == [{"goto": {"target": f"e_tapa_1v{f}"}}]
        pass_rule = next(r for r in chains[f"e_tapa_0v{f}"] if r["comment"] == "3")
        assert pass_rule["expr"][-1] == {"goto": {"target": f"e_tapa_1v{f}"}}
        assert chains[f"e_tapa_2v{f}"][-1]["expr"] == [{"goto": {"target": "e_tapa_d"}}]
    # a family chain holds only its family's address matches
    text4, text6 = (str([chains[n] for n in segs if n.endswith(f"v{f}")]) for f in (4, 6))
    assert "'ip6'" not in text4 and "'ip'" not in text6
    assert chains["e_tapa_d"] == [{"expr": [{"counter": None}, {"drop": None}], "comment": "default"}]
    raw = chains["re_tapa"]
    assert [r["comment"] for r in raw[:2]] == ["spoof", "spoof"]
    assert all(r["comment"] == "nt:5" and {"notrack": None} in r["expr"] for r in raw[2:])
    b = s.vnic_map()["tapb"]
    chains_b = render_vnic_chains(b, s.rule_map(), shapes_of(s))
    assert chains_b["re_tapb"][1]["expr"][0] == {
        "match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv6"}
    }  # no IPv6 address: all IPv6 from it dropped
    assert [r["expr"][-1]["reject"]["type"] for r in chains_b["e_tapb_d"]] == ["tcp reset", "icmpx"]
    assert len(chains_b["ri_tapb"]) == 4  # its ingress stateless rule, notrack


def test_full_table_is_consistent_and_atomic():
    s = base_state()
    cmds = render_table(s)
    assert [next(iter(c)) for c in cmds[:3]] == ["add", "delete", "add"]  # replace in one batch
    t = full(s)
    assert t["sets"]["m_egress"] == {
        "tapa": {"jump": {"target": "e_tapa"}},
        "tapb": {"jump": {"target": "e_tapb"}},
    }
    fwd = [r["comment"] for r in t["chains"]["fwd"]]
    # established first; known vNICs go to their hops, unknown workload interfaces drop
    assert fwd == ["established", "invalid", "dispatch", "dispatch", "unknown:ow"]
    # before conntrack: known vNICs go (goto) to their anti-spoofing chain, unknown ow* interfaces drop;
    # base_state has a stateless ingress rule, so destinations are dispatched too
    raw = [r["comment"] for r in t["chains"]["raw_pre"]]
    assert raw == ["dispatch", "unknown:ow", "dispatch", "dispatch"]
    assert t["sets"]["known_if"] == {"tapa": True, "tapb": True}
    assert t["quotas"] == {"_rev": s.revision}
    raw = [r["comment"] for r in full_with(s, prefixes=("tap", "vnet"))["chains"]["raw_pre"]]
    assert raw[1:3] == ["unknown:tap", "unknown:vnet"]
    assert "unknown:ow" not in [r["comment"] for r in full_with(s, prefixes=())["chains"]["fwd"]]
    assert "c4_nets" in t["sets"] and "c4_web" not in t["sets"] and "a6_web" in t["sets"]


def test_blob_round_trip():
    s = base_state()
    chunks = blob.encode(s)
    assert all(len(c) <= 128 for c in chunks)
    struct = blob.decode(chunks)
    assert struct is not None and "revision" not in struct
    back = blob.assemble(struct, s.revision, {x.name: list(x.addresses) for x in s.sets})
    assert back == s
    assert blob.decode(chunks[1:]) is None
    assert blob.decode([chunks[0] + "garbage"]) is None


def _mutations(s: HostDesiredState, rnd: random.Random) -> HostDesiredState:
    sets, rules, vnics = list(s.sets), list(s.rules), list(s.vnics)
    for _ in range(rnd.randint(1, 3)):
        k = rnd.randrange(7)
        if k == 0 and sets:  # address churn
            i = rnd.randrange(len(sets))
            extra = (f"10.3.{rnd.randrange(9)}.{rnd.randrange(9)}", f"fd00:3::{rnd.randrange(99):x}")
            addrs = tuple(sorted({*sets[i].addresses[1:], *extra[: rnd.randint(0, 2)]}))
            sets[i] = replace(sets[i], addresses=addrs)
        elif k == 1 and sets:  # cidr shape changes
            i = rnd.randrange(len(sets))
            cidrs = rnd.choice([(), ("10.7.0.0/16",), ("fd00:7::/64",), ("10.7.0.0/16", "10.7.1.0/24")])
            sets[i] = replace(sets[i], cidrs=tuple(sorted(cidrs)))
        elif k == 2 and rules:  # a rule's action changes
            i = rnd.randrange(len(rules))
            rules[i] = replace(rules[i], action=rnd.choice(["allow", "drop", "reject", "pass"]))
        elif k == 3:  # a vNIC's rule list changes
            i = rnd.randrange(len(vnics))
            ids = [r.id for r in rules]
            eg = tuple(sorted(rnd.sample(ids, rnd.randint(0, len(ids)))))
            vnics[i] = replace(vnics[i], egress=eg, default_action=rnd.choice(["allow", "drop", "reject"]))
        elif k == 4 and len(vnics) > 1:  # vNIC removed
            vnics.pop(rnd.randrange(len(vnics)))
        elif k == 5:  # vNIC added / readdressed
            n = rnd.randrange(5)
            vnics = [v for v in vnics if v.ifname != f"tapx{n}"]
            vnics.append(
                IRVnic(f"tapx{n}", "t/x", "t", (f"10.0.9.{n}",), ingress=(rules[0].id,) if rules else ())
            )
        elif k == 6:  # a new set and a rule using it
            name = f"g{rnd.randrange(4)}"
            if name not in {x.name for x in sets}:
                sets.append(IRSet(name, ("10.5.5.5",)))
                rid = 100 + rnd.randrange(50)
                if rid not in {r.id for r in rules}:
                    rules.append(R(rid, "drop", src=name))
                    i = rnd.randrange(len(vnics))
                    vnics[i] = replace(vnics[i], ingress=(rid, *vnics[i].ingress))
    # drop rules/sets nobody references (the IR never carries them)
    used_ids = {i for v in vnics for i in (*v.egress, *v.ingress)}
    rules = [r for r in rules if r.id in used_ids]
    used_sets = {x for r in rules for x in (r.src_set, r.dst_set) if x}
    sets = [x for x in sets if x.name in used_sets]
    return state(s.revision + 1, vnics, rules, sets)


@pytest.mark.parametrize("seed", range(40))
def test_incremental_equals_full(seed: int):
    rnd = random.Random(seed)
    s = base_state()
    fake = FakeTable()
    fake.apply(render_table(s))
    for _ in range(6):
        n = _mutations(s, rnd)
        try:
            cmds = render_delta(s, n)  # the fake raises on any dangling reference or bad order
        except RawLayoutChanged:  # first/last stateless ingress rule: the backend renders the table
            assert stateless_ingress(s) != stateless_ingress(n)
            cmds = render_table(n)
        fake.apply(cmds)
        assert fake.t == full(n), f"seed {seed}: incremental result differs from a full render"
        s = n


def test_element_only_delta_is_minimal():
    s = base_state()
    sets = list(s.sets)
    sets[2] = replace(sets[2], addresses=("10.0.0.1", "10.0.0.7", "fd00::1"))
    n = replace(s, revision=2, sets=tuple(sets))
    cmds = render_delta(s, n)
    assert cmds[0] == {
        "add": {"element": {"family": "inet", "table": "omniwall", "name": "a4_web", "elem": ["10.0.0.7"]}}
    }
    # the element, its ipcache entry (the hop index: 10.0.0.7 now has web's identity), the revision
    # (quota `_rev` updated in place)
    assert len(cmds) == 3
    ipc = cmds[1]["add"]["element"]
    assert ipc["name"].startswith("ipc_") and [e[0] for e in ipc["elem"]] == ["10.0.0.7"]
    assert render_delta(s, replace(s, revision=2)) == [
        {
            "add": {
                "quota": {
                    "family": "inet",
                    "table": "omniwall",
                    "name": "_rev",
                    "bytes": 2,
                    "used": 0,
                    "inv": False,
                }
            }
        }
    ]


def test_unknown_set_is_a_clear_error():
    s = base_state()
    bad = replace(s, sets=s.sets[1:])  # 'bad' missing
    with pytest.raises(ValueError, match="bad"):
        render_table(bad)


# ------------------------------------------------------------------- raw element batches, prefixes


def _messages(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, off = [], 0
    while off < len(data):
        ln, typ, flags, seq = struct.unpack_from("=IHHI", data, off)
        out.append((typ, flags, seq, data[off + 16 : off + ln]))
        off += (ln + 3) & ~3
    return out


def test_element_batch_encoding():
    ops = [
        nlbatch.ElemOp("delete", "a4_web", "ipv4_addr", ("10.0.0.7",)),
        nlbatch.ElemOp("add", "a6_web", "ipv6_addr", ()),  # nothing to send
        nlbatch.ElemOp("add", "a6_web", "ipv6_addr", ("fd00::1", "fd00::2")),
        nlbatch.QuotaOp("_rev", 2**40 + 7),
    ]
    data, seqs = nlbatch.encode("inet", "omniwall", ops, 100)
    msgs = _messages(data)
    assert [m[0] for m in msgs] == [0x10, (10 << 8) | 14, (10 << 8) | 12, (10 << 8) | 18, 0x11]
    assert [m[2] for m in msgs] == [100, 101, 102, 103, 104] and seqs == [101, 102, 103]
    assert all(m[1] & 0x4 for m in msgs[1:-1])  # every command is acked
    assert msgs[1][3][0] == 1  # NFPROTO_INET
    assert b"omniwall\0" in msgs[1][3] and b"a4_web\0" in msgs[1][3]
    assert bytes([10, 0, 0, 7]) in msgs[1][3]
    assert ipaddress.ip_address("fd00::2").packed in msgs[2][3]
    assert struct.pack("!Q", 2**40 + 7) in msgs[3][3]
    assert nlbatch.key_bytes("ifname", "ow1") == b"ow1" + b"\0" * 13
    with pytest.raises(ValueError):
        nlbatch.key_bytes("ipv4_addr", "10.0.0.300")
    with pytest.raises(ValueError):
        nlbatch.key_bytes("ifname", "x" * 16)


def test_workload_prefixes_are_checked():
    assert check_prefixes(["tap", "vnet", "tap"]) == ("tap", "vnet")
    assert check_prefixes([]) == ()
    for bad in (["ow*"], ["a b"], [""], ["x" * 16]):
        with pytest.raises(ValueError, match=r"workload_prefixes\[0\]"):
            check_prefixes(bad)
    with pytest.raises(ValueError, match="not the string"):
        check_prefixes("ow")
