"""Live migration in the lab (docs/design/migration.md): the lab plays the hypervisor.

`move_vnics` is the hypervisor's part: the *host end* of each of the workload's veths moves into the
destination host's namespace (`ip link set X netns D`), keeping its ifname and MAC; the workload's end,
its addresses, routes, neighbours and sockets are never touched (the workload sees a carrier blip).
On the destination the link gets what the lab gives every vNIC (proxy ARP, fe80::1, up); then every
host's /32 and /128 routes follow: the destination first, the source last. Just before the move the
source gets a fallback route via the destination (higher metric), so packets that still reach it are
forwarded on instead of dropped for want of a route.

`switch_vnics` is that move done once per lab, whoever asks: under the lab's state-file lock it moves
the vNICs unless the state file says they are there already, and records the new plan. Two callers:
the lab's hypervisor process (lab/hypervisor.py), when the manager orders the switch of a migration
anyone started (`omniwall migrate`), and `migrate` below.

`migrate` drives a whole migration of a managed lab through the manager's API: start it, wait until
the destination enforces the workload's policy and holds its conntrack entries (phase `switching`),
move the vNIC (if the hypervisor has not yet), say `switched`, wait for the end. A lab without a control
plane falls back to `Lab.move` (standalone policy programmed host by host, no conntrack carried).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from omniwall.client import ClientError
from omniwall.lab import state as lab_state
from omniwall.lab import vm
from omniwall.lab.inputs import catalog_from_dump, dump_catalog
from omniwall.lab.lab import Lab, LabError, _with_host
from omniwall.lab.netns import Netlink
from omniwall.lab.plan import FABRIC_IFNAME, GATEWAY4, GATEWAY6, LabPlan
from omniwall.lab.topology import IFA_F_NODAD, _host_routes

POLL = 0.01
NUD_REACHABLE, NUD_PERMANENT = 0x02, 0x80
BEFORE_SWITCH = ("prepare", "export", "import")  # the phases of a migration before the vNIC may move
FALLBACK = 4096  # metric of the source's temporary route to the moving workload via the destination


def move_vnics(plan: LabPlan, workload: str, to_host: str, *, ipv6: bool = True) -> LabPlan:
    """Move `workload`'s vNICs (host ends) to `to_host` and repoint every host's routes; returns the
    new plan. The destination's policy must be in place before (that is the migration's job)."""
    w = plan.workload(workload)
    if w.kind == "vm":  # a QEMU guest: a real live migration of the VM (lab/vm.py)
        return vm.migrate_guest(plan, w.key, to_host, ipv6=ipv6)
    dst = plan.host(to_host)
    if w.host == to_host:
        return plan
    src = plan.host(w.host)
    new_plan = replace(
        plan, workloads=tuple(replace(x, host=to_host) if x.key == w.key else x for x in plan.workloads)
    )
    with Netlink() as nl:
        # Everything slow first (a thread and a netlink socket per namespace, interface indexes), so
        # the blackout (link gone from the source .. routes everywhere repointed) is only netlink calls.
        fabric = {h.name: nl.index(h.netns, FABRIC_IFNAME) for h in plan.hosts}
        links = {v.host_ifname: nl.index(src.netns, v.host_ifname) for v in w.vnics}
        # The source's route to the workload leaves with the link: a fallback via the destination
        # (higher metric) takes over at once instead of "no route".
        fallbacks = [(f"{ip}/32", dst.fabric_ip4, socket.AF_INET) for v in w.vnics for ip in v.ips4]
        if ipv6:
            fallbacks += [(f"{ip}/128", dst.fabric_ip6, socket.AF_INET6) for v in w.vnics for ip in v.ips6]
        sipr, dipr = nl.ipr(src.netns), nl.ipr(dst.netns)
        # The link loses carrier while it moves, and a carrier loss flushes the workload's neighbour
        # cache: a packet sent then makes it ARP for the gateway into a dead link, and the next try is
        # 1 s later (measured: 1-2 s stalls). A VM keeps its neighbours across a migration; pin the
        # gateway to the MAC that moves with the link.
        wmacs: dict[str, str] = {}
        for v in w.vnics:
            mac = sipr.get_links(links[v.host_ifname])[0].get_attr("IFLA_ADDRESS")
            wipr, widx = nl.ipr(w.netns), nl.index(w.netns, v.name)
            wmacs[v.host_ifname] = wipr.get_links(widx)[0].get_attr("IFLA_ADDRESS")
            wipr.neigh("replace", dst=GATEWAY4, lladdr=mac, ifindex=widx, state=NUD_PERMANENT)
            if ipv6:
                wipr.neigh(
                    "replace",
                    dst=GATEWAY6,
                    lladdr=mac,
                    ifindex=widx,
                    state=NUD_PERMANENT,
                    family=socket.AF_INET6,
                )
        for prefix, gw, family in fallbacks:
            sipr.route(
                "replace", dst=prefix, gateway=gw, oif=fabric[src.name], family=family, priority=FALLBACK
            )
        for ifname, index in links.items():
            sipr.link("set", index=index, net_ns_fd=dst.netns)
            idx = nl.index(dst.netns, ifname)
            nl.sysctl(dst.netns, {f"net.ipv4.conf.{ifname}.proxy_arp": 1})
            if ipv6:
                dipr.addr("add", index=idx, address=GATEWAY6, prefixlen=64, flags=IFA_F_NODAD)
            dipr.link("set", index=idx, state="up")
            # What a migrated VM announces (QEMU's self-announce): its MAC. Without it the destination
            # ARPs for the workload while the workload's end of the veth may still be inactive (its
            # qdisc comes back when the kernel's linkwatch worker runs; slow on a loaded machine)
            # and retries only 1 s later (measured: 0.4-1 s stalls after some moves).
            v = next(x for x in w.vnics if x.host_ifname == ifname)
            for ip in v.ips4:
                dipr.neigh("replace", dst=ip, lladdr=wmacs[ifname], ifindex=idx, state=NUD_REACHABLE)
            for ip in v.ips6 if ipv6 else ():
                dipr.neigh(
                    "replace",
                    dst=ip,
                    lladdr=wmacs[ifname],
                    ifindex=idx,
                    state=NUD_REACHABLE,
                    family=socket.AF_INET6,
                )
        order = [to_host] + [h.name for h in new_plan.hosts if h.name not in (to_host, src.name)] + [src.name]
        for h in order:
            _host_routes(nl, new_plan, h, ipv6=ipv6)
        for prefix, gw, family in fallbacks:
            sipr.route("del", dst=prefix, gateway=gw, oif=fabric[src.name], family=family, priority=FALLBACK)
    return new_plan


class StaleSwitch(LabError):
    """The migration that asked for this move no longer waits for it: nothing was moved."""


def switch_vnics(
    name: str, workload: str, to_host: str, *, waiting: Callable[[], bool] | None = None
) -> bool:
    """Lab `name`'s hypervisor act: move `workload`'s vNICs to `to_host` and record it in the state file,
    unless they are there already. Safe to call from several processes. Returns whether it moved.

    `waiting` is asked under the lock, just before a move: whether the migration that orders it still
    waits in `switching`. An order seen late (the audit stream replays, a lagging follower) must not
    move a vNIC that later migrations have moved on since: that would put it on a host whose
    policy no longer holds it (StaleSwitch instead)."""
    with lab_state.locked(name):
        st = lab_state.load(name)
        if st.plan is None:
            raise LabError(f"lab {name!r} has no plan")
        w = st.plan.workload(workload)
        st.plan.host(to_host)
        if w.host == to_host:
            return False
        if waiting is not None and not waiting():
            raise StaleSwitch(f"{workload}: its migration to {to_host} no longer waits in switching")
        st.plan = move_vnics(st.plan, w.key, to_host, ipv6=st.ipv6)
        st.resources = dump_catalog(_with_host(catalog_from_dump(st.resources), w.tenant, w.name, to_host))
        lab_state.save(st)
        return True


def waits_for_vnic(rec: Any, mid: str) -> bool:
    """Whether the migration record `rec` (the workload's current one) is `mid`, waiting for its vNIC."""
    return bool(rec["id"] == mid and rec["result"] == "running" and rec["phase"] == "switching")


def migrate(
    lab: Lab,
    workload: str,
    to_host: str,
    *,
    switch_timeout: float = 60.0,
    timeout: float = 120.0,
    on_phase: Callable[[str], None] | None = None,
    api_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Migrate `workload` to `to_host` with its vNIC; returns the migration record (raises LabError
    when it failed: then nothing moved and the workload is still protected on its host)."""
    w = lab.plan.workload(workload)
    lab.plan.host(to_host)
    if w.host == to_host:
        raise LabError(f"{w.key} already runs on {to_host}")
    if lab.state.policy != "managed":
        if w.kind == "vm":  # a guest moves with QEMU's migration, driven by the manager's phases
            raise LabError(f"{w.key} is a VM: live migration of a VM needs a managed lab (lab up --managed)")
        t0 = time.monotonic()
        lab.move(w.key, to_host)
        return {"result": "succeeded", "mode": lab.state.policy, "ms": round((time.monotonic() - t0) * 1000)}
    from omniwall.lab.control import ControlPlane

    cp = ControlPlane(lab.prefix)
    try:
        api = cp.api_client()
        rec = api.migrate(w.key, to_host, switch_timeout=switch_timeout, **(api_options or {}))
        mid = rec["id"]
        seen: set[str] = set()

        def poll(until: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
            deadline = time.monotonic() + timeout
            while True:
                r = dict(api.migration(w.key))
                for p in r.get("phases", []):
                    if on_phase is not None and p["phase"] not in seen:
                        on_phase(p["phase"])
                    seen.add(p["phase"])
                if r["id"] != mid or until(r):
                    return r
                if time.monotonic() > deadline:
                    raise LabError(f"migration {mid} still in phase {r['phase']} after {timeout:g} s")
                time.sleep(POLL)

        rec = poll(lambda r: r["phase"] not in BEFORE_SWITCH or r["result"] != "running")
        if "switching" not in seen:  # it rolls back (or has): nothing moved
            rec = poll(lambda r: r["result"] != "running")
            raise LabError(f"migration {mid} failed before the move: {rec.get('error')}")
        if rec["result"] == "running" and rec["phase"] == "switching":
            # unless the lab's hypervisor was first; never for a migration that has rolled back since
            switch_vnics(lab.name, w.key, to_host, waiting=lambda: waits_for_vnic(api.migration(w.key), mid))
            api.switched(w.key, mid)
        rec = poll(lambda r: r["result"] != "running")
        if rec["result"] != "succeeded":
            raise LabError(f"migration {mid} ended {rec['result']}: {rec.get('error')}")
        return rec
    except ClientError as e:
        raise LabError(f"migration of {w.key}: {'; '.join(line.strip() for line in e.lines())}") from e
    finally:
        cp.close()
        lab.reload()


__all__ = ["StaleSwitch", "migrate", "move_vnics", "switch_vnics", "waits_for_vnic"]
