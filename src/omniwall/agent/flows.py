"""Flow records at the agent: kernel flow logs and conntrack ends → attributed `FlowRecord`s → manager.

Sources (docs/design/flows.md):
- NFLOG group `flow_group` (dataplane/nft/render.py `_flow`): every hop verdict of a new connection
  logs its first packet with prefix `owf:<rule id>:<verdict>:<hop>` — allowed, dropped, rejected,
  monitor "would deny", the tenant default action included (`IRVnic.default_id`). The hop is in the
  prefix, so both hops of one connection on one host each give their own record: the kernel's
  attribution at both hops, not the ct mark's (which keeps only the last hop).
- the host's guards log the same way (anti-spoofing, the vNIC's connection count and rate limits), with
  ids of their own (`flows.record.GUARDS`): their drops are records named after the guard.
- conntrack NEW events (dataplane/ctevents.py): the allowed record of a connection's last local hop (the
  ct mark names the rule or default that let it through): the ingress hop's where the destination is a
  local vNIC, else the egress hop's where the source is, on hosts whose table does not log allows
  (`render.allowed_from_conntrack`: flows on and no stateless rule on the host); a same-host
  connection's egress hop logs in `fwd` instead (group flow+1, the rule id in the packet mark:
  render.same_host_egress_rules). No NFLOG message per connection between hosts: the agent's Python per
  message was flows' cost.
- conntrack DESTROY events: joined by original tuple to the allowed logs, they complete the connection
  with packets, bytes and duration.

Records, per interval (0.5 s) and per (rule, verdict, hop, vNIC, protocol, src, dst, dport):
- connections allowed by a stateful rule that began: `final=False`, `count` = connections, no counters;
- those that ended (conntrack DESTROY): `final=True`, `count=0`, packets/bytes of both directions summed,
  `start` = first begin, `end` = last end (one connection: exactly its own); summing `count` gives
  connections, summing `packets`/`bytes` gives traffic, nothing twice;
- every other verdict (denied, rejected, would-deny, allowed by a stateless rule, ICMP): `count` =
  `packets` = packets; a flood is one record with a count.
`sport` is the connection's when one connection makes the record, else 0.

Bounds: the aggregation table (`max_keys`), the open-connection table (`max_open`) and the outgoing
buffer (`max_buffer`) are capped; what does not fit is counted in `dropped[place]`, and so are kernel
losses (NFLOG sequence gaps and overruns, conntrack event overruns). Enforcement never waits on any of
this: NFLOG copies packets to us and never holds them, and the readers run in their own threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import operator
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import httpx

from omniwall.compiler.ir import HostDesiredState
from omniwall.dataplane.ctevents import CtDestroy, CtEventReader, CtNew, enable_accounting
from omniwall.dataplane.ctmirror import ConntrackMirror
from omniwall.dataplane.netns import in_netns
from omniwall.dataplane.nflog import FlowLog, NflogReader
from omniwall.dataplane.nft.render import allowed_from_conntrack, ct_flow_group
from omniwall.flows.record import (
    DEFAULT_CATEGORY,
    DEFAULT_POLICY,
    GUARD_CATEGORY,
    GUARDS,
    FlowBatch,
    FlowRecord,
)

log = logging.getLogger("omniwall.agent.flows")

VERDICT = {"a": "allowed", "d": "denied", "r": "rejected", "w": "would-deny"}
HOP = {"e": "egress", "i": "ingress"}
PROTO = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
# places where records can be lost (FlowBatch.dropped keys)
KERNEL_NFLOG = "kernel-nflog"  # NFLOG messages the kernel numbered but could not deliver
KERNEL_NFLOG_OVERRUN = "kernel-nflog-overrun"  # receive-buffer overruns (the gaps above count them)
KERNEL_CT = "kernel-ctevents"  # conntrack event overruns (each: at least one lost completion)
# same-host egress allows the kernel could not name (the packet had a mark of its own: fwd logs
# `owf:marked:` instead of setting it; render.same_host_egress_rules)
KERNEL_UNNAMED = "kernel-unnamed"
AGENT_AGGREGATION = "agent-aggregation"  # denied packets with no room in the aggregation table
AGENT_OPEN = "agent-open"  # completions lost: the open-connection table was full
AGENT_BUFFER = "agent-buffer"  # records with no room in the outgoing buffer (manager away)
MANAGER_REFUSED = "manager-refused"  # records of a batch the manager refused (4xx)
# after each read, let the socket gather more: one wakeup per READ_PAUSE under load, not one per event
# (conntrack events come one message each); the kernel queues meanwhile (receive buffers of 8/4 MB)
READ_PAUSE = 0.05
# A denied/rejected/would-deny key new in this interval is shipped at once (the console's "a denied packet
# is on screen within a second"), not at the interval's end; at most one such early flush per EARLY_GAP,
# so a scan (a new key per packet) costs a few batches a second, not one per packet.
EARLY_GAP = 0.1
REFUSED_TTL = 60.0
_FIELDS = tuple(f.name for f in fields(FlowRecord))
_values = operator.attrgetter(*_FIELDS)  # s: how long a refused attempt's retries count as the same attempt


@dataclass(frozen=True, slots=True)
class Attribution:
    tenant: str
    policy: str
    rule: str
    category: str
    stateful: bool
    allows: bool = True  # the rule or default lets the packet through (not a monitored drop: would-deny)


class FlowAggregator:
    """PURE (no I/O, no clock of its own): flow logs + conntrack ends → records. Not thread-safe:
    `FlowCollector` serializes calls."""

    def __init__(self, host: str, *, max_keys: int = 65_536, max_open: int = 65_536) -> None:
        self.host = host
        self.max_keys = max_keys
        self.max_open = max_open
        self.revision = 0
        self.rules: dict[int, Attribution] = {}
        self._prev_rules: dict[int, Attribution] = {}
        self.vnics_by_name: dict[str, tuple[str, str]] = {}  # ifname -> (workload, tenant)
        self.vnics_by_addr: dict[str, str] = {}  # own address -> ifname
        # ingress allowed records come from NEW events (the table logs none: render.allowed_from_conntrack)
        self.ct_new = False
        # the interval's aggregates: (kind, rule id, verdict, hop, ifindex, proto, src, dst, dport) ->
        # [n, first, last, sport (0 when several), packets, bytes]; kind: o(pened), c(ompleted), p(ackets)
        self._agg: dict[tuple[Any, ...], list[Any]] = {}
        # open allowed connections: (proto, src, dst, sport, dport) -> [(hop, rule id, ifindex, start)]
        # (plain dicts, oldest first: insertion order; cheaper than OrderedDict on the per-connection path).
        # The hops are a tuple of tuples of atoms, not a list: the garbage collector stops tracking those,
        # where a list per open connection stayed tracked, and every full collection walked them all
        self._open: dict[tuple[Any, ...], tuple[tuple[str, int, int, float], ...]] = {}
        self._refused: dict[tuple[object, ...], float] = {}
        self.dropped: Counter[str] = Counter()
        self.fresh = 0  # keys of a non-allowed verdict first seen since the last flush (ship early)
        self.emitted = 0

    # ---- state
    def set_state(self, state: HostDesiredState) -> None:
        """The realized desired state: names for rule ids and vNICs. The previous state's names stay
        known one more revision, for logs of packets judged just before the change."""
        rules: dict[int, Attribution] = {
            r.id: Attribution(r.tenant, r.policy, r.rule, r.category, r.stateful, r.action == "allow")
            for r in state.rules
        }
        for v in state.vnics:
            rules[v.default_id] = Attribution(
                v.tenant, DEFAULT_POLICY, v.default_action, DEFAULT_CATEGORY, True,
                v.default_action == "allow",
            )  # fmt: skip
        for gid, (policy, rule) in GUARDS.items():  # tenant "": the vNIC's (`_record`)
            rules[gid] = Attribution("", policy, rule, GUARD_CATEGORY, False)
        self._prev_rules, self.rules = self.rules, rules
        self.revision = state.revision
        self.vnics_by_name = {v.ifname: (v.workload, v.tenant) for v in state.vnics}
        self.vnics_by_addr = {a: v.ifname for v in state.vnics for a in v.addresses}
        self.ct_new = allowed_from_conntrack(state, 0)

    def attribution(self, rule_id: int) -> Attribution | None:
        return self.rules.get(rule_id) or self._prev_rules.get(rule_id)

    # ---- input
    def on_logs(
        self, logs: Iterable[FlowLog], now: float, ifname_of: Callable[[int], str | None] | None = None
    ) -> None:
        """Flow logs, one per packet → the interval's aggregates (`flush` turns them into records)."""
        counts: dict[FlowLog, int] = {}
        for log_ in logs:
            counts[log_] = counts.get(log_, 0) + 1
        self.on_log_counts(counts, now)

    def on_log_counts(self, counts: dict[FlowLog, int], now: float) -> None:
        """Distinct flow logs and how many packets logged each (`NflogReader.read_flow_counts`) → the
        interval's aggregates. The per-connection path of the agent: lookups as locals, an existing
        aggregate updated in place; a repeated log (a flood, a retransmitted first packet) costs one
        step, not one per packet."""
        open_, refused, agg, add = self._open, self._refused, self._agg, self._add
        rules, prev, max_open = self.rules, self._prev_rules, self.max_open
        for (rule_id, v, h, proto, src, dst, sport, dport, indev, outdev), n in counts.items():
            ifx = indev if h == "e" else outdev
            if v == "a" and proto != 1 and proto != 58:
                attr = rules.get(rule_id) or prev.get(rule_id)
                if attr is None or attr.stateful:
                    tup = (proto, src, dst, sport, dport)
                    hops = open_.get(tup)
                    if hops is None:
                        if tup in refused:
                            continue  # a retry of an attempt the other hop refused
                        if len(open_) >= max_open:
                            del open_[next(iter(open_))]
                            self.dropped[AGENT_OPEN] += 1
                        open_[tup] = ((h, rule_id, ifx, now),)
                    elif any(x[0] == h for x in hops):
                        continue  # a retransmitted first packet (still `ct state new`): same connection
                    else:
                        open_[tup] = (*hops, (h, rule_id, ifx, now))
                    key = ("o", rule_id, v, h, ifx, proto, src, dst, dport)
                    slot = agg.get(key)
                    if slot is None:
                        add(key, now, now, sport, 0, 0)
                    else:  # `_add` of one more connection, inline (a burst between the same ends)
                        slot[0] += 1
                        if now < slot[1]:
                            slot[1] = now
                        if now > slot[2]:
                            slot[2] = now
                        if slot[3] != sport:
                            slot[3] = 0
                    continue
            elif (v == "d" or v == "r") and (proto, src, dst, sport, dport) in open_:
                # refused at the other hop: never confirmed, no completion will come; its retries are
                # the same attempt (remembered a while, bounded, so a flood is not one record a packet)
                tup = (proto, src, dst, sport, dport)
                del open_[tup]
                if len(refused) >= max_open:
                    del refused[next(iter(refused))]
                refused[tup] = now
            add(("p", rule_id, v, h, ifx, proto, src, dst, dport), now, now, 0, n, 0, n)

    def on_ct_events(self, events: Iterable[CtNew | CtDestroy], now: float) -> None:
        """Conntrack events in the kernel's order: NEW (6 fields) → allowed records (`ct_log`'s, `ct_new`
        only: else the table logs them), DESTROY (8) → completions. The NEW events go first (a
        connection's NEW always precedes its DESTROY; one drain of a short connection holds both).
        The per-connection path of a host whose allowed records come from conntrack: `ct_log` and
        `on_log_counts`' opening of an allowed connection inline, without a log tuple or a count per
        event (a NEW event is one confirmed connection: never a retransmission nor a refused retry)."""
        ends: list[CtDestroy] = []
        if not self.ct_new:
            ends = [ev for ev in events if len(ev) == 8]  # type: ignore[misc]
            if ends:
                self.on_destroy(ends, now)
            return
        open_, agg, add, addrs = self._open, self._agg, self._add, self.vnics_by_addr
        rules, prev, max_open = self.rules, self._prev_rules, self.max_open
        for ev in events:
            if len(ev) == 8:
                ends.append(ev)  # type: ignore[arg-type]
                continue
            proto, src, dst, sport, dport, mark = ev  # type: ignore[misc]
            if dst in addrs:
                h = "i"
            elif src in addrs:
                h = "e"
            else:
                continue  # neither end is a local vNIC (ct_log)
            attr = rules.get(mark) or prev.get(mark)
            if (attr is not None and not (attr.allows and attr.stateful)) or proto == 1 or proto == 58:
                if attr is None or attr.allows:  # ICMP (or a stale stateless mark): packets, like a log
                    add(("p", mark, "a", h, 0, proto, src, dst, dport), now, now, 0, 1, 0, 1)
                continue
            tup = (proto, src, dst, sport, dport)
            hops = open_.get(tup)
            if hops is None:
                if len(open_) >= max_open:
                    del open_[next(iter(open_))]
                    self.dropped[AGENT_OPEN] += 1
                open_[tup] = ((h, mark, 0, now),)
            elif hops[0][0] == h or len(hops) > 1:
                continue  # this hop is open already
            else:
                open_[tup] = (hops[0], (h, mark, 0, now))
            key = ("o", mark, "a", h, 0, proto, src, dst, dport)
            slot = agg.get(key)
            if slot is None:
                add(key, now, now, sport, 0, 0)
            else:  # `_add` of one more connection, inline (a burst between the same ends)
                slot[0] += 1
                if now < slot[1]:
                    slot[1] = now
                if now > slot[2]:
                    slot[2] = now
                if slot[3] != sport:
                    slot[3] = 0
        if ends:
            self.on_destroy(ends, now)

    def ct_log(self, ev: CtNew) -> FlowLog | None:
        """The allowed log a NEW event stands for (None: none, or its hop logged it), only where the
        table logs no allow (`ct_new`): the ingress hop's for a connection to a local vNIC (the mark is
        the last local hop's: the ingress one), else the egress hop's for one from a local vNIC (the
        only local hop: a same-host connection's egress hop comes from `fwd`'s log, `same_host_logs`); not
        for a monitored drop's mark (would-deny: logged, like denials). The fuzzer's attribution check
        reads NEW events through it too."""
        if not self.ct_new:
            return None
        proto, src, dst, sport, dport, mark = ev
        addrs = self.vnics_by_addr
        if dst in addrs:
            h = "i"
        elif src in addrs:
            h = "e"
        else:
            return None
        attr = self.rules.get(mark) or self._prev_rules.get(mark)
        if attr is not None and not attr.allows:
            return None
        return (mark, "a", h, proto, src, dst, sport, dport, 0, 0)  # ifindex 0: the vNIC by address

    def same_host_logs(self, counts: dict[FlowLog, int]) -> dict[FlowLog, int]:
        """`fwd`'s same-host egress logs (render.same_host_egress_rules; `NflogReader(mark_id=True)`:
        the rule id is the connection's mark, carried by the packet mark) that are records: not those
        whose mark is a monitored drop's (its would-deny logged), none where the host logs its allows
        (`ct_new` off: a stale table). The fuzzer's attribution check reads them through it too."""
        if not self.ct_new:
            return {}
        rules, prev = self.rules, self._prev_rules
        keep: dict[FlowLog, int] = {}
        for k, n in counts.items():
            attr = rules.get(k[0]) or prev.get(k[0])
            if attr is None or attr.allows:
                keep[k] = n
        return keep

    def on_destroy(self, events: Iterable[CtDestroy], now: float) -> None:
        """Conntrack ends → the completions of the allowed connections we saw begin (`_add`, inline:
        once per connection and hop)."""
        open_, agg, add = self._open, self._agg, self._add
        for proto, src, dst, sport, dport, packets, nbytes, _mark in events:
            hops = open_.pop((proto, src, dst, sport, dport), None)
            if hops is None:
                continue
            for h, rule_id, ifx, start in hops:
                key = ("c", rule_id, "a", h, ifx, proto, src, dst, dport)
                slot = agg.get(key)
                if slot is None:
                    add(key, start, now, sport, packets, nbytes)
                    continue
                slot[0] += 1
                if start < slot[1]:
                    slot[1] = start
                if now > slot[2]:
                    slot[2] = now
                if slot[3] != sport:
                    slot[3] = 0
                slot[4] += packets
                slot[5] += nbytes

    def _add(
        self, key: tuple[Any, ...], first: float, last: float, sport: int, packets: int, nbytes: int,
        n: int = 1,
    ) -> None:  # fmt: skip
        slot = self._agg.get(key)
        if slot is not None:
            slot[0] += n
            slot[1] = min(slot[1], first)
            slot[2] = max(slot[2], last)
            slot[3] = sport if slot[3] == sport else 0
            slot[4] += packets
            slot[5] += nbytes
        elif len(self._agg) < self.max_keys:
            self._agg[key] = [n, first, last, sport, packets, nbytes]
            if key[2] != "a":
                self.fresh += 1
        else:
            self.dropped[AGENT_AGGREGATION] += n

    def flush(self, ifname_of: Callable[[int], str | None], now: float = 0.0) -> list[FlowRecord]:
        """The records of the interval that ends now: per key, connections opened (`final=False`,
        count = connections), connections ended (`final=True`, count 0, their packets and bytes summed),
        and packets of every other verdict (count = packets)."""
        agg, self._agg = self._agg, {}
        self.fresh = 0
        while self._refused and next(iter(self._refused.values())) < now - REFUSED_TTL:
            del self._refused[next(iter(self._refused))]
        out = []
        for (kind, rule_id, v, h, ifx, proto, src, dst, dport), (
            n,
            first,
            last,
            sport,
            pk,
            nb,
        ) in agg.items():
            ifname = self._ifname(h, ifx, ifx, src, dst, ifname_of)
            if kind == "o":
                rec = self._record(rule_id, v, h, ifname, proto, src, dst, sport, dport, first, last,
                                   count=n, final=False)  # fmt: skip
            elif kind == "c":
                rec = self._record(rule_id, v, h, ifname, proto, src, dst, sport, dport, first, last,
                                   packets=pk, nbytes=nb, count=0)  # fmt: skip
            else:
                rec = self._record(
                    rule_id, v, h, ifname, proto, src, dst, 0, dport, first, last, packets=n, count=n
                )
            out.append(rec)
        self.emitted += len(out)
        return out

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def pending_keys(self) -> int:
        return len(self._agg)

    # ---- helpers
    def _ifname(
        self, h: str, indev: int, outdev: int, src: str, dst: str, ifname_of: Callable[[int], str | None]
    ) -> str:
        name = ifname_of(indev if h == "e" else outdev)
        if name is not None and name in self.vnics_by_name:
            return name
        # the vNIC's own address (egress: anti-spoofing makes the source one)
        return self.vnics_by_addr.get(src if h == "e" else dst, name or "")

    def _record(
        self, rule_id: int, v: str, h: str, ifname: str, proto: int, src: str, dst: str, sport: int,
        dport: int, start: float, end: float, *, packets: int = 0, nbytes: int = 0, count: int = 1,
        final: bool = True,
    ) -> FlowRecord:  # fmt: skip
        attr = self.attribution(rule_id)
        workload, vtenant = self.vnics_by_name.get(ifname, ("", ""))
        if attr is None:  # a rule of a state older than the previous one: name what we know
            attr = Attribution(vtenant, f"(rule {rule_id})", str(rule_id), "", True)
        # positional: keyword construction of this 22-field record cost twice as much (flood path)
        return FlowRecord(
            start, end, self.host, HOP[h], ifname, workload, VERDICT[v], rule_id,  # type: ignore[arg-type]
            attr.tenant or vtenant, attr.policy, attr.rule, attr.category, self.revision,
            PROTO.get(proto, str(proto)),
            src, dst, sport, dport, packets, nbytes, count, final,
        )  # fmt: skip


