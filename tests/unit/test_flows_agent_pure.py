"""The pure parts of the agent's flow path: default-action ids, flow logs in the rendered ruleset, log
and conntrack-event parsing, aggregation and record building, the bounded buffer, metrics bounds."""

from __future__ import annotations

import dataclasses
import json
import socket
import struct

from prometheus_client import generate_latest

from omniwall.agent.flows import AGENT_AGGREGATION, AGENT_OPEN, FlowAggregator, RecordBuffer
from omniwall.agent.metrics import AgentMetrics
from omniwall.compiler.ir import HostDesiredState, IRRule, IRVnic, ServiceMatch
from omniwall.compiler.ruleids import MAX_ID, default_rule_id, is_default_id
from omniwall.dataplane.ctevents import parse_destroy
from omniwall.dataplane.nflog import _flow_log
from omniwall.dataplane.nft.render import render_table
from omniwall.flows.record import DEFAULT_POLICY, FlowRecord

A, B = "10.0.0.1", "10.0.0.2"


def _state(rev: int = 4, *, monitor: bool = False, default: str = "drop") -> HostDesiredState:
    rules = (
        IRRule(11, "t", "web", "allow-a", "application", "allow", None, None),
        IRRule(12, "prov", "base", "deny-ssh", "infrastructure", "drop", None, None,
               (ServiceMatch("tcp", ((22, 22),)),), monitor=monitor),
        IRRule(13, "t", "web", "udp-free", "application", "allow", None, None, stateful=False),
    )  # fmt: skip
    vnics = (
        IRVnic("va", "t/a", "t", (A,), egress=(11,)),
        IRVnic("vb", "t/b", "t", (B,), ingress=(12, 11, 13), default_action=default),  # type: ignore[arg-type]
    )
    return HostDesiredState("h", rev, vnics, rules)


def test_default_ids_are_stable_distinct_and_never_rule_ids() -> None:
    d = default_rule_id("t", "drop")
    assert d == default_rule_id("t", "drop") and is_default_id(d) and d > MAX_ID and d < 2**32
    assert len({default_rule_id(t, a) for t in ("t", "u") for a in ("drop", "reject", "allow")}) == 6
    v = IRVnic("va", "t/a", "t", (A,))
    assert v.default_id == d
    assert dataclasses.replace(v, default_action="reject").default_id == default_rule_id("t", "reject")
    st = _state()
    assert HostDesiredState.loads(st.dumps()) == st
    assert json.loads(st.dumps())["vnics"][0]["default_id"] == d


def _logs(cmds: list[dict]) -> list[str]:
    out = []
    for c in cmds:
        for e in c.get("add", {}).get("rule", {}).get("expr", []):
            if "log" in e and e["log"]["prefix"].startswith("owf:"):
                out.append(e["log"]["prefix"])
    return out


def test_every_verdict_logs_a_flow_with_rule_and_hop() -> None:
    st = _state(monitor=True)
    assert _logs(render_table(st)) == []  # flows off: the ruleset is exactly as before
    logs = set(_logs(render_table(st, flow_group=16)))
    dv = st.vnic_map()["vb"].default_id
    da = st.vnic_map()["va"].default_id
    assert {"owf:11:a:e", "owf:11:a:i", "owf:12:w:i", "owf:13:a:i", f"owf:{dv}:d:i", f"owf:{da}:d:e"} <= logs
    rej = _logs(render_table(_state(default="reject"), flow_group=16))
    assert f"owf:{default_rule_id('t', 'reject')}:r:i" in rej
    fwd = [c["add"]["rule"]["comment"] for c in render_table(st, flow_group=16) if "rule" in c.get("add", {})
           and c["add"]["rule"]["chain"] == "fwd"]  # fmt: skip
    assert fwd[0] == "established flows:16"  # adoption sees a changed flow setting


def _ipv4_tcp(src: str, dst: str, sport: int, dport: int) -> bytes:
    ip = bytes([0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0]) + socket.inet_aton(src) + socket.inet_aton(dst)
    return ip + struct.pack("!HH", sport, dport) + bytes(16)


def test_flow_log_parsing() -> None:
    p = _ipv4_tcp(A, B, 40000, 22)
    assert _flow_log(b"owf:12:d:i", p, 3, 4) == (12, "d", "i", 6, A, B, 40000, 22, 3, 4)
    assert _flow_log(b"ow:12:drop ", p, 3, 4) is None  # the `log: true` group's prefix is not a flow
    assert _flow_log(b"owf:x:d:i", p, 3, 4) is None
    assert _flow_log(b"owf:12:d:i", p[:10], 3, 4) is None
    icmp = (
        bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0])
        + socket.inet_aton(A)
        + socket.inet_aton(B)
        + bytes([8, 0])
    )
    assert _flow_log(b"owf:1:a:e", icmp, 1, 2)[3:8] == (1, A, B, 0, 8)  # type: ignore[index]


def _nla(typ: int, payload: bytes) -> bytes:
    b = struct.pack("=HH", 4 + len(payload), typ) + payload
    return b + b"\0" * ((4 - len(b) % 4) % 4)


