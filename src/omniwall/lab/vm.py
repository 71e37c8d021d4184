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
"""

from __future__ import annotations

import shutil

from omniwall.lab.guest import rundir, vm_dir
from omniwall.lab.netns import Netlink
from omniwall.lab.plan import GATEWAY6, LabPlan, WorkloadPlan
from omniwall.vm import image, qemu

GATEWAY_MAC = "ee:ee:ee:ee:ee:ee"  # the hosts' side of every tap (like Calico's)
IFA_F_NODAD = 0x02


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
    ipr = nl.ipr(host)
    ipr.link("add", ifname=v.host_ifname, kind="tuntap", mode="tap")
    idx = nl.index(host, v.host_ifname)
    ipr.link("set", index=idx, address=GATEWAY_MAC, state="up")
    if ipv6:
        ipr.addr("add", index=idx, address=GATEWAY6, prefixlen=64, flags=IFA_F_NODAD)
    nl.sysctl(host, {f"net.ipv4.conf.{v.host_ifname}.proxy_arp": 1})
    spec = qemu.GuestSpec(
        name=w.key,
        tap=v.host_ifname,
        mac=v.mac or qemu.guest_mac(w.key),
        ips4=v.ips4,
        ips6=v.ips6 if ipv6 else (),
        servers=w.servers,
    )
    qemu.start(spec, img, rundir(w.netns), netns=host)


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
    pids = qemu.stop_many(dirs)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    return pids


def describe(name: str) -> str:
    """For `lab status`: the guest's QEMU PID and console log."""
    d = rundir(name)
    pid = qemu.pid_of(d)
    return f"VM, qemu pid {pid} (running), console {d / 'serial.log'}" if pid else f"VM in {d} (NOT RUNNING)"


__all__ = ["GATEWAY_MAC", "build_guest", "describe", "preflight", "stop_guests", "wait_guests"]
