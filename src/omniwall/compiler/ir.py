"""Per-host desired state: the contract between the compiler, the sim evaluator and every backend.

A `HostDesiredState` is everything one host's kernel needs, and nothing more: its vNICs with their ordered
egress/ingress rule lists, the rules those lists name, and the address sets the rules reference. It is
frozen, deterministic (sorted), JSON-serialisable, and carries the store revision it reflects.

Semantics (docs/semantics.md is the long form):
- Rules at a hop are ordered: categories (emergency, infrastructure, environment, application,
  baseline), then policy priority, then policy name, then rule order. The vNIC's `egress`/`ingress`
  tuples are already in that order. First match wins; `pass` jumps to the first rule of the next
  category; no match: `default_action`.
- A rule matches a packet when src is in `src_set` (None = any address), dst in `dst_set` (None = any),
  and the packet matches one of `services` (empty = any protocol, any port).
- `monitor=True` (owner tenant in monitor mode): a drop/reject is logged as "would drop" and the packet is
  allowed at this hop. `default_monitor` is the same for the vNIC's default action.
- `stateful=False`: packets matching the rule at its placement are not tracked (see docs/semantics.md).
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, is_dataclass
from itertools import repeat
from operator import attrgetter
from typing import Any, Literal, TypeVar

from omniwall.compiler.ruleids import default_rule_id

IR_VERSION = 1
T = TypeVar("T")
K = TypeVar("K")

ActionName = Literal["allow", "drop", "reject", "pass"]
DefaultAction = Literal["allow", "drop", "reject"]
ProtoName = Literal["tcp", "udp", "icmp", "icmpv6", "any"]
CATEGORIES: tuple[str, ...] = ("emergency", "infrastructure", "environment", "application", "baseline")


@dataclass(frozen=True, slots=True)
class ServiceMatch:
    protocol: ProtoName
    ports: tuple[tuple[int, int], ...] = ()  # destination port ranges (tcp/udp); empty = every port
    icmp_type: int | None = None
    icmp_code: int | None = None


@dataclass(frozen=True, slots=True)
class IRRule:
    id: int  # stable, 1..2**31-1; the ct mark of connections it admits and the nft rule comment
    tenant: str  # owner tenant
    policy: str  # policy name
    rule: str  # rule name
    category: str  # one of CATEGORIES
    action: ActionName
    src_set: str | None  # name of an IRSet, None = any
    dst_set: str | None
    services: tuple[ServiceMatch, ...] = ()
    stateful: bool = True
    log: bool = False
    monitor: bool = False

    @property
    def label(self) -> str:
        return f"{self.tenant}/{self.policy}/{self.rule}"


@dataclass(frozen=True, slots=True)
class IRSet:
    """Addresses of a group (or a union of a rule side's peers). Host addresses and CIDRs apart, because
    the kernel keeps /32 and /128 in fast hash sets and prefixes in slow-to-change interval sets."""

    name: str
    addresses: tuple[str, ...] = ()  # sorted, IPv4 and IPv6 host addresses
    cidrs: tuple[str, ...] = ()  # sorted, networks (never /32 or /128: those go to `addresses`)


@dataclass(frozen=True, slots=True)
class IRVnic:
    ifname: str  # host-side interface name (the key)
    workload: str  # "tenant/name"
    tenant: str
    addresses: tuple[str, ...]  # the only source addresses it may send from (anti-spoofing)
    egress: tuple[int, ...] = ()  # rule ids, in evaluation order (packets the workload sends)
    ingress: tuple[int, ...] = ()  # rule ids, in evaluation order (packets to the workload)
    default_action: DefaultAction = "drop"
    default_monitor: bool = False
    mac: str | None = None
    # connection limits of its egress (a resource limit, not policy; None = none): concurrent tracked
    # connections it originates, new connections per second (docs/conntrack-limits.md)
    conn_limit: int | None = None
    conn_rate: int | None = None
    # the id of (tenant, default_action) (compiler/ruleids.default_rule_id): derived, never passed, so
    # `replace()` and JSON round trips can never leave a stale one; flow records name the default by it
    default_id: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "default_id", default_rule_id(self.tenant, self.default_action))


@dataclass(frozen=True, slots=True)
class HostDesiredState:
    host: str
    revision: int
    vnics: tuple[IRVnic, ...] = ()  # sorted by ifname
    rules: tuple[IRRule, ...] = ()  # sorted by id; every rule some vNIC references, no others
    sets: tuple[IRSet, ...] = ()  # sorted by name; every set some rule references, no others
    version: int = IR_VERSION

    # ---- lookups (cheap; built on demand, not stored)
    def rule_map(self) -> dict[int, IRRule]:
        return {r.id: r for r in self.rules}

    def set_map(self) -> dict[str, IRSet]:
        return {s.name: s for s in self.sets}

    def vnic_map(self) -> dict[str, IRVnic]:
        return {v.ifname: v for v in self.vnics}

    # ---- JSON
    def to_json(self) -> dict[str, Any]:
        return plain(self)  # type: ignore[no-any-return]

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(data: dict[str, Any]) -> HostDesiredState:
        if data.get("version", IR_VERSION) != IR_VERSION:
            raise ValueError(f"unsupported IR version {data.get('version')}, expected {IR_VERSION}")
        return HostDesiredState(
            host=data["host"],
            revision=int(data["revision"]),
            vnics=tuple(vnic_from_json(v) for v in data.get("vnics", ())),
            rules=tuple(rule_from_json(r) for r in data.get("rules", ())),
            sets=tuple(set_from_json(s) for s in data.get("sets", ())),
            version=IR_VERSION,
        )

    @staticmethod
    def loads(text: str) -> HostDesiredState:
        return HostDesiredState.from_json(json.loads(text))


def service_from_json(d: dict[str, Any]) -> ServiceMatch:
    return ServiceMatch(
        protocol=d["protocol"],
        ports=tuple((int(a), int(b)) for a, b in d.get("ports", ())),
        icmp_type=d.get("icmp_type"),
        icmp_code=d.get("icmp_code"),
    )


def rule_from_json(d: dict[str, Any]) -> IRRule:
    return IRRule(
        id=int(d["id"]),
        tenant=d["tenant"],
        policy=d["policy"],
        rule=d["rule"],
        category=d["category"],
        action=d["action"],
        src_set=d.get("src_set"),
        dst_set=d.get("dst_set"),
        services=tuple(service_from_json(s) for s in d.get("services", ())),
        stateful=bool(d.get("stateful", True)),
        log=bool(d.get("log", False)),
        monitor=bool(d.get("monitor", False)),
    )


def set_from_json(d: dict[str, Any]) -> IRSet:
    return IRSet(name=d["name"], addresses=tuple(d.get("addresses", ())), cidrs=tuple(d.get("cidrs", ())))


def vnic_from_json(d: dict[str, Any]) -> IRVnic:
    return IRVnic(
        ifname=d["ifname"],
        workload=d["workload"],
        tenant=d["tenant"],
        addresses=tuple(d.get("addresses", ())),
        egress=tuple(int(i) for i in d.get("egress", ())),
        ingress=tuple(int(i) for i in d.get("ingress", ())),
        default_action=d.get("default_action", "drop"),
        default_monitor=bool(d.get("default_monitor", False)),
        mac=d.get("mac"),
        conn_limit=_opt_int(d.get("conn_limit")),
        conn_rate=_opt_int(d.get("conn_rate")),
    )


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


# ------------------------------------------------------------------------------------------------ deltas
# Felix style: Update/Remove pairs. A delta applied to its base state gives exactly the target state.
# Order is the contract: set updates, then rule updates, then vNIC updates; removals in reverse
# (vNICs, then rules, then sets), so the kernel never references something missing.


@dataclass(frozen=True, slots=True)
class SetUpdate:
    """Create the set, or change its members: element deltas against the receiver's base, nothing else
    on the wire, so one member joining a 100k-member group costs the same bytes as in a 2-member one.

    `result` is the set after the update when the producer already holds it (the compiler shares one
    IRSet among every host holding the set); it never goes on the wire (`wire: False`), takes no part
    in equality, and `after()` computes it from the base when it is absent (a decoded delta)."""

    name: str
    added_addresses: tuple[str, ...] = ()
    removed_addresses: tuple[str, ...] = ()
    added_cidrs: tuple[str, ...] = ()
    removed_cidrs: tuple[str, ...] = ()
    created: bool = False
    result: IRSet | None = field(default=None, compare=False, repr=False, metadata={"wire": False})

    def after(self, base: IRSet | None) -> IRSet:
        """The set this update leads to from `base` (None: the set is new)."""
        if self.result is not None:
            return self.result
        if base is None or self.created:
            return IRSet(self.name, tuple(sorted(self.added_addresses)), tuple(sorted(self.added_cidrs)))
        return IRSet(
            self.name,
            _patched(base.addresses, self.added_addresses, self.removed_addresses),
            _patched(base.cidrs, self.added_cidrs, self.removed_cidrs),
        )


def _patched(base: tuple[str, ...], added: tuple[str, ...], removed: tuple[str, ...]) -> tuple[str, ...]:
    """Sorted `base` less `removed` plus `added`: O(len(base)) memory moves, not a sort, for small
    changes (a member joining a large group, on the agent's hot path)."""
    if not added and not removed:
        return base
    if len(added) + len(removed) > 64:
        return tuple(sorted((set(base) - set(removed)) | set(added)))
    lst = list(base)
    for a in removed:
        i = bisect_left(lst, a)
        if i < len(lst) and lst[i] == a:
            del lst[i]
    for a in added:
        i = bisect_left(lst, a)
        if i == len(lst) or lst[i] != a:
            lst.insert(i, a)
    return tuple(lst)


@dataclass(frozen=True, slots=True)
class SetRemove:
    name: str


@dataclass(frozen=True, slots=True)
class RuleUpdate:
    rule: IRRule


@dataclass(frozen=True, slots=True)
class RuleRemove:
    id: int


@dataclass(frozen=True, slots=True)
class VnicUpdate:
    """The vNIC is new, or its address list, rule lists or defaults changed, or a rule it references
    changed (its chains must be re-rendered)."""

    vnic: IRVnic


@dataclass(frozen=True, slots=True)
class VnicRemove:
    ifname: str


@dataclass(frozen=True, slots=True)
class HostDelta:
    host: str
    from_revision: int
    to_revision: int
    set_updates: tuple[SetUpdate, ...] = ()
    rule_updates: tuple[RuleUpdate, ...] = ()
    vnic_updates: tuple[VnicUpdate, ...] = ()
    vnic_removes: tuple[VnicRemove, ...] = ()
    rule_removes: tuple[RuleRemove, ...] = ()
    set_removes: tuple[SetRemove, ...] = ()

    @property
    def empty(self) -> bool:
        return not (
            self.set_updates
            or self.rule_updates
            or self.vnic_updates
            or self.vnic_removes
            or self.rule_removes
            or self.set_removes
        )

    def to_json(self) -> dict[str, Any]:
        return plain(self)  # type: ignore[no-any-return]


_new = object.__new__
_consume = deque(maxlen=0).extend  # runs an iterator to its end in C


def _slot_setters(cls: type, names: tuple[str, ...]) -> list[Callable[[Any, Any], None]]:
    if tuple(f.name for f in fields(cls)) != names:
        raise RuntimeError(f"{cls.__name__}'s fields changed: update its fast constructor below")
    return [cls.__dict__[n].__set__ for n in names]


def slot_replacer(cls: type[T], name: str) -> Callable[[T, Any], T]:
    """`dataclasses.replace(obj, name=value)` for the frozen slotted dataclass `cls`, ~2x cheaper: the
    other slots are copied through their descriptors (one C-level getter for all of them), without the
    dataclass __init__ or __post_init__ (so only for a field that nothing else is derived from)."""
    names = tuple(f.name for f in fields(cls))
    get, setters = attrgetter(*names), _slot_setters(cls, names)
    put = setters[names.index(name)]

    def replaced(obj: T, value: Any) -> T:
        out = _new(cls)
        for set_, v in zip(setters, get(obj), strict=True):
            set_(out, v)
        put(out, value)
        return out

    return replaced


_HD_DEFAULTS = ("rule_updates", "vnic_updates", "vnic_removes", "rule_removes", "set_removes")
_hd_host, _hd_from, _hd_to, _hd_sets, *_hd_rest = _slot_setters(
    HostDelta, ("host", "from_revision", "to_revision", "set_updates", *_HD_DEFAULTS)
)


def set_updates_deltas(
    hosts: list[str], from_revisions: list[int], to_revision: int, set_updates: list[tuple[SetUpdate, ...]]
) -> list[HostDelta]:
    """`[HostDelta(h, f, to_revision, set_updates=u) for h, f, u in zip(hosts, from_revisions,
    set_updates)]`, the same frozen objects, built several times faster: the slots are written through
    their descriptors (not the dataclass __init__'s `object.__setattr__` per field), each slot for every
    delta by one C-level map, no Python-level call per host. The compiler makes one per host for
    set-only changes (an env or quarantine label reaches every host: 10k of them per change at 1M
    workloads)."""
    n = len(hosts)
    out = list(map(_new, repeat(HostDelta, n)))
    _consume(map(_hd_host, out, hosts))
    _consume(map(_hd_from, out, from_revisions))
    _consume(map(_hd_to, out, repeat(to_revision, n)))
    _consume(map(_hd_sets, out, set_updates))
    for put in _hd_rest:
        _consume(map(put, out, repeat((), n)))
    return out


_VNIC_FIELDS = (
    "ifname",
    "workload",
    "tenant",
    "addresses",
    "egress",
    "ingress",
    "default_action",
    "default_monitor",
    "mac",
    "conn_limit",
    "conn_rate",
    "default_id",
)
_v_if, _v_wl, _v_tn, _v_ad, _v_eg, _v_in, _v_da, _v_dm, _v_mac, _v_cl, _v_cr, _v_did = _slot_setters(
    IRVnic, _VNIC_FIELDS
)


def make_vnic(
    ifname: str,
    workload: str,
    tenant: str,
    addresses: tuple[str, ...],
    egress: tuple[int, ...],
    ingress: tuple[int, ...],
    default_action: DefaultAction,
    default_monitor: bool,
    mac: str | None,
    conn_limit: int | None,
    conn_rate: int | None,
    default_id: int,
) -> IRVnic:
    """`IRVnic(...)`, the same frozen object, built ~3x faster through the slot descriptors (the
    dataclass __init__ calls `object.__setattr__` per field, then `__post_init__`): the compiler makes
    one per vNIC, a million at 1M workloads. `default_id` must be `default_rule_id(tenant,
    default_action)` (what `__post_init__` derives); the caller memoises it per tenant."""
    v = _new(IRVnic)
    _v_if(v, ifname)
    _v_wl(v, workload)
    _v_tn(v, tenant)
    _v_ad(v, addresses)
    _v_eg(v, egress)
    _v_in(v, ingress)
    _v_da(v, default_action)
    _v_dm(v, default_monitor)
    _v_mac(v, mac)
    _v_cl(v, conn_limit)
    _v_cr(v, conn_rate)
    _v_did(v, default_id)
    return v


def plain(obj: Any) -> Any:
    """The IR as JSON-ready lists and dicts, without the fields marked `wire: False`; like
    `dataclasses.asdict` but ~4x faster (no deep copies). With a thousand agents, this is most of the
    feed's encoding cost."""
    t = type(obj)
    names = _WIRE_FIELDS.get(t)
    if names is None:
        if t is tuple or t is list:
            return [plain(x) for x in obj]
        if t is dict:
            return {k: plain(v) for k, v in obj.items()}
        if not is_dataclass(obj) or isinstance(obj, type):
            return obj  # str, int, None, enums: json.dumps renders them as asdict left them
        names = _WIRE_FIELDS[t] = tuple(f.name for f in fields(obj) if f.metadata.get("wire", True))
    return {n: plain(getattr(obj, n)) for n in names}


_WIRE_FIELDS: dict[type, tuple[str, ...]] = {}


def delta_from_json(d: dict[str, Any]) -> HostDelta:
    return HostDelta(
        host=d["host"],
        from_revision=int(d["from_revision"]),
        to_revision=int(d["to_revision"]),
        set_updates=tuple(
            SetUpdate(
                name=u["name"],
                added_addresses=tuple(u.get("added_addresses", ())),
                removed_addresses=tuple(u.get("removed_addresses", ())),
                added_cidrs=tuple(u.get("added_cidrs", ())),
                removed_cidrs=tuple(u.get("removed_cidrs", ())),
                created=bool(u.get("created", False)),
            )
            for u in d.get("set_updates", ())
        ),
        rule_updates=tuple(RuleUpdate(rule_from_json(u["rule"])) for u in d.get("rule_updates", ())),
        vnic_updates=tuple(VnicUpdate(vnic_from_json(u["vnic"])) for u in d.get("vnic_updates", ())),
        vnic_removes=tuple(VnicRemove(u["ifname"]) for u in d.get("vnic_removes", ())),
        rule_removes=tuple(RuleRemove(int(u["id"])) for u in d.get("rule_removes", ())),
        set_removes=tuple(SetRemove(u["name"]) for u in d.get("set_removes", ())),
    )


def diff(old: HostDesiredState, new: HostDesiredState) -> HostDelta:
    """The smallest delta taking `old` to `new`."""
    old_sets, new_sets = old.set_map(), new.set_map()
    set_updates = []
    for name, s in sorted(new_sets.items()):
        prev = old_sets.get(name)
        if prev is None:
            set_updates.append(SetUpdate(name, s.addresses, added_cidrs=s.cidrs, created=True, result=s))
        elif prev != s:
            pa, na, pc, nc = set(prev.addresses), set(s.addresses), set(prev.cidrs), set(s.cidrs)
            set_updates.append(
                SetUpdate(
                    name=name,
                    result=s,
                    added_addresses=tuple(sorted(na - pa)),
                    removed_addresses=tuple(sorted(pa - na)),
                    added_cidrs=tuple(sorted(nc - pc)),
                    removed_cidrs=tuple(sorted(pc - nc)),
                )
            )
    set_removes = tuple(SetRemove(n) for n in sorted(old_sets.keys() - new_sets.keys()))

    old_rules, new_rules = old.rule_map(), new.rule_map()
    changed_rules = {i for i, r in new_rules.items() if old_rules.get(i) != r}
    rule_updates = tuple(RuleUpdate(new_rules[i]) for i in sorted(changed_rules))
    rule_removes = tuple(RuleRemove(i) for i in sorted(old_rules.keys() - new_rules.keys()))

    old_vnics, new_vnics = old.vnic_map(), new.vnic_map()
    vnic_updates = []
    for name, v in sorted(new_vnics.items()):
        prev = old_vnics.get(name)
        touched = prev is None or prev != v
        if not touched:
            touched = any(i in changed_rules for i in v.egress) or any(i in changed_rules for i in v.ingress)
        if touched:
            vnic_updates.append(VnicUpdate(v))
    vnic_removes = tuple(VnicRemove(n) for n in sorted(old_vnics.keys() - new_vnics.keys()))

    return HostDelta(
        host=new.host,
        from_revision=old.revision,
        to_revision=new.revision,
        set_updates=tuple(set_updates),
        rule_updates=rule_updates,
        vnic_updates=tuple(vnic_updates),
        vnic_removes=vnic_removes,
        rule_removes=rule_removes,
        set_removes=set_removes,
    )


def _merged(
    base: tuple[T, ...], key: Callable[[T], K], puts: Iterable[T], drops: Iterable[K]
) -> tuple[T, ...]:
    """`base` with `puts` replacing by key and `drops` removed, sorted by key; `base` itself (shared,
    not copied) when there is nothing to change."""
    puts, drops = list(puts), list(drops)
    if not puts and not drops:
        return base
    if len(puts) + len(drops) <= max(8, len(base) >> 4):
        # A few changes to a large state (the manager applies every host's delta of a change, mostly one
        # rule each): binary searches in `base`'s sorted order instead of a dict and a sort of all of it.
        out = list(base)
        for x in puts:
            k = key(x)
            i = bisect_left(out, k, key=key)  # type: ignore[arg-type]
            if i < len(out) and key(out[i]) == k:
                out[i] = x
            else:
                out.insert(i, x)
        for k in drops:
            i = bisect_left(out, k, key=key)  # type: ignore[arg-type]
            if i < len(out) and key(out[i]) == k:
                del out[i]
        return tuple(out)
    by_key = {key(x): x for x in base}
    by_key.update((key(x), x) for x in puts)
    for k in drops:
        by_key.pop(k, None)
    return tuple(v for _, v in sorted(by_key.items()))  # type: ignore[type-var]


def apply_delta(base: HostDesiredState, delta: HostDelta) -> HostDesiredState:
    """Pure: the state `delta` leads to from `base`. Raises ValueError when the delta is for another base.

    Parts the delta does not touch are shared with `base` (the agent applies most deltas, which change
    only set members, on the hot path: rebuilding 10k rules for them cost milliseconds)."""
    if delta.from_revision != base.revision:
        raise ValueError(f"delta starts at revision {delta.from_revision}, base is at {base.revision}")
    return HostDesiredState(
        host=base.host,
        revision=delta.to_revision,
        vnics=_merged(
            base.vnics,
            lambda v: v.ifname,
            (u.vnic for u in delta.vnic_updates),
            (r.ifname for r in delta.vnic_removes),
        ),
        rules=_merged(
            base.rules,
            lambda r: r.id,
            (u.rule for u in delta.rule_updates),
            (r.id for r in delta.rule_removes),
        ),
        sets=_merged(
            base.sets,
            lambda s: s.name,
            _sets_after(base, delta.set_updates),
            (r.name for r in delta.set_removes),
        ),
    )


def _sets_after(base: HostDesiredState, updates: tuple[SetUpdate, ...]) -> list[IRSet]:
    if not updates:
        return []
    have = base.set_map() if any(u.result is None for u in updates) else {}
    return [u.after(have.get(u.name)) for u in updates]


def empty_state(host: str, revision: int = 0) -> HostDesiredState:
    return HostDesiredState(host=host, revision=revision)


__all__ = [
    "CATEGORIES",
    "IR_VERSION",
    "HostDelta",
    "HostDesiredState",
    "IRRule",
    "IRSet",
    "IRVnic",
    "RuleRemove",
    "RuleUpdate",
    "ServiceMatch",
    "SetRemove",
    "SetUpdate",
    "VnicRemove",
    "VnicUpdate",
    "apply_delta",
    "delta_from_json",
    "diff",
    "empty_state",
    "make_vnic",
    "plain",
    "set_updates_deltas",
    "slot_replacer",
]
