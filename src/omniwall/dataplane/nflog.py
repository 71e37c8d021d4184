"""A small raw-netlink NFLOG reader (pyroute2 has none): bind to a group, parse prefix and headers.

The nft rules log with prefix `ow:<rule id>:<action> ` (action: drop, reject, would-drop; rule id 0 =
a vNIC's default action). `NflogReader(group, netns)` opens its socket inside `netns` (NFLOG delivers
in the namespace that logged) and `read(timeout)` returns parsed `NflogRecord`s.

Flow records (agent/flows.py) use their own group and prefix `owf:<id>:<a|d|r|w>:<e|i>` (verdict,
hop); `read_flows()` is their lean parser: no dataclass, no `ipaddress`, one tuple per packet, since a
denied flood arrives here packet by packet. The instance is configured with per-instance sequence
numbers, so every message the kernel could not deliver (socket overrun) shows up as a gap: `lost`.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from omniwall.dataplane.netns import in_netns

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_COPY_PACKET = 2
NFULA_PACKET_HDR = 1
NFULA_MARK = 2
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_SEQ = 12
NFULA_CFG_NLBUFSIZ = 3
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULA_CFG_FLAGS = 6
NFULNL_CFG_F_SEQ = 1
# the rule id of a log whose prefix says `owf:ct:…` (render.same_host_egress_rules): the packet's mark
# (NFULA_MARK), which the rule set to the connection's ct mark for the log (and back to 0 after it)
CT_MARK_ID = -1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NLMSG_DONE = 3

_PREFIX = re.compile(r"ow:(\d+):([a-z-]+)")
RECV_SIZE = 1 << 18  # a receive buffer above the largest datagram (NFLOG: nlbufsiz, at most 128 KB)


def queued_datagrams(
    sock: socket.socket, timeout: float, on_overrun: Callable[[], None], buf: bytearray | None = None
) -> Iterator[bytes]:
    """The datagrams of a netlink socket: waits up to `timeout` for the first, then yields whatever else
    is already queued. ENOBUFS (the receive buffer overflowed: the kernel dropped messages) calls
    `on_overrun` and goes on; the NFLOG and conntrack-event readers both count losses this way.
    `buf` (at least 128 KB, the largest NFLOG datagram): receive into it and copy out only the datagram.
    `recv(128 KB)` allocates its 128 KB result anew each time (above glibc's mmap threshold: an mmap and
    an munmap): ~10 µs a call measured here, against ~0.5 µs for the datagram of one conntrack event."""
    if not select.select([sock], [], [], timeout)[0]:
        return
    if buf is None:
        buf = bytearray(RECV_SIZE)
    view = memoryview(buf)
    while True:
        try:
            n = sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                on_overrun()
                continue
            raise
        yield view[:n].tobytes()


@dataclass(frozen=True, slots=True)
class NflogRecord:
    prefix: str
    rule_id: int | None  # None when the prefix is not ours
    action: str | None  # drop, reject, would-drop
    family: int  # 4 or 6
    src: str
    dst: str
    protocol: int
    sport: int = 0
    dport: int = 0
    icmp_type: int | None = None
    icmp_code: int | None = None
    indev: int = 0
    outdev: int = 0
    mark: int = 0


def parse_prefix(prefix: str) -> tuple[int, str] | None:
    m = _PREFIX.match(prefix.strip())
    return (int(m.group(1)), m.group(2)) if m else None


def _attrs(buf: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    off = 0
    while off + 4 <= len(buf):
        ln, typ = struct.unpack_from("=HH", buf, off)
        if ln < 4:
            break
        out[typ & 0x3FFF] = buf[off + 4 : off + ln]
        off += (ln + 3) & ~3
    return out


def parse_payload(payload: bytes) -> dict[str, object]:
    """Network + transport headers of a logged packet."""
    if not payload:
        return {}
    ver = payload[0] >> 4
    if ver == 4 and len(payload) >= 20:
        ihl = (payload[0] & 0xF) * 4
        proto = payload[9]
        src, dst = str(ipaddress.IPv4Address(payload[12:16])), str(ipaddress.IPv4Address(payload[16:20]))
        l4 = payload[ihl:]
        family = 4
    elif ver == 6 and len(payload) >= 40:
        proto = payload[6]
        src, dst = str(ipaddress.IPv6Address(payload[8:24])), str(ipaddress.IPv6Address(payload[24:40]))
        l4 = payload[40:]
        family = 6
    else:
        return {}
    out: dict[str, object] = {"family": family, "src": src, "dst": dst, "protocol": proto}
    if proto in (6, 17) and len(l4) >= 4:
        out["sport"], out["dport"] = struct.unpack_from("!HH", l4, 0)
    elif proto in (1, 58) and len(l4) >= 2:
        out["icmp_type"], out["icmp_code"] = l4[0], l4[1]
    return out


def _flow_prefix(prefix: bytes) -> tuple[int, str, str] | None:
    """`owf:<id>:<v>:<h>` -> (id, v, h); `owf:ct:<v>:<h>` -> (CT_MARK_ID, v, h); None: not a flow log."""
    if not prefix.startswith(b"owf:"):
        return None
    try:
        _, rid, verdict, hop = prefix.decode().split(":")
        return (CT_MARK_ID if rid == "ct" else int(rid)), verdict, hop
    except ValueError:
        return None


def _flow_log(prefix: bytes, p: bytes, indev: int, outdev: int) -> FlowLog | None:
    """`owf:<id>:<v>:<h>` + the packet's headers, or None (not ours, or a truncated packet)."""
    head = _flow_prefix(prefix)
    if head is None or not p:
        return None
    return _flow_headers(head, p, indev, outdev, {})


