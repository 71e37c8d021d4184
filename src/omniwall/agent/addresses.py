"""Which IPs sit behind which vNIC, as the hypervisor's routing table says, watched over netlink.

The workload's own addresses live in the workload's namespace (or VM), invisible from the host. What the
host does see, and what decides where packets go, is its routes: in the routed lab (and with routed
tap/veth setups in general) each workload IP is a host route `<ip>/32 dev <vnic>` (`/128` for IPv6) in
the host's main table. So the agent watches RTM_NEWROUTE/RTM_DELROUTE (and link changes, which renumber
ifindexes) in the host namespace and reports `{ifname: [ips]}` for the vNICs of its desired state. The
manager updates the workload, the compiler changes set elements everywhere: an IP change needs no policy
edit.

A vNIC with no host route is left out of the report rather than sent as `[]`: between the creation of a
veth and its route, or while a workload migrates away, an empty list would strip the workload of its
addresses in the whole cluster.

pyroute2 (a dependency already) speaks rtnetlink; its AsyncIPRoute plugs into the agent's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("omniwall.agent")

Addresses = dict[str, list[str]]
MAIN_TABLE = 254
RTN_UNICAST = 1
NETLINK_ROUTE = 0
RELEVANT_EVENTS = frozenset({"RTM_NEWROUTE", "RTM_DELROUTE", "RTM_NEWLINK", "RTM_DELLINK"})


def host_routes_by_ifname(links: Iterable[Any], routes: Iterable[Any], vnics: Iterable[str]) -> Addresses:
    """Pure: from rtnetlink link and route messages, the host-route IPs per watched vNIC (sorted; vNICs
    without any left out)."""
    watched = set(vnics)
    names = {link["index"]: link.get("ifname") for link in links}
    found: dict[str, set[str]] = {}
    for r in routes:
        ifname = names.get(r.get("oif"))
        if ifname not in watched:
            continue
        if r.get("table") != MAIN_TABLE or r.get("type") != RTN_UNICAST:
            continue
        dst = r.get("dst")
        if not dst:
            continue
        try:
            ip = ipaddress.ip_address(dst)
        except ValueError:
            continue
        if r.get("dst_len") != ip.max_prefixlen or ip.is_link_local or ip.is_multicast:
            continue
        found.setdefault(ifname, set()).add(str(ip))
    return {name: sorted(ips, key=_ip_order) for name, ips in sorted(found.items())}


def _ip_order(text: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(text)
    return ip.version, int(ip)  # IPv4 first; addresses of two versions do not compare


def open_rtnetlink(netns: str | None) -> int:
    """A NETLINK_ROUTE socket in `netns` (a socket stays in the namespace it was created in); the caller
    owns the returned fd.

    Not pyroute2's own `netns=`: that forks a helper and later SIGTERMs it, and a forked child shares the
    asyncio signal wake-up fd with its parent, so the helper's SIGTERM can land in the agent's loop and
    stop the agent. `setns()` on a short-lived worker thread does the same without a process."""
    from omniwall.dataplane.netns import in_netns

    with in_netns(netns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)  # asyncio wants DGRAM
    return sock.detach()


class AddressWatcher:
    """Calls `on_change(addresses)` at start and whenever the host routes of the watched vNICs change."""

    def __init__(
        self,
        vnics: Callable[[], Iterable[str]],
        on_change: Callable[[Addresses], None],
        netns: str | None = None,
        debounce: float = 0.2,
        rescan_interval: float = 60.0,
    ) -> None:
        self.vnics = vnics
        self.on_change = on_change
        self.netns = netns
        self.debounce = debounce
        self.rescan_interval = rescan_interval  # a safety net for lost netlink messages (ENOBUFS)
        self.last: Addresses | None = None
        self._poke = asyncio.Event()

    def poke(self) -> None:
        """The set of vNICs changed (new desired state): rescan."""
        self._poke.set()

    async def run(self) -> None:
        from pyroute2 import AsyncIPRoute  # imported here: unit tests of the pure part need no netlink

        events_fd = await asyncio.to_thread(open_rtnetlink, self.netns)
        dumps_fd = await asyncio.to_thread(open_rtnetlink, self.netns)
        async with AsyncIPRoute(fileno=events_fd) as events, AsyncIPRoute(fileno=dumps_fd) as dumps:
            await events.bind()
            reader = asyncio.create_task(self._read_events(events))
            try:
                while True:
                    await self._scan(dumps)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._poke.wait(), timeout=self.rescan_interval)
                    await asyncio.sleep(self.debounce)  # a burst of route changes makes one report
                    self._poke.clear()
            finally:
                reader.cancel()

    async def _read_events(self, ipr: Any) -> None:
        while True:
            async for msg in ipr.get():
                if msg.get("event") in RELEVANT_EVENTS:
                    self._poke.set()

    async def _scan(self, ipr: Any) -> None:
        links = [link async for link in await ipr.get_links()]
        routes = [r async for r in await ipr.get_routes(family=2)]
        routes += [r async for r in await ipr.get_routes(family=10)]
        current = host_routes_by_ifname(links, routes, self.vnics())
        if current != self.last:
            self.last = current
            log.info("vNIC addresses: %s", current)
            self.on_change(current)


__all__ = ["AddressWatcher", "host_routes_by_ifname"]
