"""The agent's last check before the kernel: what it will not attach, and what fails closed.

The manager validates every object, but the agent does not take a desired state on trust (defence in depth
for a manager bug, an old manager, or a stolen manager credential). Two dangers, both from one object:
- a vNIC on an interface outside this host's allowed patterns (`lo`, `eth0`, a bridge): its
  anti-spoofing rule would cut the hypervisor off. Such a vNIC is **not attached** at all;
- text nftables cannot load (an address with an IPv6 zone id, garbage in a set): the host's whole ruleset
  transaction would fail, and with it every later change for every tenant. The affected vNIC **fails
  closed** instead: no addresses it may send from, no rules, default drop; the rest of the host converges.

Every refusal is reported (the agent's status error), never silent. Pure: no I/O, unit-tested.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from omniwall.compiler.ir import HostDelta, HostDesiredState, IRSet, IRVnic
from omniwall.model.inet import kernel_address_ok, kernel_network_ok
from omniwall.model.interfaces import DEFAULT_VNIC_INTERFACES, interface_allowed


@dataclass(frozen=True, slots=True)
class Refusal:
    ifname: str
    workload: str
    action: str  # "not attached" | "fails closed"
    reason: str

    def __str__(self) -> str:
        return f"vNIC {self.ifname} of {self.workload} {self.action}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Guarded:
    state: HostDesiredState  # what the backend may realize
    refusals: tuple[Refusal, ...] = ()

    @property
    def clean(self) -> bool:
        return not self.refusals


def _bad_elements(s: IRSet) -> list[str]:
    return [a for a in s.addresses if not kernel_address_ok(a)] + [
        c for c in s.cidrs if not kernel_network_ok(c)
    ]


class Guard:
    """Checks desired states against this host's allowed interface patterns and the kernel's grammar."""

    def __init__(self, patterns: Iterable[str] = DEFAULT_VNIC_INTERFACES) -> None:
        self.patterns = tuple(patterns)

    def vnic_problem(self, v: IRVnic) -> Refusal | None:
        if not interface_allowed(v.ifname, self.patterns):
            why = f"interface outside this host's allowed patterns ({', '.join(self.patterns)})"
            return Refusal(v.ifname, v.workload, "not attached", why)
        bad = [a for a in v.addresses if not kernel_address_ok(a)]
        if bad:
            return Refusal(v.ifname, v.workload, "fails closed", f"address(es) the kernel cannot load: {bad}")
        return None

    def delta_clean(self, delta: HostDelta) -> bool:
        """Cheap check of what a delta adds (its base was clean): the agent's hot path."""
        for u in delta.vnic_updates:
            if self.vnic_problem(u.vnic) is not None:
                return False
        for su in delta.set_updates:
            if not all(kernel_address_ok(a) for a in su.added_addresses):
                return False
            if not all(kernel_network_ok(c) for c in su.added_cidrs):
                return False
        return True

    def check(self, state: HostDesiredState) -> Guarded:
        """The state with refused vNICs left out and tainted ones failing closed; itself when clean."""
        refusals: list[Refusal] = []
        tainted_sets: dict[str, list[str]] = {}
        sets = []
        for s in state.sets:
            bad = _bad_elements(s)
            if bad:
                tainted_sets[s.name] = bad
                keep = set(bad)
                s = dataclasses.replace(
                    s,
                    addresses=tuple(a for a in s.addresses if a not in keep),
                    cidrs=tuple(c for c in s.cidrs if c not in keep),
                )
            sets.append(s)
        rules = state.rule_map()
        tainted_rules = {r.id for r in state.rules if r.src_set in tainted_sets or r.dst_set in tainted_sets}
        vnics = []
        for v in state.vnics:
            problem = self.vnic_problem(v)
            if problem is None and tainted_rules:
                hit = sorted({i for i in (*v.egress, *v.ingress) if i in tainted_rules})
                if hit:
                    names = sorted(
                        {n for i in hit for n in (rules[i].src_set, rules[i].dst_set) if n in tainted_sets}
                    )
                    problem = Refusal(
                        v.ifname,
                        v.workload,
                        "fails closed",
                        "rule(s) "
                        + ", ".join(rules[i].label for i in hit)
                        + " use set(s) with elements the kernel cannot load: "
                        + "; ".join(f"{n}: {tainted_sets[n]}" for n in names),
                    )
            if problem is None:
                vnics.append(v)
                continue
            refusals.append(problem)
            if problem.action == "fails closed":
                vnics.append(
                    dataclasses.replace(
                        v, addresses=(), egress=(), ingress=(), default_action="drop", default_monitor=False
                    )
                )
        if not refusals and not tainted_sets:
            return Guarded(state)
        used_rules = {i for v in vnics for i in (*v.egress, *v.ingress)}
        kept_rules = tuple(r for r in state.rules if r.id in used_rules)
        used_sets = {n for r in kept_rules for n in (r.src_set, r.dst_set) if n is not None}
        safe = dataclasses.replace(
            state,
            vnics=tuple(vnics),
            rules=kept_rules,
            sets=tuple(s for s in sets if s.name in used_sets),
        )
        return Guarded(safe, tuple(refusals))


__all__ = ["Guard", "Guarded", "Refusal"]
