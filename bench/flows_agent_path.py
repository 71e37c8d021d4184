"""The agent's Python per connection on the flow path, without a kernel: CPU (`process_time`) per
connection of each step, over synthetic messages in the kernel's layout.

    .venv/bin/python bench/flows_agent_path.py [--connections 20000]
    PYTHONPATH=/tmp/base/src .venv/bin/python bench/flows_agent_path.py   # another package, same messages

Per connection and agent: the NFLOG parse of its first packet's log (`NflogReader._parse_flows`, 64
messages a datagram as with `qthresh`), `FlowAggregator.on_log_counts`, the conntrack DESTROY parse (as
`CtEventReader.read` does, 64 events a datagram), `FlowAggregator.on_destroy`, and the conntrack mirror's
handling of the same DESTROY event (`mirror_destroy`, revocation's, with flows on or off; where the mirror
hands its events to the flow collector, the flow reader's own parse is not run: `destroy_parse` 0).
Load-independent in the sense that it counts only this process's CPU; the connection-rate ratio itself
is bench/flows_agent.py. The agent's modules are imported first, so the garbage collector walks a heap
like the agent's (its cost falls on the steps that allocate). Prints one JSON line (µs per connection
per step, and the total).
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))  # the pure test's state
from test_flows_agent_pure import A, B, _nla, _state

import omniwall.agent.main  # noqa: F401 - the agent's heap: the garbage collector's full passes walk it
from omniwall.agent.flows import FlowAggregator
from omniwall.dataplane import ctevents
from omniwall.dataplane.ctmirror import ConntrackMirror, parse_orig
from omniwall.dataplane.nflog import NflogReader, _msg


def _ipv4_tcp(sport: int) -> bytes:
    ip = bytes([0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0]) + socket.inet_aton(A) + socket.inet_aton(B)
    return ip + struct.pack("!HH", sport, 8080) + bytes(16)


def nflog_message(i: int) -> bytes:
    """A flow log as the kernel lays it out for a forwarded packet from an Ethernet device (attribute
    order of __build_packet_message, captured on this kernel)."""
    attrs = [
        (1, struct.pack("!HBB", 0x0800, 2, 0)),  # NFULA_PACKET_HDR
        (10, b"owf:11:a:e\0"),  # prefix
        (4, struct.pack("!I", 3)),  # indev
        (5, struct.pack("!I", 4)),  # outdev
        (8, struct.pack("!H2x8s", 6, bytes(8))),  # NFULA_HWADDR
        (15, struct.pack("!H", 1)),  # NFULA_HWTYPE
        (17, struct.pack("!H", 14)),  # NFULA_HWLEN
        (16, bytes(14)),  # NFULA_HWHEADER
        (3, struct.pack("!QQ", 1_700_000_000, 1)),  # NFULA_TIMESTAMP
        (12, struct.pack("!I", i)),  # seq
        (9, _ipv4_tcp(10000 + i % 50000)),  # payload
    ]
    return _msg((4 << 8) | 0, 0, 0, 2, 16, attrs)


def destroy_message(i: int) -> bytes:
    sport = 10000 + i % 50000

    def tup(a: str, b: str, sp: int, dp: int) -> bytes:
        ip = _nla(1, socket.inet_aton(a)) + _nla(2, socket.inet_aton(b))
        pr = _nla(1, bytes([6])) + _nla(2, struct.pack("!H", sp)) + _nla(3, struct.pack("!H", dp))
        return _nla(1 | 0x8000, ip) + _nla(2 | 0x8000, pr)

    def ctr(p: int, b: int) -> bytes:
        return _nla(1, struct.pack("!Q", p)) + _nla(2, struct.pack("!Q", b))

    # the attribute order of a DESTROY event on this kernel (tests/unit/test_flows_agent_pure.py
    # _KERNEL_DESTROY): tuples, id, status, timeout, counters, TCP state, mark
    body = _nla(1 | 0x8000, tup(A, B, sport, 8080)) + _nla(2 | 0x8000, tup(B, A, 8080, sport))
    body += _nla(12, struct.pack("!I", i)) + _nla(3, struct.pack("!I", 0x18E)) + _nla(7, bytes(4))
    body += _nla(9 | 0x8000, ctr(5, 300)) + _nla(10 | 0x8000, ctr(4, 1000))
    body += _nla(4 | 0x8000, _nla(1 | 0x8000, _nla(1, bytes([7]))))  # CTA_PROTOINFO: TCP state
    body += _nla(8, struct.pack("!I", 11))
    return struct.pack("=IHHII", 20 + len(body), (1 << 8) | 2, 0, 0, 0) + struct.pack("!BBH", 2, 0, 0) + body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=20_000)
    n = ap.parse_args().connections
    out: dict[str, float] = {}
    reader = NflogReader.__new__(NflogReader)  # the parser only: no socket
    reader._prefixes, reader._addrs, reader._next_seq, reader.lost, reader._seq = {}, {}, None, 0, 0
    reader._heads = {}  # (this branch's decode cache; unused by older packages)
    grams = [b"".join(nflog_message(i) for i in range(k, min(n, k + 64))) for k in range(0, n, 64)]
    counted = hasattr(FlowAggregator, "on_log_counts")  # False: an older package (PYTHONPATH), per log
    parts: list = []
    t0 = time.process_time()
    for d in grams:  # as the agent's reader: one datagram's logs
        parts.append({} if counted else [])
        reader._parse_flows(d, parts[-1])
    nlogs = sum(sum(p.values()) if counted else len(p) for p in parts)
    out["nflog_parse"] = (time.process_time() - t0) / nlogs * 1e6
    ag = FlowAggregator("h")
    ag.set_state(_state())
    t0 = time.process_time()
    for p in parts:
        ag.on_log_counts(p, 10.0) if counted else ag.on_logs(p, 10.0)
    out["on_logs"] = (time.process_time() - t0) / nlogs * 1e6
    grams = [b"".join(destroy_message(i) for i in range(k, min(n, k + 64))) for k in range(0, n, 64)]
    events = []
    addrs: dict[bytes, str] = {}
    t0 = time.process_time()
    for data in grams:  # as CtEventReader.read
        off = 0
        while off + 20 <= len(data):
            ln, typ = struct.unpack_from("=IH", data, off)
            if typ == ctevents._DELETE:
                ev = ctevents.parse_destroy(data, off + 20, off + ln, data[off + 16], addrs)
                if ev is not None:
                    events.append(ev)
            off += (ln + 3) & ~3
    out["destroy_parse"] = (time.process_time() - t0) / len(events) * 1e6
    # the conntrack mirror (revocation's) reads every DESTROY event too, one datagram each: with a
    # subscriber (this branch) it parses each once for both, and the flow reader's parse above is not run
    m = ConntrackMirror.__new__(ConntrackMirror)  # the parser only: no socket, no thread
    m._addrs, m._by_addr, m.events, m._destroyed = {}, {}, 0, []
    sink: list = []
    shared = hasattr(m, "subscribe_events")
    m._destroy_sink = sink.extend if shared else None
    singles = [destroy_message(i) for i in range(n)]
    for d in singles:  # what their NEW events added
        o = parse_orig(d, 20, len(d), d[16], {})
        assert o is not None
        m._add(o)
    t0 = time.process_time()
    for d in singles:
        m._apply(d)
        if shared:  # handed once per drain (here per event: the most it costs)
            m._hand_destroyed()
    out["mirror_destroy"] = (time.process_time() - t0) / n * 1e6
    assert not m._by_addr and (len(sink) == n or not shared)
    if shared:  # the flow reader's own parse is not run: its DESTROY events come from the mirror
        out["destroy_parse"] = 0.0
    t0 = time.process_time()
    for k in range(0, len(events), 64):
        ag.on_destroy(events[k : k + 64], 11.0)
    out["on_destroy"] = (time.process_time() - t0) / len(events) * 1e6
    assert ag.open_connections == 0, "every connection completed"
    out["total"] = sum(out.values())
    print(json.dumps({k: round(v, 2) for k, v in out.items()} | {"connections": n}))


if __name__ == "__main__":
    main()
