"""PURE: one host's IR -> libnftables JSON commands (a full table, or an incremental delta).

Layout of `table inet omniwall` (docs/design/dataplane.md has the why):

  chain raw_pre  (prerouting, priority -300, before conntrack)
      iifname "ow*" iifname != @known_if drop   (per workload prefix: fail closed on unknown vNICs)
      iifname vmap @m_raw_egress        -> re_<if>: anti-spoofing drop; stateless egress rules: notrack
      ip daddr vmap @m_raw_ingress4     -> ri_<if>: stateless ingress rules: notrack
      ip6 daddr vmap @m_raw_ingress6
  chain fwd      (forward, priority 0)
      ct state established,related accept      (first: only a connection's first packet is judged)
      ct state invalid drop
      oifname "ow*" oifname != @known_if drop   (per workload prefix)
      iifname vmap @m_egress            -> e_<if>  (egress hop of the sending vNIC)
      oifname vmap @m_ingress           -> i_<if>  (ingress hop of the receiving vNIC)
      (policy accept: both hops allowed, or not our traffic)

Per vNIC and direction: an entry chain `e_<if>` dispatching on `meta nfproto`, then per address family
one chain per category segment (`e_<if>_0v4`, `e_<if>_1v4`, ...; `e_<if>_0v6`, ...) holding only the
nft rules a packet of that family can match, and a tail `e_<if>_d` holding the default action.
allow = `return` (back to fwd, so the ingress hop is still judged), pass = `goto` the next segment,
falling off a segment = `goto` the next one, drop = drop, reject = tcp reset for TCP and icmpx
admin-prohibited otherwise.

A vNIC with connection limits (`IRVnic.conn_limit`/`conn_rate`) jumps first from `e_<if>` to
`e_<if>_l`: new connections over a limit are dropped and counted by the named counter `cl_<if>` before
the rule walk (docs/conntrack-limits.md).

Every rule carries a counter and `comment "<rule id>"`; allowed+stateful rules `ct mark set <id>`;
logged drops/rejects and monitor-mode would-drops go to NFLOG group `log_group` with prefix
`ow:<id>:<action> ` (id 0 = the vNIC's default action).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omniwall.compiler.ir import HostDesiredState, IRRule, IRSet, IRVnic, ServiceMatch, SetUpdate, plain
from omniwall.dataplane.nft import blob
from omniwall.dataplane.nft.expr import Json, T
from omniwall.dataplane.nft.expr import match as _match
from omniwall.dataplane.nft.expr import meta as _meta
from omniwall.dataplane.nft.expr import payload as _payload
from omniwall.dataplane.nft.expr import rule as _rule
from omniwall.dataplane.nft.names import (
    FAMILY,
    FWD_CHAIN,
    KNOWN_IF,
    MAP_EGRESS,
    MAP_INGRESS,
    MAP_RAW_EGRESS,
    MAP_RAW_INGRESS4,
    MAP_RAW_INGRESS6,
    RAW_CHAIN,
    REV_OBJ,
    STATE_BUCKETS,
    STATE_CHAIN,
    TABLE,
    addr_set,
    cidr_set,
    connlimit_counter,
    port_set,
    raw_chain,
    state_chain,
    vnic_chain,
)
from omniwall.dataplane.nft.render_index import (
    IndexDiff,
    IndexObjects,
    diff_index,
    hop_chains,
    hop_signature,
    index_chain,
    index_objects,
    plan_of,
    render_index_full,
)
from omniwall.dataplane.nft.set_signatures import IndexPlan, merge_ranges
from omniwall.flows.record import CONN_LIMIT_RULE_ID, CONN_RATE_RULE_ID, SPOOF_RULE_ID

DEFAULT_LOG_GROUP = 1
# flow records (agent/flows.py): every hop verdict of a new connection logs here with a `owf:` prefix
DEFAULT_FLOW_GROUP = 16
FLOW_VERDICT = {"allow": "a", "drop": "d", "reject": "r", "would-drop": "w"}
HOP_CODE = {"egress": "e", "ingress": "i"}
DIRECTIONS = ("egress", "ingress")
# host-side names of workload interfaces (the lab's derived ifnames are `ow<hash>`, model/resources.py)
DEFAULT_WORKLOAD_PREFIXES: tuple[str, ...] = ("ow",)
_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def check_prefixes(prefixes: Sequence[str]) -> tuple[str, ...]:
    """Validated workload-interface prefixes (ValueError naming the bad entry)."""
    if isinstance(prefixes, str):
        raise ValueError(f"workload_prefixes: a list of prefixes, not the string {prefixes!r}")
    out: list[str] = []
    for i, p in enumerate(prefixes):
        if not isinstance(p, str) or not _PREFIX.fullmatch(p):
            raise ValueError(
                f"workload_prefixes[{i}]: {p!r} is not an interface-name prefix (1-15 of A-Z a-z 0-9 _ . -)"
            )
        if p not in out:
            out.append(p)
    return tuple(out)


# ------------------------------------------------------------------------------------- expressions


def _counter() -> Json:
    return {"counter": None}


def _log(rule_id: int, action: str, group: int) -> Json:
    return {"log": {"prefix": f"ow:{rule_id}:{action} ", "group": group}}


def _flow(rule_id: int, verdict: str, hop: str, group: int | None) -> list[Json]:
    """The flow-record log of one hop verdict (none when flows are off): `owf:<id>:<verdict>:<hop>`.
    The hop is in the prefix, so both hops of one connection on one host are told apart (the ct mark
    keeps only the last one)."""
    if group is None:
        return []
    return [{"log": {"prefix": f"owf:{rule_id}:{FLOW_VERDICT[verdict]}:{HOP_CODE[hop]}", "group": group}}]


def _ctmark(value: int) -> Json:
    return {"mangle": {"key": {"ct": {"key": "mark"}}, "value": value}}


def _reject_tcp() -> Json:
    return {"reject": {"type": "tcp reset"}}


def _reject_icmpx() -> Json:
    return {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}


def _l4(proto: str) -> Json:
    return _match(_meta("l4proto"), proto)


# --------------------------------------------------------------------------------------- addresses


def split_families(addresses: Iterable[str]) -> tuple[list[str], list[str]]:
    v4, v6 = [], []
    for a in addresses:
        (v6 if ":" in a else v4).append(a)
    return v4, v6


def collapse_cidrs(cidrs: Iterable[str]) -> tuple[list[str], list[str]]:
    """Networks per family, merged so no two overlap (nft interval sets refuse overlaps)."""
    nets4: list[ipaddress.IPv4Network] = []
    nets6: list[ipaddress.IPv6Network] = []
    for c in cidrs:
        n = ipaddress.ip_network(c, strict=False)
        if isinstance(n, ipaddress.IPv4Network):
            nets4.append(n)
        else:
            nets6.append(n)
    return (
        [str(n) for n in ipaddress.collapse_addresses(nets4)],
        [str(n) for n in ipaddress.collapse_addresses(nets6)],
    )


def _prefix_elem(cidr: str) -> Json:
    addr, length = cidr.split("/")
    return {"prefix": {"addr": addr, "len": int(length)}}


def set_shape(s: IRSet) -> tuple[bool, bool]:
    """Which interval sets exist for an IR set: (has IPv4 networks, has IPv6 networks)."""
    c4, c6 = collapse_cidrs(s.cidrs)
    return bool(c4), bool(c6)


def kernel_set_names(s: IRSet) -> list[str]:
    has4, has6 = set_shape(s)
    names = [addr_set(s.name, 4), addr_set(s.name, 6)]
    if has4:
        names.append(cidr_set(s.name, 4))
    if has6:
        names.append(cidr_set(s.name, 6))
    return names


def render_set(s: IRSet) -> list[Json]:
    """Declare an IR set's kernel sets and fill them (hash sets always, interval sets when needed)."""
    cmds: list[Json] = []
    v4, v6 = split_families(s.addresses)
    c4, c6 = collapse_cidrs(s.cidrs)
    for fam, addrs, nets in ((4, v4, c4), (6, v6, c6)):
        typ = "ipv4_addr" if fam == 4 else "ipv6_addr"
        name = addr_set(s.name, fam)
        cmds.append({"add": {"set": {**T, "name": name, "type": typ}}})
        if addrs:
            cmds.append({"add": {"element": {**T, "name": name, "elem": sorted(addrs)}}})
        if nets:
            cname = cidr_set(s.name, fam)
            cmds.append({"add": {"set": {**T, "name": cname, "type": typ, "flags": ["interval"]}}})
            cmds.append({"add": {"element": {**T, "name": cname, "elem": [_prefix_elem(n) for n in nets]}}})
    return cmds


