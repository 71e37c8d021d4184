"""Conntrack events over raw ctnetlink: DESTROY (the end of every connection, with its counters) and
NEW (its beginning, with the ct mark: the rule that let it in at its last local hop).

The flow collector (agent/flows.py) joins them by original tuple to the allowed-connection logs it saw
at the connection's first packet, to complete those records with packets, bytes and duration. Counters
need `net.netfilter.nf_conntrack_acct=1` in the namespace (`enable_accounting`): without it the events
still arrive, with zero counters. A lean parser of our own, not pyroute2's (its message classes cost
tens of µs per event; a busy host ends thousands of connections a second).

Loss: the kernel drops events when our receive buffer is full and the next recv fails with ENOBUFS;
how many were lost is unknown, so `overruns` counts the occurrences (each is at least one event).
"""

from __future__ import annotations

import re
import socket
import struct

from omniwall.dataplane.netns import in_netns
from omniwall.dataplane.nflog import RECV_SIZE, addr_text, queued_datagrams

NETLINK_NETFILTER = 12
NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY = 1, 3
_NEW, _DELETE = (1 << 8) | 0, (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_NEW / _DELETE
CTA_TUPLE_ORIG, CTA_TUPLE_IP, CTA_TUPLE_PROTO, CTA_STATUS, CTA_ZONE = 1, 1, 2, 3, 18
IPS_EXPECTED = 1  # a related connection (a helper's expectation): its mark is its master's
PORT_PROTOS = frozenset((6, 17, 132, 136))  # the protocols whose ports a flow log reads (nflog.py)
CTA_MARK, CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY = 8, 9, 10
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE = 4, 5, 6
CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE = 7, 8, 9
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NETLINK_NO_ENOBUFS = 270, 1, 5

# (proto, src, dst, sport, dport or ICMP type, packets, bytes, mark): both directions' counters summed
CtDestroy = tuple[int, str, str, int, int, int, int, int]
# (proto, src, dst, sport, dport or ICMP type, mark): a NEW event of a marked connection, in a flow log's
# terms (ports of the protocols a flow log reads them of, else 0; ICMP: the type where the port goes)
CtNew = tuple[int, str, str, int, int, int]


_HH = struct.Struct("=HH").unpack_from
_IH = struct.Struct("=IH").unpack_from
_BE16 = struct.Struct("!H").unpack_from
_BE32 = struct.Struct("!I").unpack_from
_BE64 = struct.Struct("!Q").unpack_from


def top_attrs(data: bytes, off: int, end: int) -> dict[int, tuple[int, int]]:
    """The top-level attributes of one ctnetlink message (`data[off:end]`): type -> (start, end) of its
    payload (a repeated type: the last). The generic walk behind the parsers of unusual shapes (IPv6,
    ICMP, a zone) and of dumps; the usual events go through the regex fast paths."""
    at: dict[int, tuple[int, int]] = {}
    while off + 4 <= end:
        ln, typ = _HH(data, off)
        if ln < 4:
            break
        at[typ & 0x3FFF] = (off + 4, off + ln)
        off += (ln + 3) & ~3
    return at


def _counters(data: bytes, off: int, end: int) -> tuple[int, int]:
    packets = nbytes = 0
    while off + 4 <= end:
        ln, typ = _HH(data, off)
        if ln < 4:
            break
        typ &= 0x3FFF
        if typ == CTA_COUNTERS_PACKETS:
            packets = _BE64(data, off + 4)[0]
        elif typ == CTA_COUNTERS_BYTES:
            nbytes = _BE64(data, off + 4)[0]
        off += (ln + 3) & ~3
    return packets, nbytes


# A DESTROY event of an IPv4 TCP/UDP/SCTP connection as ctnetlink lays it out — the shape of nearly
# every event: the original tuple (52 bytes: the IP nest with V4_SRC and V4_DST, the proto nest with
# PROTO_NUM, SRC_PORT and DST_PORT), the reply tuple (52), CTA_ID, CTA_STATUS, CTA_TIMEOUT, both
# directions' counters (PACKETS then BYTES, 64-bit each), the timestamps (`nf_conntrack_timestamp`), TCP's
# state (CTA_PROTOINFO) and CTA_MARK, each optional one fixed-size. One regex match over the whole message
# checks the fixed bytes and captures what the record needs, in C; anything else (IPv6, ICMP, a zone,
# labels, another attribute) takes `_parse_destroy_v4` (IPv4 ports: the original tuple by one struct, the
# rest walked) or the generic walk. The DESTROY parse was the largest share of the
# agent's CPU per connection (bench/flows_agent.py).
_V4_DESTROY = re.compile(
    rb"\x34\x00\x01\x80\x14\x00\x01\x80\x08\x00\x01\x00(.{4})\x08\x00\x02\x00(.{4})"
    rb"\x1c\x00\x02\x80\x05\x00\x01\x00(.)...\x06\x00\x02\x00(..)..\x06\x00\x03\x00(..).."
    rb"\x34\x00\x02\x80.{48}"  # the reply tuple
    rb"(?:\x08\x00\x0c\x00.{4})?\x08\x00\x03\x00.{4}(?:\x08\x00\x07\x00.{4})?"  # CTA_ID, _STATUS, _TIMEOUT
    rb"\x1c\x00\x09\x80\x0c\x00\x01\x00(.{8})\x0c\x00\x02\x00(.{8})"  # CTA_COUNTERS_ORIG
    rb"\x1c\x00\x0a\x80\x0c\x00\x01\x00(.{8})\x0c\x00\x02\x00(.{8})"  # CTA_COUNTERS_REPLY
    rb"(?:\x1c\x00\x14\x80.{24})?(?:\x10\x00\x04\x80.{12})?"  # CTA_TIMESTAMP, CTA_PROTOINFO (TCP state)
    rb"(?:\x08\x00\x08\x00(.{4}))?\Z",  # CTA_MARK, then the end of the message
    re.S,
).match


def parse_destroy(
    data: bytes, off: int, end: int, family: int, addrs: dict[bytes, str] | None = None
) -> CtDestroy | None:
    """One DESTROY message's attributes (`data[off:end]`) -> CtDestroy. Walks only what it needs,
    without building dicts (this runs once per connection that ends on the host)."""
    ev = parse_destroy_v4(data, off, end, addrs if addrs is not None else {})
    return ev if ev is not None else _parse_destroy_v4(data, off, end, family, addrs)


def parse_destroy_v4(data: bytes, off: int, end: int, addrs: dict[bytes, str]) -> CtDestroy | None:
    """`parse_destroy` of the usual shape only (`_V4_DESTROY`: IPv4, a port protocol, no zone), one
    regex match; None for any other shape. The conntrack mirror reads its DESTROY events with it too
    (its own attribute walk cost more than this whole parse)."""
    m = _V4_DESTROY(data, off, end)
    if m is None:
        return None
    src, dst, proto, sport, dport, po, bo, pr, br, mark = m.groups()
    s, d = addr_text(addrs, src), addr_text(addrs, dst)
    return (
        proto[0], s, d, int.from_bytes(sport), int.from_bytes(dport),
        int.from_bytes(po) + int.from_bytes(pr), int.from_bytes(bo) + int.from_bytes(br),
        int.from_bytes(mark) if mark else 0,
    )  # fmt: skip


# The original tuple alone (52 bytes: the IP nest with V4_SRC and V4_DST, the proto nest with PROTO_NUM,
# SRC_PORT and DST_PORT, no zone), for an event whose tail `_V4_DESTROY` does not know.
_V4_ORIG = re.compile(
    rb"\x34\x00\x01\x80\x14\x00\x01\x80\x08\x00\x01\x00.{4}\x08\x00\x02\x00.{4}"
    rb"\x1c\x00\x02\x80\x05\x00\x01\x00.{4}\x06\x00\x02\x00.{4}\x06\x00\x03\x00.{4}",
    re.S,
).match
_V4_FIELDS = struct.Struct("!12x4s4x4s8xB7xH6xH2x").unpack_from
# counters nest: PACKETS then BYTES, each a 64-bit attribute (28 bytes with the nest header)
_CTR = re.compile(rb"\x1c\x00.\x80\x0c\x00\x01\x00.{8}\x0c\x00\x02\x00.{8}", re.S).match
_CTR_FIELDS = struct.Struct("!8xQ4xQ").unpack_from


def _parse_destroy_v4(
    data: bytes, off: int, end: int, family: int, addrs: dict[bytes, str] | None = None
) -> CtDestroy | None:
    """`parse_destroy` of an IPv4 port-protocol event whose tail `_V4_DESTROY` does not know: the
    original tuple by one struct, the rest by an attribute walk; other shapes: the generic walk."""
    if _V4_ORIG(data, off) is None:
        return _parse_destroy(data, off, end, family, addrs)
    src, dst, proto, sport, dport = _V4_FIELDS(data, off)
    cache = addrs if addrs is not None else {}
    s, d = addr_text(cache, src), addr_text(cache, dst)
    packets = nbytes = mark = 0
    off += 52
    hh, ctr, fields = _HH, _CTR, _CTR_FIELDS
    while off + 4 <= end:
        ln, typ = hh(data, off)
        if ln < 4:
            break
        typ &= 0x3FFF
        if typ in (CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY):
            if ctr(data, off) is not None:
                p, b = fields(data, off)
            else:
                p, b = _counters(data, off + 4, off + ln)
            packets += p
            nbytes += b
        elif typ == CTA_MARK:
            mark = _BE32(data, off + 4)[0]
        off += (ln + 3) & ~3
    return (proto, s, d, sport, dport, packets, nbytes, mark)


def _parse_destroy(
    data: bytes, off: int, end: int, family: int, addrs: dict[bytes, str] | None = None
) -> CtDestroy | None:
    """`parse_destroy` of any shape (IPv6, ICMP, a zone): the generic attribute walk."""
    at = top_attrs(data, off, end)
    orig = at.get(CTA_TUPLE_ORIG)
    if orig is None:
        return None
    co, cr, m = at.get(CTA_COUNTERS_ORIG), at.get(CTA_COUNTERS_REPLY), at.get(CTA_MARK)
    mark = _BE32(data, m[0])[0] if m else 0
    t = parse_tuple(data, *orig, addrs if addrs is not None else {})
    if t is None:
        return None
    proto, s_txt, d_txt, sport, dport, _, icmp_type, _ = t
    if icmp_type is not None:
        dport = icmp_type  # a flow record keeps an ICMP type where a port goes
    po, bo = _counters(data, *co) if co else (0, 0)
    pr, br = _counters(data, *cr) if cr else (0, 0)
    return (proto, s_txt, d_txt, sport, dport, po + pr, bo + br, mark)


_AF = {4: socket.AF_INET, 16: socket.AF_INET6}
# (protocol, source, destination, source port, destination port, ICMP id, ICMP type, ICMP code)
Tuple = tuple[int, str, str, int, int, int | None, int | None, int | None]


def parse_tuple(data: bytes, a: int, e: int, addrs: dict[bytes, str]) -> Tuple | None:
    """One ctnetlink tuple (`data[a:e]`, the attributes inside CTA_TUPLE_ORIG or _REPLY): its addresses
    and protocol fields, without building dicts; `addrs` caches address text by raw bytes. Shared by
    the flow path (DESTROY events) and the conntrack mirror (NEW/DESTROY events, dumps)."""
    src = dst = None
    proto = sport = dport = 0
    icmp_id = icmp_type = icmp_code = None
    while a + 4 <= e:
        ln, typ = _HH(data, a)
        if ln < 4:
            break
        typ &= 0x3FFF
        b, be = a + 4, a + ln
        while b + 4 <= be:
            ln2, t2 = _HH(data, b)
            if ln2 < 4:
                break
            t2 &= 0x3FFF
            if typ == CTA_TUPLE_IP:
                if t2 in (1, 3):  # CTA_IP_V4_SRC, CTA_IP_V6_SRC
                    src = data[b + 4 : b + ln2]
                elif t2 in (2, 4):
                    dst = data[b + 4 : b + ln2]
            elif typ == CTA_TUPLE_PROTO:
                if t2 == CTA_PROTO_NUM:
                    proto = data[b + 4]
                elif t2 == CTA_PROTO_SRC_PORT:
                    sport = _BE16(data, b + 4)[0]
                elif t2 == CTA_PROTO_DST_PORT:
                    dport = _BE16(data, b + 4)[0]
                elif t2 in (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMPV6_ID):
                    icmp_id = _BE16(data, b + 4)[0]
                elif t2 in (CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMPV6_TYPE):
                    icmp_type = data[b + 4]
                elif t2 in (CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMPV6_CODE):
                    icmp_code = data[b + 4]
            b += (ln2 + 3) & ~3
        a += (ln + 3) & ~3
    if src is None or dst is None or len(src) not in _AF or len(dst) not in _AF:
        return None
    return (proto, addr_text(addrs, src), addr_text(addrs, dst), sport, dport, icmp_id, icmp_type, icmp_code)


# A NEW event of an IPv4 TCP/UDP/SCTP connection as ctnetlink lays it out (captured from the kernel: see
# the unit test): both tuples as in `_V4_DESTROY`, then CTA_ID, CTA_STATUS, CTA_TIMEOUT, TCP's protoinfo
# (state, window scales, flags: 48 bytes) and CTA_MARK, each optional one fixed-size, up to the end of the
# message. One regex match captures the tuple, the status and the mark; any other shape takes the walks.
_V4_NEW = re.compile(
    rb"\x34\x00\x01\x80\x14\x00\x01\x80\x08\x00\x01\x00(.{4})\x08\x00\x02\x00(.{4})"
    rb"\x1c\x00\x02\x80\x05\x00\x01\x00(.)...\x06\x00\x02\x00(..)..\x06\x00\x03\x00(..).."
    rb"\x34\x00\x02\x80.{48}"  # the reply tuple
    rb"(?:\x08\x00\x0c\x00.{4})?\x08\x00\x03\x00(.{4})(?:\x08\x00\x07\x00.{4})?"  # CTA_ID, _STATUS, _TIMEOUT
    rb"(?:\x30\x00\x04\x80.{44})?"  # CTA_PROTOINFO (TCP)
    rb"(?:\x08\x00\x08\x00(.{4}))?\Z",  # CTA_MARK, then the end of the message
    re.S,
).match


def parse_new_v4(
    data: bytes, off: int, end: int, addrs: dict[bytes, str]
) -> tuple[int, str, str, int, int, int, int] | None:
    """A NEW event of the usual shape (`_V4_NEW`): (proto, src, dst, sport, dport, status, mark) by one
    regex match; None for any other shape (the walks: `new_fields`)."""
    m = _V4_NEW(data, off, end)
    if m is None:
        return None
    src, dst, proto, sport, dport, status, mark = m.groups()
    return (
        proto[0], addr_text(addrs, src), addr_text(addrs, dst), int.from_bytes(sport), int.from_bytes(dport),
        int.from_bytes(status), int.from_bytes(mark) if mark else 0,
    )  # fmt: skip


def flow_new_v4(proto: int, s: str, d: str, sport: int, dport: int, status: int, mark: int) -> CtNew | None:
    """`flow_new` of a `parse_new_v4` result."""
    if not mark or status & IPS_EXPECTED:
        return None
    if proto not in PORT_PROTOS:
        return (proto, s, d, 0, 0, mark)
    return (proto, s, d, sport, dport, mark)


def new_fields(data: bytes, off: int, end: int) -> tuple[int, int, int, int, int] | None:
    """One NEW message's top-level attributes (`data[off:end]`): (start and end of the original tuple's
    attributes, zone, status, mark); None without an original tuple. One walk (it runs once per
    connection that starts on the host), shared by the conntrack mirror and `new_event`."""
    at = top_attrs(data, off, end)
    orig = at.get(CTA_TUPLE_ORIG)
    if orig is None:
        return None
    z, st, m = at.get(CTA_ZONE), at.get(CTA_STATUS), at.get(CTA_MARK)
    zone = _BE16(data, z[0])[0] if z else 0
    status = _BE32(data, st[0])[0] if st else 0
    mark = _BE32(data, m[0])[0] if m else 0
    return orig[0], orig[1], zone, status, mark


def flow_new(t: Tuple, status: int, mark: int) -> CtNew | None:
    """The flow collector's view of a NEW event (its original tuple `t`): None when it names no rule
    (no mark) or its mark is not its own decision (a related connection inherits its master's)."""
    proto, src, dst, sport, dport, _id, icmp_type, _code = t
    if icmp_type is None:
        return flow_new_v4(proto, src, dst, sport, dport, status, mark)
    if not mark or status & IPS_EXPECTED:
        return None
    return (proto, src, dst, 0, icmp_type, mark)


def new_event(data: bytes, off: int, end: int, addrs: dict[bytes, str]) -> CtNew | None:
    """One NEW message's attributes -> CtNew (None: see `flow_new`, or no tuple)."""
    v4 = parse_new_v4(data, off, end, addrs)
    if v4 is not None:
        return flow_new_v4(*v4)
    f = new_fields(data, off, end)
    if f is None or not f[4]:
        return None
    t = parse_tuple(data, f[0], f[1], addrs)
    return None if t is None else flow_new(t, f[3], f[4])


def ct_events(data: bytes, addrs: dict[bytes, str], out: list[CtNew | CtDestroy]) -> None:
    """The NEW (marked, `flow_new`) and DESTROY events of one ctnetlink datagram, in order, appended to
    `out` (other messages skipped; a CtNew has 6 fields, a CtDestroy 8). `addrs` caches address text
    by raw bytes (cleared here past 65,536)."""
    off = 0
    while off + 20 <= len(data):
        ln, typ = _IH(data, off)
        if ln < 16:
            break
        if typ == _DELETE:
            ev: CtNew | CtDestroy | None = parse_destroy(data, off + 20, off + ln, data[off + 16], addrs)
            if ev is not None:
                out.append(ev)
        elif typ == _NEW:
            ev = new_event(data, off + 20, off + ln, addrs)
            if ev is not None:
                out.append(ev)
        off += (ln + 3) & ~3
    if len(addrs) > 65_536:
        addrs.clear()


def destroy_events(data: bytes, addrs: dict[bytes, str], out: list[CtDestroy]) -> None:
    """The DESTROY events of one ctnetlink datagram, appended to `out` (other messages skipped).
    `addrs` caches address text by raw bytes (cleared here past 65,536). Shared by `CtEventReader` and
    the flow collector's feed from the conntrack mirror's socket (agent/flows.py)."""
    off = 0
    while off + 20 <= len(data):
        ln, typ = _IH(data, off)
        if ln < 16:
            break
        if typ == _DELETE:
            ev = parse_destroy(data, off + 20, off + ln, data[off + 16], addrs)
            if ev is not None:
                out.append(ev)
        off += (ln + 3) & ~3
    if len(addrs) > 65_536:
        addrs.clear()


class CtEventReader:
    """Subscribes to conntrack DESTROY events of `netns` (opened there: events are per namespace), and
    NEW events too with `new=True` (the flow collector without a conntrack mirror: ingress allowed
    records come from them, docs/design/flows.md)."""

    def __init__(self, netns: str | None = None, rcvbuf: int = 4 << 20, new: bool = False) -> None:
        self.new = new
        self.overruns = 0
        self._addrs: dict[bytes, str] = {}  # raw -> text, bounded (cleared past 65,536)
        self._buf = bytearray(RECV_SIZE)
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE (root)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((0, 0))
        if new:
            self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_CONNTRACK_NEW)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_CONNTRACK_DESTROY)

    def read(self, timeout: float = 0.2) -> list[CtNew | CtDestroy]:
        """The queued events in order: DESTROY, and with `new` the NEW ones (`ct_events`)."""
        out: list[CtNew | CtDestroy] = []
        for data in queued_datagrams(self.sock, timeout, self._overrun, self._buf):
            if self.new:
                ct_events(data, self._addrs, out)
            else:
                destroy_events(data, self._addrs, out)  # type: ignore[arg-type]
        return out

    def _overrun(self) -> None:
        self.overruns += 1

    def close(self) -> None:
        self.sock.close()


def enable_accounting(netns: str | None) -> bool:
    """`nf_conntrack_acct=1` in `netns` (a per-namespace sysctl, read through /proc/sys from a thread
    that entered the namespace). False when it cannot be set (not root): counters stay zero."""
    try:
        with in_netns(netns), open("/proc/sys/net/netfilter/nf_conntrack_acct", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


__all__ = [
    "CtDestroy",
    "CtEventReader",
    "CtNew",
    "ct_events",
    "destroy_events",
    "enable_accounting",
    "flow_new",
    "flow_new_v4",
    "new_event",
    "new_fields",
    "parse_destroy",
    "parse_destroy_v4",
    "parse_new_v4",
    "top_attrs",
]