def test_conntrack_destroy_parsing() -> None:
    ip = _nla(1, socket.inet_aton(A)) + _nla(2, socket.inet_aton(B))
    proto = _nla(1, bytes([6])) + _nla(2, struct.pack("!H", 40000)) + _nla(3, struct.pack("!H", 8080))
    tup = _nla(1 | 0x8000, ip) + _nla(2 | 0x8000, proto)
    ctr = lambda p, b: _nla(1, struct.pack("!Q", p)) + _nla(2, struct.pack("!Q", b))  # noqa: E731
    body = _nla(1 | 0x8000, tup) + _nla(9 | 0x8000, ctr(5, 300)) + _nla(10 | 0x8000, ctr(4, 1000))
    body += _nla(8, struct.pack("!I", 11))
    assert parse_destroy(body, 0, len(body), socket.AF_INET) == (6, A, B, 40000, 8080, 9, 1300, 11)


def _names(_i: int) -> str | None:
    return {3: "va", 4: "vb"}.get(_i)


def test_allowed_connection_then_completion_counts_once() -> None:
    ag = FlowAggregator("h")
    ag.set_state(_state())
    syn = [(11, "a", "e", 6, A, B, 40000, 8080, 3, 4), (11, "a", "i", 6, A, B, 40000, 8080, 3, 4)]
    ag.on_logs(syn, 10.0, _names)
    ag.on_logs(syn[:1], 10.5, _names)  # a retransmitted SYN: the same connection
    out = ag.flush(_names)
    assert sorted((r.hop, r.ifname, r.workload, r.final, r.count, r.sport) for r in out) == [
        ("egress", "va", "t/a", False, 1, 40000), ("ingress", "vb", "t/b", False, 1, 40000),
    ]  # fmt: skip
    r = out[0]
    assert (r.rule_id, r.rule_tenant, r.policy, r.rule, r.category, r.revision) == (
        11,
        "t",
        "web",
        "allow-a",
        "application",
        4,
    )
    ag.on_destroy([(6, A, B, 40000, 8080, 9, 1300, 11)], 12.0)
    done = ag.flush(_names)
    assert sorted((d.hop, d.final, d.count, d.packets, d.bytes, d.start, d.end) for d in done) == [
        ("egress", True, 0, 9, 1300, 10.0, 12.0), ("ingress", True, 0, 9, 1300, 10.0, 12.0),
    ]  # fmt: skip
    assert ag.open_connections == 0 and sum(x.count for x in out + done) == 2  # one connection per hop
    FlowRecord.from_json(json.loads(json.dumps(done[0].to_json())))


def test_many_connections_between_the_same_ends_are_one_record_per_interval() -> None:
    ag = FlowAggregator("h")
    ag.set_state(_state())
    ag.on_logs([(11, "a", "e", 6, A, B, 1000 + i, 8080, 3, 4) for i in range(500)], 1.0, _names)
    ag.on_destroy([(6, A, B, 1000 + i, 8080, 4, 200, 11) for i in range(300)], 2.0)
    (opened, ended) = sorted(ag.flush(_names), key=lambda r: r.final)
    assert (opened.count, opened.sport, opened.final) == (500, 0, False)
    assert (ended.count, ended.packets, ended.bytes, ended.final) == (0, 1200, 60000, True)
    assert ag.open_connections == 200


def test_denials_aggregate_default_and_monitor_are_named() -> None:
    ag = FlowAggregator("h")
    st = _state(monitor=True)
    ag.set_state(st)
    dv = st.vnic_map()["vb"].default_id
    logs = [(dv, "d", "i", 17, A, B, 5000 + i, 53, 3, 4) for i in range(1000)]  # a flood: any sport
    logs += [(12, "w", "i", 6, A, B, 40000, 22, 3, 4)]
    logs += [(13, "a", "i", 17, A, B, 1, 9999, 3, 4)] * 3  # stateless allow: aggregated, no completion
    ag.on_logs(logs, 1.0, _names)
    recs = {r.rule_id: r for r in ag.flush(_names)}
    d = recs[dv]
    assert (d.count, d.packets, d.verdict, d.policy, d.rule, d.category, d.rule_tenant, d.dport, d.sport) == (
        1000, 1000, "denied", DEFAULT_POLICY, "drop", "default", "t", 53, 0,
    )  # fmt: skip
    assert (recs[12].verdict, recs[12].rule_tenant, recs[12].category) == (
        "would-deny",
        "prov",
        "infrastructure",
    )
    assert (recs[13].verdict, recs[13].count, recs[13].final) == ("allowed", 3, True)
    assert ag.flush(_names) == []  # the interval is over


