"""`NftBackend`: one host's `HostDesiredState` realized in `table inet omniwall` of one network namespace.

- `sync(state)`: reads the table back; nothing realized (or drifted) -> the whole table is rebuilt in
  one transaction; otherwise the minimal incremental transaction (often nothing at all).
- `apply(delta)`: one incremental transaction (set elements, replaced vNIC chains, map elements).
- Every change then re-judges the conntrack entries of the affected vNICs under the new state and
  deletes those it would refuse (revocation); other connections are untouched.
- `realized()` rebuilds the IR from the table alone (stored structure + revision + kernel set
  elements), so a restarted agent adopts the table without writing and without breaking connections.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from dataclasses import replace
from typing import Any

from omniwall.compiler.ir import HostDelta, HostDesiredState, IRVnic, apply_delta
from omniwall.dataplane.backend import Capabilities, ConnEntry, RuleCounters
from omniwall.dataplane.conntrack import ConntrackTable
from omniwall.dataplane.nft import blob
from omniwall.dataplane.nft.libnft import Nft, NftError
from omniwall.dataplane.nft.names import FAMILY, REV_CHAIN, STATE_CHAIN, TABLE, addr_set
from omniwall.dataplane.nft.rejudge import Probe, judge_hop
from omniwall.dataplane.nft.render import DEFAULT_LOG_GROUP, render_delta, render_table

log = logging.getLogger(__name__)


def normalized(state: HostDesiredState) -> HostDesiredState:
    """Order-insensitive form for comparisons (set members sorted as strings, as read back)."""
    return replace(
        state,
        sets=tuple(
            replace(s, addresses=tuple(sorted(s.addresses)), cidrs=tuple(sorted(s.cidrs))) for s in state.sets
        ),
    )


def _elem_key(e: Any) -> str | None:
    if isinstance(e, str):
        return e
    if isinstance(e, dict) and "elem" in e:  # element with attributes (counter/timeout/comment)
        return _elem_key(e["elem"].get("val"))
    return None


class NftBackend:
    capabilities = Capabilities(kernel=True, conntrack=True, counters=True)

    def __init__(
        self,
        netns: str | None,
        *,
        log_group: int = DEFAULT_LOG_GROUP,
        allow_initial_netns: bool = False,
        revoke: bool = True,
    ) -> None:
        self.netns = netns
        self.log_group = log_group
        self.revoke = revoke
        self.nft = Nft(netns, allow_initial_netns=allow_initial_netns)
        self.ct = ConntrackTable(thread=self.nft.thread, allow_initial_netns=allow_initial_netns)
        self._current: HostDesiredState | None = None
        self.last_revoked: list[ConnEntry] = []

    def close(self) -> None:
        self.nft.close()

    # --------------------------------------------------------------------------------- read back
    def _listing(self) -> list[dict[str, Any]] | None:
        return self.nft.list_table(FAMILY, TABLE)

    def realized(self) -> HostDesiredState | None:
        listing = self._listing()
        state = self._decode(listing) if listing is not None else None
        self._current = state
        return state

    def _decode(self, listing: list[dict[str, Any]]) -> HostDesiredState | None:
        chunks: list[str] = []
        revision: int | None = None
        elements: dict[str, list[str]] = {}
        counts: Counter[str] = Counter()
        sets: set[str] = set()
        for obj in listing:
            if "rule" in obj:
                r = obj["rule"]
                counts[r["chain"]] += 1
                if r["chain"] == STATE_CHAIN:
                    chunks.append(r.get("comment", ""))
                elif r["chain"] == REV_CHAIN:
                    revision = int(r.get("comment", "0"))
            elif "set" in obj:
                s = obj["set"]
                sets.add(s["name"])
                elements[s["name"]] = [k for k in map(_elem_key, s.get("elem", [])) if k is not None]
            elif "map" in obj:
                sets.add(obj["map"]["name"])
        struct = blob.decode(chunks)
        if struct is None or revision is None:
            return None
        try:
            addresses = {
                s["name"]: elements.get(addr_set(s["name"], 4), []) + elements.get(addr_set(s["name"], 6), [])
                for s in struct.get("sets", [])
            }
            state = blob.assemble(struct, revision, addresses)
        except (KeyError, ValueError, TypeError):
            return None
        # drift check: the kernel must hold exactly the chains/sets (and rule counts) we would render
        exp_counts: Counter[str] = Counter()
        exp_sets: set[str] = set()
        for cmd in render_table(state, self.log_group):
            add = cmd.get("add", {})
            if "rule" in add:
                exp_counts[add["rule"]["chain"]] += 1
            elif "set" in add:
                exp_sets.add(add["set"]["name"])
            elif "map" in add:
                exp_sets.add(add["map"]["name"])
        if +counts != +exp_counts or sets != exp_sets:
            log.warning("nft table in %s drifted from its stored state; will rebuild", self.netns)
            return None
        return state

    # ------------------------------------------------------------------------------------- writes
    def sync(self, state: HostDesiredState) -> None:
        current = self.realized()
        if current is not None and normalized(current) == normalized(state):
            self._current = state
            return
        if current is None:
            self.nft.transact(render_table(state, self.log_group))
        else:
            try:
                self.nft.transact(render_delta(normalized(current), normalized(state), self.log_group))
            except NftError as e:  # an unexpected kernel state: replace the table atomically instead
                log.warning("incremental sync failed (%s); rebuilding the table", e.message)
                self.nft.transact(render_table(state, self.log_group))
        self._current = state
        self._revoke(current, state)

    def apply(self, delta: HostDelta) -> None:
        base = self._current if self._current is not None else self.realized()
        if base is None:
            raise ValueError("apply: nothing realized yet; sync a full state first")
        if delta.from_revision != base.revision:
            raise ValueError(
                f"apply: delta starts at revision {delta.from_revision}, realized is {base.revision}"
            )
        new = apply_delta(base, delta)
        hints = {u.full.name: u for u in delta.set_updates}
        self.nft.transact(render_delta(base, new, self.log_group, hints))
        self._current = new
        self._revoke(base, new)

    def teardown(self) -> None:
        if self._listing() is not None:
            self.nft.transact([{"delete": {"table": {"family": FAMILY, "name": TABLE}}}])
        self._current = None

    # --------------------------------------------------------------------------------- revocation
    def _revoke(self, old: HostDesiredState | None, new: HostDesiredState) -> None:
        """Delete conntrack entries of affected vNICs that `new` would refuse at a hop still on this host,
        and those no local vNIC is part of any more (the vNIC left: DESIGN §8 step 5)."""
        self.last_revoked = []
        if not self.revoke or old == new:
            return
        new_by_addr = _by_address(new.vnics)
        old_by_addr = _by_address(old.vnics) if old is not None else {}
        affected = _affected_addresses(old, new)
        if not affected:
            return
        doomed = []
        for e in self.ct.list():
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

    # ------------------------------------------------------------------------------------ reports
    def counters(self) -> list[RuleCounters]:
        listing = self.nft.list_table(FAMILY, TABLE, terse=True) or []
        pk: Counter[int] = Counter()
        by: Counter[int] = Counter()
        for obj in listing:
            r = obj.get("rule")
            if not r or r.get("chain") in (STATE_CHAIN, REV_CHAIN) or not str(r.get("comment", "")).isdigit():
                continue
            rid = int(r["comment"])
            for ex in r.get("expr", []):
                c = ex.get("counter") if isinstance(ex, dict) else None
                if isinstance(c, dict):
                    pk[rid] += c.get("packets", 0)
                    by[rid] += c.get("bytes", 0)
        ids = sorted(set(pk) | set(by))
        return [RuleCounters(rule_id=i, packets=pk[i], bytes=by[i]) for i in ids]

    def connections(self, ifname: str | None = None) -> list[ConnEntry]:
        if ifname is None:
            return self.ct.list()
        state = self._current if self._current is not None else self.realized()
        vnic = state.vnic_map().get(ifname) if state is not None else None
        if vnic is None:
            return []
        return self.ct.matching(vnic.addresses)

    def export_connections(self, addresses: list[str]) -> list[ConnEntry]:
        return self.ct.matching(addresses)

    def import_connections(self, entries: list[ConnEntry]) -> int:
        return self.ct.import_entries(entries)

    def flush_connections(self, entries: list[ConnEntry]) -> int:
        return self.ct.delete(entries)


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


__all__ = ["NftBackend", "normalized"]
