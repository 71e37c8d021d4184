"""The connectivity matrix: which probes to send (every ordered pair of workloads), and how to report.

Without explicit ports each destination is probed on the responders it runs (`lab.servers`); with
`--ports tcp/80,udp/81,icmp` every destination is probed on those. One JSON line per probe:
`{"from": "t/a", "to": "t/b", "proto": "tcp", "port": 80, "result": "allowed"|"denied"}` (ICMP: port
null), plus `"expected"` when the policy's expectation was asked for.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from omniwall.lab.plan import LabPlan, WorkloadPlan
from omniwall.lab.probe import Probe, ProbeResult
from omniwall.lab.responder import parse_server

TARGET_RE = re.compile(r"^(tcp|udp)/(\d+)$|^(icmp)$")


class MatrixError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Target:
    proto: str  # tcp | udp | icmp
    port: int | None = None

    def __str__(self) -> str:
        return self.proto if self.port is None else f"{self.proto}/{self.port}"


@dataclass(frozen=True, slots=True)
class MatrixEntry:
    src: str
    dst: str
    proto: str
    port: int | None
    allowed: bool
    detail: str
    expected: bool | None = None

    @property
    def result(self) -> str:
        return "allowed" if self.allowed else "denied"

    @property
    def agrees(self) -> bool:
        return self.expected is None or self.expected == self.allowed

    def to_json(self) -> dict[str, object]:
        d: dict[str, object] = {
            "from": self.src,
            "to": self.dst,
            "proto": self.proto,
            "port": self.port,
            "result": self.result,
        }
        if self.expected is not None:
            d["expected"] = "allowed" if self.expected else "denied"
        return d

    def json_line(self) -> str:
        return json.dumps(self.to_json())


def parse_targets(text: str) -> list[Target]:
    """`tcp/80,udp/81,icmp` -> targets (in order, without duplicates)."""
    out: list[Target] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = TARGET_RE.match(part)
        if not m:
            raise MatrixError(f"--ports: {part!r} is not like tcp/80, udp/53 or icmp")
        t = Target("icmp") if m.group(3) else Target(m.group(1), int(m.group(2)))
        if t.port is not None and not 1 <= t.port <= 65535:
            raise MatrixError(f"--ports: port {t.port} is outside 1..65535")
        if t not in out:
            out.append(t)
    if not out:
        raise MatrixError("--ports: no ports given")
    return out


def served_targets(w: WorkloadPlan) -> list[Target]:
    out: list[Target] = []
    for entry in w.servers:
        found = parse_server(entry)
        out.extend(Target(p, port) for p, port in found)
        if not found:  # icmp
            out.append(Target("icmp"))
    return out


def matrix_probes(plan: LabPlan, targets: Sequence[Target] | None = None, *, family: int = 4) -> list[Probe]:
    """Every ordered pair of distinct workloads (that have an address of `family`) x targets."""
    probes = []
    for src in plan.workloads:
        src_addr = src.address(family)
        if src_addr is None:
            continue
        for dst in plan.workloads:
            dst_addr = dst.address(family)
            if dst is src or dst_addr is None:
                continue
            for t in targets if targets is not None else served_targets(dst):
                probes.append(
                    Probe(
                        src_netns=src.netns,
                        addr=dst_addr,
                        proto=t.proto,
                        port=t.port,
                        src=src.key,
                        dst=dst.key,
                        src_addr=src_addr,
                        expect_name=dst.key,
                    )
                )
    return probes


def entries_of(results: Sequence[ProbeResult], expected: Sequence[bool] | None = None) -> list[MatrixEntry]:
    return [
        MatrixEntry(
            src=r.probe.src,
            dst=r.probe.dst,
            proto=r.probe.proto,
            port=r.probe.port,
            allowed=r.allowed,
            detail=r.detail,
            expected=expected[i] if expected is not None else None,
        )
        for i, r in enumerate(results)
    ]