def test_tables_are_bounded_and_losses_counted() -> None:
    ag = FlowAggregator("h", max_keys=10, max_open=5)
    ag.set_state(_state())
    ag.on_logs([(12, "d", "i", 6, A, B, 1, p, 3, 4) for p in range(25)], 1.0, _names)
    assert ag.pending_keys == 10 and ag.dropped[AGENT_AGGREGATION] == 15
    ag2 = FlowAggregator("h", max_open=5)
    ag2.set_state(_state())
    ag2.on_logs([(11, "a", "e", 6, A, B, p, 80, 3, 4) for p in range(8)], 1.0, _names)
    assert ag2.open_connections == 5 and ag2.dropped[AGENT_OPEN] == 3
    # refused at the other hop: no completion will come, nothing is kept open, retries are one attempt
    ag3 = FlowAggregator("h")
    ag3.set_state(_state())
    for _ in range(3):
        ag3.on_logs([(11, "a", "e", 6, A, B, 7, 22, 3, 4), (12, "d", "i", 6, A, B, 7, 22, 3, 4)], 1.0, _names)
        assert ag3.open_connections == 0
    recs = {(r.verdict, r.final): r.count for r in ag3.flush(_names, 2.0)}
    assert recs == {("allowed", False): 1, ("denied", True): 3}


def test_record_buffer_is_bounded() -> None:
    buf = RecordBuffer(limit=3)
    rec = FlowRecord(
        0, 0, "h", "egress", "va", "t/a", "denied", 1, "t", "p", "r", "application", 1, "tcp", A, B
    )
    assert buf.push([rec] * 2) == 0 and buf.push([rec] * 4) == 3 and len(buf) == 3 and buf.dropped == 3
    assert len(buf.peek(2)) == 2
    buf.pop(2)
    assert len(buf) == 1


def test_metrics_bound_policy_labels() -> None:
    m = AgentMetrics("h", max_policies=2)
    m.watch_dropped(lambda: {"agent-buffer": 7})
    rec = FlowRecord(
        0, 0, "h", "egress", "va", "t/a", "denied", 1, "t", "p", "r", "application", 1, "tcp", A, B
    )
    m.on_records([dataclasses.replace(rec, policy=f"p{i}", count=2) for i in range(5)])
    m.desired(5, now=0.0)
    m.realized(_state(5), now=0.25)
    body = generate_latest(m.registry).decode()
    assert body.count("omniwall_agent_verdicts_total{") == 3  # p0, p1, (other)
    assert 'omniwall_agent_verdicts_total{policy="(other)",tenant="(other)",verdict="denied"} 6.0' in body
    assert 'omniwall_agent_flow_records_dropped_total{place="agent-buffer"} 7.0' in body
    assert 'omniwall_agent_flow_records_total{verdict="denied"} 5.0' in body
    assert "omniwall_agent_realized_revision 5.0" in body and "omniwall_agent_rules 3.0" in body
    assert "omniwall_agent_realization_lag_seconds_sum 0.25" in body


def test_a_new_denied_key_is_fresh_until_flushed_allowed_ones_never() -> None:
    """The collector ships at once when `fresh` > 0 (the console's latency); a flood is one fresh key."""
    ag = FlowAggregator("h")
    ag.set_state(_state())
    ag.on_logs([(11, "a", "e", 6, A, B, 1000 + i, 8080, 3, 4) for i in range(5)], 1.0, _names)
    assert ag.fresh == 0
    ag.on_logs([(12, "d", "i", 6, A, B, 1000 + i, 22, 3, 4) for i in range(100)], 1.0, _names)
    assert ag.fresh == 1
    ag.on_logs([(12, "d", "i", 6, A, B, 7, 23, 3, 4)], 1.0, _names)
    assert ag.fresh == 2
    ag.flush(_names, 1.1)
    assert ag.fresh == 0


def _kernel_destroy(src: str, dst: str, proto: int, sport: int, dport: int, mark: int, pad: bool) -> bytes:
    """A DESTROY message's attributes in the kernel's order: tuples, id, status, counters (64-bit, with
    an alignment pad attribute when `pad`), timestamp, mark."""
    fam = socket.AF_INET6 if ":" in src else socket.AF_INET

    def tup(a: str, b: str, sp: int, dp: int) -> bytes:
        ip = _nla(1 if fam == socket.AF_INET else 3, socket.inet_pton(fam, a))
        ip += _nla(2 if fam == socket.AF_INET else 4, socket.inet_pton(fam, b))
        if proto in (1, 58):
            pr = _nla(1, bytes([proto])) + _nla(4, struct.pack("!H", 7)) + _nla(5, bytes([8]))
            pr += _nla(6, bytes([0]))
        else:
            pr = _nla(1, bytes([proto])) + _nla(2, struct.pack("!H", sp)) + _nla(3, struct.pack("!H", dp))
        return _nla(1 | 0x8000, ip) + _nla(2 | 0x8000, pr)

    def ctr(p: int, b: int) -> bytes:
        body = (_nla(3, b"") if pad else b"") + _nla(1, struct.pack("!Q", p))
        return body + (_nla(3, b"") if pad else b"") + _nla(2, struct.pack("!Q", b))

    body = _nla(1 | 0x8000, tup(src, dst, sport, dport)) + _nla(2 | 0x8000, tup(dst, src, dport, sport))
    body += _nla(12, struct.pack("!I", 99)) + _nla(3, struct.pack("!I", 0x18E))
    body += _nla(9 | 0x8000, ctr(3, 180)) + _nla(10 | 0x8000, ctr(2, 120))
    body += _nla(20 | 0x8000, _nla(1, struct.pack("!Q", 1)) + _nla(2, struct.pack("!Q", 2)))
    return body + _nla(8, struct.pack("!I", mark))


