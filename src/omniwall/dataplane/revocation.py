"""Revocation (docs/semantics.md §6): after a policy change, the tracked connections that the new state
would refuse at a hop on this host are cut (their conntrack entries deleted); others are untouched.

`Revoker` finds the connections a change can affect, judges each by the hops still on this host, and
deletes the refused ones. It owns no kernel state of its own: the conntrack table it is given does the I/O.
"""

from __future__ import annotations

import ipaddress

from omniwall.compiler.ir import HostDesiredState, IRVnic
from omniwall.dataplane.backend import ConnEntry
from omniwall.dataplane.conntrack import ConntrackTable
from omniwall.dataplane.nft.rejudge import Probe, judge_hop


class Revoker:
    def __init__(self, ct: ConntrackTable, *, enabled: bool = True) -> None:
        self.ct = ct
        self.enabled = enabled
        self.last_revoked: list[ConnEntry] = []  # what the last call cut (tests, benchmarks)

    def after_change(self, old: HostDesiredState | None, new: HostDesiredState) -> list[ConnEntry]:
        """Delete conntrack entries of affected vNICs that `new` would refuse at a hop still on this host,
        and those no local vNIC is part of any more (the vNIC left: DESIGN §8 step 5)."""
        self.last_revoked = []
        if not self.enabled or old == new:
            return []
        affected = _affected_addresses(old, new)
        if not affected:
            return []
        return self._rejudge(new, self.ct.list(), affected, _by_address(old.vnics) if old is not None else {})

    def involving(self, new: HostDesiredState, addresses: set[str]) -> list[ConnEntry]:
        """Revocation after a members-only change: only connections from/to `addresses` can have
        become refused, and conntrack is asked (filtered in the kernel) for those alone."""
        self.last_revoked = []
        if not self.enabled or not addresses or self.ct.count() == 0:
            return []
        affected = {_canon(a) for a in addresses}
        return self._rejudge(new, self.ct.involving(affected), affected, {})

    def _rejudge(
        self,
        new: HostDesiredState,
        entries: list[ConnEntry],
        affected: set[str],
        old_by_addr: dict[str, IRVnic],
    ) -> list[ConnEntry]:
        new_by_addr = _by_address(new.vnics)
        doomed = []
        for e in entries:
            src, dst = _canon(e.src), _canon(e.dst)
            if src not in affected and dst not in affected:
                continue
            sv, dv = new_by_addr.get(src), new_by_addr.get(dst)
            if sv is None and dv is None:
                if src in old_by_addr or dst in old_by_addr:
                    doomed.append(e)  # its vNIC left this host: no hop here judges it any more
                continue
            p = Probe.of(e)  # judged by the hops still on this host (a peer may have moved away)
            if (sv is not None and judge_hop(new, sv, "egress", p)[0] != "allow") or (
                dv is not None and judge_hop(new, dv, "ingress", p)[0] != "allow"
            ):
                doomed.append(e)
        if doomed:
            self.ct.delete(doomed)
            self.last_revoked = doomed
        return doomed


def _canon(addr: str) -> str:
    return str(ipaddress.ip_address(addr))


def _by_address(vnics: tuple[IRVnic, ...]) -> dict[str, IRVnic]:
    out: dict[str, IRVnic] = {}
    for v in vnics:
        for a in v.addresses:
            out.setdefault(_canon(a), v)
    return out


def _affected_addresses(old: HostDesiredState | None, new: HostDesiredState) -> set[str]:
    """Addresses of vNICs whose verdicts may have changed: vNIC added/removed/changed, a rule it uses
    changed, or a set one of its rules references changed."""
    if old is None:
        return set(_by_address(new.vnics))
    old_v, new_v = old.vnic_map(), new.vnic_map()
    old_r, new_r = old.rule_map(), new.rule_map()
    old_s, new_s = old.set_map(), new.set_map()
    changed_sets = {n for n in old_s.keys() | new_s.keys() if old_s.get(n) != new_s.get(n)}
    changed_rules = {i for i in old_r.keys() | new_r.keys() if old_r.get(i) != new_r.get(i)}
    out: set[str] = set()
    for name in old_v.keys() | new_v.keys():
        ov, nv = old_v.get(name), new_v.get(name)
        hit = ov != nv
        if not hit and nv is not None:
            for i in (*nv.egress, *nv.ingress):
                r = new_r.get(i)
                if i in changed_rules or (
                    r is not None and (r.src_set in changed_sets or r.dst_set in changed_sets)
                ):
                    hit = True
                    break
        if hit:
            for v in (ov, nv):
                if v is not None:
                    out.update(_canon(a) for a in v.addresses)
    return out


__all__ = ["Revoker"]
