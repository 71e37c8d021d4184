"""The rulesets `bench/dataplane.py` compares, built directly (no compiler, no catalog).

- (b) `omniwall_state`: a `HostDesiredState` for one lab host, realized by the real `NftBackend`:
  `rules` rules in total, address sets totalling `members` addresses, the path's vNIC plus synthetic
  vNICs (interfaces that do not exist: the dispatch maps are keyed by name, so their chains are loaded
  and cost memory but are never walked) carrying the rules that do not span the path.
  The path's vNIC hop (egress on the source host, ingress on the destination host) holds `hop_rules`
  rules: `hop_rules - 1` that do not match the measured flow, cycling through the three ways a rule
  fails (source not in its set: one hash lookup; source in, destination not: two lookups; both in,
  wrong port: two lookups and two compares), and the allowing rule **last**, just before the default
  drop. A linear hop makes every new connection pay the whole walk; the hop index (nft/set_signatures.py)
  decides at render time that the first kind never matches at the egress hop (the local side) and
  looks the rest up by the destination's identity and port.
- (c) `linear_table` (table `owbench_c`): the naive model, iptables without ipset: one rule per member
  address (`ip saddr <member> ip daddr <dst> tcp dport 5201-5300 accept`), the source's own rule last, after
  `ct state established,related accept`.
- (d) `stateful_table` (table `owbench_d`): `ct state established,related accept`, then `accept`:
  what conntrack alone costs, the floor for any stateful firewall.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from omniwall.compiler.ir import HostDesiredState, IRRule, IRSet, IRVnic, ServiceMatch

Json = dict[str, Any]
BENCH_TABLE = "owbench"  # scratch table (the 1M-element set); Omniwall's own table is `inet omniwall`
TABLE_D, TABLE_C, TABLE_M = "owbench_d", "owbench_c", "owbench_m"
SYNTH_NET = ipaddress.ip_network("10.128.0.0/9")  # synthetic group members (never routed in the lab)
SYNTH_VNIC_NET = ipaddress.ip_network("10.64.0.0/16")  # synthetic vNIC addresses
RULES_PER_SYNTH_VNIC = 100
TENANT = "bench"


def member_addresses(start: int, count: int) -> tuple[str, ...]:
    base = int(SYNTH_NET.network_address)
    return tuple(str(ipaddress.IPv4Address(base + start + i)) for i in range(count))


def omniwall_state(
    host: str,
    *,
    ifname: str,
    vnic_addr: str,
    direction: str,
    src_ip: str,
    dst_ip: str,
    ports: tuple[int, ...],
    rules: int = 10_000,
    members: int = 100_000,
    sets: int = 200,
    hop_rules: int = 100,
    port_list: bool = False,
    revision: int = 1,
) -> HostDesiredState:
    """Arm (b) for one host; `direction` is the path's hop there ("egress" at the source's host).
    Rules that can match the path's addresses allow `ports` as one range (`tcp/5201-5300`), or, with
    `port_list`, as a list (`tcp/5201,5300`: the renderer makes that an anonymous set per nft rule)."""
    if not 1 <= hop_rules <= rules:
        raise ValueError(f"hop_rules must be within 1..{rules}, got {hop_rules}")
    if sets < 4 or sets % 2:
        raise ValueError("sets must be an even number >= 4")
    per_set = members // sets
    # even-numbered sets hold both path addresses (rules on them can match the flow's addresses),
    # odd-numbered ones neither; every set also holds `per_set` synthetic members
    ir_sets = []
    for k in range(sets):
        extra = (src_ip, dst_ip) if k % 2 == 0 else ()
        ir_sets.append(
            IRSet(name=f"g{k:04d}", addresses=tuple(sorted(member_addresses(k * per_set, per_set) + extra)))
        )
    even = [s.name for s in ir_sets[0::2]]
    odd = [s.name for s in ir_sets[1::2]]
    ranges = tuple((p, p) for p in ports) if port_list else ((min(ports), max(ports)),)
    svc = (ServiceMatch("tcp", ranges),)

    def rule(i: int, action: str, src: str, dst: str, services: tuple[ServiceMatch, ...]) -> IRRule:
        return IRRule(
            id=i,
            tenant=TENANT,
            policy=f"p{i // 100:03d}",
            rule=f"r{i % 100:02d}",
            category="application",
            action=action,  # type: ignore[arg-type]
            src_set=src,
            dst_set=dst,
            services=services,
        )

    all_rules: list[IRRule] = []
    for i in range(1, rules + 1):
        if i == hop_rules:  # the allowing rule: last of the path's hop
            all_rules.append(rule(i, "allow", even[0], even[1], svc))
            continue
        kind = i % 3
        if kind == 0:  # source not in the set
            r = rule(i, "allow", odd[i % len(odd)], even[i % len(even)], svc)
        elif kind == 1:  # source in, destination not
            r = rule(i, "allow", even[i % len(even)], odd[i % len(odd)], svc)
        else:  # both in, another port
            r = rule(
                i,
                "allow",
                even[i % len(even)],
                even[(i + 1) % len(even)],
                (ServiceMatch("tcp", ((20000 + i, 20000 + i),)),),
            )
        all_rules.append(r)

    hop_ids = tuple(range(1, hop_rules + 1))
    path_vnic = IRVnic(
        ifname=ifname,
        workload=f"{TENANT}/path",
        tenant=TENANT,
        addresses=(vnic_addr,),
        egress=hop_ids if direction == "egress" else (),
        ingress=hop_ids if direction == "ingress" else (),
    )
    vnics = [path_vnic]
    rest = list(range(hop_rules + 1, rules + 1))
    vbase = int(SYNTH_VNIC_NET.network_address) + 1
    for n, k in enumerate(range(0, len(rest), RULES_PER_SYNTH_VNIC)):
        ids = tuple(rest[k : k + RULES_PER_SYNTH_VNIC])
        half = len(ids) // 2
        vnics.append(
            IRVnic(
                ifname=f"owbv{n:04d}",
                workload=f"{TENANT}/synthetic-{n}",
                tenant=TENANT,
                addresses=(str(ipaddress.IPv4Address(vbase + n)),),
                egress=ids[:half],
                ingress=ids[half:],
            )
        )
    return HostDesiredState(
        host=host,
        revision=revision,
        vnics=tuple(sorted(vnics, key=lambda v: v.ifname)),
        rules=tuple(all_rules),
        sets=tuple(ir_sets),
    )


def _table_head(table: str) -> list[Json]:
    t = {"family": "inet", "name": table}
    return [
        {"add": {"table": t}},
        {"delete": {"table": t}},
        {"add": {"table": t}},
        {"add": {"chain": {"family": "inet", "table": table, "name": "fwd", "type": "filter",
                           "hook": "forward", "prio": 0, "policy": "accept"}}},
    ]  # fmt: skip


def _rule(table: str, *expr: Json) -> Json:
    return {"add": {"rule": {"family": "inet", "table": table, "chain": "fwd", "expr": list(expr)}}}


def _ct_established(table: str) -> Json:
    return _rule(
        table,
        {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
        {"accept": None},
    )


def _ip(field: str, addr: str) -> Json:
    return {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": field}}, "right": addr}}


def stateful_table(table: str) -> list[Json]:
    """Arm (d): conntrack and nothing else."""
    return [*_table_head(table), _ct_established(table), _rule(table, {"accept": None})]


def _vmap(key: str, ifname: str, verb: str, chain: str) -> Json:
    entry = [ifname, {verb: {"target": chain}}]
    return {"vmap": {"key": {"meta": {"key": key}}, "data": {"set": [entry]}}}


def minimal_enforcing_table(
    table: str, ifname: str, own: str, direction: str, ports: tuple[int, ...]
) -> list[Json]:
    """Arm (m): the least any per-vNIC enforcing firewall with anti-spoofing does, hand-written: raw
    prerouting sends the vNIC's packets (ifname map, goto) to a one-rule anti-spoofing chain; forward:
    established accept, then the hop of the path's vNIC by ifname map, one rule allowing the bench ports
    (counter, ct mark, return), else drop. What (b) adds beyond it is the cost of Omniwall's generality."""
    t = {"family": "inet", "table": table}
    hop_key, verb = ("iifname", "jump") if direction == "egress" else ("oifname", "goto")
    local = "saddr" if direction == "egress" else "daddr"
    spoofed = {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": own}}
    port = {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                      "right": {"set": list(ports)}}}  # fmt: skip
    mark = {"mangle": {"key": {"ct": {"key": "mark"}}, "value": 1}}
    allow = [_ip(local, own), port, {"counter": None}, mark, {"return": None}]
    raw = {**t, "name": "raw", "type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"}
    return [
        *_table_head(table),
        {"add": {"chain": raw}},
        {"add": {"chain": {**t, "name": "spoof"}}},
        {"add": {"chain": {**t, "name": "hop"}}},
        {"add": {"rule": {**t, "chain": "spoof", "expr": [spoofed, {"drop": None}]}}},
        {"add": {"rule": {**t, "chain": "raw", "expr": [_vmap("iifname", ifname, "goto", "spoof")]}}},
        _ct_established(table),
        _rule(table, _vmap(hop_key, ifname, verb, "hop")),
        {"add": {"rule": {**t, "chain": "hop", "expr": allow}}},
        {"add": {"rule": {**t, "chain": "hop", "expr": [{"counter": None}, {"drop": None}]}}},
    ]


