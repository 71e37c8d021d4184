"""Whole-set checks (docs/semantics.md §1-2): what one object cannot know about the others.

Per-object checks (types, enums, ports, CIDRs, selector syntax) already ran in the schema
(`model.resources`). Here: duplicate names, references (groups, workloads, services, hosts, owner
applications) and who may reference what across tenants, provider-only categories and kinds, group
cycles, addresses used twice, host interface names used twice on one host.

Every problem is a `FieldError` naming the object, the field path and the reason; all are collected and
raised together, and nothing is returned on error.

A tenant's errors name nothing it cannot see: a collision with another tenant's address or interface says
"already in use" without naming the owner, "did you mean" suggests only names visible to the object's
tenant (never Hosts, unshared provider groups or other tenants' objects), and a provider group that is not
shared with the tenant is "unknown", exactly like one that does not exist.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from typing import Any

from omniwall import PROVIDER_TENANT
from omniwall.model.catalog import Catalog, Key, is_address_literal, split_ref
from omniwall.model.errors import FieldError, ValidationError, resource_id
from omniwall.model.interfaces import interface_allowed
from omniwall.model.loader import source_of
from omniwall.model.resources import (
    PROVIDER_CATEGORIES,
    Action,
    Category,
    Group,
    Host,
    Policy,
    Workload,
    _Resource,
    is_inline_service,
    vnic_ifname,
)

# Kinds an Application may own (metadata.application).
OWNABLE_KINDS = frozenset({"Workload", "Group", "Service", "Policy"})


def rid(r: _Resource) -> str:
    return resource_id(r.kind, r.tenant, r.name)  # type: ignore[attr-defined]


class _Errors:
    def __init__(self) -> None:
        self.items: list[FieldError] = []

    def add(self, r: _Resource, path: str, message: str) -> None:
        self.items.append(FieldError(source_of(r), path, message, rid(r)))


def validate(resources: Iterable[Any], *, existing: Catalog | None = None) -> Catalog:
    """Check `resources` as a whole and return their Catalog; raise ValidationError listing every problem.

    With `existing` (what is already stored), `resources` is a change to it: they may reference stored
    objects and replace them (same kind, tenant and name), the result is the merged Catalog (`existing`
    is not modified), and only problems the change introduces are reported: the changed objects
    themselves, and stored objects the change breaks (a provider group no longer shared with a tenant
    that references it). Problems already present in `existing` do not block an unrelated change, and
    the cost follows the size of the change, not of the store (beyond copying its indexes)."""
    resources = list(resources)
    errors = _Errors()
    _check_duplicates(resources, errors)
    if existing is None:
        catalog = Catalog.of(resources)
        _check_catalog(catalog, errors, None)
    else:
        catalog = _merged(existing, resources)
        current = (_current(catalog, r) for r in resources)
        changed = list({id(r): r for r in current if r is not None}.values())
        _check_catalog(catalog, errors, changed)
        _check_stored_referrers(existing, catalog, changed, errors)
    if errors.items:
        # In input order (document by document), stored objects last; stable within a document.
        rank = {source_of(r): i for i, r in reversed(list(enumerate(resources)))}
        rank.pop("", None)
        raise ValidationError(sorted(errors.items, key=lambda e: rank.get(e.document, len(rank))))
    return catalog


def _merged(existing: Catalog, resources: list[_Resource]) -> Catalog:
    c = Catalog(
        tenants=dict(existing.tenants),
        hosts=dict(existing.hosts),
        workloads=dict(existing.workloads),
        groups=dict(existing.groups),
        services=dict(existing.services),
        applications=dict(existing.applications),
        policies=dict(existing.policies),
    )
    for r in resources:
        c.add(r)
    return c


def _current(c: Catalog, r: _Resource) -> _Resource | None:
    """The object the catalog holds under r's key (r itself unless a later duplicate replaced it)."""
    key: Any = r.name if r.kind in ("Tenant", "Host") else (r.tenant, r.name)  # type: ignore[attr-defined]
    return c.table(r.kind).get(key)  # type: ignore[attr-defined]


def _check_duplicates(resources: list[_Resource], errors: _Errors) -> None:
    first: dict[tuple[str, str, str], _Resource] = {}
    for r in resources:
        if r.key in first:
            where = source_of(first[r.key])
            also = f" (also in {where})" if where else ""
            errors.add(r, "metadata.name", f"duplicate {r.kind} {r.name!r}{also}")  # type: ignore[attr-defined]
        else:
            first[r.key] = r


