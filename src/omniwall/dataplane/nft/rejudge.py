"""PURE: re-judge an existing connection (its original-direction first packet) under a new IR.

Used for revocation (docs/semantics.md §6): after a policy change, conntrack entries whose connection
the new state would refuse at a hop on this host are deleted. This mirrors render.py's chain layout
(category segments, pass = next segment, first match wins, monitor = allow) so the kernel and this check
agree; the sim (`omniwall.sim.evaluate`) implements the same contract independently.
"""

from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass
from functools import lru_cache

from omniwall.compiler.ir import HostDesiredState, IRRule, IRSet, IRVnic, ServiceMatch
from omniwall.dataplane.backend import ConnEntry
from omniwall.dataplane.nft.render import segments

PROTO_NUM = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}


@dataclass(frozen=True, slots=True)
class Probe:
    src: str
    dst: str
    protocol: int
    dport: int = 0
    icmp_type: int | None = None
    icmp_code: int | None = None

    @staticmethod
    def of(e: ConnEntry) -> Probe:
        return Probe(e.src, e.dst, e.protocol, e.dport, e.icmp_type, e.icmp_code)


@lru_cache(maxsize=4096)
def _net(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(cidr, strict=False)


_MEMBERS: dict[int, tuple[tuple[str, ...], frozenset[str]]] = {}  # id(addresses) -> (them, canonical)
_MEMBERS_MAX = 64


def _members(addresses: tuple[str, ...]) -> frozenset[str]:
    """The canonical members of an address tuple, built once per tuple (sets hold up to 100k+ members;
    a per-lookup scan made one re-judged connection cost O(members))."""
    hit = _MEMBERS.get(id(addresses))
    if hit is not None and hit[0] is addresses:
        return hit[1]
    canon = frozenset(str(ipaddress.ip_address(a)) for a in addresses)
    if len(_MEMBERS) >= _MEMBERS_MAX:
        with contextlib.suppress(StopIteration, KeyError, RuntimeError):  # another thread got there
            _MEMBERS.pop(next(iter(_MEMBERS)))  # oldest first
    _MEMBERS[id(addresses)] = (addresses, canon)  # keeps the tuple alive, so its id stays its own
    return canon


def in_set(addr: str, s: IRSet) -> bool:
    ip = ipaddress.ip_address(addr)
    if str(ip) in _members(s.addresses):
        return True
    return any(ip.version == _net(c).version and ip in _net(c) for c in s.cidrs)


def service_matches(svc: ServiceMatch, p: Probe) -> bool:
    if svc.protocol == "any":
        return True
    if PROTO_NUM[svc.protocol] != p.protocol:
        return False
    if svc.protocol in ("tcp", "udp"):
        return not svc.ports or any(lo <= p.dport <= hi for lo, hi in svc.ports)
    if svc.icmp_type is not None and svc.icmp_type != p.icmp_type:
        return False
    return svc.icmp_code is None or svc.icmp_type is None or svc.icmp_code == p.icmp_code


def rule_matches(rule: IRRule, sets: dict[str, IRSet], p: Probe) -> bool:
    if rule.src_set is not None and not in_set(p.src, sets[rule.src_set]):
        return False
    if rule.dst_set is not None and not in_set(p.dst, sets[rule.dst_set]):
        return False
    return not rule.services or any(service_matches(s, p) for s in rule.services)


_MAPS: list[tuple[tuple[IRRule, ...], tuple[IRSet, ...], dict[int, IRRule], dict[str, IRSet]]] = []


def _maps(state: HostDesiredState) -> tuple[dict[int, IRRule], dict[str, IRSet]]:
    """state.rule_map() and set_map(), kept while the state's tuples are the same objects (revocation
    judges many connections under one state; rebuilding them per hop was O(rules) each)."""
    hit = _MAPS[0] if _MAPS else None  # read once: backends of several hosts may share this process
    if hit is None or hit[0] is not state.rules or hit[1] is not state.sets:
        hit = (state.rules, state.sets, state.rule_map(), state.set_map())
        _MAPS[:] = [hit]
    return hit[2], hit[3]


def judge_hop(state: HostDesiredState, vnic: IRVnic, direction: str, p: Probe) -> tuple[str, int]:
    """(verdict, rule id; 0 = default action). Verdicts: allow, drop, reject (monitor counts as allow)."""
    rmap, sets = _maps(state)
    if direction == "egress":
        if not any(ipaddress.ip_address(a) == ipaddress.ip_address(p.src) for a in vnic.addresses):
            return "drop", 0  # anti-spoofing
        ids = vnic.egress
    else:
        ids = vnic.ingress
    for seg in segments([rmap[i] for i in ids]):
        for r in seg:
            if not rule_matches(r, sets, p):
                continue
            if r.action == "pass":
                break  # next segment
            if r.action == "allow" or r.monitor:
                return "allow", r.id
            return r.action, r.id
    if vnic.default_action == "allow" or vnic.default_monitor:
        return "allow", 0
    return vnic.default_action, 0


def owner(state: HostDesiredState, addr: str) -> IRVnic | None:
    ip = ipaddress.ip_address(addr)
    for v in state.vnics:
        if any(ipaddress.ip_address(a) == ip for a in v.addresses):
            return v
    return None


def refused(state: HostDesiredState, p: Probe) -> bool:
    """True when a hop on this host (egress of the source vNIC, ingress of the destination's) refuses."""
    src, dst = owner(state, p.src), owner(state, p.dst)
    if src is not None and judge_hop(state, src, "egress", p)[0] != "allow":
        return True
    return dst is not None and judge_hop(state, dst, "ingress", p)[0] != "allow"


__all__ = ["Probe", "in_set", "judge_hop", "owner", "refused", "rule_matches", "service_matches"]