# ------------------------------------------------------------------------------------------ matches

Shapes = Mapping[str, tuple[bool, bool]]
# rule id -> (rule, shapes, family_matches(rule, shapes)): see render_vnic_chains
MatchMemo = dict[int, tuple[IRRule, Shapes, list[tuple[int | None, str | None, list[Json]]]]]


def _addr_parts(setname: str | None, fam: int, shapes: Shapes) -> list[str | None]:
    if setname is None:
        return [None]
    if setname not in shapes:
        raise ValueError(f"rule references set {setname!r}, which the state does not define")
    parts: list[str | None] = [f"@{addr_set(setname, fam)}"]
    if shapes[setname][0 if fam == 4 else 1]:
        parts.append(f"@{cidr_set(setname, fam)}")
    return parts


def _port_elems(ranges: list[tuple[int, int]]) -> list[Any]:
    return [a if a == b else {"range": [a, b]} for a, b in ranges]


def port_set_name(ranges: list[tuple[int, int]]) -> str:
    return port_set(",".join(f"{a}-{b}" for a, b in ranges))


def _port_set(ranges: list[tuple[int, int]]) -> Any:
    """One port or range inline; a list: the named set shared by every rule with that list (an
    anonymous set per nft rule makes the kernel name each one by scanning the table's sets: quadratic
    load, 52 s instead of 4 s for 10k rules)."""
    return _port_elems(ranges)[0] if len(ranges) == 1 else f"@{port_set_name(ranges)}"


def _proto_ranges(services: tuple[ServiceMatch, ...], proto: str) -> list[tuple[int, int]] | None:
    """Merged port ranges of the tcp/udp services of `proto`; None: that protocol with any port."""
    if len(services) == 1:  # the common case: one service, one range
        s = services[0]
        if s.protocol != proto:
            return []
        if not s.ports:
            return None
        if len(s.ports) == 1:
            a, b = s.ports[0]
            return [(a, b) if a <= b else (b, a)]
    svcs = [s for s in services if s.protocol == proto]
    if any(not s.ports for s in svcs):
        return None
    return merge_ranges(r for s in svcs for r in s.ports)


def port_sets(state: HostDesiredState) -> dict[str, list[tuple[int, int]]]:
    """Every named port set the state's rules use: name -> merged ranges."""
    out: dict[str, list[tuple[int, int]]] = {}
    for r in state.rules:
        protos = {s.protocol for s in r.services}
        if not r.services or "any" in protos:
            continue
        for proto in ("tcp", "udp"):
            if proto in protos:
                ranges = _proto_ranges(r.services, proto)
                if ranges is not None and len(ranges) > 1:
                    out.setdefault(port_set_name(ranges), ranges)
    return dict(sorted(out.items()))


def render_port_set(name: str, ranges: list[tuple[int, int]]) -> list[Json]:
    return [
        {"add": {"set": {**T, "name": name, "type": "inet_service", "flags": ["interval"]}}},
        {"add": {"element": {**T, "name": name, "elem": _port_elems(ranges)}}},
    ]


# A service variant: (address family it implies or None, l4 protocol or None, match expressions)
Variant = tuple[int | None, str | None, list[Json]]


def service_variants(services: tuple[ServiceMatch, ...]) -> list[Variant]:
    """One variant per nft rule needed to match 'any of these services'."""
    protos = {s.protocol for s in services}
    if not services or "any" in protos:
        return [(None, None, [])]
    out: list[Variant] = []
    for proto in ("tcp", "udp"):
        if proto not in protos:
            continue
        ranges = _proto_ranges(services, proto)
        if ranges is None:
            out.append((None, proto, [_l4(proto)]))
        else:
            out.append((None, proto, [_l4(proto), _match(_payload("th", "dport"), _port_set(ranges))]))
    if "icmp" not in protos and "icmpv6" not in protos:
        return out
    seen: set[tuple[str, int | None, int | None]] = set()
    for s in services:
        if s.protocol not in ("icmp", "icmpv6"):
            continue
        key = (s.protocol, s.icmp_type, s.icmp_code)
        if key in seen:
            continue
        seen.add(key)
        fam = 4 if s.protocol == "icmp" else 6
        exprs = [_l4(s.protocol)]
        if s.icmp_type is not None:
            exprs.append(_match(_payload(s.protocol, "type"), s.icmp_type))
            if s.icmp_code is not None:
                exprs.append(_match(_payload(s.protocol, "code"), s.icmp_code))
        out.append((fam, s.protocol, exprs))
    return out


