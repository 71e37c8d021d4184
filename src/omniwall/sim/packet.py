"""A packet as the sim sees it: addresses, protocol, ports, ICMP type/code; parsed once.

`Packet` is immutable. The parsed forms (address family, integer addresses) are computed at
construction, so the evaluator — called 100k+ times by the differential fuzzer — never re-parses.

Conventions (docs/semantics.md is the contract; these are the sim's reading of a packet):
- `protocol` is `tcp`, `udp`, `icmp`, `icmpv6` or an IP protocol number; the numbers 6, 17, 1 and 58
  are normalised to their names, so `Packet(..., protocol=6)` equals `protocol="tcp"`.
- A TCP packet judged as new is the SYN of a connection; its reply is the SYN-ACK.
- ICMP packets without a type are echo requests (type 8, or 128 for ICMPv6), code 0.
- `icmp` needs IPv4 addresses, `icmpv6` IPv6 addresses; source and destination share one family.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace

ProtocolLike = str | int

PROTO_NUMBERS: dict[int, str] = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
PROTO_NAMES: frozenset[str] = frozenset(PROTO_NUMBERS.values())
ICMP_ECHO_REQUEST = {"icmp": 8, "icmpv6": 128}
ICMP_ECHO_REPLY = {"icmp": 0, "icmpv6": 129}


def normalize_protocol(protocol: ProtocolLike) -> str | int:
    if isinstance(protocol, bool):
        raise ValueError(f"{protocol!r} is not a protocol")
    if isinstance(protocol, int):
        if not 0 <= protocol <= 255:
            raise ValueError(f"IP protocol number {protocol} is outside 0..255")
        return PROTO_NUMBERS.get(protocol, protocol)
    name = protocol.strip().lower()
    if name in PROTO_NAMES:
        return name
    if name.isdigit():
        return normalize_protocol(int(name))
    raise ValueError(f"{protocol!r} is not a protocol: use tcp, udp, icmp, icmpv6 or a number 0..255")


@dataclass(frozen=True, slots=True)
class Packet:
    src: str
    dst: str
    protocol: ProtocolLike
    sport: int = 0
    dport: int = 0
    icmp_type: int | None = None
    icmp_code: int | None = None
    # Parsed once (not part of equality: they follow from the fields above).
    v6: bool = field(init=False, repr=False, compare=False)
    src_int: int = field(init=False, repr=False, compare=False)
    dst_int: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            s = ipaddress.ip_address(self.src)
            d = ipaddress.ip_address(self.dst)
        except ValueError as e:
            raise ValueError(f"packet address: {e}") from None
        if s.version != d.version:
            raise ValueError(f"source {self.src} and destination {self.dst} are of different IP versions")
        proto = normalize_protocol(self.protocol)
        v6 = s.version == 6
        if proto == "icmp" and v6:
            raise ValueError("icmp needs IPv4 addresses (use icmpv6 for IPv6)")
        if proto == "icmpv6" and not v6:
            raise ValueError("icmpv6 needs IPv6 addresses (use icmp for IPv4)")
        for name in ("sport", "dport"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} {port} is outside 0..65535")
        icmp_type, icmp_code = self.icmp_type, self.icmp_code
        if proto in ICMP_ECHO_REQUEST:
            if icmp_type is None:
                icmp_type, icmp_code = ICMP_ECHO_REQUEST[proto], 0
            elif icmp_code is None:
                icmp_code = 0
            for name, value in (("icmp_type", icmp_type), ("icmp_code", icmp_code)):
                if not 0 <= value <= 255:
                    raise ValueError(f"{name} {value} is outside 0..255")
        elif icmp_type is not None or icmp_code is not None:
            raise ValueError(f"icmp_type/icmp_code given for a {proto} packet")
        # Canonical text forms, so equal packets compare equal ("::1" vs "0::1").
        object.__setattr__(self, "src", str(s))
        object.__setattr__(self, "dst", str(d))
        object.__setattr__(self, "protocol", proto)
        object.__setattr__(self, "icmp_type", icmp_type)
        object.__setattr__(self, "icmp_code", icmp_code)
        object.__setattr__(self, "v6", v6)
        object.__setattr__(self, "src_int", int(s))
        object.__setattr__(self, "dst_int", int(d))

    @property
    def has_ports(self) -> bool:
        return self.protocol in ("tcp", "udp")

    def reply(self) -> Packet:
        """The answer to this packet: addresses and ports swapped; an echo request becomes an echo reply."""
        icmp_type = self.icmp_type
        if self.protocol in ICMP_ECHO_REQUEST and icmp_type == ICMP_ECHO_REQUEST[str(self.protocol)]:
            icmp_type = ICMP_ECHO_REPLY[str(self.protocol)]
        return replace(
            self, src=self.dst, dst=self.src, sport=self.dport, dport=self.sport, icmp_type=icmp_type
        )

    def describe(self) -> str:
        if self.protocol in ("tcp", "udp"):
            return f"{self.protocol} {self.src}:{self.sport} -> {self.dst}:{self.dport}"
        if self.protocol in ICMP_ECHO_REQUEST:
            return f"{self.protocol} {self.src} -> {self.dst} type {self.icmp_type} code {self.icmp_code}"
        return f"proto {self.protocol} {self.src} -> {self.dst}"


__all__ = ["ICMP_ECHO_REPLY", "ICMP_ECHO_REQUEST", "Packet", "ProtocolLike", "normalize_protocol"]
