"""What Linux conntrack does with a tracked packet that matches no existing entry.

The forward chain of every host starts with `ct state established,related accept` and
`ct state invalid drop` (DESIGN §6). A tracked packet without an entry is either `new` (judged by the
rules; an entry is created if it is delivered) or `invalid` (dropped before any rule). Which one depends
only on the protocol and, for TCP and ICMP, on the packet kind — these are the kernel's rules
(net/netfilter/nf_conntrack_proto_{tcp,icmp,icmpv6}.c):

- TCP: a SYN starts a connection. A SYN-ACK with no entry is invalid ("sNO -> sIV": too late).
- UDP and other protocols: any packet starts a connection.
- ICMP: only echo (8), timestamp (13), info (15) and address-mask (17) requests start one. Errors (3, 4, 5,
  11, 12) are `related` to the connection they quote or else invalid; every other type is invalid.
- ICMPv6: only echo request (128) and node-information query (139) start one. Neighbour discovery and
  MLD (130-137, 143) are never tracked (the kernel marks them untracked itself), so rules always judge
  them. Everything else (errors 1-4 with nothing to relate to, replies) is invalid.

The sim has no related-error model: an ICMP error it judges is one that quotes no known connection.
"""

from __future__ import annotations

from omniwall.sim.packet import Packet

ICMP_NEW_TYPES = frozenset({8, 13, 15, 17})
ICMPV6_NEW_TYPES = frozenset({128, 139})
ICMPV6_NEVER_TRACKED = frozenset({130, 131, 132, 133, 134, 135, 136, 137, 143})


def kernel_untracked(packet: Packet) -> bool:
    """True for packets conntrack never tracks on its own (ICMPv6 neighbour discovery and MLD)."""
    return packet.protocol == "icmpv6" and packet.icmp_type in ICMPV6_NEVER_TRACKED


def starts_connection(packet: Packet, *, reply: bool = False) -> bool:
    """May this packet, tracked and matching no entry, create one? False means `ct state invalid`.

    `reply=True` means the packet is the answer of a request/response exchange (a TCP SYN-ACK rather
    than a SYN); for UDP and ICMP the packet itself already says everything.
    """
    proto = packet.protocol
    if proto == "tcp":
        return not reply
    if proto == "icmp":
        return packet.icmp_type in ICMP_NEW_TYPES
    if proto == "icmpv6":
        return packet.icmp_type in ICMPV6_NEW_TYPES
    return True


__all__ = ["kernel_untracked", "starts_connection"]