def family_matches(rule: IRRule, shapes: Shapes) -> list[tuple[int | None, str | None, list[Json]]]:
    """(address family or None, l4 protocol or None, match expressions) per nft rule: family x src part
    x dst part x service. The family is that of the rule's address matches (None: it has none, the rule
    matches both families); a service variant's own family (icmp/icmpv6) does not place it, so an odd
    packet (an IPv6 one carrying protocol 1) meets exactly the rules it met before the split."""
    variants = service_variants(rule.services)
    fams: list[int | None] = [None] if rule.src_set is None and rule.dst_set is None else [4, 6]
    out: list[tuple[int | None, str | None, list[Json]]] = []
    for fam in fams:
        for vfam, proto, sexprs in variants:
            if fam is not None and vfam is not None and fam != vfam:
                continue
            ipproto = "ip" if fam == 4 else "ip6"
            for sp in _addr_parts(rule.src_set, fam or 4, shapes) if fam else [None]:
                for dp in _addr_parts(rule.dst_set, fam or 4, shapes) if fam else [None]:
                    exprs: list[Json] = []
                    if sp is not None:
                        exprs.append(_match(_payload(ipproto, "saddr"), sp))
                    if dp is not None:
                        exprs.append(_match(_payload(ipproto, "daddr"), dp))
                    out.append((fam, proto, exprs + sexprs))
    return out


def rule_matches(rule: IRRule, shapes: Shapes) -> list[tuple[str | None, list[Json]]]:
    """(l4 protocol or None, match expressions) per nft rule, both families."""
    return [(proto, exprs) for _fam, proto, exprs in family_matches(rule, shapes)]


# ------------------------------------------------------------------------------------------- chains


def _reject_rules(match: list[Json], proto: str | None, pre: list[Json], comment: str) -> list[Json]:
    if proto == "tcp":
        return [_rule([*match, *pre, _reject_tcp()], comment)]
    if proto is not None:
        return [_rule([*match, *pre, _reject_icmpx()], comment)]
    return [
        _rule([*match, _l4("tcp"), *pre, _reject_tcp()], comment),
        _rule([*match, *pre, _reject_icmpx()], comment),
    ]


def render_rule(
    rule: IRRule,
    next_chain: str,
    shapes: Shapes,
    log_group: int,
    family: int | None = None,
    *,
    hop: str = "egress",
    flow_group: int | None = None,
    matches: list[tuple[int | None, str | None, list[Json]]] | None = None,
    ct_new: bool = False,
) -> list[Json]:
    """The nft rules realizing one IR rule at one hop (same verdict on each); `family` 4 or 6: only
    those a packet of that family can match (for the hop's per-family chains), None: all.
    `flow_group`: every verdict also logs a flow record there (`_flow`), except, with `ct_new`, an
    allow by a stateful rule (either hop): the agent takes that record from the conntrack NEW event (the
    ct mark names the rule; `allowed_from_conntrack`), or, for the egress hop of a connection between
    two vNICs of the host, from `fwd`'s same-host log (`same_host_egress_rules`)."""
    out: list[Json] = []
    comment = str(rule.id)
    would_drop = rule.monitor and rule.action in ("drop", "reject")
    silent = ct_new and rule.stateful and not would_drop
    for fam, proto, match in family_matches(rule, shapes) if matches is None else matches:
        if family is not None and fam is not None and fam != family:
            continue
        if rule.action == "allow" or would_drop:
            verdict = "would-drop" if would_drop else "allow"
            stmts = [_counter(), *_flow(rule.id, verdict, hop, None if silent else flow_group)]
            if would_drop:
                stmts.append(_log(rule.id, "would-drop", log_group))
            if rule.stateful:
                stmts.append(_ctmark(rule.id))
            out.append(_rule([*match, *stmts, {"return": None}], comment))
        elif rule.action == "pass":
            out.append(_rule([*match, _counter(), {"goto": {"target": next_chain}}], comment))
        elif rule.action == "drop":
            pre = [_counter(), *_flow(rule.id, "drop", hop, flow_group)]
            pre += [_log(rule.id, "drop", log_group)] if rule.log else []
            out.append(_rule([*match, *pre, {"drop": None}], comment))
        elif rule.action == "reject":
            pre = [_counter(), *_flow(rule.id, "reject", hop, flow_group)]
            pre += [_log(rule.id, "reject", log_group)] if rule.log else []
            out.extend(_reject_rules(match, proto, pre, comment))
        else:
            raise ValueError(f"rule {rule.id}: unknown action {rule.action!r}")
    return out


def render_default(
    vnic: IRVnic, log_group: int, *, hop: str = "egress", flow_group: int | None = None, ct_new: bool = False
) -> list[Json]:
    """The vNIC's default action at one hop; its flow records name `vnic.default_id`. With `ct_new`
    (`allowed_from_conntrack`), a default that lets the packet through marks the connection with
    `vnic.default_id` (as a stateful rule marks it with its id) and an allow logs nothing: the agent
    reads it from the NEW event (or `fwd`'s same-host log). A monitored default marks it too, so that
    the mark of a connection is always its last hop's (never the egress hop's of the same host)."""
    act = vnic.default_action
    if act == "allow" or vnic.default_monitor:
        verdict = "allow" if act == "allow" else "would-drop"
        silent = ct_new and act == "allow"
        stmts = [_counter(), *_flow(vnic.default_id, verdict, hop, None if silent else flow_group)]
        if act != "allow":
            stmts.append(_log(0, "would-drop", log_group))
        if ct_new:
            stmts.append(_ctmark(vnic.default_id))
        return [_rule([*stmts, {"return": None}], "default")]
    pre = [_counter(), *_flow(vnic.default_id, act, hop, flow_group)]
    if act == "drop":
        return [_rule([*pre, {"drop": None}], "default")]
    return _reject_rules([], None, pre, "default")


def has_conn_limits(vnic: IRVnic) -> bool:
    return vnic.conn_limit is not None or vnic.conn_rate is not None