class RecordBuffer:
    """The outgoing records, bounded: what does not fit is counted (`dropped`), never kept."""

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._q: deque[FlowRecord] = deque()
        self.dropped = 0
        self._lock = threading.Lock()

    def push(self, records: list[FlowRecord]) -> int:
        """Append what fits; returns how many were dropped."""
        with self._lock:
            room = self.limit - len(self._q)
            if room >= len(records):
                self._q.extend(records)
                return 0
            self._q.extend(records[: max(0, room)])
            lost = len(records) - max(0, room)
            self.dropped += lost
            return lost

    def peek(self, n: int) -> list[FlowRecord]:
        with self._lock:
            return [self._q[i] for i in range(min(n, len(self._q)))]

    def pop(self, n: int) -> None:
        with self._lock:
            for _ in range(min(n, len(self._q))):
                self._q.popleft()

    def __len__(self) -> int:
        return len(self._q)


class FlowCollector:
    """Reads the kernel (two threads, inside the host's namespace), aggregates, buffers, and ships
    batches (`run()`, an asyncio task of the agent). `on_record(record)` (optional) sees every record
    (metrics)."""

    def __init__(
        self,
        host: str,
        *,
        netns: str | None = None,
        group: int,
        interval: float = 0.5,
        batch_max: int = 2_000,
        max_buffer: int = 100_000,
        max_keys: int = 65_536,
        max_open: int = 65_536,
        on_records: Callable[[list[FlowRecord]], None] | None = None,
        ct_feed: ConntrackMirror | None = None,
    ) -> None:
        self.host = host
        self.netns = netns
        self.group = group
        self.interval = interval
        self.batch_max = batch_max
        self.agg = FlowAggregator(host, max_keys=max_keys, max_open=max_open)
        self.buffer = RecordBuffer(max_buffer)
        self.on_records = on_records
        self.accounting = False
        self.batches = 0  # batches the manager accepted
        self.sent = 0  # records in them
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ifnames: dict[int, str | None] = {}
        self.nflog: NflogReader | None = None
        # fwd's same-host egress logs (render.same_host_egress_rules): their own group, the rule id is
        # the packet mark (set from the ct mark for the log); few (one per same-host connection)
        self.nflog_ct: NflogReader | None = None
        self.ct: CtEventReader | None = None
        # DESTROY events from the conntrack mirror's socket (revocation's, dataplane/ctmirror.py) when
        # there is one: no second subscription (the kernel copied and queued every event once more, and
        # a thread of ours woke for them); else our own reader (`ct`)
        self.ct_feed = ct_feed
        self._ct_overflows0 = 0
        self._pending = threading.Event()
        self._backoff_until = 0.0  # monotonic: the shipper backs off (manager away) until then
        self._sent_dropped: dict[str, int] = {}

    # ---- lifecycle
    def start(self) -> None:
        self.accounting = enable_accounting(self.netns)
        # up to 512 logs a datagram (128 KB skbs), flushed after 50 ms: one wakeup per batch of
        # connections; 64 bytes of packet are enough for the IPv4/IPv6 and transport headers we read
        self.nflog = NflogReader(
            self.group, self.netns, copy_range=64, rcvbuf=16 << 20, qthresh=512, batch_ms=50,
            nlbufsiz=128 << 10, seq=True,
        )  # fmt: skip
        self.nflog_ct = NflogReader(
            ct_flow_group(self.group), self.netns, copy_range=64, rcvbuf=4 << 20, qthresh=64, batch_ms=50,
            nlbufsiz=64 << 10, seq=True, mark_id=True,
        )  # fmt: skip
        loops: list[tuple[str, Callable[[], None]]] = [
            ("flows-nflog", self._nflog_loop), ("flows-nflog-ct", self._nflog_ct_loop),
        ]  # fmt: skip
        if self.ct_feed is not None:
            self._ct_overflows0 = self.ct_feed.overflows
            self.ct_feed.subscribe_events(self._on_ct_events, self._new_dst())
        else:
            self.ct = CtEventReader(self.netns, new=True)
            loops.append(("flows-ct", self._ct_loop))
        for name, fn in loops:
            t = threading.Thread(target=self._in_netns, args=(fn,), name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
        if self.ct_feed is not None:
            self.ct_feed.subscribe_events(None)
        for t in self._threads:
            t.join(timeout=2)
        for r in (self.nflog, self.nflog_ct, self.ct):
            if r is not None:
                with contextlib.suppress(OSError):
                    r.close()

    def set_state(self, state: HostDesiredState) -> None:
        with self._lock:
            self.agg.set_state(state)
            self._ifnames.clear()
        if self.ct_feed is not None and self._threads and not self._stop.is_set():  # the NEW filter follows
            self.ct_feed.subscribe_events(self._on_ct_events, self._new_dst())

    def _new_dst(self) -> frozenset[str]:
        """The addresses of the NEW events the mirror hands us (`FlowAggregator.ct_log`'s: from or to
        one of them): the local vNICs' where allowed records come from conntrack, else none."""
        return frozenset(self.agg.vnics_by_addr) if self.agg.ct_new else frozenset()

    @property
    def dropped(self) -> dict[str, int]:
        """Cumulative losses by place (FlowBatch.dropped)."""
        d = Counter(self.agg.dropped)
        for r in (self.nflog, self.nflog_ct):
            if r is not None:
                d[KERNEL_NFLOG] += r.lost
                d[KERNEL_NFLOG_OVERRUN] += r.overruns
                d[KERNEL_UNNAMED] += r.unnamed
        if self.ct is not None:
            d[KERNEL_CT] += self.ct.overruns
        if self.ct_feed is not None:
            d[KERNEL_CT] += self.ct_feed.overflows - self._ct_overflows0
        d[AGENT_BUFFER] += self.buffer.dropped
        return {k: v for k, v in sorted(d.items()) if v}

    # ---- reader threads
    def _in_netns(self, fn: Callable[[], None]) -> None:
        with in_netns(self.netns):  # if_indextoname resolves in the host's namespace
            while not self._stop.is_set():
                try:
                    fn()
                except Exception as e:  # the flow path must never take the agent down
                    log.warning(
                        "flow reader %s: %s: %s", threading.current_thread().name, type(e).__name__, e
                    )
                    time.sleep(0.5)

    def _resolve(self, ifindex: int) -> None:
        try:
            self._ifnames[ifindex] = socket.if_indextoname(ifindex) if ifindex else None
        except OSError:
            self._ifnames[ifindex] = None

    def _ifname_of(self, ifindex: int) -> str | None:
        """Cached only (any thread): unknown indexes fall back to the vNIC's address."""
        return self._ifnames.get(ifindex)

    def _nflog_loop(self) -> None:
        assert self.nflog is not None
        logs = self.nflog.read_flow_counts(0.2)
        if logs:
            names = self._ifnames
            for log_ in logs:  # resolve interface indexes here: this thread is in the host namespace
                if log_[8] not in names:
                    self._resolve(log_[8])
                if log_[9] not in names:
                    self._resolve(log_[9])
            with self._lock:
                self.agg.on_log_counts(logs, time.time())
                if self.agg.pending_keys >= self.batch_max or (
                    self.agg.fresh and time.monotonic() >= self._backoff_until  # manager away: wait
                ):
                    self._pending.set()
            self._stop.wait(READ_PAUSE)

    def _nflog_ct_loop(self) -> None:
        assert self.nflog_ct is not None
        logs = self.nflog_ct.read_flow_counts(0.2)
        if logs:
            names = self._ifnames
            for log_ in logs:
                if log_[8] not in names:
                    self._resolve(log_[8])
                if log_[9] not in names:
                    self._resolve(log_[9])
            with self._lock:
                self.agg.on_log_counts(self.agg.same_host_logs(logs), time.time())
            self._stop.wait(READ_PAUSE)

    def _ct_loop(self) -> None:
        assert self.ct is not None
        events = self.ct.read(0.2)
        if events:
            self._on_ct_events(events)
            self._stop.wait(READ_PAUSE)

    def _on_ct_events(self, events: list[CtNew | CtDestroy]) -> None:
        """NEW and DESTROY events: our reader's, or the conntrack mirror's (its thread, once per drain)."""
        with self._lock:
            self.agg.on_ct_events(events, time.time())

    def _emit(self, recs: list[FlowRecord]) -> None:
        if not recs:
            return
        self.buffer.push(recs)
        if self.on_records is not None:
            self.on_records(recs)
        if len(self.buffer) >= self.batch_max:
            self._pending.set()

    def flush(self) -> None:
        """Move the interval's aggregates to the buffer (the shipper calls it every interval)."""
        with self._lock:
            recs = self.agg.flush(self._ifname_of, time.time())
        self._emit(recs)

    # ---- shipping
    def batch(self) -> FlowBatch:
        return FlowBatch(self.host, tuple(self.buffer.peek(self.batch_max)), self.dropped)

    @staticmethod
    def body(batch: FlowBatch) -> bytes:
        """`batch.to_json()` as JSON bytes, without `dataclasses.asdict` (it deep-copies every field:
        most of the agent's CPU per connection when measured)."""
        recs = [dict(zip(_FIELDS, _values(r), strict=True)) for r in batch.records]
        return json.dumps({"host": batch.host, "records": recs, "dropped": batch.dropped}).encode()

    async def run(self, client: httpx.AsyncClient, manager_url: str | Callable[[], str], token: str) -> None:
        """Every `interval` (or as soon as `batch_max` records wait): flush and post. Manager away:
        keep the records (bounded), retry with backoff; a refused batch is counted and dropped.
        `manager_url` may be a callable: the agent's current manager (it changes on failover)."""
        manager = manager_url if callable(manager_url) else (lambda: manager_url)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        delay = self.interval
        loop = asyncio.get_running_loop()
        flushed = 0.0
        while True:
            await loop.run_in_executor(None, self._pending.wait, delay)
            early = EARLY_GAP - (time.monotonic() - flushed)
            if early > 0:  # woken by a new denied key right after a flush: bound the batch rate
                await asyncio.sleep(early)
            self._pending.clear()
            flushed = time.monotonic()
            self.flush()
            delay = self.interval
            while len(self.buffer) or self.dropped != self._sent_dropped:
                batch = self.batch()
                n = len(batch.records)
                try:
                    url = f"{manager().rstrip('/')}/v1/hosts/{self.host}/flows"
                    resp = await client.post(
                        url, content=self.body(batch), headers=headers, timeout=30.0
                    )  # acked once stored
                except httpx.HTTPError as e:
                    log.debug("flows: manager unreachable (%s); %d records wait", e, len(self.buffer))
                    delay = min(30.0, max(delay, self.interval) * 2)
                    break
                if resp.status_code < 300:
                    self.buffer.pop(n)
                    self._sent_dropped = batch.dropped
                    self.batches += 1
                    self.sent += n
                elif 400 <= resp.status_code < 500 and resp.status_code not in (401, 404, 408, 429):
                    log.warning(
                        "flows: manager refused a batch of %d (%d): %s", n, resp.status_code, resp.text[:200]
                    )
                    self.buffer.pop(n)
                    self.agg.dropped[MANAGER_REFUSED] += n
                    if not n:
                        break
                else:  # 5xx, auth not ready, route not there yet: keep and retry later
                    delay = min(30.0, max(delay, self.interval) * 2)
                    break
            self._backoff_until = time.monotonic() + (delay if delay > self.interval else 0.0)

    def wait_idle(self) -> None:
        """For tests: stop waiting for the interval."""
        self._pending.set()


__all__ = ["FlowAggregator", "FlowCollector", "RecordBuffer"]
