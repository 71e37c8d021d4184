"""The flow record: one verdict at one hop, with the rule that decided it (the agent→manager contract).

Producers: each agent, from conntrack events (allowed connections, completed with packets, bytes and
duration when they end) and from NFLOG (denied, rejected and monitor-mode "would deny" packets, aggregated
per (src, dst, proto, dport, rule) and interval, so a flood is a count and not a flood of records).
Consumer: the manager's flow ingest (`POST /v1/hosts/{host}/flows`), storage and API.

Every record names its deciding rule: a policy rule (its stable id, tenant, policy, rule name, category), or
the vNIC tenant's default action (`category == "default"`, `policy == DEFAULT_POLICY`), never "unknown".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

Verdict = Literal["allowed", "denied", "rejected", "would-deny"]
Hop = Literal["egress", "ingress"]
VERDICTS: tuple[str, ...] = ("allowed", "denied", "rejected", "would-deny")
HOPS: tuple[str, ...] = ("egress", "ingress")
DEFAULT_CATEGORY = "default"  # a verdict of the tenant's default action
DEFAULT_POLICY = "(default)"
# The host's own guards, which judge before any policy rule: anti-spoofing (a vNIC sending from an address
# that is not its own) and the vNIC's connection limits (count, rate). Their drops are records too, with
# ids above every 32-bit rule and default-action id (they never travel in a ct mark, only in NFLOG
# prefixes), `category == GUARD_CATEGORY`, the vNIC's tenant as `rule_tenant`, and these names.
SPOOF_RULE_ID = 2**32 + 1
CONN_LIMIT_RULE_ID = 2**32 + 2
CONN_RATE_RULE_ID = 2**32 + 3
GUARD_CATEGORY = "guard"
GUARDS: dict[int, tuple[str, str]] = {  # id -> (policy, rule)
    SPOOF_RULE_ID: ("(anti-spoofing)", "spoof"),
    CONN_LIMIT_RULE_ID: ("(connection-limit)", "conn-limit"),
    CONN_RATE_RULE_ID: ("(connection-limit)", "conn-rate"),
}

# Bounds of one batch (the manager refuses larger ones with 413 and counts them).
MAX_BATCH_RECORDS = 10_000
MAX_BATCH_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class FlowRecord:
    start: float  # epoch seconds: connection start (allowed) or first denied packet of the interval
    end: float  # connection end / last update (allowed), last denied packet of the interval
    host: str
    hop: Hop  # egress: leaving the local vNIC's workload; ingress: entering it
    ifname: str  # the local vNIC's host interface
    workload: str  # "tenant/name" of the local vNIC's workload
    verdict: Verdict
    rule_id: int  # the IR rule id (the ct mark / NFLOG prefix); default actions have ids of their own
    rule_tenant: str  # owner of the deciding policy (the vNIC's tenant for a default action)
    policy: str  # policy name, or DEFAULT_POLICY
    rule: str  # rule name, or the default action ("drop", "allow", "reject")
    category: str  # emergency | infrastructure | environment | application | baseline | default | guard
    revision: int  # the desired revision the agent had realized when it decided
    proto: str  # tcp | udp | icmp | icmpv6 | another IP protocol number as text
    src: str
    dst: str
    sport: int = 0
    dport: int = 0  # destination port (tcp/udp); ICMP type for icmp/icmpv6
    packets: int = 0  # both directions for allowed connections; denied packets otherwise
    bytes: int = 0
    count: int = 1  # connections begun (allowed; 0 for a completion) or packets aggregated into this record
    final: bool = True  # allowed: False while the connection is still open (an interim update)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> FlowRecord:
        return FlowRecord(**{f: d[f] for f in _FIELDS if f in d})


_FIELDS = tuple(f.name for f in fields(FlowRecord))


@dataclass(frozen=True, slots=True)
class FlowBatch:
    """What an agent posts: records since its last batch, and what it lost on the way (never silent)."""

    host: str
    records: tuple[FlowRecord, ...] = ()
    # Records lost before they reached the manager, by place: "kernel" (NFLOG/conntrack event queue
    # overruns), "agent" (buffer full while the manager was away), ...; cumulative since agent start.
    dropped: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "records": [r.to_json() for r in self.records], "dropped": self.dropped}


__all__ = [
    "CONN_LIMIT_RULE_ID",
    "CONN_RATE_RULE_ID",
    "DEFAULT_CATEGORY",
    "DEFAULT_POLICY",
    "GUARDS",
    "GUARD_CATEGORY",
    "HOPS",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_RECORDS",
    "SPOOF_RULE_ID",
    "VERDICTS",
    "FlowBatch",
    "FlowRecord",
    "Hop",
    "Verdict",
]