def addr_text(addrs: dict[bytes, str], raw: bytes) -> str:
    """A 4- or 16-byte address as text, through the cache `addrs` (a host sees few distinct addresses;
    the NFLOG and conntrack-event readers each keep one, bounded)."""
    s = addrs.get(raw)
    if s is None:
        s = addrs[raw] = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
    return s


def _flow_headers(
    head: tuple[int, str, str], p: bytes, indev: int, outdev: int, addrs: dict[bytes, str]
) -> FlowLog | None:
    rule_id, verdict, hop = head
    ver = p[0] >> 4
    if ver == 4 and len(p) >= 20:
        proto, src, dst, l4 = p[9], addr_text(addrs, p[12:16]), addr_text(addrs, p[16:20]), (p[0] & 0xF) * 4
    elif ver == 6 and len(p) >= 40:
        proto, src, dst, l4 = p[6], addr_text(addrs, p[8:24]), addr_text(addrs, p[24:40]), 40
    else:
        return None
    sport = dport = 0
    if proto in (6, 17, 132, 136) and len(p) >= l4 + 4:
        sport, dport = _PORTS(p, l4)
    elif proto in (1, 58) and len(p) > l4:
        dport = p[l4]  # the ICMP type stands in for the port
    return (rule_id, verdict, hop, proto, src, dst, sport, dport, indev, outdev)


def _msg(
    msg_type: int, flags: int, seq: int, family: int, res_id: int, attrs: list[tuple[int, bytes]]
) -> bytes:
    body = struct.pack("!BBH", family, 0, res_id)  # nfgenmsg: family, version, res_id (big endian)
    for typ, data in attrs:
        nla = struct.pack("=HH", 4 + len(data), typ) + data
        body += nla + b"\0" * ((4 - len(nla) % 4) % 4)
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, 0) + body


# one flow log: (rule id, verdict a/d/r/w, hop e/i, protocol, src, dst, sport, dport or ICMP type, indev,
# outdev)
FlowLog = tuple[int, str, str, int, str, str, int, int, int, int]
_PACKET = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
_HH = struct.Struct("=HH").unpack_from
_IH = struct.Struct("=IH").unpack_from
_BE32 = struct.Struct("!I").unpack_from
_PORTS = struct.Struct("!HH").unpack_from

