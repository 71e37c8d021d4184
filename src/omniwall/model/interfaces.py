"""Which host interfaces a workload's vNIC may be attached to.

A vNIC's host interface gets the anti-spoofing rule (`saddr != <its addresses> drop`) and the workload's
chains. Attached to the host's own `lo`, `eth0` or bridge, that rule would cut the hypervisor and every
tenant on it off the network. So only interfaces matching the provider's patterns for that Host may be
named (`Host.spec.vnicInterfaces`, shell-style globs), checked by the manager when a Workload is written
AND by the agent before it attaches anything (its own `--vnic-interfaces`): defence in depth.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from fnmatch import fnmatchcase

# tap*: QEMU/KVM; vnet*: libvirt; ow*: interfaces Omniwall names itself (derived names, the lab, CNI).
DEFAULT_VNIC_INTERFACES: tuple[str, ...] = ("ow*", "tap*", "vnet*")
# Never a vNIC, whatever a pattern says: the host's own loopback.
RESERVED_IFNAMES = frozenset({"lo"})
IFNAME_RE = re.compile(r"[A-Za-z0-9._-]{1,15}")
PATTERN_RE = re.compile(r"[A-Za-z0-9._\-*?\[\]]{1,15}")


def check_pattern(pattern: str) -> str:
    """A glob a Host may declare: interface-name characters plus `*`, `?`, `[...]`; not everything."""
    if not isinstance(pattern, str) or not PATTERN_RE.fullmatch(pattern):
        raise ValueError(
            f"{pattern!r} is not an interface pattern (1-15 characters: letters, digits, '.', '_', '-', "
            "and the globs '*', '?', '[...]')"
        )
    if pattern.strip("*?") == "":
        raise ValueError(f"{pattern!r} matches every interface, the host's own included; name a prefix")
    return pattern


def interface_allowed(ifname: str, patterns: Iterable[str]) -> bool:
    if ifname in RESERVED_IFNAMES or not IFNAME_RE.fullmatch(ifname):
        return False
    return any(fnmatchcase(ifname, p) for p in patterns)


__all__ = [
    "DEFAULT_VNIC_INTERFACES",
    "IFNAME_RE",
    "RESERVED_IFNAMES",
    "check_pattern",
    "interface_allowed",
]
