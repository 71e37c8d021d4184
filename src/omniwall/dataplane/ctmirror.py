"""A per-namespace mirror of conntrack's original tuples, indexed by address and fed by events.

Revocation must find the connections of a few addresses right after an nft commit. Any kernel dump,
filtered or not, walks the whole shared conntrack hash (~40 ms at 25k entries through pyroute2, a few ms
per filtered dump at 100k); the mirror answers from memory in O(connections of those addresses).

How it stays true:
- It subscribes to NEW and DESTROY events *before* seeding from one dump, and replays the events queued
  meanwhile over the seed (events arrive in order, so a NEW then DESTROY pair nets out either way).
- A background thread drains the socket; every lookup drains what is still queued first, so a lookup
  made after a commit sees every connection confirmed before it.
- Lost events (ENOBUFS: the receive buffer overflowed) are unknowable: the mirror throws away what is
  queued and seeds again (`resyncs` counts it).
- With `nf_conntrack_events=2` (the default) an entry created while nobody listened sends no DESTROY:
  the first seed may hold entries that end unseen. Entries the table deletes itself are forgotten at
  once; the rest cost a futile delete (ENOENT, not an error) and are forgotten then; and the reader
  seeds once more `RESEED_AFTER` seconds after a non-empty first seed (short connections of before are
  gone by then). Nothing that exists is ever missing.
Only what revocation needs is kept: the original tuple and zone (what a delete names), not states,
timeouts or windows (migration export still dumps: it needs those).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable

from omniwall.dataplane.backend import ConnEntry
from omniwall.dataplane.ctevents import (
    CTA_TUPLE_ORIG,
    CTA_ZONE,
    NETLINK_ADD_MEMBERSHIP,
    NETLINK_NETFILTER,
    NFNLGRP_CONNTRACK_DESTROY,
    NFNLGRP_CONNTRACK_NEW,
    SOL_NETLINK,
    CtDestroy,
    CtNew,
    ct_events,
    flow_new,
    flow_new_v4,
    new_fields,
    parse_destroy,
    parse_destroy_v4,
    parse_new_v4,
    parse_tuple,
    top_attrs,
)
from omniwall.dataplane.netns import NetnsThread
from omniwall.dataplane.nflog import RECV_SIZE

log = logging.getLogger("omniwall.dataplane.ctmirror")

_CT_NEW, _CT_DELETE = (1 << 8) | 0, (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK messages (dump replies: NEW)
NLMSG_ERROR, NLMSG_DONE = 2, 3
RCVBUF = 16 << 20
READER_BATCH = 16  # datagrams the background reader applies per hold of the lock
LOOKUP_BATCH = 4096  # datagrams a lookup applies at most (what was queued before it)
READ_PAUSE = 0.05  # s: the reader's pause after each drain (a close ends it at once)
RESEED_AFTER = 300.0  # s: past TIME_WAIT (120 s) and UDP timeouts of the entries seen before us

# (family, proto, src, dst, sport, dport, icmp_id, icmp_type, icmp_code, zone): one entry's identity
Orig = tuple[int, int, str, str, int, int, int | None, int | None, int | None, int]

_BE16 = struct.Struct("!H").unpack_from
_MSG = struct.Struct("=IH").unpack_from


def parse_new(
    data: bytes, off: int, end: int, family: int, addrs: dict[bytes, str]
) -> tuple[Orig, CtNew | None] | None:
    """A NEW event's original tuple and zone, and its flow view (`ctevents.flow_new`: the marked
    connections) from the same walk (the usual shape by one regex match). `addrs` caches address text."""
    v4 = parse_new_v4(data, off, end, addrs)
    if v4 is not None:
        proto, s, d, sport, dport = v4[:5]
        return (family, proto, s, d, sport, dport, None, None, None, 0), flow_new_v4(*v4)
    f = new_fields(data, off, end)
    if f is None:
        return None
    tup = parse_tuple(data, f[0], f[1], addrs)
    if tup is None:
        return None
    proto, s, d, sport, dport, icmp_id, icmp_type, icmp_code = tup
    return (family, proto, s, d, sport, dport, icmp_id, icmp_type, icmp_code, f[2]), flow_new(tup, f[3], f[4])


def parse_orig(data: bytes, off: int, end: int, family: int, addrs: dict[bytes, str]) -> Orig | None:
    """The original tuple and zone of one ctnetlink message's attributes (`data[off:end]`), by the generic
    walk (`ctevents.top_attrs`: dumps, and events the fast paths do not read). `addrs` caches address text."""
    at = top_attrs(data, off, end)
    orig, z = at.get(CTA_TUPLE_ORIG), at.get(CTA_ZONE)
    if orig is None:
        return None
    zone = _BE16(data, z[0])[0] if z else 0
    tup = parse_tuple(data, *orig, addrs)
    if tup is None:
        return None
    proto, s, d, sport, dport, icmp_id, icmp_type, icmp_code = tup
    return (family, proto, s, d, sport, dport, icmp_id, icmp_type, icmp_code, zone)


def entry_of(o: Orig) -> ConnEntry:
    family, proto, src, dst, sport, dport, icmp_id, icmp_type, icmp_code, zone = o
    return ConnEntry(
        family=family,
        protocol=proto,
        src=src,
        dst=dst,
        sport=sport,
        dport=dport,
        icmp_type=icmp_type,
        icmp_code=icmp_code,
        icmp_id=icmp_id,
        zone=zone,
    )


def orig_of(e: ConnEntry) -> Orig:
    return (e.family, e.protocol, e.src, e.dst, e.sport, e.dport, e.icmp_id, e.icmp_type, e.icmp_code, e.zone)


def events_enabled() -> bool:
    """Does this thread's namespace report conntrack events (`nf_conntrack_events` 1, or 2: when
    someone listens)? 0: no events, a mirror would go stale."""
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_events") as f:
            return f.read().strip() != "0"
    except OSError:
        return True  # module not loaded yet: the default (events on) applies once it is


class ConntrackMirror:
    """The original tuples of one namespace's conntrack table, by address. Open it on the namespace's
    thread (`ConntrackMirror.open(thread)`); read it from any thread."""

    # the NEW events the subscriber wants: those from or to one of these addresses (None: all)
    _new_dst: frozenset[str] | None = None

    def __init__(self, sock: socket.socket, dumper: socket.socket) -> None:
        self._sock = sock
        self._dumper = dumper  # opened in the namespace too: a dump needs no hop to its thread
        self._lock = threading.Lock()
        self._addrs: dict[bytes, str] = {}
        # received into, copied out per datagram: recv(256 KB) allocates its result anew (an mmap and an
        # munmap, ~10 us a call here) for each event of a few hundred bytes
        self._buf = bytearray(RECV_SIZE)
        self._by_addr: dict[str, set[Orig]] = {}
        self.resyncs = 0  # seeds after the first (lost events)
        self.overflows = 0  # ENOBUFS seen (each: at least one event lost), during a seed's discard too
        self.events = 0
        # the flow collector's events (agent/flows.py: DESTROY, and NEW of marked connections) come from
        # this socket too, parsed once for both: a second subscription cost the kernel a copy and a
        # queueing per event, and its reader a wakeup and a second parse of every event
        self._sink: Callable[[list[CtNew | CtDestroy]], None] | None = None
        self._pending: list[CtNew | CtDestroy] = []  # this drain's events for the sink, in order
        self._stop = False
        with self._lock:
            self._seed()
        self._reseed_at = time.monotonic() + RESEED_AFTER if self._by_addr else None
        self._wake_r, self._wake_w = os.pipe()
        self._reader = threading.Thread(target=self._run, name="ct-mirror", daemon=True)
        self._reader.start()

    @staticmethod
    def open(thread: NetnsThread) -> ConntrackMirror | None:
        """A mirror of `thread`'s namespace; None when that namespace reports no events."""

        def subscribe() -> tuple[socket.socket, socket.socket] | None:
            if not events_enabled():
                return None
            dumper = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            sk = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            try:
                dumper.bind((0, 0))
                try:
                    sk.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE (root)
                except OSError:
                    sk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
                sk.bind((0, 0))
                for group in (NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY):
                    sk.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
            except BaseException:
                sk.close()
                dumper.close()
                raise
            return sk, dumper

        socks = thread.call(subscribe)
        if socks is None:
            return None
        try:
            return ConntrackMirror(*socks)
        except BaseException:
            for sk in socks:
                sk.close()
            raise

    # ------------------------------------------------------------------------------------- reads
    def involving(self, addresses: Iterable[str]) -> list[ConnEntry]:
        """Entries whose original source or destination is one of `addresses` (canonical text)."""
        with self._lock:
            self._drain()
            found: set[Orig] = set()
            for a in addresses:
                found.update(self._by_addr.get(a, ()))
        return [entry_of(o) for o in found]

    def subscribe_events(
        self, sink: Callable[[list[CtNew | CtDestroy]], None] | None, new_dst: frozenset[str] | None = None
    ) -> None:
        """Hand every DESTROY event received (`ctevents.CtDestroy`: tuple, both directions' counters,
        mark) and every NEW event of a marked connection (`ctevents.CtNew`: tuple, mark), in the order
        received, to `sink`, once per drain (a list), on the draining thread with the mirror's lock held
        (`sink` must not call the mirror). Events a resync throws away are handed too (they are real);
        the events an overflow lost are not knowable: `overflows` counts them (each at least one
        event). None: no subscriber. `new_dst`: hand only the NEW events whose destination or source is
        one of these addresses (the flow collector's local vNICs: a connection the host only forwards,
        or one of its own, would be built, handed and rejected); None: every marked one. Called again
        to change it (atomically)."""
        with self._lock:
            self._sink = sink
            self._new_dst = new_dst

    def forget(self, entries: Iterable[ConnEntry]) -> None:
        """Drop entries the kernel no longer has (a delete found them gone)."""
        with self._lock:
            for e in entries:
                self._remove(orig_of(e))

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._reader.join(timeout=2)
        self._sock.close()
        self._dumper.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ---------------------------------------------------------------------------------- internals
    def _run(self) -> None:
        while not self._stop:
            try:
                ready = select.select([self._sock, self._wake_r], [], [], 1.0)[0]
            except (OSError, ValueError):
                return
            if self._stop:
                return
            if self._reseed_at is not None and time.monotonic() >= self._reseed_at:
                self._reseed_at = None
                with self._lock:
                    try:
                        self._seed()
                    except OSError:
                        return
                    self._hand_events()
            if self._sock in ready:
                more = True
                while more and not self._stop:
                    with self._lock:  # a few datagrams a hold: a lookup never waits behind a burst
                        try:
                            more = self._drain(READER_BATCH)
                        except OSError:
                            return
                # let events gather before the next wakeup (they come one datagram each: waking per
                # event cost this thread ~6 us an event); lookups drain what is queued first, so
                # this delays nothing they see, and RCVBUF holds far more than a pause's worth
                with contextlib.suppress(OSError, ValueError):
                    select.select([self._wake_r], [], [], READ_PAUSE)

    def _add(self, o: Orig) -> None:
        by_addr = self._by_addr
        for a in (o[2], o[3]) if o[2] != o[3] else (o[2],):  # a tuple: no set built per event
            got = by_addr.get(a)
            if got is None:
                got = by_addr[a] = set()
            got.add(o)

    def _remove(self, o: Orig) -> None:
        by_addr = self._by_addr
        for a in (o[2], o[3]) if o[2] != o[3] else (o[2],):
            got = by_addr.get(a)
            if got is not None:
                got.discard(o)
                if not got:
                    del by_addr[a]

    def _drain(self, limit: int = LOOKUP_BATCH) -> bool:
        """Apply the queued events, at most `limit` datagrams (lock held); True: more may be queued.
        Lost events: seed again. Bounded so that churn faster than this thread can never hold the lock
        for good (a lookup needs the events queued before it, not those arriving while it drains)."""
        try:
            return self._drain_some(limit)
        finally:
            self._hand_events()

    def _hand_events(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        if self._sink is not None:
            try:
                self._sink(batch)
            except Exception:  # the subscriber's failure must not stop the mirror
                log.exception("conntrack mirror: the DESTROY subscriber failed on %d events", len(batch))

    def _drain_some(self, limit: int) -> bool:
        for _ in range(limit):
            try:
                n = self._sock.recv_into(self._buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self.overflows += 1
                self.resyncs += 1
                self._seed()
                continue
            self._apply(memoryview(self._buf)[:n].tobytes())
        return True

    def _apply(self, data: bytes) -> None:
        off = 0
        while off + 20 <= len(data):
            ln, typ = _MSG(data, off)
            if ln < 16:
                return
            if typ == _CT_DELETE:
                # the usual event by one regex (for the subscriber's counters and mark too); other
                # shapes (IPv6, ICMP, a zone) by the walks
                ev = parse_destroy_v4(data, off + 20, off + ln, self._addrs)
                if ev is not None:
                    proto, s, d, sport, dport = ev[:5]
                    o: Orig | None = (data[off + 16], proto, s, d, sport, dport, None, None, None, 0)
                else:
                    o = parse_orig(data, off + 20, off + ln, data[off + 16], self._addrs)
                    if self._sink is not None:
                        ev = parse_destroy(data, off + 20, off + ln, data[off + 16], self._addrs)
                if ev is not None and self._sink is not None:
                    self._pending.append(ev)
                if o is not None:
                    self.events += 1
                    self._remove(o)
            elif typ == _CT_NEW:
                # one parse for both (the usual shape by one regex: the status and mark come with the
                # tuple); the flow view is kept only for a subscriber that wants its destination
                got = parse_new(data, off + 20, off + ln, data[off + 16], self._addrs)
                o = None if got is None else got[0]
                if got is not None and got[1] is not None and self._sink is not None:
                    want = self._new_dst
                    if want is None or got[1][2] in want or got[1][1] in want:
                        self._pending.append(got[1])
                if o is not None:
                    self.events += 1
                    self._add(o)
            off += (ln + 3) & ~3
        if len(self._addrs) > 65_536:
            self._addrs.clear()

    def _seed(self) -> None:
        """Discard what is queued (older than the dump), then load one full dump; events queued after
        this point are replayed over it by the next drain."""
        for _ in range(LOOKUP_BATCH):  # bounded: an older event replayed later is harmless
            try:
                n = self._sock.recv_into(self._buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self.overflows += 1
                continue
            if self._sink is not None:  # the dump supersedes them here, not for the subscriber
                ct_events(memoryview(self._buf)[:n].tobytes(), self._addrs, self._pending)
        self._by_addr.clear()
        for o in _dump(self._dumper, self._addrs):
            self._add(o)


def _dump(sk: socket.socket, addrs: dict[bytes, str]) -> list[Orig]:
    """Every entry's original tuple, from one dump on `sk` (a plain ctnetlink socket)."""
    out: list[Orig] = []
    sk.send(struct.pack("=IHHII", 20, _CT_NEW | 1, 0x301, 1, 0) + struct.pack("!BBH", 0, 0, 0))
    while True:
        data = sk.recv(1 << 20)
        off = 0
        while off + 16 <= len(data):
            ln, typ = _MSG(data, off)
            if ln < 16 or typ == NLMSG_DONE:
                return out
            if typ == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", data, off + 16)
                if err:
                    raise OSError(-err, f"conntrack dump: {os.strerror(-err)}")
                return out
            if typ == _CT_NEW:
                o = parse_orig(data, off + 20, off + ln, data[off + 16], addrs)
                if o is not None:
                    out.append(o)
            off += (ln + 3) & ~3


__all__ = ["ConntrackMirror", "Orig", "entry_of", "events_enabled", "orig_of", "parse_new", "parse_orig"]
