"""VM workloads in the lab (`lab: {kind: vm, servers: [tcp/80]}`): a QEMU guest instead of a namespace.

A VM workload's vNIC is a tap in its host's namespace, wired exactly like a namespace workload's veth
(lab/topology.py): the same host interface name (the IR's vNIC name, matching the host's
`vnicInterfaces`), a /32 (/128) route, proxy ARP, fe80::1 for IPv6 neighbours, and the gateway MAC
`GATEWAY_MAC` on every host, so a guest's cached gateway entry stays right when it moves host. QEMU runs
inside the host namespace (vm/qemu.py), its run directory is `<lab state dir>/vm/<workload netns name>`.

The rest of the lab reaches a guest by the workload's `netns` name, which for a VM names no namespace
but its run directory (`is_guest`): probes from a VM run inside the guest over its command channel
(`run_probes_mixed`, called by lab/probe.py), `lab exec` runs there too (`exec_in_guest`, called by
lab/netns.py), and the guest starts its own responders (lab/responder.py skips it). Probes *to* a VM
are ordinary packets. Guest responders serve TCP (busybox `nc`) and ICMP (the guest's kernel); UDP
servers are refused when the lab is planned (busybox-static has no UDP server), and UDP probes from a
guest report "denied (udp not available in the guest)".

Live migration (`migrate_guest`, called by lab/migrate.py `move_vnics` for a VM workload, from `lab
migrate` or the lab's hypervisor process): the destination QEMU with `-incoming` in the destination
host's namespace, the migration over the fabric (vm/migrate.py), routes switched on its RESUME, the
source QEMU stopped by PID; the guest's run directory becomes a symlink to the destination QEMU's
(`<name>.m<N>/`). A failure before the RESUME leaves the guest running on its source.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import zlib
from dataclasses import asdict, replace
from pathlib import Path

from pyroute2 import NetlinkError

from omniwall.lab.errors import LabError
from omniwall.lab.guest import rundir, vm_dir
from omniwall.lab.netns import Netlink
from omniwall.lab.plan import FABRIC_IFNAME, GATEWAY6, LabPlan, WorkloadPlan
from omniwall.vm import image, qemu
from omniwall.vm import migrate as vm_migrate

log = logging.getLogger(__name__)

GATEWAY_MAC = "ee:ee:ee:ee:ee:ee"  # the hosts' side of every tap (like Calico's)
IFA_F_NODAD = 0x02
NUD_REACHABLE = 0x02
RT_SCOPE_LINK = 253
AF6 = socket.AF_INET6
INCOMING_PORTS = (40000, 10000)  # a guest's migration port on the destination: base + crc32(key) % span


class GuestMigrationError(LabError):
    """A VM's live migration failed before the destination ran the guest: it still runs on its source,
    the destination's QEMU and tap are gone."""


# ------------------------------------------------------------------------------------- lifecycle


def preflight(plan: LabPlan) -> None:
    """Before anything is built: a lab with VM workloads needs QEMU and the guest image."""
    if not any(w.kind == "vm" for w in plan.workloads):
        return
    if shutil.which(qemu.QEMU) is None:
        raise qemu.VmError(
            f"{qemu.QEMU} not found: VM workloads need the qemu-system-x86 package (make install)"
        )
    image.load()


def build_guest(nl: Netlink, plan: LabPlan, w: WorkloadPlan, *, ipv6: bool) -> None:
    """The tap in `w`'s host namespace, wired like a veth, and QEMU attached to it (not yet booted:
    `wait_guests`)."""
    img = image.load()
    host = plan.host(w.host).netns
    v = w.vnics[0]  # plan_lab allows one vNIC per VM
    _make_tap(nl, host, v.host_ifname, ipv6=ipv6)
    spec = qemu.GuestSpec(
        name=w.key,
        tap=v.host_ifname,
        mac=v.mac or qemu.guest_mac(w.key),
        ips4=v.ips4,
        ips6=v.ips6 if ipv6 else (),
        servers=w.servers,
    )
    qemu.start(spec, img, rundir(w.netns), netns=host)


def _make_tap(nl: Netlink, host: str, ifname: str, *, ipv6: bool) -> int:
    """A persistent tap in `host` wired like a veth's host end (gateway MAC, proxy ARP, fe80::1, up);
    one already there (a retried migration) is reused."""
    ipr = nl.ipr(host)
    if not ipr.link_lookup(ifname=ifname):
        ipr.link("add", ifname=ifname, kind="tuntap", mode="tap")
    idx = nl.index(host, ifname)
    ipr.link("set", index=idx, address=GATEWAY_MAC, state="up")
    if ipv6:
        ipr.addr("replace", index=idx, address=GATEWAY6, prefixlen=64, flags=IFA_F_NODAD)
    nl.sysctl(host, {f"net.ipv4.conf.{ifname}.proxy_arp": 1})
    return idx


