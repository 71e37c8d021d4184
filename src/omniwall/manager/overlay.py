"""Migration overlay: while a workload migrates, its vNICs (with the rules and sets they use) are placed on
the destination host too, so the destination enforces the workload's policy before the vNIC arrives.

Pure functions over `HostDesiredState`s; the manager applies them after every compile. The compiler knows
nothing about migrations: the workload's compiled vNIC on the source is copied, by ifname, into the
destination's state. Rule ids and set names are global (same id, same content on every host), so the
copy is a union; a vNIC the destination already has under that ifname is left alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from omniwall.compiler.hoststate import rule_sets
from omniwall.compiler.ir import HostDesiredState, IRVnic


def workload_vnics(state: HostDesiredState | None, workload: str) -> list[IRVnic]:
    """The vNICs of `workload` ("tenant/name") in `state`."""
    if state is None:
        return []
    return [v for v in state.vnics if v.workload == workload]


def merge_workload(dest: HostDesiredState, src: HostDesiredState | None, workload: str) -> HostDesiredState:
    """`dest` plus `workload`'s vNICs as compiled on `src`, with the rules and sets they reference."""
    have = dest.vnic_map()
    add = [v for v in workload_vnics(src, workload) if v.ifname not in have]
    if not add or src is None:
        return dest
    rules = dest.rule_map()
    src_rules = src.rule_map()
    for v in add:
        for i in (*v.egress, *v.ingress):
            if i not in rules and i in src_rules:
                rules[i] = src_rules[i]
    sets = dest.set_map()
    src_sets = src.set_map()
    for r in rules.values():
        for s in rule_sets(r):
            if s not in sets and s in src_sets:
                sets[s] = src_sets[s]
    vnics = {**have, **{v.ifname: v for v in add}}
    return replace(
        dest,
        vnics=tuple(v for _, v in sorted(vnics.items())),
        rules=tuple(r for _, r in sorted(rules.items())),
        sets=tuple(s for _, s in sorted(sets.items())),
    )


def overlay(
    compiled: dict[str, HostDesiredState],
    moves: Iterable[tuple[str, str, str]],
) -> dict[str, HostDesiredState]:
    """`compiled` (host -> state, complete for every host a move names) with each (workload, source,
    destination) in `moves` spanned to its destination. Returns only the destinations' new states."""
    out: dict[str, HostDesiredState] = {}
    for workload, source, dest in moves:
        base = out.get(dest) or compiled.get(dest)
        if base is None:
            continue
        out[dest] = merge_workload(base, compiled.get(source), workload)
    return out


__all__ = ["merge_workload", "overlay", "workload_vnics"]
