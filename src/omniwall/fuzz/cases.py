"""What the differential test probes: a `Case` is one connection between two lab workloads, and
`all_cases` is every ordered pair of workloads x every fuzz port (each has a responder) x icmp, per IP
version, between first addresses, plus a few targets from and to every further address.

`sim_packet` is the same connection as the sim sees it: source port `EPHEMERAL_SPORT` (see
`generate`: no generated port range splits the kernel's ephemeral range, so any source port judges
alike); ICMP is an echo request.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from omniwall.fuzz.generate import EPHEMERAL_SPORT, TCP_PORTS, UDP_PORTS
from omniwall.lab.plan import LabPlan, WorkloadPlan
from omniwall.sim.packet import Packet


@dataclass(frozen=True, slots=True)
class Case:
    """One probe: a connection from workload `src` to workload `dst` ("tenant/name"), between their
    `src_index`-th and `dst_index`-th addresses of IP version `family` (vNIC order, then address order)."""

    src: str
    dst: str
    proto: str  # tcp | udp | icmp (icmpv6 over IPv6)
    port: int | None = None
    family: int = 4
    src_index: int = 0
    dst_index: int = 0

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "src": self.src,
            "dst": self.dst,
            "proto": self.proto,
            "port": self.port,
            "family": self.family,
        }
        if self.src_index or self.dst_index:
            d |= {"src_index": self.src_index, "dst_index": self.dst_index}
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> Case:
        return Case(
            d["src"],
            d["dst"],
            d["proto"],
            d.get("port"),
            d.get("family", 4),
            d.get("src_index", 0),
            d.get("dst_index", 0),
        )

    def __str__(self) -> str:
        svc = self.proto if self.port is None else f"{self.proto}/{self.port}"
        at = f" addresses #{self.src_index}->#{self.dst_index}" if self.src_index or self.dst_index else ""
        return f"{self.src} -> {self.dst} {svc} (IPv{self.family}{at})"


def addresses(w: WorkloadPlan, family: int) -> list[str]:
    return [ip for ip in w.ips if ipaddress.ip_address(ip).version == family]


TARGETS: tuple[tuple[str, int | None], ...] = (
    *(("tcp", p) for p in TCP_PORTS),
    *(("udp", p) for p in UDP_PORTS),
    ("icmp", None),
)
EXTRA_TARGETS: tuple[tuple[str, int | None], ...] = (
    ("tcp", TCP_PORTS[0]),
    ("udp", UDP_PORTS[0]),
    ("icmp", None),
)


def all_cases(plan: LabPlan, *, ipv6: bool) -> list[Case]:
    """Every ordered pair of workloads x every fuzz port (each has a responder) x icmp, per family,
    between their first addresses; plus a few targets from and to every further address."""
    families = (4, 6) if ipv6 else (4,)
    out = []
    for s in plan.workloads:
        for d in plan.workloads:
            if s is d:
                continue
            for fam in families:
                n_src, n_dst = len(addresses(s, fam)), len(addresses(d, fam))
                if not n_src or not n_dst:
                    continue
                out.extend(Case(s.key, d.key, proto, port, fam) for proto, port in TARGETS)
                for si, di in [*((i, 0) for i in range(1, n_src)), *((0, j) for j in range(1, n_dst))]:
                    out.extend(Case(s.key, d.key, proto, port, fam, si, di) for proto, port in EXTRA_TARGETS)
    return out


def sim_packet(src_addr: str, dst_addr: str, case: Case) -> Packet:
    if case.proto in ("icmp", "icmpv6"):
        return Packet(src_addr, dst_addr, "icmpv6" if case.family == 6 else "icmp")
    return Packet(src_addr, dst_addr, case.proto, sport=EPHEMERAL_SPORT, dport=case.port or 0)


__all__ = ["EXTRA_TARGETS", "TARGETS", "Case", "addresses", "all_cases", "sim_packet"]