# The usual shape of a flow log, as the kernel lays it out (__build_packet_message): a forwarded IPv4
# TCP/UDP/SCTP/UDP-Lite packet without IP options, logged with our prefix. One regex match per message
# checks the fixed bytes and captures what the record needs (prefix, devices, sequence number, protocol,
# addresses, ports) in C; the optional attributes in between are fixed-size (mark, link-layer address,
# type and header of an Ethernet device, timestamp). Any other shape (IPv6, ICMP, IP options, the
# anti-spoofing guard's prerouting logs: no output device) takes the attribute walk.
_FAST = re.compile(
    rb".{4}\x00\x04.{10}.{4}"  # nlmsghdr (NFULNL_MSG_PACKET), nfgenmsg
    rb"\x08\x00\x01\x00.{4}"  # NFULA_PACKET_HDR
    rb".\x00\x0a\x00(owf:[^\x00]+)\x00+"  # NFULA_PREFIX, NUL-terminated, padded
    rb"\x08\x00\x04\x00(.{4})\x08\x00\x05\x00(.{4})"  # NFULA_IFINDEX_INDEV, _OUTDEV
    rb"(?:\x08\x00\x02\x00.{4})?"  # NFULA_MARK
    rb"(?:\x10\x00\x08\x00.{12})?(?:\x06\x00\x0f\x00.{4})?(?:\x06\x00\x11\x00.{4})?"  # HWADDR, HWTYPE, HWLEN
    rb"(?:\x12\x00\x10\x00.{16})?"  # NFULA_HWHEADER (Ethernet)
    rb"(?:\x14\x00\x03\x00.{16})?"  # NFULA_TIMESTAMP
    rb"\x08\x00\x0c\x00(.{4})"  # NFULA_SEQ
    rb"..\x09\x00\x45.{8}([\x06\x11\x84\x88])..(.{8})(.{4})",  # NFULA_PAYLOAD: IPv4, proto, addresses, ports
    re.S,
).match


