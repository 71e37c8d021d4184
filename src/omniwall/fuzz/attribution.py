"""Attribution check: the flow logs the kernel wrote for a probe name the same rule as the sim.

For every probe, each hop of the sim's request path that judged the packet (not established, not invalid,
reached) names a rule id (its vNIC's default-action id, or `SPOOF_RULE_ID` for anti-spoofing) and a verdict;
the kernel's flow logs (NFLOG `owf:` prefixes, read per host namespace) for the same packet must name
exactly those, hop by hop: {(host, hop): (rule id, verdict)} equal. Where the host's table takes allowed
records from conntrack NEW events instead (`render.allowed_from_conntrack`), the kernel's word for that
hop is the NEW event's mark, read per host namespace too and turned into a log exactly as the agent does
(`FlowAggregator.ct_log`), and for the egress hop of a connection between two vNICs of one host, `fwd`'s
log with the entry's mark (group `render.ct_flow_group`, `FlowAggregator.on_ct_logs`). Probes are matched
by (protocol,
src, dst, dport); ICMP by (protocol, src, dst, type): an echo request (other ICMP messages between the
same two addresses, e.g. errors, are other packets).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable

from omniwall.agent.flows import FlowAggregator
from omniwall.compiler.ir import HostDesiredState
from omniwall.dataplane.ctevents import CtEventReader
from omniwall.dataplane.nflog import FlowLog, NflogReader
from omniwall.dataplane.nft.render import ct_flow_group
from omniwall.flows.record import SPOOF_RULE_ID
from omniwall.sim.evaluate import ConnectionVerdict, HopVerdict

PROTO_NUM = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}
HOP_CODE = {"egress": "e", "ingress": "i"}

Key = tuple[int, str, str, int]  # (protocol, src, dst, dport or ICMP type)
ECHO_REQUEST = {1: 8, 58: 128}  # the probes' ICMP packets (lab/probe.py: one echo request)
Attribution = dict[tuple[str, str], tuple[int, str]]  # (host, hop) -> (rule id, verdict code)


def _key(proto: int, src: str, dst: str, dport: int) -> Key:
    return (proto, src, dst, dport)


def hop_attribution(hop: HopVerdict, states: dict[str, HostDesiredState]) -> tuple[int, str] | None:
    """(rule id, verdict code) the kernel should log at this hop; None: the hop logs no flow."""
    if hop.reached and hop.antispoof:  # the guard logs its drop under its own id
        return SPOOF_RULE_ID, "d"
    if not hop.reached or hop.antispoof or hop.established or hop.invalid:
        return None
    if hop.rule is not None:
        rid = hop.rule.id
    elif hop.default:
        vnic = states[hop.host].vnic_map()[hop.ifname]
        rid = vnic.default_id
    else:
        return None
    code = "w" if hop.monitored else {"allow": "a", "drop": "d", "reject": "r"}[hop.verdict]
    return rid, code


def sim_attribution(cv: ConnectionVerdict, states: dict[str, HostDesiredState]) -> Attribution:
    out: Attribution = {}
    for h in cv.request.hops:
        a = hop_attribution(h, states)
        if a is not None:
            out[(h.host, HOP_CODE[h.direction])] = a
    return out


def sim_key(cv: ConnectionVerdict) -> Key:
    p = cv.request.packet
    proto = PROTO_NUM.get(str(p.protocol), 0)
    return _key(proto, p.src, p.dst, ECHO_REQUEST.get(proto, p.dport))


class KernelFlows:
    """One NFLOG reader and one conntrack event reader (NEW, DESTROY) per host namespace; `collect()`
    drains them into {key: attribution}."""

    def __init__(self, netns_by_host: dict[str, str], group: int) -> None:
        self.readers: dict[str, NflogReader] = {}
        self.ct_readers: dict[str, NflogReader] = {}  # fwd's same-host egress logs (NFULA_CT marks)
        self.ct: dict[str, CtEventReader] = {}
        try:
            for host, ns in netns_by_host.items():
                self.ct[host] = CtEventReader(ns, rcvbuf=32 << 20, new=True)
                # batched (one datagram per 32 logs) and a large buffer: a round's burst of probes must
                # not overrun it (single-log datagrams cost ~4 KB of buffer each); losses are counted
                self.readers[host] = NflogReader(
                    group, ns, copy_range=96, rcvbuf=32 << 20, qthresh=32, batch_ms=20, seq=True
                )
                self.ct_readers[host] = NflogReader(
                    ct_flow_group(group), ns, copy_range=96, rcvbuf=8 << 20, qthresh=32, batch_ms=20,
                    seq=True, mark_id=True,
                )  # fmt: skip
        except BaseException:
            self.close()
            raise

    def drain(self) -> None:
        for r in [*self.readers.values(), *self.ct_readers.values()]:
            while r.read_flows(0.0):
                pass
        for c in self.ct.values():
            while c.read(0.0):
                pass

    def collect(self, states: dict[str, HostDesiredState], timeout: float = 0.3) -> dict[Key, Attribution]:
        """`states`: each host's realized state (which NEW events stand for an ingress allowed log)."""
        out: dict[Key, Attribution] = defaultdict(dict)
        conflicts: set[Key] = set()
        for host, r in self.readers.items():
            logs: list[FlowLog] = r.read_flows(timeout)
            while batch := r.read_flows(0.05):
                logs += batch
            c, rc = self.ct.get(host), self.ct_readers.get(host)
            if c is not None and rc is not None and host in states:
                agg = FlowAggregator(host)
                agg.set_state(states[host])
                events = c.read(0.05)
                while batch2 := c.read(0.05):
                    events += batch2
                for ev in events:
                    if len(ev) == 6:
                        k = agg.ct_log(ev)  # type: ignore[arg-type]
                        if k is not None:
                            logs.append(k)
                same_host: dict[FlowLog, int] = {}
                while batch3 := rc.read_flow_counts(0.05):
                    for k3, n3 in batch3.items():
                        same_host[k3] = same_host.get(k3, 0) + n3
                logs += agg.same_host_logs(same_host)
            for rid, v, h, proto, src, dst, _sport, dport, _i, _o in logs:
                k = _key(proto, src, dst, dport)
                prev = out[k].get((host, h))
                if prev is not None and prev != (rid, v):
                    conflicts.add(k)
                out[k][(host, h)] = (rid, v)
        for k in conflicts:  # two answers for one hop: never agrees
            out[k][("?", "conflict")] = (-1, "?")
        return out

    @property
    def lost(self) -> int:
        nflog = sum(r.lost + r.overruns for r in [*self.readers.values(), *self.ct_readers.values()])
        return nflog + sum(c.overruns for c in self.ct.values())

    def close(self) -> None:
        for r in [*self.readers.values(), *self.ct_readers.values(), *self.ct.values()]:
            with contextlib.suppress(OSError):
                r.close()
        self.readers.clear()
        self.ct_readers.clear()
        self.ct.clear()


def agreement(pairs: Iterable[tuple[Attribution, Attribution]]) -> tuple[int, int]:
    """(agreeing, total) over (kernel, sim) attributions."""
    total = ok = 0
    for k, s in pairs:
        total += 1
        ok += k == s
    return ok, total


__all__ = ["KernelFlows", "agreement", "hop_attribution", "sim_attribution", "sim_key"]
