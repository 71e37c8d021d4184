"""The container's routed veth, the same shape as the lab's (lab/topology.py) and a VM's tap:
- host side `ow<10 hex>` (derived from the container id and interface: matches the host's default
  `vnicInterfaces` `ow*`, so the agent drops its traffic until the container's rules are realized),
  proxy ARP on, a /32 route to it;
- container side CNI_IFNAME with the /32, a link route to 169.254.1.1 and the default route via it,
  and a permanent neighbour entry for 169.254.1.1 with the host side's MAC (the host need not own the
  gateway address, as Calico does it).
The plugin runs in the host's network namespace; the container's is entered by its path (CNI_NETNS)
on the calling thread for the few calls made there. `host_netns` (the network config's `hostNetns`,
for labs whose "hosts" are namespaces) enters a named namespace the same way for the host side, while
the process (and its HTTP to the manager) stays where it runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
from collections.abc import Iterator

from pyroute2 import IPRoute

GATEWAY4 = "169.254.1.1"
CLONE_NEWNET = 0x40000000
RT_SCOPE_LINK = 253
NUD_PERMANENT = 0x80


class NetError(RuntimeError):
    pass


def host_ifname(container_id: str, ifname: str) -> str:
    return "ow" + hashlib.sha1(f"cni/{container_id}/{ifname}".encode()).hexdigest()[:10]


@contextlib.contextmanager
def in_netns_path(path: str) -> Iterator[None]:
    """The calling thread inside the network namespace at `path`, and back."""
    libc = ctypes.CDLL(None, use_errno=True)
    back = os.open(f"/proc/self/task/{ctypes.CDLL(None).gettid()}/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
    except OSError as e:
        os.close(back)
        raise NetError(f"network namespace {path}: {e.strerror}") from None
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise NetError(f"setns {path}: {os.strerror(ctypes.get_errno())}")
        yield
    finally:
        libc.setns(back, CLONE_NEWNET)
        os.close(target)
        os.close(back)


def enter_netns(path: str) -> None:
    """The calling thread (for the plugin: the whole single-threaded process) moves to `path`."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise NetError(f"network namespace {path}: {e.strerror}") from None
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise NetError(f"setns {path}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def _sysctl(key: str, value: str) -> None:
    with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
        f.write(value)


def _host(host_netns: str | None) -> contextlib.AbstractContextManager[None]:
    """`host_netns`: a namespace name (/run/netns/<name>) or a path (the plugin's own handle)."""
    if not host_netns:
        return contextlib.nullcontext()
    return in_netns_path(host_netns if host_netns.startswith("/") else f"/run/netns/{host_netns}")


def add(netns: str, ifname: str, host_if: str, ip: str, host_netns: str | None = None) -> tuple[str, str]:
    """Create and wire the veth; returns (host side MAC, container side MAC)."""
    fd = os.open(netns, os.O_RDONLY)
    try:
        with _host(host_netns), IPRoute() as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": ifname, "net_ns_fd": fd})
            idx = ipr.link_lookup(ifname=host_if)[0]
            ipr.link("set", index=idx, state="up")
            host_mac = ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS")
            _sysctl(f"net.ipv4.conf.{host_if}.proxy_arp", "1")
            ipr.route("replace", dst=f"{ip}/32", oif=idx, scope=RT_SCOPE_LINK)
    finally:
        os.close(fd)
    with in_netns_path(netns), IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")
        if lo:
            ipr.link("set", index=lo[0], state="up")
        idx = ipr.link_lookup(ifname=ifname)[0]
        ipr.link("set", index=idx, state="up")
        ipr.addr("add", index=idx, address=ip, prefixlen=32)
        ipr.neigh("replace", dst=GATEWAY4, lladdr=host_mac, ifindex=idx, state=NUD_PERMANENT)
        ipr.route("add", dst=f"{GATEWAY4}/32", oif=idx, scope=RT_SCOPE_LINK)
        ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY4, oif=idx)
        mac = ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS")
    return host_mac, mac


def delete(host_if: str, host_netns: str | None = None) -> bool:
    """Delete the host side (the container side goes with it). Idempotent."""
    with _host(host_netns), IPRoute() as ipr:
        found = ipr.link_lookup(ifname=host_if)
        if not found:
            return False
        ipr.link("del", index=found[0])
        return True


def check(netns: str, ifname: str, host_if: str, ip: str, host_netns: str | None = None) -> None:
    """Raise NetError unless the veth, its address and its routes are as ADD left them."""
    with _host(host_netns), IPRoute() as ipr:
        found = ipr.link_lookup(ifname=host_if)
        if not found:
            raise NetError(f"host interface {host_if} is missing")
        routes = ipr.route("get", dst=ip)
        if not routes or routes[0].get_attr("RTA_OIF") != found[0]:
            raise NetError(f"the host's route to {ip} does not go to {host_if}")
    with in_netns_path(netns), IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise NetError(f"container interface {ifname} is missing")
        addrs = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx[0])}
        if ip not in addrs:
            raise NetError(f"container interface {ifname} lacks {ip}")