def wait_guests(plan: LabPlan) -> None:
    dirs = [rundir(w.netns) for w in plan.workloads if w.kind == "vm"]
    if dirs:
        qemu.wait_ready(dirs)


def stop_guests(plan: LabPlan | None, prefix: str) -> list[int]:
    """Kill the lab's guests by PID (also ones never recorded: found by their run directory under the
    lab's prefix) and remove their run directories. Returns the PIDs that ran."""
    dirs = [rundir(w.netns) for w in plan.workloads if w.kind == "vm"] if plan else []
    if prefix:
        dirs += [d for _, d in qemu.find(str(vm_dir() / prefix)) if d not in dirs]
        if vm_dir().is_dir():
            dirs += [d for d in vm_dir().glob(f"{prefix}*") if d not in dirs]
    # A migrated guest's run directory is a symlink to the destination QEMU's (`migrate_guest`).
    real = list({d.resolve(): None for d in dirs})
    pids = qemu.stop_many(real)
    for d in dirs + real:
        if d.is_symlink():
            d.unlink(missing_ok=True)
        else:
            shutil.rmtree(d, ignore_errors=True)
    return pids


# ------------------------------------------------------------------------------- live migration


def migrate_guest(plan: LabPlan, workload: str, to_host: str, *, ipv6: bool = True) -> LabPlan:
    """The lab's hypervisor part of a VM's live migration: a real QEMU migration to `to_host`.

    The destination's policy must be in place before (the manager's `prepare`..`import`). Here: the tap
    on the destination (same name and MAC, unrouted: nothing reaches it yet), the guest's neighbour
    entry there (what QEMU's self-announce, RARP frames, does not teach a host), the destination QEMU
    with `-incoming` inside the destination host's namespace, the migration over the fabric (vm/migrate.py),
    every host's routes to the guest switched on the destination's RESUME (destination first), then
    the source QEMU stopped by PID and its tap deleted. The guest's run directory becomes a symlink to
    the destination QEMU's. Returns the new plan.

    Raises GuestMigrationError when it fails before the destination resumed the guest: the guest then
    still runs on the source (checked), and the destination's QEMU, run directory and tap are gone."""
    w = plan.workload(workload)
    if w.kind != "vm":
        raise LabError(f"{w.key} is not a VM workload")
    if w.host == to_host:
        return plan
    src, dst = plan.host(w.host), plan.host(to_host)
    v = w.vnics[0]
    canonical = rundir(w.netns)
    src_dir = canonical.resolve()
    if qemu.pid_of(src_dir) is None:
        raise GuestMigrationError(f"{w.key}: no running QEMU in {src_dir}")
    spec = qemu.GuestSpec(**{**json.loads((src_dir / "guest.json").read_text()), "extra": ()})
    spec = replace(spec, ips4=tuple(spec.ips4), ips6=tuple(spec.ips6), servers=tuple(spec.servers))
    port = INCOMING_PORTS[0] + zlib.crc32(w.key.encode()) % INCOMING_PORTS[1]
    uri = f"tcp:{dst.fabric_ip4}:{port}"
    dst_dir = _next_rundir(w.netns)
    new_plan = replace(
        plan, workloads=tuple(replace(x, host=to_host) if x.key == w.key else x for x in plan.workloads)
    )
    with Netlink() as nl:
        # Slow things first (a netlink socket per namespace, indexes): the switch is netlink calls only.
        fabric = {h.name: nl.index(h.netns, FABRIC_IFNAME) for h in plan.hosts}
        for h in plan.hosts:
            nl.ipr(h.netns)
        resumed, routed = False, 0.0
        try:
            idx = _make_tap(nl, dst.netns, v.host_ifname, ipv6=ipv6)
            dipr = nl.ipr(dst.netns)
            for ip in v.ips4:
                dipr.neigh("replace", dst=ip, lladdr=spec.mac, ifindex=idx, state=NUD_REACHABLE)
            for ip in v.ips6 if ipv6 else ():
                dipr.neigh(
                    "replace",
                    dst=ip,
                    lladdr=spec.mac,
                    ifindex=idx,
                    state=NUD_REACHABLE,
                    family=socket.AF_INET6,
                )
            incoming = replace(spec, extra=("-incoming", uri))
            qemu.start(incoming, image.load(), dst_dir, netns=dst.netns)

            def switch_routes() -> None:
                nonlocal resumed, routed
                resumed = True
                _route_guest(nl, plan, w, to_host, idx, fabric, ipv6=ipv6)
                routed = time.monotonic()

            timing = vm_migrate.run(src_dir / "qmp.sock", dst_dir / "qmp.sock", uri, on_resume=switch_routes)
        except (qemu.VmError, vm_migrate.MigrationError, NetlinkError, OSError) as e:
            if resumed:  # the guest runs on the destination: finish there whatever failed late
                log.warning("%s: late error after the destination resumed the guest: %s", w.key, e)
            else:
                _undo_destination(nl, dst.netns, v.host_ifname, dst_dir)
                state = _source_state(src_dir)
                raise GuestMigrationError(
                    f"live migration of {w.key} to {to_host} failed: {e}; the guest still runs on "
                    f"{src.name} ({state})"
                ) from None
        else:
            log.info(
                "%s: migrated to %s (paused %.0f ms, QEMU downtime %s ms, total %.0f ms)",
                w.key, to_host, timing.paused_ms, timing.downtime_ms, timing.completed * 1000,
            )  # fmt: skip
            # For benchmarks and `lab status`: what this migration took, from whichever process ran it.
            (dst_dir / "migration.json").write_text(
                json.dumps(
                    {
                        "from": src.name,
                        "to": to_host,
                        **asdict(timing),
                        "pausedMs": round(timing.paused_ms, 1),
                        "routedMs": round((routed - timing.started) * 1000, 1),
                    }
                )
            )
        # The source: QEMU (now idle in `postmigrate`) by PID, its tap (and the tap's routes) with it.
        qemu.stop_many([src_dir])
        sipr = nl.ipr(src.netns)
        for i in sipr.link_lookup(ifname=v.host_ifname):
            sipr.link("del", index=i)
    _point_rundir(canonical, src_dir, dst_dir)
    return new_plan