def _check_catalog(c: Catalog, errors: _Errors, changed: list[_Resource] | None) -> None:
    """Every check, on every object (`changed` None) or on the changed objects only."""
    objects = list(c) if changed is None else changed
    for r in objects:
        _check_owner(c, r, errors)
        match r:
            case Host():
                if r.tenant != PROVIDER_TENANT:
                    errors.add(
                        r,
                        "metadata.tenant",
                        f"Host objects belong to the provider tenant {PROVIDER_TENANT!r}",
                    )
                if changed is not None:
                    _check_host_patterns_keep_workloads(c, r, errors)
            case Workload():
                if r.spec.host not in c.hosts:
                    # Hosts do not exist for tenants: no suggestion of their names
                    hint = _hint(r.spec.host, c.hosts) if r.tenant == PROVIDER_TENANT else ""
                    errors.add(r, "spec.host", f"unknown host {r.spec.host!r}{hint}")
                else:
                    _check_vnic_interfaces(c.hosts[r.spec.host], r, errors)
            case Group():
                _check_group(c, r, errors)
            case Policy():
                _check_policy(c, r, errors)
    workloads = [w for w in objects if isinstance(w, Workload)]
    _check_addresses(c, errors, None if changed is None else workloads)
    _check_ifnames(c, errors, None if changed is None else workloads)
    if changed is None:
        _check_cycles(c, errors, None)
    elif any(isinstance(g, Group) for g in changed):
        _check_cycles(c, errors, {(g.tenant, g.name) for g in changed if isinstance(g, Group)})


def _check_stored_referrers(
    existing: Catalog, merged: Catalog, changed: list[_Resource], errors: _Errors
) -> None:
    """A changed provider group may stop being shared with a tenant whose stored objects reference it:
    re-check stored groups and policies, keeping only the errors the change introduced."""
    if not any(isinstance(g, Group) and g.tenant == PROVIDER_TENANT for g in changed):
        return
    changed_ids = {id(r) for r in changed}
    for table in ("Group", "Policy"):
        for r in merged.table(table).values():
            if id(r) in changed_ids or r.tenant == PROVIDER_TENANT:
                continue
            after, before = _Errors(), _Errors()
            check = _check_group if table == "Group" else _check_policy
            check(merged, r, after)
            if not after.items:
                continue
            check(existing, r, before)
            known = {(e.path, e.message) for e in before.items}
            errors.items.extend(e for e in after.items if (e.path, e.message) not in known)