def test_conntrack_destroy_fast_path_agrees_with_the_generic_walk() -> None:
    """IPv4 port protocols take the fixed-layout path; IPv6, ICMP and padded counters the generic walk:
    the same answers either way."""
    from omniwall.dataplane.ctevents import _parse_destroy

    cases = [
        (A, B, 6, 40000, 8080, 11, False),
        (A, B, 17, 1, 65535, 0, False),
        (A, B, 132, 5000, 6000, 2**31 + 5, False),
        (A, B, 6, 40000, 8080, 11, True),
        (A, B, 1, 0, 0, 3, False),
        ("fd00::1", "fd00::2", 6, 40000, 443, 12, False),
    ]
    for src, dst, proto, sport, dport, mark, pad in cases:
        body = _kernel_destroy(src, dst, proto, sport, dport, mark, pad)
        fam = socket.AF_INET6 if ":" in src else socket.AF_INET
        got = parse_destroy(body, 0, len(body), fam, {})
        assert got == _parse_destroy(body, 0, len(body), fam, {})
        want_port = 8 if proto in (1, 58) else dport
        assert got == (proto, src, dst, sport if proto not in (1, 58) else 0, want_port, 5, 300, mark)


def test_guard_drops_are_records_named_after_the_guard() -> None:
    """Anti-spoofing and the vNIC's connection limits log their drops under their own ids; the agent
    names them (policy, rule, category "guard", the vNIC's tenant) and counts them like any denial."""
    from omniwall.flows.record import CONN_LIMIT_RULE_ID, CONN_RATE_RULE_ID, GUARD_CATEGORY, SPOOF_RULE_ID

    st = _state()
    limited = dataclasses.replace(st.vnic_map()["va"], conn_limit=100, conn_rate=50)
    st = dataclasses.replace(st, vnics=(limited, st.vnic_map()["vb"]))
    logs = _logs(render_table(st, flow_group=16))
    assert {
        f"owf:{SPOOF_RULE_ID}:d:e",
        f"owf:{CONN_LIMIT_RULE_ID}:d:e",
        f"owf:{CONN_RATE_RULE_ID}:d:e",
    } <= set(logs)
    assert not any(p.startswith(f"owf:{SPOOF_RULE_ID}") for p in _logs(render_table(st)))  # flows off
    ag = FlowAggregator("h")
    ag.set_state(st)
    ag.on_logs([(SPOOF_RULE_ID, "d", "e", 17, "10.9.9.9", B, 1, 53, 3, 4)] * 5, 1.0, _names)
    ag.on_logs([(CONN_LIMIT_RULE_ID, "d", "e", 6, A, B, 40000 + i, 80, 3, 4) for i in range(7)], 1.0, _names)
    recs = {r.rule_id: r for r in ag.flush(_names)}
    s, c = recs[SPOOF_RULE_ID], recs[CONN_LIMIT_RULE_ID]
    assert (s.policy, s.rule, s.category, s.rule_tenant, s.workload, s.verdict, s.count) == (
        "(anti-spoofing)", "spoof", GUARD_CATEGORY, "t", "t/a", "denied", 5,
    )  # fmt: skip
    assert (c.policy, c.rule, c.rule_tenant, c.count, c.packets) == (
        "(connection-limit)",
        "conn-limit",
        "t",
        7,
        7,
    )


# Three flow logs as this kernel (6.18) delivered them in one datagram: two TCP SYNs allowed at an
# ingress hop (sequence numbers 0, 1) and a denied UDP packet (sequence number 4: 2 and 3 were lost),
# forwarded between two veths (Ethernet attributes and a timestamp).
_KERNEL_DATAGRAM = bytes.fromhex(
    "cc0000000004000000000000000000000200001008000100080002000e000a006f77663a323a613a6900000008000400"
    "0000000208000500000000031000080000060000de8e6be58937000006000f000001000006001100000e000012001000"
    "f2ff20914892de8e6be589370800000014000300000000006b16d6b6000000000008006308000c000000000040000900"
    "4500003c812240003f06a4d20a6300010a6301018e8214b4e933dd6100000000a002faf015f60000020405b40402080a"
    "0ed7f452000000000103030acc0000000004000000000000000000000200001008000100080002000e000a006f77663a"
    "323a613a69000000080004000000000208000500000000031000080000060000de8e6be58937000006000f0000010000"
    "06001100000e000012001000f2ff20914892de8e6be589370800000014000300000000006b16d6b600000000000800e5"
    "08000c0000000001400009004500003c43ff40003f06e1f50a6300010a6301018e8a14b482404ffe00000000a002faf0"
    "15f60000020405b40402080af550d839000000000103030ac00000000004000000000000000000000200001008000100"
    "080002000e000a006f77663a333a643a69000000080004000000000208000500000000031000080000060000de8e6be5"
    "8937000006000f000001000006001100000e000012001000f2ff20914892de8e6be58937080000001400030000000000"
    "6b16d6b600000000000801b908000c0000000004320009004500002e758240003f11b0750a6300010a630101d820157c"
    "001a15f37878787878787878787878787878787878780000"
)


