"""Conntrack DESTROY events over raw ctnetlink: the end of every connection, with its counters.

The flow collector (agent/flows.py) joins them by original tuple to the allowed-connection logs it saw
at the connection's first packet, to complete those records with packets, bytes and duration. Counters
need `net.netfilter.nf_conntrack_acct=1` in the namespace (`enable_accounting`): without it the events
still arrive, with zero counters. A lean parser of our own, not pyroute2's (its message classes cost
tens of µs per event; a busy host ends thousands of connections a second).

Loss: the kernel drops events when our receive buffer is full and the next recv fails with ENOBUFS;
how many were lost is unknown, so `overruns` counts the occurrences (each is at least one event).
"""

from __future__ import annotations

import errno
import select
import socket
import struct

from omniwall.dataplane.netns import in_netns

NETLINK_NETFILTER = 12
NFNLGRP_CONNTRACK_DESTROY = 3
_DELETE = (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_DELETE
CTA_TUPLE_ORIG, CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 1, 2
CTA_MARK, CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY = 8, 9, 10
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMPV6_TYPE = 5, 8
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NETLINK_NO_ENOBUFS = 270, 1, 5

# (proto, src, dst, sport, dport or ICMP type, packets, bytes, mark): both directions' counters summed
CtDestroy = tuple[int, str, str, int, int, int, int, int]


def _attrs(data: bytes, off: int, end: int) -> dict[int, tuple[int, int]]:
    """type -> (start, end) of its payload."""
    out: dict[int, tuple[int, int]] = {}
    while off + 4 <= end:
        ln, typ = struct.unpack_from("=HH", data, off)
        if ln < 4:
            break
        out[typ & 0x3FFF] = (off + 4, off + ln)
        off += (ln + 3) & ~3
    return out


def _counters(data: bytes, span: tuple[int, int] | None) -> tuple[int, int]:
    if span is None:
        return 0, 0
    a = _attrs(data, *span)
    p, b = a.get(CTA_COUNTERS_PACKETS), a.get(CTA_COUNTERS_BYTES)
    return (
        struct.unpack_from("!Q", data, p[0])[0] if p else 0,
        struct.unpack_from("!Q", data, b[0])[0] if b else 0,
    )


def parse_destroy(data: bytes, off: int, end: int, family: int) -> CtDestroy | None:
    top = _attrs(data, off, end)
    orig = top.get(CTA_TUPLE_ORIG)
    if orig is None:
        return None
    t = _attrs(data, *orig)
    ip, pr = t.get(CTA_TUPLE_IP), t.get(CTA_TUPLE_PROTO)
    if ip is None or pr is None:
        return None
    ipa = _attrs(data, *ip)
    af, (s_attr, d_attr) = (socket.AF_INET, (1, 2)) if family == socket.AF_INET else (socket.AF_INET6, (3, 4))
    if s_attr not in ipa or d_attr not in ipa:
        return None
    src = socket.inet_ntop(af, data[ipa[s_attr][0] : ipa[s_attr][1]])
    dst = socket.inet_ntop(af, data[ipa[d_attr][0] : ipa[d_attr][1]])
    pa = _attrs(data, *pr)
    proto = data[pa[CTA_PROTO_NUM][0]] if CTA_PROTO_NUM in pa else 0
    sport = dport = 0
    if CTA_PROTO_SRC_PORT in pa and CTA_PROTO_DST_PORT in pa:
        sport = struct.unpack_from("!H", data, pa[CTA_PROTO_SRC_PORT][0])[0]
        dport = struct.unpack_from("!H", data, pa[CTA_PROTO_DST_PORT][0])[0]
    elif CTA_PROTO_ICMP_TYPE in pa:
        dport = data[pa[CTA_PROTO_ICMP_TYPE][0]]
    elif CTA_PROTO_ICMPV6_TYPE in pa:
        dport = data[pa[CTA_PROTO_ICMPV6_TYPE][0]]
    po, bo = _counters(data, top.get(CTA_COUNTERS_ORIG))
    pr_, br = _counters(data, top.get(CTA_COUNTERS_REPLY))
    m = top.get(CTA_MARK)
    mark = struct.unpack_from("!I", data, m[0])[0] if m else 0
    return (proto, src, dst, sport, dport, po + pr_, bo + br, mark)


class CtEventReader:
    """Subscribes to conntrack DESTROY events of `netns` (opened there: events are per namespace)."""

    def __init__(self, netns: str | None = None, rcvbuf: int = 4 << 20) -> None:
        self.overruns = 0
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE (root)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((0, 0))
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_CONNTRACK_DESTROY)

    def read(self, timeout: float = 0.2) -> list[CtDestroy]:
        out: list[CtDestroy] = []
        if not select.select([self.sock], [], [], timeout)[0]:
            return out
        while True:
            try:
                data = self.sock.recv(1 << 17, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise
            off = 0
            while off + 20 <= len(data):
                ln, typ = struct.unpack_from("=IH", data, off)
                if ln < 16:
                    break
                if typ == _DELETE:
                    ev = parse_destroy(data, off + 20, off + ln, data[off + 16])
                    if ev is not None:
                        out.append(ev)
                off += (ln + 3) & ~3

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


__all__ = ["CtDestroy", "CtEventReader", "enable_accounting", "parse_destroy"]
