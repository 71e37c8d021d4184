"""Kernel answer vs sim verdict: when a probe agrees, and how a disagreement is reported.

They agree when both allow or both deny, and, for a denial, when the way it failed fits the sim's
verdicts (`agrees`): a TCP reset exactly when the sim says the client is refused (`sim_refuses`); an
ICMP error only then (a reject may also time out: the kernel rate-limits ICMP errors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omniwall.fuzz.cases import Case
from omniwall.sim.evaluate import ConnectionVerdict, Network, judge_hop
from omniwall.sim.explain import path_json, rule_text, verdict_text
from omniwall.sim.packet import Packet


def explanation_text(cv: ConnectionVerdict) -> str:
    """The sim's hop-by-hop reasoning, one line per hop."""
    lines = []
    for what, path in (("request", cv.request), ("reply", cv.reply), ("ack", cv.ack)):
        if path is None:
            continue
        untracked = f" untracked on {', '.join(sorted(path.untracked_hosts))}" if path.untracked_hosts else ""
        lines.append(f"{what}: {path.packet.describe()} -> {path.verdict}{untracked}")
        for h in path.hops:
            lines.append(
                f"  {h.host} {h.ifname} ({h.workload}) {h.direction}: {verdict_text(h)} by {rule_text(h)}"
                f"{'' if h.tracked else ' [untracked]'}"
            )
    return "\n".join(lines)


def sim_refuses(net: Network, cv: ConnectionVerdict) -> bool:
    """Does the client see a refusal (a TCP reset, an ICMP error), by the sim's verdicts?

    Only a `reject` of a packet the client sent (the request, or the TCP handshake's ACK) answers the
    client; a rejected reply answers the server. The answer is sent by the rejecting host itself (its
    output path, which Omniwall does not filter), so it reaches a client on that host. A client on
    another host receives it through its own ingress hop, like any packet: untracked there (a stateless
    rule matches the answer), that hop's rules decide; tracked, it passes as part of the connection when
    the client's host tracked the request, and is `ct state invalid` (dropped) when it did not.
    ICMP errors (UDP, ICMP) are only checked one way (see `agrees`), so for them this says True.
    """
    first = next((p for p in cv.paths if not p.allowed), None)
    if first is None or first is cv.reply or first.verdict != "reject":
        return False
    at = first.denied_at
    client = first.hops[0] if first.src is not None and first.hops else None
    p = first.packet
    if at is None or client is None or at.host == client.host or p.protocol != "tcp":
        return True
    answer = Packet(p.dst, p.src, p.protocol, sport=p.dport, dport=p.sport)
    hop = judge_hop(net.index[client.host], client.ifname, "ingress", answer)
    if not hop.tracked:
        return hop.allowed
    return client.host not in first.untracked_hosts


def kernel_refuses(allowed: bool, detail: str) -> bool:
    """A denial that came back at once (RST, ICMP unreachable/prohibited), not a timeout."""
    return not allowed and detail != "timeout"


def agrees(case: Case, cv: ConnectionVerdict, sim_refused: bool, allowed: bool, detail: str) -> bool:
    """Allowed/denied must be equal. Denied TCP: refused (RST) exactly when the sim rejects. Denied
    UDP/ICMP: a refusal needs a reject in the sim, but a reject may time out (the kernel rate-limits
    ICMP errors)."""
    if allowed != cv.allowed:
        return False
    if allowed:
        return True
    if case.proto == "tcp":
        return kernel_refuses(allowed, detail) == sim_refused
    return not kernel_refuses(allowed, detail) or sim_refused


@dataclass
class Outcome:
    case: Case
    src_addr: str
    dst_addr: str
    kernel: bool
    detail: str
    sim: ConnectionVerdict
    sim_refuses: bool = False  # the client sees a refusal, by the sim (`sim_refuses`)
    retry: bool | None = None  # the kernel's second answer, for a disagreement
    retry_detail: str | None = None
    # attribution (fuzz/attribution.py): {(host, hop): (rule id, verdict)} from the kernel's flow logs
    # and from the sim; None when not checked
    kernel_attr: dict[tuple[str, str], tuple[int, str]] | None = None
    sim_attr: dict[tuple[str, str], tuple[int, str]] | None = None

    @property
    def attributed(self) -> bool | None:
        """The kernel's flow logs name the sim's rule at every hop (None: not checked)."""
        if self.kernel_attr is None or self.sim_attr is None:
            return None
        return self.kernel_attr == self.sim_attr

    @property
    def agrees(self) -> bool:
        return agrees(self.case, self.sim, self.sim_refuses, self.kernel, self.detail)

    @property
    def confirmed(self) -> bool:
        """A mismatch the retry reproduced."""
        return (
            not self.agrees
            and self.retry is not None
            and not agrees(self.case, self.sim, self.sim_refuses, self.retry, self.retry_detail or "")
        )

    def to_json(self) -> dict[str, Any]:
        cv = self.sim
        return {
            "probe": self.case.to_json() | {"src_addr": self.src_addr, "dst_addr": self.dst_addr},
            "kernel": {
                "allowed": self.kernel,
                "detail": self.detail,
                "retry_allowed": self.retry,
                "retry_detail": self.retry_detail,
            },
            "sim": {"allowed": cv.allowed, "verdict": cv.verdict, "refuses": self.sim_refuses},
            "confirmed": self.confirmed,
            "attribution": None
            if self.attributed is None
            else {
                "agrees": self.attributed,
                "kernel": {f"{h}/{d}": list(v) for (h, d), v in sorted((self.kernel_attr or {}).items())},
                "sim": {f"{h}/{d}": list(v) for (h, d), v in sorted((self.sim_attr or {}).items())},
            },
            "explanation": explanation_text(cv),
            "paths": {
                "request": path_json(cv.request),
                "reply": None if cv.reply is None else path_json(cv.reply),
                "ack": None if cv.ack is None else path_json(cv.ack),
            },
        }


@dataclass
class RoundResult:
    outcomes: list[Outcome]
    elapsed: float
    programming: str  # fresh | sync | delta
    drift: list[str] = field(default_factory=list)  # delta mode: hosts whose incremental state differs

    @property
    def probes(self) -> int:
        return len(self.outcomes)

    @property
    def allowed(self) -> int:
        return sum(o.kernel for o in self.outcomes)

    @property
    def mismatches(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.confirmed]

    @property
    def flaky(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.agrees and not o.confirmed]

    @property
    def attribution(self) -> tuple[int, int]:
        """(probes whose flow logs name the sim's rules, probes checked)."""
        checked = [o.attributed for o in self.outcomes if o.attributed is not None]
        return sum(checked), len(checked)

    @property
    def misattributed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.attributed is False]


__all__ = ["Outcome", "RoundResult", "agrees", "explanation_text", "kernel_refuses", "sim_refuses"]