def _reader():  # the parser only: no socket
    from omniwall.dataplane.nflog import NflogReader

    r = NflogReader.__new__(NflogReader)
    r._prefixes, r._addrs, r._next_seq, r.lost, r._seq = {}, {}, None, 0, 0  # _seq: its netlink requests'
    r._heads = {}
    return r


def _attrs_of(msg: bytes) -> list[tuple[int, bytes]]:
    out, a = [], 20
    while a + 4 <= len(msg):
        ln, typ = struct.unpack_from("=HH", msg, a)
        out.append((typ, msg[a + 4 : a + ln]))
        a += (ln + 3) & ~3
    return out


def test_same_host_egress_logs_name_the_rule_by_the_packet_mark() -> None:
    """A `owf:ct:` log (fwd's same-host egress rule, group 17) takes its rule id from NFULA_MARK, only
    in a `mark_id` reader; `owf:marked:` (the packet had its own mark) is counted as unnamed. Built from
    the kernel's layout of the captured datagram's first message, with the prefix and the mark changed."""
    first = _KERNEL_DATAGRAM[: struct.unpack_from("=I", _KERNEL_DATAGRAM)[0]]

    def msg(prefix: bytes, mark: int) -> bytes:
        body = b""
        for typ, val in _attrs_of(first):
            body += _nla(typ, prefix + b"\0" if typ == 10 else val)
            if typ == 5:  # NFULA_IFINDEX_OUTDEV, then NFULA_MARK (the kernel's order)
                body += _nla(2, struct.pack("!I", mark))
        head = struct.pack("=IHHII", 20 + len(body), *struct.unpack_from("=HHII", first, 4))
        return head + first[16:20] + body

    gram = msg(b"owf:ct:a:e", 11) + msg(b"owf:ct:a:e", 0) + msg(b"owf:marked:a:e", 0x4000)
    r = _reader()
    r.mark_id = True
    got: dict = {}
    r._parse_flows(gram, got)
    assert got == {(11, "a", "e", 6, "10.99.0.1", "10.99.1.1", 36482, 5300, 2, 3): 1}  # unmarked: no rule
    assert r.unnamed == 1
    plain: dict = {}
    _reader()._parse_flows(gram, plain)  # the flow group's reader: a `ct` log names no rule there
    assert plain == {}


def test_nflog_fast_path_reads_the_kernels_layout_like_the_attribute_walk() -> None:
    from omniwall.dataplane import nflog

    fast, slow = _reader(), _reader()
    got: dict = {}
    fast._parse_flows(_KERNEL_DATAGRAM, got)
    assert got == {
        (2, "a", "i", 6, "10.99.0.1", "10.99.1.1", 36482, 5300, 2, 3): 1,
        (2, "a", "i", 6, "10.99.0.1", "10.99.1.1", 36490, 5300, 2, 3): 1,
        (3, "d", "i", 17, "10.99.0.1", "10.99.1.1", 55328, 5500, 2, 3): 1,
    }
    assert fast.lost == 2  # the sequence gap 1 -> 4
    off, walked = 0, {}
    while off < len(_KERNEL_DATAGRAM):  # every message through the generic walk
        ln = struct.unpack_from("=I", _KERNEL_DATAGRAM, off)[0]
        assert nflog._FAST(_KERNEL_DATAGRAM, off, off + ln) is not None  # the usual shape: the fast path
        slow._parse_one(_KERNEL_DATAGRAM, off, off + ln, walked)
        off += (ln + 3) & ~3
    assert walked == got and slow.lost == 2
    # a message of another shape amid the usual ones (here IPv4 with options) takes the walk, and the
    # sequence numbers stay counted across both paths
    first = _KERNEL_DATAGRAM.index(bytes.fromhex("4500003c"))
    mixed = _KERNEL_DATAGRAM[:first] + b"\x46" + _KERNEL_DATAGRAM[first + 1 :]
    r, got2 = _reader(), {}
    r._parse_flows(mixed, got2)
    assert sum(got2.values()) == 3 and r.lost == 2 and len(got2.keys() & got.keys()) == 2


def test_a_flood_is_counted_not_one_object_per_packet() -> None:
    udp = _KERNEL_DATAGRAM[-0xC0:]  # the denied UDP log: one message
    assert struct.unpack_from("=I", udp)[0] == 0xC0
    seq_at = udp.index(bytes.fromhex("08000c00")) + 4
    flood = b"".join(udp[:seq_at] + struct.pack("!I", i) + udp[seq_at + 4 :] for i in range(100))
    r, got = _reader(), {}
    r._parse_flows(flood, got)
    assert list(got.values()) == [100] and r.lost == 0
    log = next(iter(got))
    ag = FlowAggregator("h")
    ag.set_state(_state())
    ag.on_log_counts(got, 1.0)
    (rec,) = ag.flush(_names)
    assert (rec.verdict, rec.rule_id, rec.count, rec.packets, rec.dport) == ("denied", 3, 100, 100, log[7])


