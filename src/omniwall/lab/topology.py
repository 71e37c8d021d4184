"""Realize a `LabPlan` in the kernel: namespaces, veths, bridge, addresses, routes, namespace sysctls.

Routing model (DESIGN.md §9, the same as Calico's): a workload has /32 (/128) addresses and a default
route via 169.254.1.1 (fe80::1) on its vNIC. The host answers ARP for 169.254.1.1 because that address
sits on the host namespace's `lo` (proxy ARP is also on, for any other address a workload may ask
for) and answers NDP for fe80::1 because that is the host-side veth's link-local address. The host
routes each local workload's /32 to its vNIC interface and each remote workload's /32 via the remote
host's fabric address, so every packet between workloads is *forwarded* by the hosts it crosses — which
is where the nftables `forward` hook of each host enforces policy.

Everything happens inside the lab's own namespaces; nothing is created in, or changed in, the root one.
"""

from __future__ import annotations

import socket
from dataclasses import replace

from omniwall.lab import netns, vm
from omniwall.lab.netns import Netlink
from omniwall.lab.plan import (
    FABRIC_BRIDGE,
    FABRIC_IFNAME,
    FABRIC_NET,
    GATEWAY4,
    GATEWAY6,
    HostPlan,
    LabPlan,
    WorkloadPlan,
)

IFA_F_NODAD = 0x02  # addresses usable at once: no duplicate address detection in a lab
RT_SCOPE_LINK = 253
RULE_PRIORITY = 1000  # source rules for a workload's second and later vNICs
TABLE_BASE = 100

__all__ = ["build", "destroy", "host_routes_sync", "move_workload"]


def build(plan: LabPlan, *, ipv6: bool = True) -> None:
    """Create every namespace, link, address and route of `plan`. Raises on the first failure; the
    caller tears down (`destroy`) what was made, because namespaces are the unit of cleanup."""
    vm.preflight(plan)  # VM workloads: QEMU and the guest image are there
    with Netlink() as nl:
        _build_fabric(nl, plan)
        for h in plan.hosts:
            _build_host(nl, plan, h, ipv6=ipv6)
        for w in plan.workloads:
            _build_workload(nl, plan, w, ipv6=ipv6)
        for h in plan.hosts:
            _host_routes(nl, plan, h.name, ipv6=ipv6)
    vm.wait_guests(plan)  # VM workloads: booted, addresses up, responders listening


def destroy(plan: LabPlan | None, prefix: str) -> list[str]:
    """Delete the plan's namespaces and any other namespace whose name starts with `prefix` (a lab cut
    short before its plan was saved). Returns the names deleted. Idempotent."""
    vm.stop_guests(plan, prefix)  # VM workloads: QEMU killed by PID before its host namespace goes
    names = list(plan.namespaces()) if plan else []
    if prefix:
        names += [n for n in netns.list_names(prefix) if n not in names]
    deleted = []
    # Workloads first: deleting a namespace deletes its veth ends, and their peers with them.
    for name in reversed(names):
        if netns.delete(name):
            deleted.append(name)
    return deleted


def host_routes_sync(plan: LabPlan, host: str, *, ipv6: bool = True) -> None:
    """Make `host`'s routes to workload addresses match the plan (see `_host_routes`)."""
    with Netlink() as nl:
        _host_routes(nl, plan, host, ipv6=ipv6)


def move_workload(plan: LabPlan, workload: str, to_host: str, *, ipv6: bool = True) -> LabPlan:
    """Move a workload's vNICs to another host (the lab's part of a live migration, DESIGN.md §8):
    the old host's veths go (taking their routes with them), new ones come up on `to_host`, and every
    host's routes follow. The workload namespace, its processes and their sockets stay. Returns the
    new plan. Policy (the new host's desired state, conntrack entries) is the caller's business and
    should be in place on `to_host` *before* this is called."""
    w = plan.workload(workload)
    plan.host(to_host)  # raises for an unknown host
    if w.kind == "vm":
        raise ValueError(f"workload {w.key} is a VM: moving a lab guest between hosts is not supported yet")
    if w.host == to_host:
        return plan
    new_w = replace(w, host=to_host)
    new_plan = replace(plan, workloads=tuple(new_w if x.key == w.key else x for x in plan.workloads))
    old = plan.host(w.host)
    with Netlink() as nl:
        ipr = nl.ipr(old.netns)
        for v in w.vnics:
            found = ipr.link_lookup(ifname=v.host_ifname)
            if found:
                ipr.link("del", index=found[0])  # deletes the workload's end too
        for i in range(len(new_w.vnics)):
            _wire_vnic(nl, new_plan, new_w, i, ipv6=ipv6)
        for h in new_plan.hosts:
            _host_routes(nl, new_plan, h.name, ipv6=ipv6)
    return new_plan


# --------------------------------------------------------------------------------------------- pieces


def _build_fabric(nl: Netlink, plan: LabPlan) -> None:
    ns = plan.fabric_netns
    netns.create(ns)
    nl.ipr(ns).link("set", index=nl.index(ns, "lo"), state="up")
    nl.ipr(ns).link("add", ifname=FABRIC_BRIDGE, kind="bridge")
    nl.ipr(ns).link("set", index=nl.index(ns, FABRIC_BRIDGE), state="up")


