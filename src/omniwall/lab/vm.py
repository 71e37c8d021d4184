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

import asyncio
import math
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from omniwall.lab import state as lab_state
from omniwall.lab.netns import Netlink
from omniwall.lab.plan import GATEWAY6, LabPlan, WorkloadPlan
from omniwall.lab.probe import Probe, ProbeResult, judge_reply
from omniwall.vm import channel, image, qemu

GATEWAY_MAC = "ee:ee:ee:ee:ee:ee"  # the hosts' side of every tap (like Calico's)
IFA_F_NODAD = 0x02
CHANNEL_SLACK = 30.0  # a deadline, not a wait: a starved guest (TCG on a loaded machine) answers late
PER_PROBE = 0.3  # ... and each probe starts processes in the guest
NO_ANSWER = channel.Result(-1, "")


def vm_dir() -> Path:
    return lab_state.STATE_DIR / "vm"


def rundir(name: str) -> Path:
    """A VM workload's run directory, by its `WorkloadPlan.netns` name."""
    return vm_dir() / name


def is_guest(name: str) -> bool:
    return (rundir(name) / "guest.json").is_file()


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


# ------------------------------------------------------------------------------------- inside a guest


def exec_in_guest(
    name: str, argv: Sequence[str], *, capture: bool = True, timeout: float | None = 30
) -> subprocess.CompletedProcess[str]:
    """`lab exec` for a VM: run argv in the guest's busybox shell; its output (stdout and stderr
    together) is returned as stdout, or printed when not captured."""
    res = channel.run(rundir(name) / "ctl.sock", shlex.join(argv), timeout=timeout or 30)
    if not capture:
        sys.stdout.write(res.output + ("\n" if res.output and not res.output.endswith("\n") else ""))
        sys.stdout.flush()
        return subprocess.CompletedProcess(list(argv), res.returncode, None, None)
    return subprocess.CompletedProcess(list(argv), res.returncode, res.output, "")


def run_probes_mixed(
    probes: Sequence[Probe],
    guests: set[str],
    timeout: float,
    run_netns: Callable[[Sequence[Probe]], list[ProbeResult]],
) -> list[ProbeResult]:
    """Probes from guests run inside them (one batch per guest), the others through `run_netns`, all at
    the same time; results in the order of `probes`."""

    async def both() -> list[list[ProbeResult]]:
        jobs = [asyncio.to_thread(run_netns, [p for p in probes if p.src_netns not in guests])]
        for g in sorted(guests):
            jobs.append(asyncio.to_thread(guest_batch, g, [p for p in probes if p.src_netns == g], timeout))
        return list(await asyncio.gather(*jobs))

    done = {id(r.probe): r for batch in asyncio.run(both()) for r in batch}
    return [done[id(p)] for p in probes]


def guest_batch(name: str, probes: list[Probe], timeout: float) -> list[ProbeResult]:
    """Run `probes` (all from guest `name`) inside it as one batch; results in their order."""
    script = batch_script(probes, timeout)
    budget = timeout + CHANNEL_SLACK + PER_PROBE * len(probes)
    res = channel.run(rundir(name) / "ctl.sock", script, timeout=budget)
    answers: dict[int, channel.Result] = {}
    for line in res.output.splitlines():
        parts = line.split(" ", 2)
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].lstrip("-").isdigit():
            answers[int(parts[0])] = channel.Result(int(parts[1]), parts[2] if len(parts) == 3 else "")
    out = []
    for i, p in enumerate(probes):
        allowed, detail = judge_guest(p, probe_command(p, timeout), answers.get(i, NO_ANSWER))
        out.append(ProbeResult(p, allowed, detail, 0.0))
    return out


def batch_script(probes: Sequence[Probe], timeout: float) -> str:
    """One guest script running every probe at once, printing `<index> <exit code> <output line>` per
    probe. Under TCG each process the guest starts costs ~40 ms, so a probe is one background command
    (one fork + exec: its exit code from `wait`, its output from a file read by the shell itself), and
    the batch one channel command. A watchdog kills probes that hang (denied)."""
    t = max(1, math.ceil(timeout))
    run = [i for i, p in enumerate(probes) if probe_command(p, timeout)]
    lines = [f"{probe_command(probes[i], timeout)} >/tmp/p{i} 2>&1 & p{i}=$!" for i in run]
    pids = " ".join(f"$p{i}" for i in run)
    lines.append(f"(sleep {t + 4}; kill {pids}) 2>/dev/null & wd=$!")  # probes wait t + 1
    for i in run:
        lines.append(f'wait $p{i}; r=$?; l=; read -r l </tmp/p{i}; echo "{i} $r $l"; rm -f /tmp/p{i}')
    lines.append("kill $wd 2>/dev/null; true")
    return "\n".join(lines)


def probe_command(p: Probe, timeout: float) -> str:
    """The busybox command that performs probe `p` inside a guest (empty: not possible there). One
    second more than the probe's timeout: a guest starting many processes at once is slow to send."""
    t = max(1, math.ceil(timeout)) + 1
    addr = shlex.quote(p.addr)
    if p.proto == "tcp":
        # The responder sends its line and closes at once; -w bounds the connect.
        return f"nc -w {t} {addr} {int(p.port or 0)} </dev/null"
    if p.proto in ("icmp", "icmpv6"):
        ping = "ping6" if ":" in p.addr else "ping"
        return f"{ping} -c 1 -W {t} {addr} >/dev/null"
    return ""


def judge_guest(p: Probe, script: str, r: channel.Result) -> tuple[bool, str]:
    if not script:
        return False, f"{p.proto} not available in the guest"
    if r.returncode == -1:
        return False, "timeout"  # no answer from the guest in time (exactly "timeout": not a refusal)
    if p.proto == "tcp":
        if r.output.startswith("omniwall-lab"):
            return judge_reply(p, r.output.encode())
        return False, "refused" if "refused" in r.output.lower() else "timeout"
    return (True, "ok") if r.returncode == 0 else (False, "timeout")


__all__ = [
    "GATEWAY_MAC",
    "batch_script",
    "build_guest",
    "describe",
    "exec_in_guest",
    "guest_batch",
    "is_guest",
    "preflight",
    "probe_command",
    "run_probes_mixed",
    "rundir",
    "stop_guests",
    "wait_guests",
]