def render_conn_limits(vnic: IRVnic, flow_group: int | None = None) -> list[Json]:
    """The vNIC's connection limits (chain `e_<if>_l`, jumped to first from its egress entry chain): a
    resource limit, not policy.
    Only `ct state new` packets reach the hop (fwd accepts established ones first); untracked packets
    (stateless rules) hold no conntrack entry and are not limited. The rate is checked first, so a
    connection it drops is never added to the count; over either limit: counted by the named counter
    `cl_<if>` and dropped before the rule walk. Both limits are per nft rule, i.e. per vNIC; the
    count's list restarts only when the limit chain is rewritten (docs/conntrack-limits.md)."""
    new = _match({"ct": {"key": "state"}}, ["new"], "in")

    def drop(rule_id: int) -> list[Json]:  # a flow record names the limit (flows.record.GUARDS)
        flow = _flow(rule_id, "drop", "egress", flow_group)
        return [{"counter": connlimit_counter(vnic.ifname)}, *flow, {"drop": None}]

    out: list[Json] = []
    if vnic.conn_rate is not None:
        burst = max(5, vnic.conn_rate // 10)
        rate = {"rate": vnic.conn_rate, "per": "second", "burst": burst, "inv": True}
        out.append(_rule([new, {"limit": rate}, *drop(CONN_RATE_RULE_ID)], "connrate"))
    if vnic.conn_limit is not None:
        count = {"ct count": {"val": vnic.conn_limit, "inv": True}}
        out.append(_rule([new, count, *drop(CONN_LIMIT_RULE_ID)], "connlimit"))
    return out


def conn_limit_chain(ifname: str) -> str:
    """`e_<if>_l`: the vNIC's limit rules, jumped to first from `e_<if>`. A chain of their own because
    `ct count` keeps its list of connections in the rule: render_delta leaves this chain alone while
    the limits are unchanged, so a policy change (which re-renders the vNIC's other chains) does not
    reset the count, which a tenant could otherwise do at will by editing its own policies."""
    return vnic_chain("egress", ifname, "l")


def render_conn_counter(vnic: IRVnic) -> Json:
    return {"add": {"counter": {**T, "name": connlimit_counter(vnic.ifname)}}}


def segments(rules: list[IRRule]) -> list[list[IRRule]]:
    """Maximal runs of rules of the same category, in order."""
    out: list[list[IRRule]] = []
    for r in rules:
        if out and out[-1][-1].category == r.category:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def _hop_rules(vnic: IRVnic, direction: str, rmap: Mapping[int, IRRule]) -> list[IRRule]:
    ids = vnic.egress if direction == "egress" else vnic.ingress
    missing = [i for i in ids if i not in rmap]
    if missing:
        raise ValueError(f"vNIC {vnic.ifname} {direction} references unknown rule ids {missing}")
    return [rmap[i] for i in ids]


def _antispoof(vnic: IRVnic, flow_group: int | None = None) -> list[Json]:
    v4, v6 = split_families(vnic.addresses)
    out = []
    drop = [_counter(), *_flow(SPOOF_RULE_ID, "drop", "egress", flow_group), {"drop": None}]
    # no IPv4 address: no IPv4 at all
    m = _match(_payload("ip", "saddr"), {"set": sorted(v4)}, "!=") if v4 else _match(_meta("nfproto"), "ipv4")
    out.append(_rule([m, *drop], "spoof"))
    if v6:
        # "::" (DAD) and link-local (neighbour discovery with the host) are never forwarded by the kernel
        own: list[Any] = [*sorted(v6), "::", _prefix_elem("fe80::/10")]
        m = _match(_payload("ip6", "saddr"), {"set": own}, "!=")
    else:
        m = _match(_meta("nfproto"), "ipv6")
    out.append(_rule([m, *drop], "spoof"))
    return out


def hop_segments(state: HostDesiredState) -> dict[tuple[str, str], tuple[list[IRRule], list[list[IRRule]]]]:
    """Every hop's rules and their category segments."""
    rmap = state.rule_map()
    out = {}
    for v in state.vnics:
        for d in DIRECTIONS:
            rules = _hop_rules(v, d, rmap)
            out[(v.ifname, d)] = (rules, segments(rules))
    return out


def index_plan(state: HostDesiredState) -> IndexPlan:
    return plan_of(state, hop_segments)


def index_objects_of(state: HostDesiredState, log_group: int, flow_group: int | None = None) -> IndexObjects:
    rr, rd = renderers(allowed_from_conntrack(state, flow_group))
    return index_objects(state, index_plan(state), rr, rd, log_group, flow_group)


def allowed_from_conntrack(state: HostDesiredState, flow_group: int | None) -> bool:
    """Do this host's ingress allowed records come from conntrack NEW events (no allowed log at
    ingress; defaults set the ct mark)? Yes with flows on, unless some vNIC of the host has a
    stateless rule: its raw `notrack` (either hop, either vNIC of a same-host connection) can leave a
    connection that a stateful rule or a default allows untracked, with no NEW event to tell it, so
    such a host logs every allowed hop (docs/design/flows.md)."""
    if flow_group is None:
        return False
    rmap = state.rule_map()
    return all(rmap[i].stateful for v in state.vnics for i in (*v.egress, *v.ingress) if i in rmap)


def renderers(ct_new: bool) -> tuple[Any, Any]:
    """render_rule and render_default with `ct_new` bound (for render_index, which takes them)."""
    if not ct_new:
        return render_rule, render_default
    return functools.partial(render_rule, ct_new=True), functools.partial(render_default, ct_new=True)


def render_vnic_chains(
    vnic: IRVnic,
    rmap: Mapping[int, IRRule],
    shapes: Shapes,
    log_group: int = DEFAULT_LOG_GROUP,
    plan: IndexPlan | None = None,
    ingress_dispatch: bool = False,
    flow_group: int | None = None,
    memo: MatchMemo | None = None,
    ct_new: bool = False,
) -> dict[str, list[Json]]:
    """Every chain of one vNIC, name -> rules (each {"expr", "comment"}), in a stable order.
    `memo`: the caller's rule id -> (rule, shapes, family_matches) of earlier renders, reused while
    the rule and the shapes are the same objects (planner.py: a one-rule change re-renders its vNIC's
    other rules from it).

    Per direction: the entry chain `e_<if>` sends a packet to its family's segments (`e_<if>_0v4`,
    `e_<if>_1v4`, ... / `..._0v6`, ...), each holding only the nft rules a packet of that family can
    match, so a packet never walks the other family's variants; both families end in the tail
    `e_<if>_d`. Segment boundaries (categories) are the same in both families, so `pass` (goto the next
    segment) and falling off a segment keep their meaning."""
    chains: dict[str, list[Json]] = {}
    known: dict[int, list[tuple[int | None, str | None, list[Json]]]] = {}  # rule id -> family_matches
    if memo is not None:

        def matches_of(r: IRRule) -> list[tuple[int | None, str | None, list[Json]]]:
            hit = memo.get(r.id)
            if hit is not None and hit[0] is r and hit[1] is shapes:
                return hit[2]
            fm = family_matches(r, shapes)
            memo[r.id] = (r, shapes, fm)
            return fm
    else:

        def matches_of(r: IRRule) -> list[tuple[int | None, str | None, list[Json]]]:
            return family_matches(r, shapes)

    for direction in DIRECTIONS:
        rules = _hop_rules(vnic, direction, rmap)
        segs = segments(rules)
        tail = vnic_chain(direction, vnic.ifname, "d")
        entry = vnic_chain(direction, vnic.ifname)
        fam_chains: dict[int, list[str]] = {
            fam: [vnic_chain(direction, vnic.ifname, f"{k}v{fam}") for k in range(max(1, len(segs)))]
            for fam in (4, 6)
        }
        hp = plan.hops.get((vnic.ifname, direction)) if plan is not None else None
        first = {
            fam: index_chain(direction, vnic.ifname, fam) if hp and fam in hp.families else names[0]
            for fam, names in fam_chains.items()
        }
        limits = render_conn_limits(vnic, flow_group) if direction == "egress" else []
        if limits:  # in a chain of their own: see conn_limit_chain
            chains[conn_limit_chain(vnic.ifname)] = limits
        # the forward hook of an inet table sees IPv4 and IPv6 only: not IPv4 is IPv6
        chains[entry] = [
            *([_rule([_jump(conn_limit_chain(vnic.ifname))], "limits")] if limits else []),
            _rule([_match(_meta("nfproto"), "ipv4"), {"goto": {"target": first[4]}}], "v4"),
            _rule([{"goto": {"target": first[6]}}], "v6"),
        ]
        if hp is not None:
            chains.update(hop_chains(hp, renderers(ct_new)[0], shapes, log_group, flow_group))
        for fam, names in fam_chains.items():
            for k, name in enumerate(names):
                nxt = names[k + 1] if k + 1 < len(names) else tail
                body: list[Json] = []
                for r in segs[k] if segs else []:
                    fm = known.get(r.id)
                    if fm is None:  # both families' chains render the rule: its matches once
                        fm = known[r.id] = matches_of(r)
                    body.extend(
                        render_rule(
                            r,
                            nxt,
                            shapes,
                            log_group,
                            fam,
                            hop=direction,
                            flow_group=flow_group,
                            matches=fm,
                            ct_new=ct_new,
                        )
                    )
                body.append(_rule([{"goto": {"target": nxt}}], "next"))
                chains[name] = body
        chains[tail] = render_default(vnic, log_group, hop=direction, flow_group=flow_group, ct_new=ct_new)
        # raw: anti-spoofing (egress) and notrack for stateless rules; re_<if> is entered by goto (one
        # lookup per packet), so it ends with the ingress dispatch when the host has stateless ingress
        raw: list[Json] = _antispoof(vnic, flow_group) if direction == "egress" else []
        for r in rules:
            if not r.stateful:
                fm = known.get(r.id)
                for _fam, _proto, match in matches_of(r) if fm is None else fm:
                    raw.append(_rule([*match, {"notrack": None}, {"return": None}], f"nt:{r.id}"))
        if direction == "egress" and ingress_dispatch:
            raw += raw_ingress_dispatch()
        chains[raw_chain(direction, vnic.ifname)] = raw
    return chains


def _chain_decl(name: str) -> Json:
    return {"add": {"chain": {**T, "name": name}}}


def _add_rules(chain: str, rules: list[Json]) -> list[Json]:
    return [{"add": {"rule": {**T, "chain": chain, **r}}} for r in rules]


def _jump(target: str) -> Json:
    return {"jump": {"target": target}}


def vnic_map_elements(vnic: IRVnic) -> dict[str, list[Any]]:
    v4, v6 = split_families(vnic.addresses)
    ri = raw_chain("ingress", vnic.ifname)
    return {
        MAP_EGRESS: [[vnic.ifname, _jump(vnic_chain("egress", vnic.ifname))]],
        # goto: the ingress hop is fwd's last word (its `return` = allow ends fwd at policy accept)
        MAP_INGRESS: [[vnic.ifname, {"goto": {"target": vnic_chain("ingress", vnic.ifname)}}]],
        MAP_RAW_EGRESS: [[vnic.ifname, {"goto": {"target": raw_chain("egress", vnic.ifname)}}]],
        MAP_RAW_INGRESS4: [[a, _jump(ri)] for a in sorted(v4)],
        MAP_RAW_INGRESS6: [[a, _jump(ri)] for a in sorted(v6)],
    }


def _elements(verb: str, name: str, elems: list[Any]) -> list[Json]:
    return [{verb: {"element": {**T, "name": name, "elem": elems}}}] if elems else []


def shapes_of(state: HostDesiredState) -> dict[str, tuple[bool, bool]]:
    return {s.name: set_shape(s) for s in state.sets}


def revision_cmd(revision: int) -> Json:
    """Create or update (in place) quota `_rev`, whose byte count is the revision."""
    return {"add": {"quota": {**T, "name": REV_OBJ, "bytes": revision, "used": 0, "inv": False}}}


def render_bookkeeping(
    state: HostDesiredState,
    *,
    structure: bool = True,
    buckets: set[int] | None = None,
    rules_in: Callable[[int], list[IRRule]] | None = None,
    plain_rule: Callable[[IRRule], Any] = plain,
) -> list[Json]:
    """Rewrite the stored IR (when the structure changed: every bucket, or only `buckets`) and the
    revision (blob.py has the layout). `rules_in`, `plain_rule`: see blob.encode_buckets."""
    cmds: list[Json] = []
    if structure:
        if buckets is None:
            cmds.append({"flush": {"chain": {**T, "name": STATE_CHAIN}}})
            header = blob.encode_header(state)
            cmds += _add_rules(STATE_CHAIN, [_rule([{"continue": None}], c) for c in header])
        for k, chunks in blob.encode_buckets(state, buckets, rules_in, plain_rule).items():
            name = state_chain(k)
            cmds.append({"flush": {"chain": {**T, "name": name}}})
            cmds += _add_rules(name, [_rule([{"continue": None}], c) for c in chunks])
    cmds.append(revision_cmd(state.revision))
    return cmds


def ct_flow_group(flow_group: int) -> int:
    """The NFLOG group of `fwd`'s same-host egress logs (`same_host_egress_rules`): the flow group's next
    one. A group of its own: its messages are read by the attribute walk (the rule id is the packet's
    mark), the flow group's by its fast path."""
    return flow_group + 1


def _meta_mark() -> Json:
    return {"meta": {"key": "mark"}}


def same_host_egress_rules(flow_group: int) -> list[Json]:
    """`fwd`, between the egress and the ingress dispatch, with `ct_new`: a packet from a vNIC of this
    host (its egress hop let it through: its chain returned) to another one (the ingress hop follows)
    logs the egress hop's allowed record. Only such a connection needs it: for any other, the NEW
    event's mark is the egress hop's (the ingress hop overwrites it here). The log cannot name the rule
    in its prefix (a constant), so it names it by the packet mark: set to the ct mark the egress
    verdict set, logged (group `ct_flow_group`, NFULA_MARK), set back to 0. Only a packet without a mark
    of its own (a workload's packets lose theirs crossing the veth; another tool of the host may set
    one) takes that path; one with a mark logs `owf:marked:`: a record the kernel cannot name, counted
    as lost (never its mark clobbered). Rules without a verdict: nothing they fail to match changes
    one. Only a connection's first packets get here (`fwd` accepts established and related first)."""
    both = [_match(_meta("iifname"), f"@{KNOWN_IF}"), _match(_meta("oifname"), f"@{KNOWN_IF}")]
    group = ct_flow_group(flow_group)
    allow, egress = FLOW_VERDICT["allow"], HOP_CODE["egress"]
    named = [
        *both,
        _match(_meta_mark(), 0),
        {"mangle": {"key": _meta_mark(), "value": {"ct": {"key": "mark"}}}},
        {"log": {"prefix": f"owf:ct:{allow}:{egress}", "group": group}},
        {"mangle": {"key": _meta_mark(), "value": 0}},
    ]
    marked = {"log": {"prefix": f"owf:marked:{allow}:{egress}", "group": group}}
    unnamed = [*both, _match(_meta_mark(), 0, "!="), marked]
    return [_rule(named, "flows:same-host-egress"), _rule(unnamed, "flows:same-host-egress-marked")]


def fwd_marker(flow_group: int | None, ct_new: bool) -> str:
    """The comment of `fwd`'s first rule: names the flow group and whether ingress allowed records come
    from conntrack (`allowed_from_conntrack`), so that adoption (which compares the base chains'
    comments) rebuilds a table that logs differently instead of adopting it (both sources would then
    count the ingress hop once each)."""
    if flow_group is None:
        return "established"
    return f"established flows:{flow_group}" + ("/ct-new2" if ct_new else "")


def stateless_ingress(state: HostDesiredState) -> bool:
    """Does some vNIC have a stateless ingress rule (then raw dispatches on destination addresses)?"""
    rmap = state.rule_map()
    return any(not rmap[i].stateful for v in state.vnics for i in v.ingress if i in rmap)


def raw_ingress_dispatch() -> list[Json]:
    return [
        _rule([{"vmap": {"key": _payload("ip", "daddr"), "data": f"@{MAP_RAW_INGRESS4}"}}], "dispatch"),
        _rule([{"vmap": {"key": _payload("ip6", "daddr"), "data": f"@{MAP_RAW_INGRESS6}"}}], "dispatch"),
    ]


def unknown_rules(key: str, prefixes: Sequence[str]) -> list[Json]:
    """`<key> "<prefix>*" counter drop`, one rule per workload prefix: placed after the dispatch to the
    known vNICs' chains (which they leave by goto), so only unknown workload interfaces reach it."""
    return [
        _rule([_match(_meta(key), f"{p}*"), _counter(), {"drop": None}], f"unknown:{p}") for p in prefixes
    ]


def render_table(
    state: HostDesiredState,
    log_group: int = DEFAULT_LOG_GROUP,
    prefixes: Sequence[str] = DEFAULT_WORKLOAD_PREFIXES,
    flow_group: int | None = None,
    index: IndexObjects | None = None,
    vnic_chains: dict[str, dict[str, list[Json]]] | None = None,
    plain_rule: Callable[[IRRule], Any] = plain,
) -> list[Json]:
    """The whole table, replacing whatever exists, as one transaction (`add; delete; add table`).
    `index`, `vnic_chains`: the state's hop index objects and per-vNIC chains (render_vnic_chains) when
    the caller has them already (planner.py); `plain_rule`: see blob.encode_bucket.
    `prefixes`: workload-interface name prefixes; unknown interfaces matching one are dropped.
    `flow_group`: NFLOG group of the flow-record logs (None: none); it is named in the comment of
    `fwd`'s first rule, so adoption (which compares the base chains' comments) notices a change."""
    rmap, shapes = state.rule_map(), shapes_of(state)
    plan = index_plan(state)
    dispatch = stateless_ingress(state)
    ct_new = allowed_from_conntrack(state, flow_group)
    if vnic_chains is None:
        vnic_chains = {
            v.ifname: render_vnic_chains(
                v, rmap, shapes, log_group, plan, dispatch, flow_group, ct_new=ct_new
            )
            for v in state.vnics
        }
    if index is None:
        index = index_objects_of(state, log_group, flow_group)
    index_decl, index_elems = render_index_full(index)
    cmds: list[Json] = [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"delete": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": {"chain": {**T, "name": RAW_CHAIN, "type": "filter", "hook": "prerouting", "prio": -300,
                           "policy": "accept"}}},
        {"add": {"chain": {**T, "name": FWD_CHAIN, "type": "filter", "hook": "forward", "prio": 0,
                           "policy": "accept"}}},
        _chain_decl(STATE_CHAIN),
        *(_chain_decl(state_chain(k)) for k in range(STATE_BUCKETS)),
        {"add": {"set": {**T, "name": KNOWN_IF, "type": "ifname"}}},
    ]  # fmt: skip
    cmds += _elements("add", KNOWN_IF, sorted(v.ifname for v in state.vnics))
    for name in (MAP_EGRESS, MAP_INGRESS, MAP_RAW_EGRESS):
        cmds.append({"add": {"map": {**T, "name": name, "type": "ifname", "map": "verdict"}}})
    cmds.append({"add": {"map": {**T, "name": MAP_RAW_INGRESS4, "type": "ipv4_addr", "map": "verdict"}}})
    cmds.append({"add": {"map": {**T, "name": MAP_RAW_INGRESS6, "type": "ipv6_addr", "map": "verdict"}}})
    for s in state.sets:
        cmds += render_set(s)
    for name, ranges in port_sets(state).items():
        cmds += render_port_set(name, ranges)
    cmds += index_decl
    cmds += [render_conn_counter(v) for v in state.vnics if has_conn_limits(v)]
    for chains in vnic_chains.values():
        cmds += [_chain_decl(name) for name in chains]
    for chains in vnic_chains.values():
        for name, rules in chains.items():
            cmds += _add_rules(name, rules)
    cmds += index_elems
    maps: dict[str, list[Any]] = {}
    seen_keys: dict[str, set[str]] = {}
    for v in state.vnics:
        for name, elems in vnic_map_elements(v).items():
            for e in elems:  # an address claimed by two vNICs: the first (sorted ifname) wins
                if e[0] not in seen_keys.setdefault(name, set()):
                    seen_keys[name].add(e[0])
                    maps.setdefault(name, []).append(e)
    for name, elems in maps.items():
        cmds += _elements("add", name, elems)
    # every packet passes here: a vNIC's goes to its re_<if> (goto: one lookup, no return), so the
    # unknown-interface drop that follows needs no set lookup; the destination dispatch (notrack of
    # stateless ingress rules) exists only when some rule needs it
    cmds += _add_rules(
        RAW_CHAIN,
        [
            _rule([{"vmap": {"key": _meta("iifname"), "data": f"@{MAP_RAW_EGRESS}"}}], "dispatch"),
            *unknown_rules("iifname", prefixes),
            *(raw_ingress_dispatch() if dispatch else []),
        ],
    )  # fmt: skip
    cmds += _add_rules(
        FWD_CHAIN,
        [
            _rule([_match({"ct": {"key": "state"}}, ["established", "related"], "in"), {"accept": None}],
                  fwd_marker(flow_group, ct_new)),
            _rule([_match({"ct": {"key": "state"}}, ["invalid"], "in"), _counter(), {"drop": None}],
                  "invalid"),
            _rule([{"vmap": {"key": _meta("iifname"), "data": f"@{MAP_EGRESS}"}}], "dispatch"),
            *(same_host_egress_rules(flow_group) if ct_new and flow_group is not None else []),
            _rule([{"vmap": {"key": _meta("oifname"), "data": f"@{MAP_INGRESS}"}}], "dispatch"),
            *unknown_rules("oifname", prefixes),
        ],
    )  # fmt: skip
    cmds += render_bookkeeping(state, plain_rule=plain_rule)
    return cmds


