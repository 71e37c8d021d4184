"""Kernel object names in `table inet omniwall`, derived deterministically from ifnames and set names.

A name that is not a plain identifier, or too long, is sanitized and suffixed with a hash of the
original (never silently truncated, so two different inputs never collide).
"""

from __future__ import annotations

import functools
import hashlib
import re

FAMILY = "inet"
TABLE = "omniwall"
MAX_NAME = 64  # the kernel allows 255; short names keep listings readable

# base chains
RAW_CHAIN = "raw_pre"  # prerouting, priority -300: anti-spoofing + notrack for stateless rules
FWD_CHAIN = "fwd"  # forward, priority 0: conntrack shortcut + per-vNIC dispatch
# bookkeeping chains (no hook, never jumped to)
STATE_CHAIN = "_state"  # the realized IR's header (host, version), compressed, in rule comments
STATE_BUCKETS = 64  # its rules, vNICs and set structures, hashed into this many chains `_state_<k>`
# the realized revision: the byte limit of quota object `_rev` (never referenced by a rule, so it limits
# nothing). A quota, not a rule or set: it is updatable in place by one small message in the same raw
# batch as set elements (a rule would make the kernel re-validate every chain of the table at commit)
REV_OBJ = "_rev"
REV_CHAIN = REV_OBJ  # older name, kept for importers; the revision is no longer a chain
# workload interfaces the agent knows (every vNIC's ifname): an interface matching a workload prefix
# but not in here is dropped (fail closed on unknown vNICs)
KNOWN_IF = "known_if"
# dispatch maps
MAP_EGRESS = "m_egress"  # iifname : jump e_<if>
MAP_INGRESS = "m_ingress"  # oifname : jump i_<if>
MAP_RAW_EGRESS = "m_raw_egress"  # iifname : jump re_<if>
MAP_RAW_INGRESS4 = "m_raw_ingress4"  # ip daddr : jump ri_<if>  (the vNIC's own addresses)
MAP_RAW_INGRESS6 = "m_raw_ingress6"  # ip6 daddr : jump ri_<if>

# the hop index (identity.py): ipcache maps (remote address -> goto identity chain), per direction and
# family, host addresses (hash) and CIDR networks (interval); and ifname -> goto the vNIC's any-remote chain
IPCACHE = {
    (d, fam, nets): f"ipc{'n' if nets else ''}_{d[0]}{fam}"
    for d in ("egress", "ingress")
    for fam in (4, 6)
    for nets in (False, True)
}
MAP_ANY = {"egress": "m_any_egress", "ingress": "m_any_ingress"}
# one shared lookup chain per direction and family (the ipcache maps, then MAP_ANY): every hop's
# `<hop>_x4`/`_x6` goes there, so the kernel's commit-time loop check walks each ipcache map once
# instead of once per hop (render_index.py)
IPCACHE_CHAIN = {(d, fam): f"ipx_{d[0]}{fam}" for d in ("egress", "ingress") for fam in (4, 6)}

_PLAIN = re.compile(r"[A-Za-z0-9_]+")


def state_chain(bucket: int) -> str:
    return f"{STATE_CHAIN}_{bucket:02d}"


@functools.lru_cache(maxsize=65536)  # pure; a full render asks for the same names tens of thousands of times
def safe(name: str, maxlen: int = MAX_NAME - 8) -> str:
    if _PLAIN.fullmatch(name) and len(name) <= maxlen:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", name)[: maxlen - 11]
    return f"{cleaned}_{digest}"


def vnic_chain(direction: str, ifname: str, segment: int | str = 0) -> str:
    """Entry chain (segment 0) `e_<if>`/`i_<if>`, later category segments `e_<if>_1`..., tail `e_<if>_d`."""
    prefix = "e" if direction == "egress" else "i"
    base = f"{prefix}_{safe(ifname)}"
    return base if segment == 0 else f"{base}_{segment}"


def identity_chain(direction: str, tag: str) -> str:
    return f"x{direction[0]}_{tag}"


def identity_map(direction: str, tag: str, kind: str) -> str:
    """One identity's maps over every hop that names it, all `-> goto <path chain>`: kind "h" =
    `ifname . l4proto . dport` for one-port intervals (hash), "r" = the same for wider intervals
    (interval map), "f" = `ifname . l4proto` for the hop's most common path (hash)."""
    return f"mx{kind}{direction[0]}_{tag}"


def path_chain(digest: str) -> str:
    return f"px_{digest}"


def raw_chain(direction: str, ifname: str) -> str:
    return f"{'re' if direction == 'egress' else 'ri'}_{safe(ifname)}"


def connlimit_counter(ifname: str) -> str:
    """Named counter of the new connections a vNIC's connection limits dropped (docs/conntrack-limits.md)."""
    return f"cl_{safe(ifname)}"


def addr_set(setname: str, family: int) -> str:
    """Hash set of host addresses (ipv4_addr / ipv6_addr)."""
    return f"a{family}_{safe(setname)}"


def cidr_set(setname: str, family: int) -> str:
    """Interval set of networks, only present when the IR set has networks of that family."""
    return f"c{family}_{safe(setname)}"


def port_set(ranges: str) -> str:
    """Named interval set of ports (inet_service) shared by every rule with the same port list; the
    name is a digest of the merged list, so equal lists share one set and a changed list is a new set."""
    return f"p_{hashlib.sha256(ranges.encode()).hexdigest()[:16]}"


__all__ = [
    "FAMILY",
    "FWD_CHAIN",
    "IPCACHE",
    "IPCACHE_CHAIN",
    "KNOWN_IF",
    "MAP_ANY",
    "MAP_EGRESS",
    "MAP_INGRESS",
    "MAP_RAW_EGRESS",
    "MAP_RAW_INGRESS4",
    "MAP_RAW_INGRESS6",
    "RAW_CHAIN",
    "REV_CHAIN",
    "REV_OBJ",
    "STATE_BUCKETS",
    "STATE_CHAIN",
    "TABLE",
    "addr_set",
    "cidr_set",
    "connlimit_counter",
    "identity_chain",
    "identity_map",
    "path_chain",
    "port_set",
    "raw_chain",
    "safe",
    "state_chain",
    "vnic_chain",
]