def _tcp_ports(ports: tuple[int, ...]) -> list[Json]:
    return [
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}},
                   "right": {"range": [min(ports), max(ports)]}}},
    ]  # fmt: skip


def linear_table(
    table: str, src_ip: str, dst_ip: str, ports: tuple[int, ...], rules: int = 10_000
) -> list[Json]:
    """Arm (c): one rule per member address (`tcp dport 5201-5300`, as Omniwall's allowing rule),
    the source's own rule last, then drop."""
    cmds = [*_table_head(table), _ct_established(table)]
    for a in (*member_addresses(0, rules - 1), src_ip):
        cmds.append(_rule(table, _ip("saddr", a), _ip("daddr", dst_ip), *_tcp_ports(ports), {"accept": None}))
    cmds.append(_rule(table, {"counter": None}, {"drop": None}))
    return cmds


def delete_table(table: str = BENCH_TABLE) -> list[Json]:
    t = {"family": "inet", "name": table}
    return [{"add": {"table": t}}, {"delete": {"table": t}}]


def dormant_text(table: str, dormant: bool) -> str:
    """nft syntax that parks (unhooks) or wakes a table. Text, because the JSON parser of nftables 1.0.6
    ignores table flags; `add table` without flags clears them."""
    return f"add table inet {table} {{ flags dormant; }}" if dormant else f"add table inet {table}"


def big_set(count: int, name: str = "big") -> list[Json]:
    """One transaction: a table with one `count`-element ipv4_addr hash set."""
    t = {"family": "inet", "name": BENCH_TABLE}
    s = {"family": "inet", "table": BENCH_TABLE, "name": name}
    return [
        {"add": {"table": t}},
        {"delete": {"table": t}},
        {"add": {"table": t}},
        {"add": {"set": {**s, "type": "ipv4_addr"}}},
        {"add": {"element": {**s, "elem": list(member_addresses(0, count))}}},
    ]
