"""Address sets: the content of a group's IRSet, or of a rule side's union of peers.

An `AddrSet` keeps a reference count per address (a group may reach one address through several
workloads or CIDRs; a union through several groups), the networks (non-host CIDRs) apart, and its last
materialised `IRSet`. While an IRSet exists, the addresses whose presence flipped are remembered, so the
next IRSet is patched (bisect on the sorted tuple) instead of re-sorted, and the SetUpdate for the hosts
carries exact added/removed elements. Listeners (unions containing a group) receive presence flips.
"""

from __future__ import annotations

import hashlib
import ipaddress
from bisect import bisect_left
from collections.abc import Iterable
from sys import intern

from omniwall.compiler.ir import IRSet, SetUpdate

# Set names are interned: every rule naming a set, every host's set counts and the set memo then hold
# one string object per name, so their dict lookups and sorts match by identity, not by comparing the
# bytes of two copies (a host's ~1,000 set names, looked up in dicts of ~200k names, at 1M workloads).


def group_set_name(tenant: str, name: str) -> str:
    """`g.<tenant>.<group>`; names may contain dots, so a tenant with a dot (where `g.a.b.c` would be
    ambiguous) gets `g.<hash>` instead: one dot, never equal to a two-dot name."""
    if "." in tenant:
        return intern("g." + hashlib.blake2b(f"{tenant}/{name}".encode(), digest_size=8).hexdigest())
    return intern(f"g.{tenant}.{name}")


def union_set_name(tokens: Iterable[str]) -> str:
    """`u.<hash>` of the sorted, resolved peer tokens (`g:tenant/name`, `a:10.0.0.0/8`)."""
    text = "\n".join(sorted(set(tokens)))
    return intern("u." + hashlib.blake2b(text.encode(), digest_size=8).hexdigest())


def split_literal(net: str) -> tuple[str | None, str | None]:
    """A CIDR or address -> (host address, None) for /32 and /128, else (None, network)."""
    n = ipaddress.ip_network(net, strict=False)
    if n.prefixlen == n.max_prefixlen:
        return str(n.network_address), None
    return None, str(n)


class AddrSet:
    __slots__ = ("counts", "dirty", "irset", "listeners", "name", "nets", "registry", "touched")

    def __init__(self, name: str, registry: dict[str, AddrSet]) -> None:
        self.name = name
        self.counts: dict[str, int] = {}
        self.nets: tuple[str, ...] = ()
        self.irset: IRSet | None = None
        self.touched: set[str] = set()
        self.dirty = False  # the IRSet is stale (touched addresses, or nets changed)
        self.listeners: list[AddrSet] = []
        self.registry = registry  # sets with a stale IRSet, flushed once per update

    def _mark(self) -> None:
        if self.irset is not None and not self.dirty:
            self.dirty = True
            self.registry[self.name] = self

    def inc(self, addr: str) -> None:
        c = self.counts.get(addr, 0)
        self.counts[addr] = c + 1
        if c == 0:
            if self.irset is not None:
                self.touched.add(addr)
                self._mark()
            for lst in self.listeners:
                lst.inc(addr)

    def dec(self, addr: str) -> None:
        c = self.counts[addr]
        if c == 1:
            del self.counts[addr]
            if self.irset is not None:
                self.touched.add(addr)
                self._mark()
            for lst in self.listeners:
                lst.dec(addr)
        else:
            self.counts[addr] = c - 1

    def set_nets(self, nets: Iterable[str]) -> None:
        nets = tuple(sorted(set(nets)))
        if nets != self.nets:
            self.nets = nets
            self._mark()

    def current(self) -> IRSet:
        """The IRSet for the current content (cached)."""
        if self.irset is None:
            self.irset = IRSet(self.name, tuple(sorted(self.counts)), self.nets)
        elif self.dirty:
            self.flush()
        return self.irset

    def flush(self) -> SetUpdate | None:
        """Bring the IRSet up to date; the change as a SetUpdate against the previous IRSet, if any."""
        old = self.irset
        self.dirty = False
        touched, self.touched = self.touched, set()
        if old is None:
            return None
        addrs = old.addresses
        added = tuple(sorted(a for a in touched if a in self.counts))
        removed = tuple(sorted(a for a in touched if a not in self.counts and _contains(addrs, a)))
        added = tuple(a for a in added if not _contains(addrs, a))
        if len(added) + len(removed) > 64:
            new_addrs = tuple(sorted(self.counts))
        elif added or removed:
            lst = list(addrs)
            for a in removed:
                del lst[bisect_left(lst, a)]
            for a in added:
                lst.insert(bisect_left(lst, a), a)
            new_addrs = tuple(lst)
        else:
            new_addrs = addrs
        if not added and not removed and self.nets == old.cidrs:
            return None
        new = IRSet(self.name, new_addrs, self.nets)
        self.irset = new
        oc, nc = set(old.cidrs), set(new.cidrs)
        return SetUpdate(
            name=self.name,
            result=new,
            added_addresses=added,
            removed_addresses=removed,
            added_cidrs=tuple(sorted(nc - oc)),
            removed_cidrs=tuple(sorted(oc - nc)),
        )


def _contains(sorted_tuple: tuple[str, ...], a: str) -> bool:
    i = bisect_left(sorted_tuple, a)
    return i < len(sorted_tuple) and sorted_tuple[i] == a


def created_update(s: IRSet) -> SetUpdate:
    return SetUpdate(s.name, s.addresses, added_cidrs=s.cidrs, created=True, result=s)