# ------------------------------------------------------------------------------------ incremental


def _touched_vnics(old: HostDesiredState, new: HostDesiredState) -> list[IRVnic]:
    """New-state vNICs whose chains must be re-rendered: new or changed vNIC, a changed rule it uses,
    or a set it uses whose interval-set shape changed (rules reference a different set list then)."""
    old_v, old_r, old_shapes = old.vnic_map(), old.rule_map(), shapes_of(old)
    new_r, new_shapes = new.rule_map(), shapes_of(new)
    changed_rules = {i for i, r in new_r.items() if old_r.get(i) != r}
    reshaped = {n for n, sh in new_shapes.items() if old_shapes.get(n, sh) != sh}
    out = []
    for v in new.vnics:
        if old_v.get(v.ifname) != v:
            out.append(v)
            continue
        ids = (*v.egress, *v.ingress)
        if any(i in changed_rules for i in ids) or any(
            new_r[i].src_set in reshaped or new_r[i].dst_set in reshaped for i in ids if i in new_r
        ):
            out.append(v)
    return out


def structure_changed(old: HostDesiredState, new: HostDesiredState) -> bool:
    return not blob.same_structure(old, new)


class RawLayoutChanged(ValueError):
    """render_delta cannot express the change: the caller renders the whole table instead."""