# A DESTROY event as this kernel (6.18) sent it: a TCP connection 10.99.0.1:36482 -> 10.99.1.1:5300 that
# ended after 4 + 3 packets (216 + 164 bytes), ct mark 2 (ID, status, timeout, counters, TCP state, mark).
_KERNEL_DESTROY = bytes.fromhex(
    "e40000000201000000000000ac46f9e9020000003400018014000180080001000a630001080002000a6301011c000280"
    "0500010006000000060002008e8200000600030014b400003400028014000180080001000a630101080002000a630001"
    "1c00028005000100060000000600020014b40000060003008e82000008000c0068dfb7a6080003000000020e08000700"
    "000000001c0009800c00010000000000000000040c00020000000000000000d81c000a800c0001000000000000000003"
    "0c00020000000000000000a4100004800c00018005000100070000000800080000000002"
)


def test_conntrack_destroy_fast_path_reads_the_kernels_layout() -> None:
    from omniwall.dataplane import ctevents

    data = _KERNEL_DESTROY
    assert ctevents._V4_DESTROY(data, 20, len(data)) is not None  # the usual shape: one regex match
    want = (6, "10.99.0.1", "10.99.1.1", 36482, 5300, 7, 380, 2)
    assert parse_destroy(data, 20, len(data), data[16], {}) == want
    assert ctevents._parse_destroy(data, 20, len(data), data[16], {}) == want
    # an attribute the fast path does not know (here a zone, after the mark): the generic walk
    longer = data + _nla(18, struct.pack("!H", 7))
    longer = struct.pack("=I", len(longer)) + longer[4:]
    assert ctevents._V4_DESTROY(longer, 20, len(longer)) is None
    assert parse_destroy(longer, 20, len(longer), data[16], {}) == want


def test_mirror_reads_a_destroy_event_once_for_itself_and_the_flow_collector() -> None:
    """The conntrack mirror parses a DESTROY event of the usual shape by the flow path's regex and hands
    it to its subscriber (agent/flows.py `ct_feed`); the tuple it forgets is exactly the one its own walk
    (and so a NEW event, a dump) gives; other shapes take the walks, with the same answers."""
    from omniwall.dataplane.ctmirror import ConntrackMirror, parse_orig

    def mirror() -> tuple[ConntrackMirror, list]:
        m = ConntrackMirror.__new__(ConntrackMirror)  # the parser only: no socket, no thread
        m._addrs, m._by_addr, m._pending, m.events = {}, {}, [], 0
        got: list = []
        m._sink = got.extend
        return m, got

    data = _KERNEL_DESTROY
    longer = data + _nla(18, struct.pack("!H", 7))  # a zone: not the usual shape
    longer = struct.pack("=I", len(longer)) + longer[4:]
    for msg, zone in ((data, 0), (longer, 7)):
        m, got = mirror()
        orig = parse_orig(msg, 20, len(msg), msg[16], {})
        assert orig is not None and orig[-1] == zone
        m._add(orig)
        assert m._by_addr
        m._apply(msg)
        m._hand_events()
        assert m._by_addr == {} and m.events == 1  # forgotten: the same tuple as the NEW event's
        assert got == [(6, "10.99.0.1", "10.99.1.1", 36482, 5300, 7, 380, 2)]
    m, got = mirror()
    m._sink = None
    m._apply(data)
    assert m._pending == [] and m.events == 1  # nobody subscribed: nothing kept


def _stateful_state(default: str = "allow", monitor: bool = False) -> HostDesiredState:
    st = _state(monitor=monitor, default=default)
    return dataclasses.replace(
        st,
        rules=st.rules[:2],
        vnics=(st.vnics[0], dataclasses.replace(st.vnics[1], ingress=(12, 11))),
    )