def _build_host(nl: Netlink, plan: LabPlan, h: HostPlan, *, ipv6: bool) -> None:
    ns = h.netns
    netns.create(ns)
    values: dict[str, str | int] = {
        "net.ipv4.ip_forward": 1,
        # The firewall, not reverse-path filtering, decides about spoofed sources (anti-spoofing rules).
        "net.ipv4.conf.all.rp_filter": 0,
        "net.ipv4.conf.default.rp_filter": 0,
    }
    if ipv6:
        values |= {
            "net.ipv6.conf.all.forwarding": 1,
            "net.ipv6.conf.default.accept_dad": 0,
            "net.ipv6.conf.default.accept_ra": 0,
        }
    nl.sysctl(ns, values)
    ipr = nl.ipr(ns)
    lo = nl.index(ns, "lo")
    ipr.link("set", index=lo, state="up")
    # The gateway every local workload uses; on lo so one address serves all vNICs.
    ipr.addr("add", index=lo, address=GATEWAY4, prefixlen=32)
    nl.add_veth(ns, FABRIC_IFNAME, plan.fabric_netns, h.fabric_peer)
    fabric = plan.fabric_netns
    nl.ipr(fabric).link("set", index=nl.index(fabric, h.fabric_peer), master=nl.index(fabric, FABRIC_BRIDGE))
    fab = nl.index(ns, FABRIC_IFNAME)
    ipr.addr("add", index=fab, address=h.fabric_ip4, prefixlen=FABRIC_NET.prefixlen)
    if ipv6:
        ipr.addr("add", index=fab, address=h.fabric_ip6, prefixlen=64, flags=IFA_F_NODAD)


def _build_workload(nl: Netlink, plan: LabPlan, w: WorkloadPlan, *, ipv6: bool) -> None:
    if w.kind == "vm":  # a QEMU guest on a tap instead of a namespace on a veth (lab/vm.py)
        vm.build_guest(nl, plan, w, ipv6=ipv6)
        return
    netns.create(w.netns)
    values: dict[str, str | int] = {"net.ipv4.ping_group_range": "0 2147483647"}
    if ipv6:
        values |= {"net.ipv6.conf.default.accept_dad": 0, "net.ipv6.conf.all.accept_dad": 0}
    nl.sysctl(w.netns, values)
    nl.ipr(w.netns).link("set", index=nl.index(w.netns, "lo"), state="up")
    for i in range(len(w.vnics)):
        _wire_vnic(nl, plan, w, i, ipv6=ipv6)


def _wire_vnic(nl: Netlink, plan: LabPlan, w: WorkloadPlan, i: int, *, ipv6: bool) -> None:
    """veth between the workload and its host for vNIC `i`; addresses and routes on the workload side."""
    v = w.vnics[i]
    host = plan.host(w.host).netns
    nl.add_veth(host, v.host_ifname, w.netns, v.name, mac_b=v.mac)
    if ipv6:
        nl.ipr(host).addr(
            "add", index=nl.index(host, v.host_ifname), address=GATEWAY6, prefixlen=64, flags=IFA_F_NODAD
        )
    nl.sysctl(host, {f"net.ipv4.conf.{v.host_ifname}.proxy_arp": 1})
    ipr = nl.ipr(w.netns)
    idx = nl.index(w.netns, v.name)
    for ip in v.ips4:
        ipr.addr("add", index=idx, address=ip, prefixlen=32)
    for ip in v.ips6:
        ipr.addr("add", index=idx, address=ip, prefixlen=128, flags=IFA_F_NODAD)
    # First vNIC: the main table. Later ones: their own table, chosen by source address,
    # so replies leave through the vNIC the request came in on.
    table = 254 if i == 0 else TABLE_BASE + i
    if v.ips4 or i == 0:
        ipr.route("add", dst=f"{GATEWAY4}/32", oif=idx, scope=RT_SCOPE_LINK, table=table)
        ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY4, oif=idx, table=table)
    if ipv6 and (v.ips6 or i == 0):
        ipr.route("add", dst="::/0", gateway=GATEWAY6, oif=idx, family=socket.AF_INET6, table=table)
    if i > 0:
        for ip in v.ips4:
            ipr.rule("add", src=ip, src_len=32, table=table, priority=RULE_PRIORITY)
        for ip in v.ips6:
            ipr.rule("add", family=socket.AF_INET6, src=ip, src_len=128, table=table, priority=RULE_PRIORITY)


def _host_routes(nl: Netlink, plan: LabPlan, host: str, *, ipv6: bool) -> None:
    """`host`'s routes to every workload address: local ones to their vNIC interface, remote ones via
    their host's fabric address. `replace` also repoints a route whose workload moved."""
    h = plan.host(host)
    hosts = {x.name: x for x in plan.hosts}
    ipr = nl.ipr(h.netns)
    fab = nl.index(h.netns, FABRIC_IFNAME)
    for w in plan.workloads:
        local = w.host == host
        other = hosts[w.host]
        for v in w.vnics:
            oif = nl.index(h.netns, v.host_ifname) if local else fab
            for ip in v.ips4:
                if local:
                    ipr.route("replace", dst=f"{ip}/32", oif=oif, scope=RT_SCOPE_LINK)
                else:
                    ipr.route("replace", dst=f"{ip}/32", gateway=other.fabric_ip4, oif=oif)
            if not ipv6:
                continue
            for ip in v.ips6:
                if local:
                    ipr.route("replace", dst=f"{ip}/128", oif=oif, family=socket.AF_INET6)
                else:
                    ipr.route(
                        "replace", dst=f"{ip}/128", gateway=other.fabric_ip6, oif=oif, family=socket.AF_INET6
                    )