def render_delta(
    old: HostDesiredState,
    new: HostDesiredState,
    log_group: int = DEFAULT_LOG_GROUP,
    set_updates: Mapping[str, SetUpdate] | None = None,
    flow_group: int | None = None,
) -> list[Json]:
    """Incremental commands taking a table that realizes `old` to one realizing `new` (one transaction).

    Order is the contract: sets and elements first; then vNIC chains (map elements of removed vNICs
    deleted, changed chains flushed, obsolete chains deleted, new chains declared, rules added, new map
    elements added); then removed sets; then the stored IR and revision.
    `set_updates` (from a HostDelta) lets big sets skip recomputing their member differences.
    """
    cmds: list[Json] = []
    old_sets, new_sets = old.set_map(), new.set_map()
    late_deletes: list[Json] = []

    # 1. sets
    for name, s in new_sets.items():
        prev = old_sets.get(name)
        if prev is None:
            cmds += render_set(s)
            continue
        if prev == s:
            continue
        hint = set_updates.get(name) if set_updates else None
        if hint is not None and not hint.created:  # the delta already names the changed members
            gone4, gone6 = split_families(hint.removed_addresses)
            new4, new6 = split_families(hint.added_addresses)
        else:  # set arithmetic first (C speed on 100k members), then split only the changes
            pa_all, na_all = set(prev.addresses), set(s.addresses)
            gone4, gone6 = split_families(pa_all - na_all)
            new4, new6 = split_families(na_all - pa_all)
        pc4, pc6 = collapse_cidrs(prev.cidrs)
        nc4, nc6 = collapse_cidrs(s.cidrs)
        for fam, gone, added, pc, nc in ((4, gone4, new4, pc4, nc4), (6, gone6, new6, pc6, nc6)):
            aname = addr_set(name, fam)
            cmds += _elements("delete", aname, sorted(gone))
            cmds += _elements("add", aname, sorted(added))
            cname = cidr_set(name, fam)
            typ = "ipv4_addr" if fam == 4 else "ipv6_addr"
            if nc and not pc:
                cmds.append({"add": {"set": {**T, "name": cname, "type": typ, "flags": ["interval"]}}})
                cmds += _elements("add", cname, [_prefix_elem(n) for n in nc])
            elif pc and not nc:
                late_deletes.append({"delete": {"set": {**T, "name": cname}}})
            elif pc != nc:
                cmds += _elements("delete", cname, [_prefix_elem(n) for n in sorted(set(pc) - set(nc))])
                cmds += _elements("add", cname, [_prefix_elem(n) for n in sorted(set(nc) - set(pc))])
    for name in sorted(old_sets.keys() - new_sets.keys()):
        late_deletes += [{"delete": {"set": {**T, "name": n}}} for n in kernel_set_names(old_sets[name])]
    old_ports, new_ports = port_sets(old), port_sets(new)
    for name, ranges in new_ports.items():
        if name not in old_ports:
            cmds += render_port_set(name, ranges)
    late_deletes += [{"delete": {"set": {**T, "name": n}}} for n in old_ports if n not in new_ports]

    # 2. vNICs (and the hop index: identities, their maps and chains, path chains)
    old_v = old.vnic_map()
    new_v = new.vnic_map()
    old_plan, new_plan = index_plan(old), index_plan(new)
    dispatch = stateless_ingress(new)
    if dispatch != stateless_ingress(old):
        raise RawLayoutChanged("the raw chain's destination dispatch appears or goes: render the table")
    ct_new = allowed_from_conntrack(new, flow_group)
    if ct_new != allowed_from_conntrack(old, flow_group):
        raise RawLayoutChanged("ingress allowed records change source (a first or last stateless rule)")
    idiff = diff_index(
        index_objects_of(old, log_group, flow_group), index_objects_of(new, log_group, flow_group)
    )
    touched = _touched_vnics(old, new)
    seen = {v.ifname for v in touched}
    touched += [
        v
        for v in new.vnics
        if v.ifname not in seen
        and v.ifname in old_v
        and hop_signature(old_plan, v.ifname) != hop_signature(new_plan, v.ifname)
    ]
    removed = [old_v[n] for n in sorted(old_v.keys() - new_v.keys())]
    cmds += render_vnic_changes(
        VnicChange(old, new, old_plan, new_plan, touched, removed, dispatch, idiff, ct_new=ct_new),
        log_group,
        flow_group,
    )
    cmds += late_deletes
    cmds += render_bookkeeping(new, structure=structure_changed(old, new))
    return cmds