def test_ingress_allowed_records_come_from_conntrack_where_no_rule_is_stateless() -> None:
    """Flows on and every rule of the host stateful: an ingress allow (a stateful rule or the default)
    logs nothing and marks the connection (the default with its id), the egress hop and every other
    verdict still log; a host with a stateless rule logs every allowed hop, and the adoption marker
    tells the two apart."""
    from omniwall.dataplane.nft.render import allowed_from_conntrack

    def ctmarks(cmds: list[dict]) -> set[int]:
        return {
            e["mangle"]["value"]
            for c in cmds
            for e in c.get("add", {}).get("rule", {}).get("expr", [])
            if "mangle" in e and e["mangle"]["key"] == {"ct": {"key": "mark"}}
        }

    def fwd0(cmds: list[dict]) -> str:
        return next(
            c["add"]["rule"]["comment"]
            for c in cmds
            if c.get("add", {}).get("rule", {}).get("chain") == "fwd"
        )

    st = _stateful_state(monitor=True)
    assert allowed_from_conntrack(st, 16) and not allowed_from_conntrack(st, None)
    assert not allowed_from_conntrack(_state(), 16)  # rule 13 is stateless
    cmds = render_table(st, flow_group=16)
    logs = set(_logs(cmds))
    va, vb = st.vnic_map()["va"], st.vnic_map()["vb"]
    assert "owf:11:a:e" not in logs and "owf:11:a:i" not in logs  # both hops: from conntrack
    assert f"owf:{vb.default_id}:a:i" not in logs and f"owf:{vb.default_id}:a:e" not in logs
    assert f"owf:{va.default_id}:d:e" in logs  # a drop logs at either hop
    assert "owf:12:w:i" in logs  # a would-deny still logs at ingress
    # fwd's same-host egress logs, between the egress and the ingress dispatch: the rule named by the
    # packet mark (set from the ct mark, logged in group 17, set back to 0), or unnamed when it had one
    fwd = [c["add"]["rule"] for c in cmds if c.get("add", {}).get("rule", {}).get("chain") == "fwd"]
    assert [r["comment"] for r in fwd][2:6] == [
        "dispatch", "flows:same-host-egress", "flows:same-host-egress-marked", "dispatch",
    ]  # fmt: skip
    mm = {"meta": {"key": "mark"}}
    assert fwd[3]["expr"][2:] == [
        {"match": {"op": "==", "left": mm, "right": 0}},
        {"mangle": {"key": mm, "value": {"ct": {"key": "mark"}}}},
        {"log": {"prefix": "owf:ct:a:e", "group": 17}},
        {"mangle": {"key": mm, "value": 0}},
    ]
    assert fwd[4]["expr"][2:] == [
        {"match": {"op": "!=", "left": mm, "right": 0}}, {"log": {"prefix": "owf:marked:a:e", "group": 17}},
    ]  # fmt: skip
    assert ctmarks(cmds) == {11, 12, vb.default_id}  # a monitored drop marks too, a drop nothing
    assert fwd0(cmds) == "established flows:16/ct-new2"
    old = render_table(_state(monitor=True), flow_group=16)
    assert fwd0(old) == "established flows:16" and {"owf:11:a:i", "owf:11:a:e"} <= set(_logs(old))
    assert not any("same-host" in c["add"]["rule"]["comment"] for c in old if "rule" in c.get("add", {}))
    assert not ctmarks(render_table(_state(), flow_group=16)) - {11}  # defaults mark only in ct mode
    assert fwd0(render_table(st)) == "established" and not _logs(render_table(st))


def test_new_events_make_the_ingress_records_once_and_destroy_completes_both_hops() -> None:
    st = _stateful_state(monitor=True)
    dv = st.vnic_map()["vb"].default_id
    ag = FlowAggregator("h")
    ag.set_state(st)
    assert ag.ct_new
    # the same-host connection's egress hop: fwd's log, the rule named by the packet mark; a monitored
    # drop's mark there is not an allow (its would-deny logged)
    same = {(11, "a", "e", 6, A, B, 40000, 8080, 3, 4): 1, (12, "a", "e", 6, A, B, 40001, 22, 3, 4): 1}
    assert ag.same_host_logs(same) == {(11, "a", "e", 6, A, B, 40000, 8080, 3, 4): 1}
    ag.on_log_counts(ag.same_host_logs(same), 10.0)
    ag.on_ct_events(
        [
            (6, A, B, 40000, 8080, 11),  # the ingress hop: mark 11, destination local
            (6, A, B, 40001, 22, 12),  # a would-deny's mark: its hop logged it
            (6, A, "10.9.9.9", 5000, 80, 11),  # destination not local: the egress hop's mark
            (6, "10.8.8.8", "10.9.9.9", 5000, 80, 11),  # neither end local: forwarded only
            (1, A, "10.9.9.9", 0, 8, 11),  # ICMP: a count of packets, not an open connection
            (17, "10.9.9.9", B, 5000, 53, dv),  # the default allowed it
            (6, A, B, 40000, 8080, 9, 1300, 11),  # then the first one ends
        ],
        12.0,
    )
    out = ag.flush(_names)
    got = sorted((r.hop, r.ifname, r.rule_id, r.verdict, r.final, r.count, r.packets) for r in out)
    assert got == [
        ("egress", "va", 11, "allowed", False, 1, 0), ("egress", "va", 11, "allowed", False, 1, 0),
        ("egress", "va", 11, "allowed", True, 0, 9), ("egress", "va", 11, "allowed", True, 1, 1),
        ("ingress", "vb", 11, "allowed", False, 1, 0), ("ingress", "vb", 11, "allowed", True, 0, 9),
        ("ingress", "vb", dv, "allowed", False, 1, 0),
    ]  # fmt: skip
    assert ag.open_connections == 2  # the UDP one and the one leaving the host, until their DESTROY
    ag.set_state(_state())  # a stateless rule: the table logs allows, NEW events and fwd say nothing
    ag.on_ct_events([(6, A, B, 40002, 8080, 11), (6, A, "10.9.9.9", 5001, 80, 11)], 13.0)
    assert ag.same_host_logs(same) == {}
    assert ag.flush(_names) == []


