"""`compile_catalog` equals a naive reference compiler written straight from docs/semantics.md (no
indexes, no incremental state: every workload against every selector, every rule against every vNIC) on
random inventories. The reference shares only naming helpers (set names, rule ids) with the compiler."""

from __future__ import annotations

import ipaddress
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from omniwall import PROVIDER_TENANT
from omniwall.compiler.build import compile_catalog
from omniwall.compiler.ir import CATEGORIES, HostDesiredState, IRRule, IRSet, IRVnic, ServiceMatch
from omniwall.compiler.ruleids import assign_rule_ids
from omniwall.compiler.sets import group_set_name, union_set_name
from omniwall.compiler.testing import host, md, service, tenant, workload
from omniwall.model.catalog import Catalog, is_address_literal, split_ref
from omniwall.model.resources import (
    Group,
    GroupSpec,
    Policy,
    PolicySpec,
    Rule,
    Vnic,
    is_inline_service,
    parse_inline_service,
    vnic_ifname,
)
from omniwall.selectors import facts_of, parse

Key = tuple[str, str]


# ------------------------------------------------------------------------------------------ reference


def service_key(s: ServiceMatch) -> tuple[Any, ...]:
    none = -1
    return (
        s.protocol,
        s.ports,
        none if s.icmp_type is None else s.icmp_type,
        none if s.icmp_code is None else s.icmp_code,
    )