def _route_guest(
    nl: Netlink, plan: LabPlan, w: WorkloadPlan, to_host: str, idx: int, fabric: dict[str, int], *, ipv6: bool
) -> None:
    """Every host's routes to `w`'s addresses point at `to_host`: the destination first (its tap), the
    source last (until then it still delivers to the paused guest's tap, whose packets QEMU drops)."""
    v = w.vnics[0]
    dst = plan.host(to_host)
    order = [to_host] + [h.name for h in plan.hosts if h.name not in (to_host, w.host)] + [w.host]
    for name in order:
        ipr = nl.ipr(plan.host(name).netns)
        for ip in v.ips4:
            if name == to_host:
                ipr.route("replace", dst=f"{ip}/32", oif=idx, scope=RT_SCOPE_LINK)
            else:
                ipr.route("replace", dst=f"{ip}/32", gateway=dst.fabric_ip4, oif=fabric[name])
        for ip in v.ips6 if ipv6 else ():
            if name == to_host:
                ipr.route("replace", dst=f"{ip}/128", oif=idx, family=socket.AF_INET6)
            else:
                ipr.route(
                    "replace",
                    dst=f"{ip}/128",
                    gateway=dst.fabric_ip6,
                    oif=fabric[name],
                    family=socket.AF_INET6,
                )


def _next_rundir(netns: str) -> Path:
    n = 1
    while (vm_dir() / f"{netns}.m{n}").exists():
        n += 1
    return vm_dir() / f"{netns}.m{n}"


def _point_rundir(canonical: Path, old: Path, new: Path) -> None:
    """Make the guest's run directory (its lab name) the destination QEMU's, then drop the source's."""
    if canonical.is_symlink():
        tmp = canonical.with_name(f".{canonical.name}.lnk")
        tmp.unlink(missing_ok=True)
        os.symlink(new.name, tmp)
        os.replace(tmp, canonical)
    else:  # the first migration: the source ran in the canonical directory itself
        shutil.rmtree(canonical, ignore_errors=True)
        os.symlink(new.name, canonical)
    if old != canonical:
        shutil.rmtree(old, ignore_errors=True)


def _undo_destination(nl: Netlink, host: str, ifname: str, dst_dir: Path) -> None:
    qemu.stop_many([dst_dir])
    shutil.rmtree(dst_dir, ignore_errors=True)
    ipr = nl.ipr(host)
    for i in ipr.link_lookup(ifname=ifname):
        ipr.link("del", index=i)


def _source_state(src_dir: Path) -> str:
    try:
        return f"QEMU {vm_migrate.ensure_running(src_dir / 'qmp.sock')}"
    except Exception as e:  # a report, not a decision
        return f"state unknown: {e}"


def describe(name: str) -> str:
    """For `lab status`: the guest's QEMU PID and console log."""
    d = rundir(name)
    pid = qemu.pid_of(d)
    return f"VM, qemu pid {pid} (running), console {d / 'serial.log'}" if pid else f"VM in {d} (NOT RUNNING)"


__all__ = [
    "GATEWAY_MAC",
    "GuestMigrationError",
    "build_guest",
    "describe",
    "migrate_guest",
    "preflight",
    "stop_guests",
    "wait_guests",
]