def test_mirror_hands_marked_new_events_with_its_own_walk() -> None:
    """A NEW event (the kernel's layout: orig, reply, id, status, timeout, mark): the mirror indexes its
    tuple and hands the flow collector (proto, src, dst, sport, dport, mark) in order with DESTROY events;
    unmarked or related (expected) connections are not handed."""
    from omniwall.dataplane.ctevents import ct_events
    from omniwall.dataplane.ctmirror import ConntrackMirror

    d = _KERNEL_DESTROY
    orig_reply = d[20:124]  # the original and reply tuples of the captured event

    def new_msg(status: int, mark: int | None) -> bytes:
        body = orig_reply + _nla(12, b"\x00\x00\x00\x01") + _nla(3, struct.pack("!I", status))
        body += _nla(7, struct.pack("!I", 120)) + (
            _nla(8, struct.pack("!I", mark)) if mark is not None else b""
        )
        return struct.pack("=IHHII", 20 + len(body), 0x100, 0, 0, 0) + bytes([2, 0, 0, 0]) + body

    m = ConntrackMirror.__new__(ConntrackMirror)  # the parser only: no socket, no thread
    m._addrs, m._by_addr, m._pending, m.events = {}, {}, [], 0
    got: list = []
    m._sink = got.extend
    gram = new_msg(0x8, 7) + new_msg(0x8, None) + new_msg(0x9, 7) + d
    m._apply(gram)
    m._hand_events()
    assert m.events == 4 and m._by_addr == {}  # three NEW (one tuple), then its DESTROY
    new = (6, "10.99.0.1", "10.99.1.1", 36482, 5300, 7)
    assert got == [new, (6, "10.99.0.1", "10.99.1.1", 36482, 5300, 7, 380, 2)]
    out: list = []
    ct_events(gram, {}, out)  # the collector's own reader: the same
    assert out == got
    got.clear()
    m._new_dst = frozenset({"10.9.9.9"})  # the subscriber's local addresses: not this destination
    m._apply(gram)
    m._hand_events()
    assert got == [(6, "10.99.0.1", "10.99.1.1", 36482, 5300, 7, 380, 2)]  # the DESTROY only
    got.clear()
    m._new_dst = frozenset({"10.99.0.1"})  # a local source: the NEW event stands for its egress hop
    m._apply(gram)
    m._hand_events()
    assert got == [new, (6, "10.99.0.1", "10.99.1.1", 36482, 5300, 7, 380, 2)]


# NEW events captured from this kernel (a TCP and a UDP connection over lo, `ct mark set 7` in output):
# orig, reply, CTA_ID, CTA_STATUS, CTA_TIMEOUT, (TCP) CTA_PROTOINFO, CTA_MARK
_KERNEL_NEW_TCP = bytes.fromhex(
    "cc000000000100060000000000000000020000003400018014000180080001007f000001080002007f0000011c000280"
    "050001000600000006000200b27e00000600030014b400003400028014000180080001007f000001080002007f000001"
    "1c00028005000100060000000600020014b4000006000300b27e000008000c00b1739ef3080003000000000808000700"
    "00000078300004802c0001800500010001000000050002000a0000000500030000000000060004000300000006000500"
    "000000000800080000000007"
)
_KERNEL_NEW_UDP = bytes.fromhex(
    "9c000000000100060000000000000000020000003400018014000180080001007f000001080002007f0000011c000280"
    "050001001100000006000200b66000000600030014b500003400028014000180080001007f000001080002007f000001"
    "1c00028005000100110000000600020014b5000006000300b660000008000c00c8bdfea5080003000000000808000700"
    "0000001e0800080000000007"
)


def test_conntrack_new_fast_path_reads_the_kernels_layout() -> None:
    """The usual NEW event (IPv4, a port protocol) by one regex match, with the walks' answers; the
    mirror indexes the same tuple either way and hands the same flow view."""
    from omniwall.dataplane import ctevents
    from omniwall.dataplane.ctmirror import parse_new, parse_orig

    for data, proto, sport, dport in ((_KERNEL_NEW_TCP, 6, 45694, 5300), (_KERNEL_NEW_UDP, 17, 46688, 5301)):
        got = ctevents.parse_new_v4(data, 20, len(data), {})
        assert got == (proto, "127.0.0.1", "127.0.0.1", sport, dport, 8, 7)
        f = ctevents.new_fields(data, 20, len(data))
        assert f is not None and (f[3], f[4]) == (8, 7)
        t = ctevents.parse_tuple(data, f[0], f[1], {})
        assert t is not None
        assert ctevents.flow_new(t, f[3], f[4]) == ctevents.new_event(data, 20, len(data), {})
        new = parse_new(data, 20, len(data), 2, {})
        assert new is not None and new[0] == parse_orig(data, 20, len(data), 2, {})
        assert new[1] == (proto, "127.0.0.1", "127.0.0.1", sport, dport, 7)
        longer = data + _nla(18, struct.pack("!H", 7))  # a zone: not the usual shape, the walks
        longer = struct.pack("=I", len(longer)) + longer[4:]
        assert ctevents.parse_new_v4(longer, 20, len(longer), {}) is None
        new2 = parse_new(longer, 20, len(longer), 2, {})
        assert new2 is not None and new2[0][-1] == 7 and new2[1] == new[1]