class NflogReader:
    """`batch_ms`/`qthresh`: let the kernel pack up to `qthresh` messages into one skb, flushed at the
    latest after `batch_ms` (fewer wakeups under a flood). `nlbufsiz`: the size of that skb (the kernel's
    default, ~4 KB, holds only ~20 flow logs and flushes on full long before `qthresh`; at most 128 KB).
    `seq`: number the messages (loss = gaps). `mark_id`: a log whose prefix names no rule (`owf:ct:…`,
    render.same_host_egress_rules) takes the packet's mark as its rule id (no mark: no log), and
    `owf:marked:…` (the packet had a mark of its own: the rule could not name itself) counts in
    `unnamed`; every message takes the attribute walk (this group's messages are few)."""

    mark_id = False
    unnamed = 0  # `owf:marked:` logs (`mark_id`): records the kernel could not name

    def __init__(
        self,
        group: int,
        netns: str | None = None,
        copy_range: int = 256,
        *,
        rcvbuf: int = 1 << 20,
        qthresh: int = 0,
        batch_ms: int = 0,
        nlbufsiz: int = 0,
        seq: bool = False,
        mark_id: bool = False,
    ) -> None:
        self.group = group
        self.mark_id = mark_id
        self.lost = 0  # messages the kernel numbered but we never received (seq gaps)
        self.overruns = 0  # ENOBUFS: the socket's receive buffer overflowed
        self._next_seq: int | None = None
        self._buf = bytearray(RECV_SIZE)
        self._prefixes: dict[bytes, tuple[int, str, str] | tuple[()]] = {}
        self._addrs: dict[bytes, str] = {}
        # (prefix, indev, outdev, protocol, addresses), raw -> (id, verdict, hop, protocol, src, dst, indev,
        # outdev) decoded, or () (not ours): the connections between two ends differ in ports only
        self._heads: dict[tuple[bytes, ...], tuple[Any, ...]] = {}
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:  # root: beyond rmem_max (flood headroom); else what the sysctl allows
            self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((0, 0))
        self._seq = 0
        cfg = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
        try:
            self._request(cfg, [(NFULA_CFG_CMD, struct.pack("B", NFULNL_CFG_CMD_BIND))])
            self._request(cfg, [(NFULA_CFG_MODE, struct.pack("!IBB", copy_range, NFULNL_COPY_PACKET, 0))])
            if qthresh:
                self._request(cfg, [(NFULA_CFG_QTHRESH, struct.pack("!I", qthresh))])
            if nlbufsiz:
                self._request(cfg, [(NFULA_CFG_NLBUFSIZ, struct.pack("!I", nlbufsiz))])
            if batch_ms:
                self._request(cfg, [(NFULA_CFG_TIMEOUT, struct.pack("!I", max(1, batch_ms // 10)))])
            if seq:
                self._request(cfg, [(NFULA_CFG_FLAGS, struct.pack("!H", NFULNL_CFG_F_SEQ))])
                self._next_seq = 0  # our bind created the instance: its numbering starts at 0
        except BaseException:
            self.sock.close()
            raise

    def _request(self, msg_type: int, attrs: list[tuple[int, bytes]]) -> None:
        self._seq += 1
        self.sock.send(
            _msg(msg_type, NLM_F_REQUEST | NLM_F_ACK, self._seq, socket.AF_UNSPEC, self.group, attrs)
        )
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            data = self.sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                ln, typ, _f, seq, _pid = struct.unpack_from("=IHHII", data, off)
                if typ == NLMSG_ERROR and seq == self._seq:
                    (err,) = struct.unpack_from("=i", data, off + 16)
                    if err != 0:
                        raise OSError(-err, f"nflog config: {os.strerror(-err)}")
                    return
                off += (ln + 3) & ~3
        raise TimeoutError("nflog config: no ack")

    def read(self, timeout: float = 1.0, want: int = 1) -> list[NflogRecord]:
        """Records received within `timeout` seconds (returns early once `want` are in)."""
        out: list[NflogRecord] = []
        deadline = time.monotonic() + timeout
        while len(out) < want:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                break
            data = self.sock.recv(1 << 16)
            out.extend(self._parse(data))
        return out

    def _parse(self, data: bytes) -> list[NflogRecord]:
        recs = []
        off = 0
        while off + 16 <= len(data):
            ln, typ, _f, _seq, _pid = struct.unpack_from("=IHHII", data, off)
            if ln < 16:
                break
            if typ == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
                a = _attrs(data[off + 20 : off + ln])
                prefix = a.get(NFULA_PREFIX, b"").split(b"\0")[0].decode(errors="replace")
                hdr = parse_payload(a.get(NFULA_PAYLOAD, b""))
                pp = parse_prefix(prefix)
                recs.append(
                    NflogRecord(
                        prefix=prefix,
                        rule_id=pp[0] if pp else None,
                        action=pp[1] if pp else None,
                        family=int(hdr.get("family", 0)),  # type: ignore[call-overload]
                        src=str(hdr.get("src", "")),
                        dst=str(hdr.get("dst", "")),
                        protocol=int(hdr.get("protocol", 0)),  # type: ignore[call-overload]
                        sport=int(hdr.get("sport", 0)),  # type: ignore[call-overload]
                        dport=int(hdr.get("dport", 0)),  # type: ignore[call-overload]
                        icmp_type=hdr.get("icmp_type"),  # type: ignore[arg-type]
                        icmp_code=hdr.get("icmp_code"),  # type: ignore[arg-type]
                        indev=struct.unpack("!I", a[NFULA_IFINDEX_INDEV])[0]
                        if NFULA_IFINDEX_INDEV in a
                        else 0,
                        outdev=struct.unpack("!I", a[NFULA_IFINDEX_OUTDEV])[0]
                        if NFULA_IFINDEX_OUTDEV in a
                        else 0,
                        mark=struct.unpack("!I", a[NFULA_MARK])[0] if NFULA_MARK in a else 0,
                    )
                )
            off += (ln + 3) & ~3
        return recs

    def read_flows(self, timeout: float = 0.2) -> list[FlowLog]:
        """Every flow log that arrives within `timeout` (returns after the first datagram and whatever
        else is already queued), one per packet. Overruns and sequence gaps are counted, never raised."""
        return [log for log, n in self.read_flow_counts(timeout).items() for _ in range(n)]

    def read_flow_counts(self, timeout: float = 0.2) -> dict[FlowLog, int]:
        """`read_flows` counted: each distinct log (in order of first arrival) and how many packets
        logged it. A flood is one entry per datagram, not one Python object per packet."""
        out: dict[FlowLog, int] = {}
        for data in queued_datagrams(self.sock, timeout, self._overrun, self._buf):
            self._parse_flows(data, out)
        return out

    def _overrun(self) -> None:
        self.overruns += 1

    def _count_seq(self, seq: int) -> None:
        if self._next_seq is not None and seq != self._next_seq:
            self.lost += (seq - self._next_seq) & 0xFFFFFFFF
        self._next_seq = (seq + 1) & 0xFFFFFFFF

    def _parse_flows(self, data: bytes, out: dict[FlowLog, int]) -> None:
        # the hot loop of a denied flood and of new connections: one regex match per message of the
        # usual shape (`_FAST`), counted by its raw fields, decoded once per distinct log; the attribute
        # walk for any other shape. Caches for the prefix and the addresses (a flood repeats them), bounded.
        off, n = 0, len(data)
        fast, ih, walk_all = _FAST, _IH, self.mark_id
        raw: dict[tuple[bytes, ...], int] = {}
        next_seq, lost = self._next_seq, 0
        while off + 16 <= n:
            ln, typ = ih(data, off)
            if ln < 16:
                break
            if typ == _PACKET:
                m = None if walk_all else fast(data, off, off + ln)
                if m is not None:
                    seq = int.from_bytes(m.group(4))
                    if next_seq is not None and seq != next_seq:
                        lost += (seq - next_seq) & 0xFFFFFFFF
                    next_seq = (seq + 1) & 0xFFFFFFFF
                    key = m.group(1, 2, 3, 5, 6, 7)
                    raw[key] = raw.get(key, 0) + 1
                else:
                    self._next_seq, self.lost = next_seq, self.lost + lost
                    lost = 0
                    self._parse_one(data, off, off + ln, out)
                    next_seq = self._next_seq
            off += (ln + 3) & ~3
        self._next_seq, self.lost = next_seq, self.lost + lost
        heads, ports_of = self._heads, _PORTS
        for (prefix, indev, outdev, proto, ips, ports), k in raw.items():
            head = heads.get((prefix, indev, outdev, proto, ips))
            if head is None:
                head = self._head(prefix, indev, outdev, proto, ips)
            if not head:
                continue
            rule_id, v, h, p, s, d, i, o = head
            sport, dport = ports_of(ports)
            log = (rule_id, v, h, p, s, d, sport, dport, i, o)
            out[log] = out.get(log, 0) + k  # type: ignore[index]
        for cache in (self._prefixes, self._addrs, heads):  # bounded (the walk below fills two)
            if len(cache) > 65_536:
                cache.clear()

    def _head(self, prefix: bytes, indev: bytes, outdev: bytes, proto: bytes, ips: bytes) -> tuple[Any, ...]:
        """Decode and cache (bounded) what a flow log's fields other than its ports say."""
        prefixes, addrs, heads = self._prefixes, self._addrs, self._heads
        rule = prefixes.get(prefix)
        if rule is None:
            rule = prefixes[prefix] = _flow_prefix(prefix) or ()
        head: tuple[Any, ...] = ()
        if rule and rule[0] != CT_MARK_ID:  # (a `ct` log without its entry names no rule)
            s, d = addr_text(addrs, ips[:4]), addr_text(addrs, ips[4:])
            head = (*rule, proto[0], s, d, int.from_bytes(indev), int.from_bytes(outdev))
        heads[(prefix, indev, outdev, proto, ips)] = head
        return head

    def _parse_one(self, data: bytes, a: int, end: int, out: dict[FlowLog, int]) -> None:
        """One message of any shape: the attribute walk."""
        hh, be32 = _HH, _BE32
        prefix = payload = b""
        indev = outdev = mark = 0
        seq = -1
        a += 20
        while a + 4 <= end:
            alen, atyp = hh(data, a)
            if alen < 4:
                break
            atyp &= 0x3FFF
            if atyp == NFULA_PREFIX:
                prefix = data[a + 4 : a + alen - 1]
            elif atyp == NFULA_PAYLOAD:
                payload = data[a + 4 : a + alen]
            elif atyp == NFULA_IFINDEX_INDEV:
                indev = be32(data, a + 4)[0]
            elif atyp == NFULA_IFINDEX_OUTDEV:
                outdev = be32(data, a + 4)[0]
            elif atyp == NFULA_SEQ:
                seq = be32(data, a + 4)[0]
            elif atyp == NFULA_MARK:
                mark = be32(data, a + 4)[0]
            a += (alen + 3) & ~3
        if seq >= 0:
            self._count_seq(seq)
        head = self._prefixes.get(prefix)
        if head is None:
            head = self._prefixes[prefix] = _flow_prefix(prefix) or ()
        if head and head[0] == CT_MARK_ID:
            # `owf:ct:` names the rule by the packet's mark (`mark_id` readers only: else none)
            head = (mark, *head[1:]) if mark and self.mark_id else ()
        elif not head and self.mark_id and prefix.startswith(b"owf:marked:"):
            self.unnamed += 1
        if head and payload:
            log = _flow_headers(head, payload, indev, outdev, self._addrs)  # type: ignore[arg-type]
            if log is not None:
                out[log] = out.get(log, 0) + 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            cfg = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
            self._request(cfg, [(NFULA_CFG_CMD, struct.pack("B", NFULNL_CFG_CMD_UNBIND))])
        self.sock.close()

    def __enter__(self) -> NflogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["FlowLog", "NflogReader", "NflogRecord", "parse_payload", "parse_prefix"]
