"""`explain`: from names in a Catalog ("web-1", "acme/web-1", an IP) to a judged connection, and the
words that say why. Shared by the `omniwall explain` command and the demo.

Address choice: the source is the workload's first vNIC address of the destination's IP version (the
first address of both ends that share a version when both are workloads). TCP/UDP requests come from
source port 49152 (the first ephemeral port), so reply rules written for ephemeral ranges match.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omniwall.compiler.ir import HostDesiredState
from omniwall.model.catalog import Catalog
from omniwall.model.resources import Workload
from omniwall.sim.evaluate import ConnectionVerdict, HopVerdict, Network, PathVerdict, network_of
from omniwall.sim.packet import Packet

EPHEMERAL_PORT = 49152
PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6")


def resolve_workload(catalog: Catalog, ref: str) -> Workload:
    """`name` (unique across tenants) or `tenant/name`. KeyError with a precise message otherwise."""
    if "/" in ref:
        tenant, name = ref.split("/", 1)
        w = catalog.workloads.get((tenant, name))
        if w is not None:
            return w
        candidates = [f"{t}/{n}" for t, n in catalog.workloads]
    else:
        found = [w for (_, n), w in catalog.workloads.items() if n == ref]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(sorted(f"{w.tenant}/{w.name}" for w in found))
            raise KeyError(f"workload {ref!r} is ambiguous: {names}; write tenant/name")
        candidates = sorted({n for _, n in catalog.workloads})
    close = difflib.get_close_matches(ref, candidates, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise KeyError(f"unknown workload {ref!r}{hint}")


def _addresses(w: Workload) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [ipaddress.ip_address(ip) for v in w.spec.vnics for ip in v.ips]


def resolve_peer(catalog: Catalog, ref: str) -> tuple[str, Workload | None, list[Any]]:
    """A workload reference or a literal address: (label, workload or None, candidate addresses)."""
    try:
        ip = ipaddress.ip_address(ref)
    except ValueError:
        w = resolve_workload(catalog, ref)
        addrs = _addresses(w)
        if not addrs:
            raise ValueError(f"workload {w.tenant}/{w.name} has no IP address") from None
        return f"{w.tenant}/{w.name}", w, addrs
    return str(ip), None, [ip]


def pick_addresses(src: list[Any], dst: list[Any]) -> tuple[str, str]:
    for s in src:
        for d in dst:
            if s.version == d.version:
                return str(s), str(d)
    raise ValueError("source and destination have no address of the same IP version")


def flow_packet(
    src: str, dst: str, proto: str, port: int | None = None, *, sport: int = EPHEMERAL_PORT
) -> Packet:
    """The request packet of a flow; `icmp` becomes `icmpv6` between IPv6 addresses."""
    proto = proto.lower()
    if proto not in PROTOCOLS:
        raise ValueError(f"protocol {proto!r}: use one of {', '.join(PROTOCOLS)}")
    v6 = ipaddress.ip_address(src).version == 6
    if proto in ("icmp", "icmpv6"):
        if port is not None:
            raise ValueError("--port is for tcp and udp; ICMP has no ports")
        return Packet(src, dst, "icmpv6" if v6 else "icmp")
    if port is None:
        raise ValueError(f"{proto} needs a destination port (--port N)")
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1..65535")
    return Packet(src, dst, proto, sport=sport, dport=port)


@dataclass(frozen=True)
class Explanation:
    src: str  # label
    dst: str
    service: str  # "tcp/8080", "icmp"
    connection: ConnectionVerdict

    @property
    def allowed(self) -> bool:
        return self.connection.allowed

    @property
    def packet(self) -> Packet:
        return self.connection.request.packet


def explain(
    catalog: Catalog,
    states: Mapping[str, HostDesiredState] | Network,
    src_ref: str,
    dst_ref: str,
    proto: str,
    port: int | None = None,
) -> Explanation:
    """Judge the connection `src_ref` -> `dst_ref` (workload names or addresses)."""
    src_label, _, src_addrs = resolve_peer(catalog, src_ref)
    dst_label, _, dst_addrs = resolve_peer(catalog, dst_ref)
    s, d = pick_addresses(src_addrs, dst_addrs)
    packet = flow_packet(s, d, proto, port)
    service = f"{packet.protocol}/{port}" if port is not None else str(packet.protocol)
    return Explanation(src_label, dst_label, service, network_of(states).judge_connection(packet))


# ------------------------------------------------------------------------------------------------ words


def rule_text(hop: HopVerdict) -> str:
    """The deciding rule: `tenant/policy/rule (id N)`, `default (tenant T: drop)`, or the reason."""
    if hop.antispoof:
        return "anti-spoofing (source is not this vNIC's address)"
    if hop.invalid:
        return "conntrack: invalid (this host tracks no connection it belongs to)"
    if hop.established:
        return "conntrack: established connection"
    if hop.rule is None:
        action = hop.would or hop.verdict
        return f"default (tenant {hop.tenant}: {action})"
    return f"{hop.rule.label} (id {hop.rule.id})"


def verdict_text(hop: HopVerdict) -> str:
    text = hop.verdict
    if hop.monitored:
        text = f"allow (monitor: would {hop.would})"
    if not hop.reached:
        text += " (not reached)"
    return text


def hop_json(hop: HopVerdict) -> dict[str, Any]:
    return {
        "host": hop.host,
        "ifname": hop.ifname,
        "workload": hop.workload,
        "direction": hop.direction,
        "verdict": hop.verdict,
        "reason": hop.reason,
        "rule": None
        if hop.rule is None
        else {"id": hop.rule.id, "label": hop.rule.label, "action": hop.rule.action},
        "decision": rule_text(hop),
        "default": hop.default,
        "monitored": hop.monitored,
        "would": hop.would,
        "tracked": hop.tracked,
        "antispoof": hop.antispoof,
        "established": hop.established,
        "invalid": hop.invalid,
        "reached": hop.reached,
    }


def packet_json(p: Packet) -> dict[str, Any]:
    d: dict[str, Any] = {"src": p.src, "dst": p.dst, "protocol": p.protocol}
    if p.has_ports:
        d |= {"sport": p.sport, "dport": p.dport}
    if p.icmp_type is not None:
        d |= {"icmp_type": p.icmp_type, "icmp_code": p.icmp_code}
    return d


def path_json(pv: PathVerdict) -> dict[str, Any]:
    return {
        "packet": packet_json(pv.packet),
        "allowed": pv.allowed,
        "verdict": pv.verdict,
        "untracked_hosts": sorted(pv.untracked_hosts),
        "hops": [hop_json(h) for h in pv.hops],
    }


def explanation_json(e: Explanation) -> dict[str, Any]:
    c = e.connection
    return {
        "from": e.src,
        "to": e.dst,
        "service": e.service,
        "allowed": c.allowed,
        "verdict": c.verdict,
        "request": path_json(c.request),
        "reply": None if c.reply is None else path_json(c.reply),
        "ack": None if c.ack is None else path_json(c.ack),
    }


__all__ = [
    "EPHEMERAL_PORT",
    "Explanation",
    "explain",
    "explanation_json",
    "flow_packet",
    "hop_json",
    "path_json",
    "resolve_peer",
    "resolve_workload",
    "rule_text",
    "verdict_text",
]
