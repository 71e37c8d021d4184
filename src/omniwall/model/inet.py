"""The one strict grammar for addresses and networks, shared by the schema, the manager and the agent.

Python's `ipaddress` accepts IPv6 zone ids (`fe80::1%eth0`) since 3.9; nftables does not (it tries to
resolve the text as a host name and the whole ruleset fails to load), and a zone names an interface of one
machine, which means nothing in a policy evaluated on many. So a zone id is an error here, with a reason.
"""

from __future__ import annotations

import ipaddress
import socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _refuse_zone(text: str) -> None:
    if "%" in text:
        raise ValueError(f"{text!r}: IPv6 zone ids ('%' and an interface) are not allowed in addresses")


def parse_ip(text: str) -> IPAddress:
    """A host address, strictly: no zone id, no surrounding space. Raises ValueError with the reason."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not an address (a string like 10.0.0.1 or 2001:db8::1)")
    _refuse_zone(text)
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 or IPv6 address") from None


def parse_network(text: str) -> IPNetwork:
    """A network (host bits may be set: `10.1.2.3/8` means 10.0.0.0/8), strictly: no zone id."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a network (a string like 10.0.0.0/8)")
    _refuse_zone(text)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a CIDR like 10.0.0.0/8") from None


def is_ip(text: str) -> bool:
    try:
        parse_ip(text)
    except ValueError:
        return False
    return True


def is_network(text: str) -> bool:
    try:
        parse_network(text)
    except ValueError:
        return False
    return True


def looks_like_address(text: str) -> bool:
    """True for anything Python would take for an address or network, zone ids included: such a peer is
    meant as an address (and refused with a reason when not strict), never looked up as a group name."""
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def kernel_address_ok(text: str) -> bool:
    """What nftables will take as an address literal, checked as it checks it (`inet_pton`, in C: ~1 µs
    where `ipaddress` costs several): the agent's last line of defence over sets of 100k elements."""
    family = socket.AF_INET6 if ":" in text else socket.AF_INET
    try:
        socket.inet_pton(family, text)
    except (OSError, TypeError, ValueError):
        return False
    return True


def kernel_network_ok(text: str) -> bool:
    addr, sep, plen = text.partition("/")
    if not sep or not plen.isdigit() or not kernel_address_ok(addr):
        return False
    return int(plen) <= (128 if ":" in addr else 32)


__all__ = [
    "IPAddress",
    "IPNetwork",
    "is_ip",
    "is_network",
    "kernel_address_ok",
    "kernel_network_ok",
    "looks_like_address",
    "parse_ip",
    "parse_network",
]