@dataclass
class VnicChange:
    """What the vNIC part of an incremental transaction needs: both states and index plans, the new
    vNICs whose chains are re-rendered, the removed ones, the raw dispatch flag and the index diff."""

    old: HostDesiredState
    new: HostDesiredState
    old_plan: IndexPlan
    new_plan: IndexPlan
    touched: list[IRVnic]
    removed: list[IRVnic]
    dispatch: bool
    idiff: IndexDiff
    old_rmap: Mapping[int, IRRule] | None = None
    new_rmap: Mapping[int, IRRule] | None = None
    old_shapes: Shapes | None = None
    new_shapes: Shapes | None = None
    old_chains: Mapping[str, dict[str, list[Json]]] | None = None  # render_vnic_chains of old vNICs, known
    rendered: dict[str, dict[str, list[Json]]] | None = None  # filled with the touched vNICs' new chains
    # filled with the chains flushed and filled again: name -> their old rules (the applier may edit
    # them in place instead: backend.py, `Plan.rewrites`)
    rewritten: dict[str, list[Json]] | None = None
    memo: MatchMemo | None = None  # see render_vnic_chains
    ct_new: bool = False  # allowed_from_conntrack (the same in both states: else the table is rendered)


def render_vnic_changes(ch: VnicChange, log_group: int, flow_group: int | None) -> list[Json]:
    """The vNIC and index part of an incremental transaction (render_delta's step 2 and 3, less the
    set deletes and bookkeeping): map elements of removed vNICs deleted, changed chains flushed,
    obsolete chains deleted, new chains declared, rules added, new map elements added, index cleanup."""
    cmds: list[Json] = []
    late_deletes: list[Json] = []
    old, new, touched, removed, idiff = ch.old, ch.new, ch.touched, ch.removed, ch.idiff
    old_v = {v.ifname: v for v in old.vnics} if removed or touched else {}
    old_rmap = ch.old_rmap if ch.old_rmap is not None else old.rule_map()
    new_rmap = ch.new_rmap if ch.new_rmap is not None else new.rule_map()
    old_shapes = ch.old_shapes if ch.old_shapes is not None else shapes_of(old)
    new_shapes = ch.new_shapes if ch.new_shapes is not None else shapes_of(new)
    old_chains: dict[str, dict[str, list[Json]]] = {}
    for v in [*removed, *(old_v[t.ifname] for t in touched if t.ifname in old_v)]:
        known = ch.old_chains.get(v.ifname) if ch.old_chains is not None else None
        old_chains[v.ifname] = (
            known
            if known is not None
            else render_vnic_chains(
                v, old_rmap, old_shapes, log_group, ch.old_plan, ch.dispatch, flow_group, ct_new=ch.ct_new
            )
        )
    new_chains = {
        v.ifname: render_vnic_chains(
            v, new_rmap, new_shapes, log_group, ch.new_plan, ch.dispatch, flow_group, ch.memo, ch.ct_new
        )
        for v in touched
    }
    if ch.rendered is not None:  # the caller keeps them (planner.py: the next change's old chains)
        ch.rendered.update({n: dict(c) for n, c in new_chains.items()})
    cmds += idiff.early
    cmds += idiff.create
    # connection-limit counters: created before the rules naming them, deleted after the last one went
    for v in touched:
        prev = old_v.get(v.ifname)
        if has_conn_limits(v) and (prev is None or not has_conn_limits(prev)):
            cmds.append(render_conn_counter(v))
        elif not has_conn_limits(v) and prev is not None and has_conn_limits(prev):
            late_deletes.append({"delete": {"counter": {**T, "name": connlimit_counter(v.ifname)}}})
    late_deletes += [
        {"delete": {"counter": {**T, "name": connlimit_counter(v.ifname)}}}
        for v in removed
        if has_conn_limits(v)
    ]

    # map elements that go away (removed vNICs, changed addresses), before their chains are deleted
    for v in removed:
        for name, elems in vnic_map_elements(v).items():
            cmds += _elements("delete", name, [e[0] for e in elems])
    cmds += _elements("delete", KNOWN_IF, [v.ifname for v in removed])
    for v in touched:
        prev = old_v.get(v.ifname)
        if prev is not None and prev.addresses != v.addresses:
            pe, ne = vnic_map_elements(prev), vnic_map_elements(v)
            for name in (MAP_RAW_INGRESS4, MAP_RAW_INGRESS6):
                gone = {e[0] for e in pe[name]} - {e[0] for e in ne[name]}
                cmds += _elements("delete", name, sorted(gone))
    # a limit chain whose rules do not change is kept as it is (its `ct count` list with it)
    kept = {
        n
        for ifname, chains in old_chains.items()
        if (n := conn_limit_chain(ifname)) in chains and chains[n] == new_chains.get(ifname, {}).get(n)
    }
    # so is any chain whose rules do not change (a one-rule change rewrites the chains holding it, not
    # every chain of the vNIC: each rule added is parsed by libnftables and checked by the kernel)
    for ifname, chains in old_chains.items():
        now = new_chains.get(ifname)
        if now is None:
            continue
        same = {n for n, r in chains.items() if n in kept or now.get(n) == r}
        if same:
            new_chains[ifname] = {n: r for n, r in now.items() if n not in same}
            old_chains[ifname] = {n: r for n, r in chains.items() if n not in same}
    for chains in old_chains.values():
        cmds += [{"flush": {"chain": {**T, "name": n}}} for n in chains]
    for ifname, chains in old_chains.items():
        keep = new_chains.get(ifname, {})
        cmds += [{"delete": {"chain": {**T, "name": n}}} for n in chains if n not in keep]
        if ch.rewritten is not None:
            ch.rewritten.update((n, r) for n, r in chains.items() if n in keep)
    for chains in new_chains.values():
        cmds += [_chain_decl(n) for n in chains]
    for chains in new_chains.values():
        for n, rules in chains.items():
            cmds += _add_rules(n, rules)
    for v in touched:
        prev = old_v.get(v.ifname)
        pe = vnic_map_elements(prev) if prev is not None else {}
        for name, elems in vnic_map_elements(v).items():
            have = {e[0] for e in pe.get(name, [])}
            cmds += _elements("add", name, [e for e in elems if e[0] not in have])
    cmds += _elements("add", KNOWN_IF, [v.ifname for v in touched if v.ifname not in old_v])
    cmds += idiff.late

    # 3. index objects nobody references any more
    cmds += idiff.cleanup
    cmds += late_deletes
    return cmds


__all__ = [
    "DEFAULT_FLOW_GROUP",
    "DEFAULT_LOG_GROUP",
    "DEFAULT_WORKLOAD_PREFIXES",
    "RawLayoutChanged",
    "VnicChange",
    "allowed_from_conntrack",
    "check_prefixes",
    "collapse_cidrs",
    "conn_limit_chain",
    "family_matches",
    "fwd_marker",
    "has_conn_limits",
    "hop_segments",
    "index_plan",
    "kernel_set_names",
    "merge_ranges",
    "port_set_name",
    "port_sets",
    "render_conn_counter",
    "render_conn_limits",
    "render_default",
    "render_delta",
    "render_port_set",
    "render_rule",
    "render_set",
    "render_table",
    "render_vnic_chains",
    "render_vnic_changes",
    "renderers",
    "revision_cmd",
    "rule_matches",
    "segments",
    "service_variants",
    "set_shape",
    "shapes_of",
    "split_families",
    "stateless_ingress",
    "structure_changed",
    "unknown_rules",
]