def reference(cat: Catalog, revision: int) -> dict[str, HostDesiredState]:
    def visible(referrer: str, key: Key) -> bool:
        return key in cat.groups and cat.group_visible(referrer, key)

    def members(key: Key) -> tuple[set[Key], set[str]]:
        """(workloads, literals) of a group; the generator never makes nesting cycles."""
        t = key[0]
        spec = cat.groups[key].spec
        wls: set[Key] = set()
        lits = set(spec.cidrs)
        if spec.selector:
            sel = parse(spec.selector)
            for wk, w in cat.workloads.items():
                if (t == PROVIDER_TENANT or wk[0] == t) and sel.matches(
                    facts_of(w.metadata.labels, w.spec.attributes)
                ):
                    wls.add(wk)
        for ref in spec.workloads:
            wk = split_ref(ref, t)
            if wk in cat.workloads and (wk[0] == t or t == PROVIDER_TENANT):
                wls.add(wk)
        for ref in spec.groups:
            nk = split_ref(ref, t)
            if visible(t, nk):
                w2, l2 = members(nk)
                wls |= w2
                lits |= l2
        return wls, lits

    def content(name: str, groups: list[Key], literals: list[str]) -> IRSet:
        addrs: set[str] = set()
        nets: set[str] = set()
        lits = set(literals)
        for g in groups:
            wls, gl = members(g)
            lits |= gl
            for wk in wls:
                for v in cat.workloads[wk].spec.vnics:
                    addrs.update(v.ips)
        for lit in lits:
            n = ipaddress.ip_network(lit, strict=False)
            if n.prefixlen == n.max_prefixlen:
                addrs.add(str(n.network_address))
            else:
                nets.add(str(n))
        return IRSet(name, tuple(sorted(addrs)), tuple(sorted(nets)))

    sets: dict[str, IRSet] = {}
    compiled: list[tuple[Any, ...]] = []  # (order, key, IRRule without id, egress wls, ingress wls)
    for (t, pname), pol in cat.policies.items():
        for index, rule in enumerate(pol.spec.rules):
            if rule.disabled:
                continue
            action = rule.action.value

            def side(refs: list[str], t: str = t) -> tuple[str | None, set[Key] | None, bool]:
                """(set name, workloads for span (None = any), failed)."""
                if "any" in refs:
                    return None, None, False
                groups, lits, tokens, failed = [], [], [], False
                for ref in refs:
                    if is_address_literal(ref):
                        n = ipaddress.ip_network(ref, strict=False)
                        lit = str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n)
                        lits.append(lit)
                        tokens.append("a:" + lit)
                    elif visible(t, split_ref(ref, t)):
                        gk = split_ref(ref, t)
                        groups.append(gk)
                        tokens.append(f"g:{gk[0]}/{gk[1]}")
                    else:
                        failed = True
                wls = set().union(*(members(g)[0] for g in groups)) if groups else set()
                if failed:
                    return None, wls, True
                name = group_set_name(*groups[0]) if len(refs) == 1 and groups else union_set_name(tokens)
                sets[name] = content(name, groups, lits)
                return name, wls, False

            src, src_wls, f1 = side(rule.sources)
            dst, dst_wls, f2 = side(rule.destinations)
            svcs: set[ServiceMatch] = set()
            any_svc, f3 = not rule.services, False
            for ref in rule.services:
                if is_inline_service(ref):
                    spec = parse_inline_service(ref)
                else:
                    sk = split_ref(ref, t)
                    # own services, provider services (visible to all); the provider sees every service
                    if sk not in cat.services or not (sk[0] == t or PROVIDER_TENANT in (sk[0], t)):
                        f3 = True
                        continue
                    spec = cat.services[sk].spec
                proto = spec.protocol.value
                if proto == "any":
                    any_svc = True
                ports = tuple(sorted(set(spec.port_ranges()))) if proto in ("tcp", "udp") else ()
                svcs.add(ServiceMatch(proto, ports, spec.icmpType, spec.icmpCode))  # type: ignore[arg-type]
            services = () if any_svc or f3 else tuple(sorted(svcs, key=service_key))
            if f1 or f2 or f3:
                action = "drop"
            all_t = {wk for wk in cat.workloads if t == PROVIDER_TENANT or wk[0] == t}
            applied = rule.appliedTo or pol.spec.appliedTo
            eg_on, in_on = rule.direction.value != "in", rule.direction.value != "out"
            if applied:
                at = set()
                for ref in applied:
                    if visible(t, split_ref(ref, t)):
                        at |= members(split_ref(ref, t))[0]
                egress = at if eg_on else set()
                ingress = at if in_on else set()
            else:
                egress = (all_t if src_wls is None else src_wls) if eg_on else set()
                ingress = (all_t if dst_wls is None else dst_wls) if in_on else set()
            if t != PROVIDER_TENANT:
                egress = {w for w in egress if w[0] == t}
                ingress = {w for w in ingress if w[0] == t}
            ir = IRRule(
                0,
                t,
                pname,
                rule.name,
                pol.spec.category.value,
                action,
                src,
                dst,
                services,  # type: ignore[arg-type]
                pol.spec.stateful,
                rule.log,
                cat.tenant_spec(t).mode.value == "monitor",
            )
            order = (CATEGORIES.index(pol.spec.category.value), pol.spec.priority, t, pname, index)
            compiled.append((order, (t, pname, rule.name), ir, egress, ingress))

    ids = assign_rule_ids(c[1] for c in compiled)
    compiled.sort()
    out = {}
    for h in cat.hosts:
        vnics: dict[str, tuple[Any, IRVnic]] = {}
        for wk, w in cat.workloads.items():
            if w.spec.host != h:
                continue
            ts = cat.tenant_spec(wk[0])
            eg = tuple(ids[k] for _, k, _, e, _ in compiled if wk in e)
            ing = tuple(ids[k] for _, k, _, _, i in compiled if wk in i)
            for i, v in enumerate(w.spec.vnics):
                ifn = vnic_ifname(w, v)
                cand = IRVnic(ifn, f"{wk[0]}/{wk[1]}", wk[0], tuple(sorted(set(v.ips))), eg, ing,
                              ts.defaultAction, ts.mode.value == "monitor", v.mac)  # fmt: skip
                if ifn not in vnics or (wk, i) < vnics[ifn][0]:
                    vnics[ifn] = ((wk, i), cand)
        used = {i for _, v in vnics.values() for i in v.egress + v.ingress}
        rules = {
            ids[k]: IRRule(ids[k], *[getattr(ir, f) for f in IRRule.__slots__[1:]])
            for _, k, ir, _, _ in compiled
            if ids[k] in used
        }  # type: ignore[misc]
        names = {n for r in rules.values() for n in (r.src_set, r.dst_set) if n}
        out[h] = HostDesiredState(
            host=h,
            revision=revision,
            vnics=tuple(v for _, (_, v) in sorted(vnics.items())),
            rules=tuple(r for _, r in sorted(rules.items())),
            sets=tuple(sets[n] for n in sorted(names)),
        )
    return out


