"""Run a guest: one QEMU (TCG) process per guest, daemonized inside a host's network namespace.

Each guest has a run directory holding everything needed to find and control it later, from any
process (a later `lab down`, live migration, the libvirt hook):
    pid           QEMU's PID file (`-pidfile`)
    qmp.sock      QMP (vm/qmp.py)
    ctl.sock      the guest's command channel on its second serial port (vm/channel.py)
    serial.log    the guest's console (first serial port)
    guest.json    the GuestSpec it was started with
The tap the guest's NIC uses must exist before (created and configured by the caller: its name, MAC and
routes are the host's business); QEMU only attaches to it (`script=no`).

A guest is stopped by PID, only after checking that the PID still runs QEMU with *this* run directory
on its command line (a recycled PID is never hit). QEMU runs with `-daemonize`: nobody reads its
console, which would otherwise block it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omniwall.vm.image import GuestImage

QEMU = "qemu-system-x86_64"
DEFAULT_MEMORY_MB = 192
READY_MARK = b"omniwall-guest ready"
BOOT_TIMEOUT = 240.0  # TCG on a busy 2-core machine: ~2 s idle, 10-30 s under load, 80 s at load 80
STOP_GRACE = 3.0
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes


class VmError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class GuestSpec:
    name: str  # the workload, tenant/name: the guest's responders answer with it
    tap: str  # host-side interface the guest's NIC attaches to
    mac: str  # the guest's NIC
    ips4: tuple[str, ...] = ()
    ips6: tuple[str, ...] = ()
    servers: tuple[str, ...] = ()  # tcp/80, tcp/8000-8003, icmp
    memory_mb: int = DEFAULT_MEMORY_MB
    extra: tuple[str, ...] = field(default=())  # more QEMU arguments (e.g. -incoming for migration)


def guest_mac(key: str) -> str:
    """A stable locally administered MAC for a guest without one (QEMU's 52:54:00 prefix)."""
    d = hashlib.sha1(key.encode()).digest()
    return f"52:54:00:{d[0]:02x}:{d[1]:02x}:{d[2]:02x}"


def kernel_cmdline(spec: GuestSpec) -> str:
    parts = ["console=ttyS0", "panic=-1", "quiet", f"ow.name={spec.name}"]
    if spec.ips4:
        parts.append("ow.ip4=" + ",".join(spec.ips4))
    if spec.ips6:
        parts.append("ow.ip6=" + ",".join(spec.ips6))
    if spec.servers:
        parts.append("ow.srv=" + ",".join(spec.servers))
    return " ".join(parts)


def qemu_argv(spec: GuestSpec, image: GuestImage, rundir: Path) -> list[str]:
    return [
        QEMU,
        "-name", spec.name.replace("/", "."),
        "-accel", "tcg",
        "-m", str(spec.memory_mb),
        "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", kernel_cmdline(spec),
        "-chardev", f"socket,id=ctl,path={rundir / 'ctl.sock'},server=on,wait=off",
        "-serial", f"file:{rundir / 'serial.log'}",
        "-serial", "chardev:ctl",
        "-netdev", f"tap,id=n0,ifname={spec.tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=n0,mac={spec.mac}",
        "-qmp", f"unix:{rundir / 'qmp.sock'},server=on,wait=off",
        "-pidfile", str(rundir / "pid"),
        "-daemonize",
        *spec.extra,
    ]  # fmt: skip


def start(spec: GuestSpec, image: GuestImage, rundir: Path, *, netns: str | None = None) -> int:
    """Start the guest (QEMU in `netns`, where its tap is); returns QEMU's PID once it daemonized.
    Does not wait for the guest to boot (`wait_ready`)."""
    if len(str(rundir / "ctl.sock")) > MAX_SOCKET_PATH:
        raise VmError(f"run directory {rundir} is too long for a unix socket path")
    rundir.mkdir(parents=True, exist_ok=False)
    (rundir / "guest.json").write_text(json.dumps(asdict(spec)))
    argv = qemu_argv(spec, image, rundir)
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise VmError(f"QEMU for {spec.name} did not start: {res.stderr.strip() or f'exit {res.returncode}'}")
    pid = pid_of(rundir)
    if pid is None:
        raise VmError(f"QEMU for {spec.name} started but left no PID file in {rundir}")
    return pid


def pid_of(rundir: Path) -> int | None:
    """QEMU's PID if it still runs with this run directory, else None."""
    try:
        pid = int((rundir / "pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if is_ours(pid, rundir) else None


def is_ours(pid: int, rundir: Path) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    mark = str(rundir).encode()
    return state != "Z" and any(mark in a for a in argv) and any(a.endswith(QEMU.encode()) for a in argv)


def find(rundir_prefix: str) -> list[tuple[int, Path]]:
    """Running QEMUs whose PID file lies under a run directory starting with `rundir_prefix` (a lab's
    guests it never recorded, e.g. after being cut short)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(QEMU) or "-pidfile" not in argv:
            continue
        i = argv.index("-pidfile")
        if i + 1 < len(argv) and argv[i + 1].startswith(rundir_prefix):
            found.append((int(entry), Path(argv[i + 1]).parent))
    return found


def stop_many(rundirs: Sequence[Path], *, grace: float = STOP_GRACE) -> list[int]:
    """SIGTERM every guest of `rundirs` that runs, SIGKILL those still there after `grace`. Returns the
    PIDs that were running. QEMU is not our child (it daemonized), so "gone" is read from /proc."""
    running = []
    for d in rundirs:
        pid = pid_of(d)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            running.append((pid, d))
    deadline = time.monotonic() + grace
    left = list(running)
    while left and time.monotonic() < deadline:
        left = [(p, d) for p, d in left if is_ours(p, d)]
        if left:
            time.sleep(0.05)
    for pid, d in left:
        if is_ours(pid, d):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return [p for p, _ in running]


def wait_ready(rundirs: Sequence[Path], *, timeout: float = BOOT_TIMEOUT) -> None:
    """Wait until every guest has written its ready line on its console. Raises VmError naming the
    guests that died or did not boot in time (with the end of their console log)."""
    deadline = time.monotonic() + timeout
    pending = list(rundirs)
    while pending:
        still = []
        for d in pending:
            if READY_MARK in _read(d / "serial.log"):
                continue
            if pid_of(d) is None:
                raise VmError(f"guest {d.name} died while booting: {_tail(d)}")
            still.append(d)
        pending = still
        if not pending:
            return
        if time.monotonic() > deadline:
            raise VmError(f"guests not booted in {timeout:.0f} s: {', '.join(d.name for d in pending)}")
        time.sleep(0.1)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _tail(rundir: Path) -> str:
    text = _read(rundir / "serial.log").decode(errors="replace").strip().splitlines()
    return " | ".join(text[-5:]) or "(empty console)"


__all__ = [
    "GuestSpec",
    "VmError",
    "find",
    "guest_mac",
    "is_ours",
    "kernel_cmdline",
    "pid_of",
    "qemu_argv",
    "start",
    "stop_many",
    "wait_ready",
]