def _hint(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_owner(c: Catalog, r: _Resource, errors: _Errors) -> None:
    app = r.metadata.application
    if app is None:
        return
    if r.kind not in OWNABLE_KINDS:  # type: ignore[attr-defined]
        errors.add(r, "metadata.application", f"a {r.kind} cannot belong to an Application")  # type: ignore[attr-defined]
    elif (r.tenant, app) not in c.applications:
        names = [n for t, n in c.applications if t == r.tenant]
        errors.add(r, "metadata.application", f"unknown application {app!r}{_hint(app, names)}")


# -------------------------------------------------------------------------------------------- workloads


def _ordered(c: Catalog, report: list[Workload] | None) -> tuple[list[Workload], set[int] | None]:
    """Workloads in checking order and the ids to report on: everything, or the unchanged workloads
    first (they claim their addresses and interfaces) and the changed ones last (they get the errors)."""
    if report is None:
        return list(c.workloads.values()), None
    ids = {id(w) for w in report}
    return [*(w for w in c.workloads.values() if id(w) not in ids), *report], ids


def _check_vnic_interfaces(host: Host, w: Workload, errors: _Errors) -> None:
    """Only the provider's interface patterns for the host (model/interfaces.py says why)."""
    patterns = host.spec.vnicInterfaces
    for i, vnic in enumerate(w.spec.vnics):
        ifname = vnic_ifname(w, vnic)
        if not interface_allowed(ifname, patterns):
            path = f"spec.vnics[{i}].hostIfname" if vnic.hostIfname else f"spec.vnics[{i}].name"
            errors.add(
                w,
                path,
                f"host interface {ifname!r} is not one host {host.name!r} allows for vNICs "
                f"(its spec.vnicInterfaces: {', '.join(patterns)})",
            )


def _check_host_patterns_keep_workloads(c: Catalog, host: Host, errors: _Errors) -> None:
    """Narrowing a host's patterns must not strand workloads already attached there."""
    patterns = host.spec.vnicInterfaces
    for w in c.workloads.values():
        if w.spec.host != host.name:
            continue
        for vnic in w.spec.vnics:
            ifname = vnic_ifname(w, vnic)
            if not interface_allowed(ifname, patterns):
                errors.add(
                    host,
                    "spec.vnicInterfaces",
                    f"would leave interface {ifname!r} of {rid(w)} outside the allowed patterns",
                )


def _used_by(w: Workload, other: Workload, other_path: str) -> str:
    """Who holds what `w` wants: named when it is `w` itself or an object `w`'s tenant can see."""
    if other is w:
        return f"used by this workload ({other_path})"
    if w.tenant in (other.tenant, PROVIDER_TENANT):
        return f"used by {rid(other)} ({other_path})"
    return "in use"


def _check_addresses(c: Catalog, errors: _Errors, report: list[Workload] | None) -> None:
    if report is not None and not report:
        return  # no workload changed: no address clash can be this change's (a policy write at 1M
        # workloads walked them all)
    # With a report, only the addresses the changed workloads want can clash with theirs.
    wanted = None if report is None else {ip for w in report for v in w.spec.vnics for ip in v.ips}
    owner: dict[str, tuple[Workload, str]] = {}
    order, ids = _ordered(c, report)
    for w in order:
        for i, vnic in enumerate(w.spec.vnics):
            for j, ip in enumerate(vnic.ips):
                if wanted is not None and ip not in wanted:
                    continue
                path = f"spec.vnics[{i}].ips[{j}]"
                if ip not in owner:
                    owner[ip] = (w, path)
                elif ids is None or id(w) in ids:
                    other, other_path = owner[ip]
                    errors.add(w, path, f"address {ip} is already {_used_by(w, other, other_path)}")


def _check_ifnames(c: Catalog, errors: _Errors, report: list[Workload] | None) -> None:
    if report is not None and not report:
        return  # no workload changed (as in _check_addresses)
    owner: dict[tuple[str, str], tuple[Workload, str]] = {}
    order, ids = _ordered(c, report)
    hosts = None if report is None else {w.spec.host for w in report}
    for w in order:
        if hosts is not None and w.spec.host not in hosts:
            continue  # interface names only clash on one host
        for i, vnic in enumerate(w.spec.vnics):
            ifname = vnic_ifname(w, vnic)
            path = f"spec.vnics[{i}].hostIfname" if vnic.hostIfname else f"spec.vnics[{i}].name"
            key = (w.spec.host, ifname)
            if key not in owner:
                owner[key] = (w, path)
            elif ids is None or id(w) in ids:
                other, other_path = owner[key]
                errors.add(
                    w,
                    path,
                    f"host interface {ifname!r} on host {w.spec.host!r} is already "
                    f"{_used_by(w, other, other_path)}",
                )


# ------------------------------------------------------------------------------------------- references


def _group_ref(c: Catalog, tenant: str, ref: str) -> tuple[Key | None, str | None]:
    """Resolve a group reference made by an object of `tenant`: (key, None) or (None, reason)."""
    if ref == "any":
        return None, "'any' is not a group here; name a group"
    if is_address_literal(ref):
        return None, f"{ref!r} is an address; name a group here"
    key = split_ref(ref, tenant)
    owner, name = key
    if tenant != PROVIDER_TENANT and owner not in (tenant, PROVIDER_TENANT):
        return None, f"{ref!r} is a group of tenant {owner!r}; tenant {tenant!r} may not reference it"
    if key not in c.groups or not c.group_visible(tenant, key):
        # An unshared provider group is as unknown to a tenant as a missing one (no existence oracle).
        hint = ""
        if owner == tenant and "/" not in ref and c.group_visible(tenant, (PROVIDER_TENANT, name)):
            hint = f" (did you mean '{PROVIDER_TENANT}/{name}'?)"
        else:
            seen = [n for t, n in c.groups if t == owner and c.group_visible(tenant, (t, n))]
            hint = _hint(name, seen)
        return None, f"unknown group {ref!r}{hint}"
    return key, None


def _check_groups(c: Catalog, r: _Resource, path: str, refs: list[str], errors: _Errors) -> None:
    for i, ref in enumerate(refs):
        _, reason = _group_ref(c, r.tenant, ref)
        if reason:
            errors.add(r, f"{path}[{i}]", reason)


def _check_peers(c: Catalog, r: _Resource, path: str, refs: list[str], errors: _Errors) -> None:
    for i, ref in enumerate(refs):
        if ref == "any" or is_address_literal(ref):
            continue
        _, reason = _group_ref(c, r.tenant, ref)
        if reason:
            errors.add(r, f"{path}[{i}]", reason)


def _check_services(c: Catalog, r: _Resource, path: str, refs: list[str], errors: _Errors) -> None:
    for i, ref in enumerate(refs):
        if is_inline_service(ref):
            continue  # checked by the schema
        owner, name = split_ref(ref, r.tenant)
        if owner not in (r.tenant, PROVIDER_TENANT):
            reason = f"{ref!r} is a service of tenant {owner!r}; use your own or the provider's services"
        elif (owner, name) not in c.services:
            names = [n for t, n in c.services if t == owner]
            hint = _hint(name, names)
            if not hint and owner == r.tenant and (PROVIDER_TENANT, name) in c.services:
                hint = f" (did you mean '{PROVIDER_TENANT}/{name}'?)"
            reason = f"unknown service {ref!r}{hint}"
        else:
            continue
        errors.add(r, f"{path}[{i}]", reason)


def _check_group(c: Catalog, g: Group, errors: _Errors) -> None:
    if g.spec.shareWith and g.tenant != PROVIDER_TENANT:
        errors.add(g, "spec.shareWith", f"only provider ({PROVIDER_TENANT!r}) groups can be shared")
    for i, ref in enumerate(g.spec.workloads):
        path = f"spec.workloads[{i}]"
        if "/" in ref:
            errors.add(g, path, f"{ref!r}: name a workload of the group's own tenant (no '/')")
        elif (g.tenant, ref) not in c.workloads:
            names = [n for t, n in c.workloads if t == g.tenant]
            errors.add(g, path, f"unknown workload {ref!r}{_hint(ref, names)}")
    _check_groups(c, g, "spec.groups", g.spec.groups, errors)


def _check_policy(c: Catalog, p: Policy, errors: _Errors) -> None:
    spec = p.spec
    if spec.category in PROVIDER_CATEGORIES and p.tenant != PROVIDER_TENANT:
        errors.add(
            p,
            "spec.category",
            f"only the provider tenant {PROVIDER_TENANT!r} may write {spec.category.value} policies",
        )
    _check_groups(c, p, "spec.appliedTo", spec.appliedTo, errors)
    for j, rule in enumerate(spec.rules):
        at = f"spec.rules[{j}]"
        if spec.category == Category.BASELINE and rule.action == Action.PASS:
            # Nothing follows the baseline but the tenant's default action: `pass` would mean nothing.
            errors.add(
                p, f"{at}.action", "pass is not allowed in a baseline policy (use allow, drop or reject)"
            )
        _check_peers(c, p, f"{at}.sources", rule.sources, errors)
        _check_peers(c, p, f"{at}.destinations", rule.destinations, errors)
        _check_groups(c, p, f"{at}.appliedTo", rule.appliedTo, errors)
        _check_services(c, p, f"{at}.services", rule.services, errors)


# ----------------------------------------------------------------------------------------------- cycles


def _edges(c: Catalog, g: Group) -> Iterator[tuple[int, Key]]:
    for i, ref in enumerate(g.spec.groups):
        key, reason = _group_ref(c, g.tenant, ref)
        if key is not None and reason is None:
            yield i, key


def _check_cycles(c: Catalog, errors: _Errors, through: set[Key] | None) -> None:
    """Report each group cycle once, on the edge that closes it (iterative DFS, sorted: deterministic);
    with `through`, only cycles that pass through one of those groups."""
    white, grey, black = 0, 1, 2
    color: dict[Key, int] = dict.fromkeys(c.groups, white)
    for root in sorted(c.groups):
        if color[root] != white:
            continue
        stack: list[tuple[Key, Iterator[tuple[int, Key]]]] = [(root, _edges(c, c.groups[root]))]
        color[root] = grey
        while stack:
            node, it = stack[-1]
            step = next(it, None)
            if step is None:
                color[node] = black
                stack.pop()
                continue
            i, nxt = step
            if color[nxt] == grey:
                path = [k for k, _ in stack]
                cycle = [*path[path.index(nxt) :], nxt]
                if through is not None and not through.intersection(cycle):
                    continue
                same = len({t for t, _ in cycle}) == 1
                viewer = node[0]
                names = " -> ".join(
                    (n if same else f"{t}/{n}")
                    if viewer == PROVIDER_TENANT or c.group_visible(viewer, (t, n))
                    else "(a group you cannot see)"
                    for t, n in cycle
                )
                errors.add(c.groups[node], f"spec.groups[{i}]", f"group cycle: {names}")
            elif color[nxt] == white:
                color[nxt] = grey
                stack.append((nxt, _edges(c, c.groups[nxt])))


__all__ = ["validate"]