# ------------------------------------------------------------------------------------------ inventories


SELECTORS = [
    'tier == "web"',
    'tier in {"db", "web"} && env != "dev"',
    "all()",
    "!has(env)",
    'user == "alice"',
    'tier == "db" || env == "dev"',
]
IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.1.1", "2001:db8::1", "2001:db8::2"]
CIDRS = ["192.168.0.0/24", "10.0.0.0/30", "10.0.0.3/32", "2001:db8::/64"]
TENANTS = ["infra", "a", "b"]


def inventory(seed: int) -> list[Any]:
    r = random.Random(seed)
    out: list[Any] = [host(f"h{i}") for i in range(3)]
    for t in TENANTS:
        if r.random() < 0.7:
            spec = {
                "mode": r.choice(["enforce", "monitor"]),
                "defaultAction": r.choice(["drop", "allow", "reject"]),
            }
            out.append(tenant(t, **spec))
        for i in range(r.randint(0, 6)):
            labels = {
                k: r.choice(vs)
                for k, vs in (("tier", ["web", "db"]), ("env", ["prod", "dev"]))
                if r.random() < 0.7
            }
            attrs = {"user": r.choice(["alice", ["alice", "bob"], "bob"])} if r.random() < 0.3 else {}
            vnics = [Vnic(name=f"e{j}", ips=r.sample(IPS, r.randint(0, 2))) for j in range(r.randint(0, 2))]
            out.append(
                workload(t, f"w{i}", r.choice(["h0", "h1", "h2", "h9"]), vnics, labels, attributes=attrs)
            )
        for i in range(r.randint(0, 4)):
            lower = [f"g{j}" for j in range(i)] + ([f"infra/g{j}" for j in range(2)] if t != "infra" else [])
            spec = GroupSpec(
                selector=r.choice([None, *SELECTORS]),
                workloads=r.sample([f"w{j}" for j in range(4)], r.randint(0, 2)),
                groups=r.sample(lower, min(len(lower), r.randint(0, 2))) if t != "infra" or i else [],
                cidrs=r.sample(CIDRS, r.randint(0, 2)),
                shareWith=r.choice([[], ["*"], ["a"]]) if t == "infra" else [],
            )
            if t == "infra":
                spec = spec.model_copy(
                    update={"groups": [g for g in spec.groups if not g.startswith("infra/")]}
                )
            out.append(Group(metadata=md(f"g{i}", t), spec=spec))
        if r.random() < 0.5:
            out.append(service(t, "s0", "tcp", [r.choice([443, "8000-8080"])]))
        peers = ["g0", "g1", "g2", "g9", "infra/g0", "infra/g1", "a/g0", *CIDRS[:2], IPS[0]]
        svc_refs = ["tcp/80", "udp/53", "icmp/8", "icmp/0", "any", "s0", "infra/s0", "tcp/80,443"]
        for i in range(r.randint(0, 3)):
            rules = []
            for j in range(r.randint(1, 3)):
                src, dst = (
                    ["any"] if r.random() < 0.3 else r.sample(peers, r.randint(1, 2)) for _ in range(2)
                )
                rules.append(Rule(
                    name=f"r{j}", sources=src, destinations=dst,
                    services=r.sample(svc_refs, r.randint(0, 2)),
                    action=r.choice(["allow", "drop", "reject", "pass"]),
                    direction=r.choice(["in", "out", "both"]),
                    appliedTo=r.choice([[], [], ["g0"], ["g1", "infra/g0"]]), log=r.random() < 0.2,
                    disabled=r.random() < 0.1,
                ))  # fmt: skip
            cats = list(CATEGORIES) if t == "infra" else ["environment", "application"]
            out.append(Policy(metadata=md(f"p{i}", t), spec=PolicySpec(
                category=r.choice(cats), priority=r.choice([0, 10, 1000]), appliedTo=r.choice([[], ["g2"]]),
                stateful=r.random() < 0.8, rules=rules,
            )))  # fmt: skip
    return out


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_compile_catalog_equals_reference(seed: int) -> None:
    cat = Catalog.of(inventory(seed))
    got = compile_catalog(cat, 4)
    want = reference(cat, 4)
    assert sorted(got) == sorted(want)
    for h in want:
        assert got[h] == want[h], h
