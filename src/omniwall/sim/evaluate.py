"""The sim evaluator: judge packets against per-host desired state exactly as the kernel would.

Pure and deterministic. It mirrors docs/semantics.md §4-6 and the nftables mapping of DESIGN §6 (raw
prerouting `notrack` for packets matching stateless rules; forward chain: anti-spoofing,
`ct state established,related accept`, `ct state invalid drop`, then the vNIC chains); the differential
test holds it to the kernel, verdict for verdict.

One hop — `judge_hop(state, ifname, direction, packet, established=False)`:
1. Anti-spoofing (egress only): a source that is not one of the vNIC's addresses is dropped
   (`antispoof=True`), before anything else.
2. Tracking: the packet is *untracked* at the hop (`tracked=False`) when a stateless rule installed
   there matches its sources, destinations and services, whatever that rule's action or position;
   ICMPv6 neighbour discovery/MLD is never tracked by the kernel either (`sim.conntrack`).
3. Conntrack: a tracked packet of an established connection (`established=True`) passes unjudged
   (`established` on the verdict). A tracked new packet that cannot start a connection (a TCP SYN-ACK,
   an ICMP echo reply, ... see `sim.conntrack`) is `ct state invalid`: dropped (`invalid=True`).
4. Rules in order; first match wins. `allow` allows, `drop`/`reject` deny, `pass` jumps to the first rule
   of the next category. No match: the vNIC tenant's default action (`default=True`, `rule=None`).
5. Monitor: a drop/reject by a rule with `monitor` (or the default with `default_monitor`) allows instead
   (`monitored=True`, `would` keeps the action it would have taken).
A single hop sees only itself; on a host whose other hop untracks the packet, `judge_path` decides.

A path — `judge_path(states, packet, sender=None)`, for a packet starting a connection:
- The source vNIC is the vNIC (any host) whose addresses contain `packet.src` (or `sender=(host,
  ifname)`, to model a workload sending from a foreign address); the destination vNIC owns
  `packet.dst`. Hops: source egress, then destination ingress; an address outside the inventory has no
  hop. Same vNIC both ends, or no vNIC at all: no hops (not ours; allowed).
- Tracking is per host: the packet is untracked on a host when it is untracked at any of its hops on
  that host (raw prerouting runs once per host, before either chain). Untracked: every hop on the host
  judges it. Tracked: conntrack decides new (judge) or invalid (drop) once for the host.
- Every hop is evaluated (for explain), but only those up to the first denial are `reached`.
  `.allowed` = every hop allows; `.verdict` = the first non-allow hop's verdict, else `allow`.

A connection — `judge_connection(states, packet)`: does a request/response exchange succeed (TCP
connect: SYN then SYN-ACK; UDP request then reply; ICMP echo request then echo reply)?
- The request is `judge_path(packet)`. If it is denied, the connection fails; no reply is judged.
- Delivered and tracked on host H => H holds a conntrack entry for it.
- The reply (addresses and ports swapped, echo request -> echo reply) is then judged host by host:
  * untracked on H (a stateless rule at one of the reply's hops on H matches it: raw `notrack` runs
    before the conntrack lookup, so an existing entry is never consulted): judged at every hop on H;
  * else, H holds the request's entry: established, passes both hops unjudged;
  * else (the request was untracked on H, the reply is tracked): the reply is a *new* packet for H.
    A TCP SYN-ACK or an ICMP echo reply cannot start a connection: `ct state invalid`, dropped. A UDP
    (or other-protocol) reply is judged by the rules and, if delivered, creates an entry.
  So on a host with stateless rules, a ping reply gets through when it is untracked there too (a
  stateless rule matches the reply) and allowed, or when the request was tracked there; a TCP
  handshake only when SYN and SYN-ACK are both untracked (and allowed) or both tracked (next point).
- TCP: once the SYN-ACK got through, the handshake's ACK (`.ack`, the request's tuple again, so tracked
  exactly where the SYN was) is judged too: untracked hosts judge it; a host that tracked both the SYN
  and the SYN-ACK passes it as established; a host that tracked the SYN but not the SYN-ACK holds a
  SYN_SENT entry, in which an ACK is `ct state invalid`: dropped.
- ICMP requests other than echo (errors, timestamps, ...) expect no reply: `.reply` is None.
- `.allowed` = every judged packet (request, reply, ack) allowed; `.verdict` = the first refusal's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from omniwall.compiler.ir import HostDesiredState, IRRule
from omniwall.sim.conntrack import kernel_untracked, starts_connection
from omniwall.sim.match import HopIndex, StateIndex, VnicIndex
from omniwall.sim.packet import ICMP_ECHO_REQUEST, Packet

Direction = Literal["egress", "ingress"]
Verdict = Literal["allow", "drop", "reject"]
# How conntrack hands a packet to a host's chains: judged as new, passed as established, dropped invalid,
# or judged because untracked.
CtMode = Literal["new", "established", "invalid", "untracked"]


@dataclass(frozen=True, slots=True)
class HopVerdict:
    host: str
    ifname: str
    workload: str  # "tenant/name"
    direction: Direction
    verdict: Verdict
    rule: IRRule | None  # the deciding rule; None: default action, established, invalid or anti-spoofing
    default: bool = False  # the vNIC tenant's default action decided
    monitored: bool = False  # a drop/reject allowed by monitor mode ("would drop")
    tracked: bool = True  # False: a stateless rule here matches the packet (or the kernel never tracks it)
    antispoof: bool = False  # dropped by anti-spoofing
    established: bool = False  # passed as part of a tracked connection, not judged
    invalid: bool = False  # dropped by conntrack as invalid before any rule
    reached: bool = True  # False: an earlier hop of the path already stopped the packet
    tenant: str = ""  # the vNIC's tenant (whose default applies)
    would: str | None = None  # under monitor: the action that would have been taken

    @property
    def allowed(self) -> bool:
        return self.verdict == "allow"

    @property
    def reason(self) -> str:
        """Why: `rule`, `default`, `antispoof`, `established` or `invalid`."""
        if self.antispoof:
            return "antispoof"
        if self.invalid:
            return "invalid"
        if self.established:
            return "established"
        return "default" if self.default else "rule"


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    ifname: str
    workload: str
    tenant: str


@dataclass(frozen=True, slots=True)
class PathVerdict:
    packet: Packet
    hops: tuple[HopVerdict, ...]
    src: Endpoint | None  # the sending vNIC (None: outside the inventory)
    dst: Endpoint | None  # the receiving vNIC (None: outside the inventory)
    untracked_hosts: frozenset[str] = frozenset()  # hosts on which the packet is not tracked

    @property
    def allowed(self) -> bool:
        return all(h.verdict == "allow" for h in self.hops)

    @property
    def denied_at(self) -> HopVerdict | None:
        return next((h for h in self.hops if h.verdict != "allow"), None)

    @property
    def verdict(self) -> Verdict:
        hop = self.denied_at
        return "allow" if hop is None else hop.verdict

    @property
    def ours(self) -> bool:
        """False when no vNIC sees the packet (both ends outside the inventory)."""
        return bool(self.hops)


@dataclass(frozen=True, slots=True)
class ConnectionVerdict:
    request: PathVerdict
    reply: PathVerdict | None  # None: the request was denied, or no reply is expected
    ack: PathVerdict | None = None  # TCP: the handshake's ACK, judged once the SYN-ACK got through

    @property
    def expects_reply(self) -> bool:
        return _expects_reply(self.request.packet)

    @property
    def paths(self) -> tuple[PathVerdict, ...]:
        return tuple(p for p in (self.request, self.reply, self.ack) if p is not None)

    @property
    def allowed(self) -> bool:
        return all(p.allowed for p in self.paths)

    @property
    def verdict(self) -> Verdict:
        return next((p.verdict for p in self.paths if not p.allowed), "allow")

    @property
    def hops(self) -> tuple[HopVerdict, ...]:
        return tuple(h for p in self.paths for h in p.hops)


# ------------------------------------------------------------------------------------------------ one hop


def _judge(
    host: str, v: VnicIndex, direction: Direction, p: Packet, tracked: bool, mode: CtMode
) -> HopVerdict:
    vn = v.vnic
    base = {
        "host": host,
        "ifname": vn.ifname,
        "workload": vn.workload,
        "direction": direction,
        "tracked": tracked,
        "tenant": vn.tenant,
    }
    if direction == "egress" and not v.owns(p):
        return HopVerdict(verdict="drop", rule=None, antispoof=True, **base)
    if mode == "established":
        return HopVerdict(verdict="allow", rule=None, established=True, **base)
    if mode == "invalid":
        return HopVerdict(verdict="drop", rule=None, invalid=True, **base)
    hop: HopIndex = v.egress if direction == "egress" else v.ingress
    _passes, cr = hop.decide(p)
    if cr is not None:
        r = cr.rule
        action = r.action
        if action == "allow":
            return HopVerdict(verdict="allow", rule=r, **base)
        if r.monitor:
            return HopVerdict(verdict="allow", rule=r, monitored=True, would=action, **base)
        return HopVerdict(verdict=action, rule=r, **base)
    action = vn.default_action
    if action != "allow" and vn.default_monitor:
        return HopVerdict(verdict="allow", rule=None, default=True, monitored=True, would=action, **base)
    return HopVerdict(verdict=action, rule=None, default=True, **base)


def _hop_tracked(v: VnicIndex, direction: Direction, p: Packet) -> bool:
    if kernel_untracked(p):
        return False
    return (v.egress if direction == "egress" else v.ingress).tracked(p)


def judge_start(index: StateIndex, ifname: str, direction: Direction, packet: Packet) -> HopVerdict:
    """The rules' verdict on `packet` as the first packet of a connection at one hop: anti-spoofing,
    the rules, the default; no conntrack state (revocation asks this of a tracked connection's
    original-direction packet under a new state)."""
    return _judge(index.state.host, index.vnic(ifname), direction, packet, True, "new")


def judge_hop(
    state: HostDesiredState | StateIndex,
    ifname: str,
    direction: Direction,
    packet: Packet,
    established: bool = False,
) -> HopVerdict:
    """Judge `packet` at one hop. `established=True`: the packet belongs to a connection conntrack tracks
    on this host (it still is judged when untracked at this hop, and anti-spoofing still applies).
    A tracked packet that is not established must be able to start a connection (else: invalid).
    Raises KeyError for an unknown vNIC, ValueError for a bad direction."""
    if direction not in ("egress", "ingress"):
        raise ValueError(f"direction must be 'egress' or 'ingress', not {direction!r}")
    index = state if isinstance(state, StateIndex) else StateIndex(state)
    v = index.vnic(ifname)
    tracked = _hop_tracked(v, direction, packet)
    if not tracked:
        mode: CtMode = "untracked"
    elif established:
        mode = "established"
    else:
        mode = "new" if starts_connection(packet) else "invalid"
    return _judge(index.state.host, v, direction, packet, tracked, mode)


# ----------------------------------------------------------------------------------------------- network


class Network:
    """A compiled view of every host's desired state: which vNIC owns which address, and each host's
    `StateIndex`. Build it once and reuse it for many packets (the module functions build one a call)."""

    def __init__(self, states: Mapping[str, HostDesiredState]) -> None:
        self.states = dict(states)
        self.index: dict[str, StateIndex] = {h: StateIndex(s) for h, s in self.states.items()}
        owners: dict[tuple[bool, int], tuple[str, str]] = {}
        # Sorted, so an address claimed by two vNICs resolves the same way every time.
        for host in sorted(self.index):
            for ifname in sorted(self.index[host].vnics):
                v = self.index[host].vnics[ifname]
                for ip in sorted(v.hosts4):
                    owners.setdefault((False, ip), (host, ifname))
                for ip in sorted(v.hosts6):
                    owners.setdefault((True, ip), (host, ifname))
        self.owners = owners
        self._endpoints: dict[tuple[str, str], Endpoint] = {}

    def locate(self, v6: bool, ip: int) -> tuple[str, str] | None:
        return self.owners.get((v6, ip))

    def endpoint(self, where: tuple[str, str]) -> Endpoint:
        ep = self._endpoints.get(where)
        if ep is None:
            host, ifname = where
            if host not in self.index:
                raise KeyError(f"no desired state for host {host!r}")
            vn = self.index[host].vnic(ifname).vnic
            ep = self._endpoints[where] = Endpoint(
                host=host, ifname=ifname, workload=vn.workload, tenant=vn.tenant
            )
        return ep

    def _hops(
        self, p: Packet, sender: tuple[str, str] | None
    ) -> tuple[list[tuple[str, VnicIndex, Direction]], Endpoint | None, Endpoint | None]:
        src = sender if sender is not None else self.locate(p.v6, p.src_int)
        dst = self.locate(p.v6, p.dst_int)
        if src is not None and src == dst:
            return [], self.endpoint(src), self.endpoint(dst)  # never leaves the workload
        hops: list[tuple[str, VnicIndex, Direction]] = []
        src_ep = None if src is None else self.endpoint(src)  # validates a `sender`
        if src is not None:
            hops.append((src[0], self.index[src[0]].vnic(src[1]), "egress"))
        if dst is not None:
            hops.append((dst[0], self.index[dst[0]].vnic(dst[1]), "ingress"))
        return hops, src_ep, None if dst is None else self.endpoint(dst)

    def _walk(
        self,
        p: Packet,
        sender: tuple[str, str] | None,
        reply: bool,
        entries: frozenset[str] = frozenset(),
        no_entry: CtMode | None = None,
    ) -> PathVerdict:
        """Judge `p` along its path. Per host, conntrack's verdict comes from tracking (untracked hosts
        judge), then `entries` (hosts holding an entry: established), else `no_entry` if given, else
        new or invalid as the packet allows."""
        hops, src, dst = self._hops(p, sender)
        tracked = [_hop_tracked(v, d, p) for _, v, d in hops]
        untracked_hosts = frozenset(h for (h, _, _), t in zip(hops, tracked, strict=True) if not t)
        out: list[HopVerdict] = []
        reached = True
        for (host, v, direction), hop_tracked in zip(hops, tracked, strict=True):
            if host in untracked_hosts:
                mode: CtMode = "untracked"
            elif host in entries:
                mode = "established"
            elif no_entry is not None:
                mode = no_entry
            else:
                mode = "new" if starts_connection(p, reply=reply) else "invalid"
            hv = _judge(host, v, direction, p, hop_tracked, mode)
            if not reached:
                hv = replace(hv, reached=False)
            elif hv.verdict != "allow":
                reached = False
            out.append(hv)
        return PathVerdict(packet=p, hops=tuple(out), src=src, dst=dst, untracked_hosts=untracked_hosts)

    def judge_path(self, packet: Packet, sender: tuple[str, str] | None = None) -> PathVerdict:
        return self._walk(packet, sender, reply=False)

    def judge_connection(self, packet: Packet) -> ConnectionVerdict:
        request = self.judge_path(packet)
        if not request.allowed or not _expects_reply(packet):
            return ConnectionVerdict(request=request, reply=None)
        request_hosts = frozenset(h.host for h in request.hops)
        entries = request_hosts - request.untracked_hosts
        reply = self._walk(packet.reply(), None, reply=True, entries=entries)
        if packet.protocol != "tcp" or not reply.allowed:
            return ConnectionVerdict(request=request, reply=reply)
        # The handshake's ACK: same tuple as the SYN, so tracked exactly where the SYN was. A host whose
        # conntrack saw the SYN but not the SYN-ACK (untracked there) holds a SYN_SENT entry, and an ACK
        # in that state is invalid.
        saw_both = entries - reply.untracked_hosts
        ack = self._walk(packet, None, reply=False, entries=saw_both, no_entry="invalid")
        return ConnectionVerdict(request=request, reply=reply, ack=ack)


def _expects_reply(p: Packet) -> bool:
    if p.protocol in ICMP_ECHO_REQUEST:
        return p.icmp_type == ICMP_ECHO_REQUEST[str(p.protocol)]
    return True


def network_of(states: Mapping[str, HostDesiredState] | Network) -> Network:
    """`states` as a `Network` (built here: hold on to it to judge many packets)."""
    return states if isinstance(states, Network) else Network(states)


def judge_path(
    states: Mapping[str, HostDesiredState] | Network,
    packet: Packet,
    sender: tuple[str, str] | None = None,
) -> PathVerdict:
    """Judge a packet that starts a connection along its whole path (see the module docstring)."""
    return network_of(states).judge_path(packet, sender)


def judge_connection(states: Mapping[str, HostDesiredState] | Network, packet: Packet) -> ConnectionVerdict:
    """Does the request/response exchange `packet` starts succeed? (see the module docstring)."""
    return network_of(states).judge_connection(packet)


def iter_vnics(states: Iterable[HostDesiredState]) -> Iterable[tuple[str, str]]:
    """(host, ifname) of every vNIC, sorted: handy for fuzzers and explain."""
    for s in sorted(states, key=lambda s: s.host):
        for v in s.vnics:
            yield s.host, v.ifname


__all__ = [
    "ConnectionVerdict",
    "Endpoint",
    "HopVerdict",
    "Network",
    "Packet",
    "PathVerdict",
    "iter_vnics",
    "judge_connection",
    "judge_hop",
    "judge_path",
    "judge_start",
    "network_of",
]
