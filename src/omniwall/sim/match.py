"""Compiled matching for one `HostDesiredState`: address sets, services and per-hop rule lists.

A `StateIndex` is built once per state by whoever judges many packets against it (a `sim.Network`, the
revocation `Judge`), never cached by this module. Address sets become Python sets of integers (host
addresses) plus, for CIDRs, one set of network numbers per prefix length, so membership costs one hash
lookup per distinct prefix length, never a scan over members. A new index may take the address sets of
the index it follows (`previous`): a set whose members did not change is not rebuilt (sets hold up to
100k+ members), and with `lazy=True` a vNIC's hops are compiled when first judged.

A set name that a rule references but the state lacks matches nothing (fail closed); the compiler never
emits one.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from omniwall.compiler.ir import CATEGORIES, HostDesiredState, IRRule, IRSet, IRVnic, ServiceMatch
from omniwall.sim.packet import Packet


class AddressSet:
    """Membership test for one IRSet: exact host addresses, prefix match for CIDRs; IPv4 and IPv6 apart."""

    __slots__ = ("exact", "hosts4", "hosts6", "nets4", "nets6")

    def __init__(self, addresses: tuple[str, ...] = (), cidrs: tuple[str, ...] = ()) -> None:
        self.hosts4: set[int] = set()
        self.hosts6: set[int] = set()
        nets4: dict[int, set[int]] = {}
        nets6: dict[int, set[int]] = {}
        texts = 0
        for text in (*addresses, *cidrs):
            host = _host_int(text)
            if host is not None:
                (self.hosts6 if ":" in text else self.hosts4).add(host)
                texts += 1
                continue
            net = ipaddress.ip_network(text, strict=False)
            bits = net.max_prefixlen
            if net.prefixlen == bits:
                (self.hosts6 if net.version == 6 else self.hosts4).add(int(net.network_address))
                texts += 1
                continue
            table = nets6 if net.version == 6 else nets4
            table.setdefault(net.prefixlen, set()).add(int(net.network_address) >> (bits - net.prefixlen))
        # every host text is an address of its own (no two spellings of one): `patched` may apply
        self.exact = texts == len(self.hosts4) + len(self.hosts6)
        # (shift, network numbers) per prefix length, shortest prefix first.
        self.nets4 = tuple((32 - plen, frozenset(n)) for plen, n in sorted(nets4.items()))
        self.nets6 = tuple((128 - plen, frozenset(n)) for plen, n in sorted(nets6.items()))

    @staticmethod
    def of(s: IRSet) -> AddressSet:
        return AddressSet(s.addresses, s.cidrs)

    def patched(self, old: IRSet, new: IRSet) -> AddressSet | None:
        """This set (built from `old`) changed to `new` by host addresses only, parsing only the changed
        ones (a member change of a 100k-member group). None: rebuild it (networks changed, or an
        address is spelled twice, so removing one spelling must not remove the address)."""
        if not self.exact or old.cidrs != new.cidrs:
            return None
        before, after = set(old.addresses), set(new.addresses)
        out = AddressSet.__new__(AddressSet)
        out.hosts4, out.hosts6 = set(self.hosts4), set(self.hosts6)
        out.nets4, out.nets6 = self.nets4, self.nets6
        for text, add in [*((t, False) for t in before - after), *((t, True) for t in after - before)]:
            host = _host_int(text)
            if host is None:
                return None
            hosts = out.hosts6 if ":" in text else out.hosts4
            if add:
                hosts.add(host)
            else:
                hosts.discard(host)
        hosts_of_cidrs = len(self.hosts4) + len(self.hosts6) - len(before)
        out.exact = len(out.hosts4) + len(out.hosts6) == len(after) + hosts_of_cidrs
        return out if out.exact else None

    def contains(self, v6: bool, ip: int) -> bool:
        if v6:
            if ip in self.hosts6:
                return True
            nets = self.nets6
        else:
            if ip in self.hosts4:
                return True
            nets = self.nets4
        return any(ip >> shift in numbers for shift, numbers in nets)


EMPTY_SET = AddressSet()


def _host_int(text: str) -> int | None:
    """A host address as an integer, parsed by the C library (~10x ipaddress); None: not a plain
    address (a network, or something ipaddress must judge)."""
    try:
        if ":" in text:
            return int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
        return int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except OSError:
        return None


def service_matches(svc: ServiceMatch, packet: Packet) -> bool:
    """Protocol, then destination port ranges (tcp/udp) or ICMP type/code (icmp/icmpv6)."""
    proto = svc.protocol
    if proto == "any":
        return True
    if proto != packet.protocol:
        return False
    if proto in ("tcp", "udp"):
        if not svc.ports:
            return True
        port = packet.dport
        return any(lo <= port <= hi for lo, hi in svc.ports)
    # icmp / icmpv6: None = every type (or code).
    if svc.icmp_type is not None and svc.icmp_type != packet.icmp_type:
        return False
    return svc.icmp_code is None or svc.icmp_code == packet.icmp_code


class ServiceIndex:
    """A rule's services, pre-sorted by protocol: one dict lookup, then ports or ICMP type/code.
    Same answers as `service_matches` over the list (a test holds them equal)."""

    __slots__ = ("by_proto", "every")

    def __init__(self, services: tuple[ServiceMatch, ...]) -> None:
        # every: no services, or an `any` service. by_proto[proto]: None = every packet of that protocol,
        # else a tuple of (lo, hi) port ranges (tcp/udp) or (type, code) pairs with None wildcards (icmp).
        self.every = not services or any(s.protocol == "any" for s in services)
        by_proto: dict[str, list[tuple[int | None, int | None]] | None] = {}
        for svc in services:
            if svc.protocol in ("tcp", "udp"):
                entries: list[tuple[int | None, int | None]] = list(svc.ports)
            else:
                entries = [(svc.icmp_type, svc.icmp_code)] if svc.icmp_type is not None else []
            if not entries:
                by_proto[svc.protocol] = None
            elif svc.protocol not in by_proto or by_proto[svc.protocol] is not None:
                by_proto.setdefault(svc.protocol, [])
                by_proto[svc.protocol].extend(entries)  # type: ignore[union-attr]
        self.by_proto = {k: None if v is None else tuple(v) for k, v in by_proto.items()}

    def matches(self, p: Packet) -> bool:
        if self.every:
            return True
        by = self.by_proto
        proto = p.protocol
        if proto not in by:
            return False
        entries = by[proto]
        if entries is None:
            return True
        if proto == "tcp" or proto == "udp":
            port = p.dport
            # Plain loops, not any(genexpr): this is the fuzzer's hot path.
            for lo, hi in entries:  # noqa: SIM110
                if lo <= port <= hi:  # type: ignore[operator]
                    return True
            return False
        t, c = p.icmp_type, p.icmp_code
        for et, ec in entries:  # noqa: SIM110
            if et == t and (ec is None or ec == c):
                return True
        return False


@dataclass(frozen=True, slots=True)
class CompiledRule:
    rule: IRRule
    src: AddressSet | None  # None = any address
    dst: AddressSet | None
    services: ServiceIndex

    def matches(self, p: Packet) -> bool:
        if not self.services.matches(p):
            return False
        if self.src is not None and not self.src.contains(p.v6, p.src_int):
            return False
        return self.dst is None or self.dst.contains(p.v6, p.dst_int)


class Ruled(Protocol):
    @property
    def rule(self) -> IRRule: ...


R = TypeVar("R", bound=Ruled)


def walk(segments: Iterable[Iterable[R]], matches: Callable[[R], bool]) -> tuple[list[R], R | None]:
    """THE first-match walk of a hop (docs/semantics.md §4): segments are the hop's category runs in
    order; the first matching rule decides, except `pass`, which goes on at the next segment. Returns
    the passes met and the deciding rule (None: the default action decides). The sim judges packets
    with it; the nft hop index precomputes its port tables with it."""
    passes: list[R] = []
    for seg in segments:
        for r in seg:
            if matches(r):
                if r.rule.action == "pass":
                    passes.append(r)
                    break
                return passes, r
    return passes, None


def category_segments(rules: Iterable[R]) -> list[list[R]]:
    """Maximal runs of rules of the same category, in order."""
    out: list[list[R]] = []
    for r in rules:
        if out and out[-1][-1].rule.category == r.rule.category:
            out[-1].append(r)
        else:
            out.append([r])
    return out


@dataclass(frozen=True, slots=True)
class HopIndex:
    """One (vNIC, direction): its rules in evaluation order, cut into category segments, and the
    stateless ones among them."""

    rules: tuple[CompiledRule, ...]
    segments: tuple[tuple[CompiledRule, ...], ...]
    stateless: tuple[CompiledRule, ...]

    def decide(self, p: Packet) -> tuple[list[CompiledRule], CompiledRule | None]:
        """`walk` for one packet."""
        return walk(self.segments, lambda cr: cr.matches(p))

    def tracked(self, p: Packet) -> bool:
        """False when a stateless rule installed here matches the packet, whatever its action or position."""
        return not any(cr.matches(p) for cr in self.stateless)


@dataclass(frozen=True, slots=True)
class VnicIndex:
    vnic: IRVnic
    hosts4: frozenset[int]  # its own addresses: the anti-spoofing check
    hosts6: frozenset[int]
    egress: HopIndex
    ingress: HopIndex

    def owns(self, p: Packet) -> bool:
        return p.src_int in (self.hosts6 if p.v6 else self.hosts4)


class StateIndex:
    """Everything `judge_hop` needs about one host's desired state, precomputed.

    Eager by default (a bad state raises here). `lazy=True` compiles a vNIC when first asked for, and
    `previous` lends the address sets of an earlier index whose members are the same."""

    def __init__(
        self, state: HostDesiredState, previous: StateIndex | None = None, *, lazy: bool = False
    ) -> None:
        self.state = state
        self._irsets = state.set_map()
        self._rules = state.rule_map()
        self._vnics_ir = state.vnic_map()
        self._sets: dict[str, AddressSet] = {}
        if previous is not None:
            for name, s in self._irsets.items():
                old = previous._irsets.get(name)
                got = previous._sets.get(name)
                if got is None or old is None:
                    continue
                if _same_members(old, s):
                    self._sets[name] = got
                else:
                    patched = got.patched(old, s)
                    if patched is not None:
                        self._sets[name] = patched
        self.vnics: dict[str, VnicIndex] = {}
        if not lazy:
            for v in state.vnics:
                self.vnic(v.ifname)

    def address_set(self, name: str) -> AddressSet:
        got = self._sets.get(name)
        if got is None:
            s = self._irsets.get(name)
            got = EMPTY_SET if s is None else AddressSet.of(s)
            self._sets[name] = got
        return got

    def vnic(self, ifname: str) -> VnicIndex:
        got = self.vnics.get(ifname)
        if got is not None:
            return got
        v = self._vnics_ir.get(ifname)
        if v is None:
            raise KeyError(f"host {self.state.host!r} has no vNIC {ifname!r}")
        own = [ipaddress.ip_address(a) for a in v.addresses]
        got = self.vnics[ifname] = VnicIndex(
            vnic=v,
            hosts4=frozenset(int(a) for a in own if a.version == 4),
            hosts6=frozenset(int(a) for a in own if a.version == 6),
            egress=_hop(v.egress, self._rules, self),
            ingress=_hop(v.ingress, self._rules, self),
        )
        return got


def _same_members(a: IRSet, b: IRSet) -> bool:
    if a is b:
        return True
    return (a.addresses is b.addresses or a.addresses == b.addresses) and (
        a.cidrs is b.cidrs or a.cidrs == b.cidrs
    )


def _hop(ids: tuple[int, ...], rules: dict[int, IRRule], sets: StateIndex) -> HopIndex:
    ordered = []
    for rid in ids:
        r = rules.get(rid)
        if r is None:
            raise ValueError(f"vNIC references rule id {rid}, which the state does not define")
        ordered.append(r)
    # Category positions must be non-decreasing: the compiler orders them, a violation is a compiler bug.
    rank = [CATEGORIES.index(r.category) for r in ordered]
    if rank != sorted(rank):
        raise ValueError(f"rules {list(ids)} are not ordered by category")
    compiled = [
        CompiledRule(
            rule=r,
            src=None if r.src_set is None else sets.address_set(r.src_set),
            dst=None if r.dst_set is None else sets.address_set(r.dst_set),
            services=ServiceIndex(r.services),
        )
        for r in ordered
    ]
    return HopIndex(
        rules=tuple(compiled),
        segments=tuple(tuple(seg) for seg in category_segments(compiled)),
        stateless=tuple(c for c in compiled if not c.rule.stateful),
    )


__all__ = [
    "AddressSet",
    "CompiledRule",
    "HopIndex",
    "ServiceIndex",
    "StateIndex",
    "VnicIndex",
    "category_segments",
    "service_matches",
    "walk",
]
