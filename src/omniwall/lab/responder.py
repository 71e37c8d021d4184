"""Responders: tiny servers inside workload namespaces, one process per workload, for `lab.servers`.

TCP: accept, send one line naming the workload (`omniwall-lab tenant/web-1 tcp/80`), close.
UDP: answer every datagram with `omniwall-lab tenant/web-1 udp/53 <the request>`.
ICMP echo needs no responder (the workload's kernel answers); `icmp` entries are accepted and skipped.

The process is started with `start_new_session` (it outlives a CLI `lab up`), enters its namespace with
`setns()` before opening any socket, binds each of the workload's addresses explicitly (so UDP replies
leave from the address that was asked), prints `ready` once every socket is bound and then serves
until killed. Teardown kills it by PID, after checking that the PID still runs *this* module in *that*
namespace — a recycled PID is never killed.

Run as `python -m omniwall.lab.responder --netns NS --workload T/N --addr IP ... tcp/80 udp/53`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

MODULE = "omniwall.lab.responder"
SERVER_RE = re.compile(r"^(tcp|udp)/(\d+)(?:-(\d+))?$|^(icmp|icmpv6)$")
MAX_PORTS_PER_ENTRY = 64
READY_TIMEOUT = 10.0
CLONE_NEWNET = 0x40000000


class ResponderError(RuntimeError):
    pass


def parse_server(entry: str) -> list[tuple[str, int]]:
    """`tcp/80` -> [("tcp", 80)]; `udp/5000-5002` -> three; `icmp` -> [] (the kernel answers)."""
    m = SERVER_RE.match(entry.strip())
    if not m:
        raise ResponderError(f"{entry!r} is not like tcp/80, udp/53, tcp/8000-8003 or icmp")
    if m.group(4):
        return []
    proto, lo = m.group(1), int(m.group(2))
    hi = int(m.group(3)) if m.group(3) else lo
    if not 1 <= lo <= hi <= 65535:
        raise ResponderError(f"{entry!r}: ports must be within 1..65535, low to high")
    if hi - lo + 1 > MAX_PORTS_PER_ENTRY:
        raise ResponderError(f"{entry!r}: at most {MAX_PORTS_PER_ENTRY} ports per range")
    return [(proto, p) for p in range(lo, hi + 1)]


def reply_line(workload: str, proto: str, port: int) -> bytes:
    return f"omniwall-lab {workload} {proto}/{port}".encode()


# ------------------------------------------------------------------------------------- parent side


@dataclass(frozen=True, slots=True)
class ResponderSpec:
    netns: str
    workload: str  # tenant/name
    addresses: tuple[str, ...]
    servers: tuple[str, ...]


_children: dict[int, subprocess.Popen[bytes]] = {}  # started by this process: reaped on stop


def start_many(specs: Sequence[ResponderSpec], started: dict[str, int] | None = None) -> dict[str, int]:
    """Start one responder per spec (in parallel) and wait until each has bound its sockets.

    Returns {workload: pid} for every process started. Each PID also goes into `started` the moment
    its process exists, so a caller interrupted here (Ctrl-C, a failing responder: the others keep
    running) still knows what to kill."""
    started = {} if started is None else started
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for s in specs:
        if not s.addresses or not any(parse_server(e) for e in s.servers) or _is_guest(s.netns):
            continue
        argv = [sys.executable, "-m", MODULE, "--netns", s.netns, "--workload", s.workload]
        for a in s.addresses:
            argv += ["--addr", a]
        argv += ["--", *s.servers]
        p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # survives the CLI process and its Ctrl-C
            close_fds=True,
        )
        _children[p.pid] = p
        procs[s.workload] = p
        started[s.workload] = p.pid
    errors = _await_ready(procs)
    if errors:
        failed = "; ".join(f"{k}: {e}" for k, e in sorted(errors.items()))
        raise ResponderError(f"responders failed: {failed}")
    return {k: p.pid for k, p in procs.items()}


def _is_guest(netns: str) -> bool:
    """A VM workload's guest starts its own responders (lab/vm.py)."""
    from omniwall.lab import vm

    return vm.is_guest(netns)


def _await_ready(procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, str]:
    deadline = time.monotonic() + READY_TIMEOUT
    pending = {p.stdout.fileno(): (k, p) for k, p in procs.items() if p.stdout}
    buffers: dict[int, bytes] = dict.fromkeys(pending, b"")
    errors: dict[str, str] = {}
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            for k, _ in pending.values():
                errors[k] = "not ready in time"
            break
        ready, _, _ = select.select(list(pending), [], [], left)
        for fd in ready:
            chunk = os.read(fd, 4096)
            buffers[fd] += chunk
            if chunk and b"\n" not in buffers[fd]:
                continue
            k, p = pending.pop(fd)
            line = buffers[fd].decode(errors="replace").strip()
            if line != "ready":
                errors[k] = line or f"exited with {p.poll()}"
    for p in procs.values():
        if p.stdout:
            p.stdout.close()
    return errors


def is_ours(pid: int, netns: str | None = None) -> bool:
    """Does `pid` run this module (in namespace `netns`, when given)? Guards against recycled PIDs."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    if MODULE.encode() not in argv:
        return False
    return netns is None or netns.encode() in argv


def find(netns_prefix: str) -> list[tuple[int, str]]:
    """Responders running in namespaces whose name starts with `netns_prefix` (a lab's prefix): the ones
    a lab started but never recorded (cut short between start and saving the state file)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if MODULE in argv and "--netns" in argv:
            i = argv.index("--netns")
            if i + 1 < len(argv) and argv[i + 1].startswith(netns_prefix):
                found.append((int(entry), argv[i + 1]))
    return found


def stop(pid: int, netns: str | None = None, *, timeout: float = 2.0) -> bool:
    """Terminate a responder by PID (only if it is ours). Returns whether it was running."""
    return bool(stop_many([(pid, netns)], timeout=timeout))


def stop_many(targets: Sequence[tuple[int, str | None]], *, timeout: float = 2.0) -> list[int]:
    """SIGTERM every responder of `targets` [(pid, netns)] that is ours, wait for all of them together,
    SIGKILL the ones still running after `timeout`. Returns the PIDs that were running."""
    running = []
    for pid, netns in targets:
        if not is_ours(pid, netns):
            _children.pop(pid, None)
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        running.append(pid)
    deadline = time.monotonic() + timeout
    left = list(running)
    while left and time.monotonic() < deadline:
        left = [pid for pid in left if not _gone(pid)]
        if left:
            time.sleep(0.01)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in running:
        child = _children.pop(pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=timeout)
    return running


def _gone(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        return child.poll() is not None  # our child: reap it
    return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ------------------------------------------------------------------------------------- server side


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, line: bytes) -> None:
        self.line = line
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(self.line + b" " + data[:200], addr)


async def _serve(workload: str, addresses: list[str], servers: list[str]) -> None:
    loop = asyncio.get_running_loop()
    keep: list[object] = []
    for entry in servers:
        for proto, port in parse_server(entry):
            line = reply_line(workload, proto, port)
            for addr in addresses:
                if proto == "tcp":

                    async def handle(
                        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes = line
                    ) -> None:
                        with contextlib.suppress(OSError):
                            writer.write(line + b"\n")
                            await writer.drain()
                            writer.close()
                            await writer.wait_closed()

                    keep.append(await asyncio.start_server(handle, host=addr, port=port, reuse_address=True))
                else:
                    transport, _ = await loop.create_datagram_endpoint(
                        lambda line=line: _Udp(line), local_addr=(addr, port)
                    )
                    keep.append(transport)
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the parent stops reading after `ready`
    stop_event = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_event.set)
    await stop_event.wait()


def _enter(netns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join("/run/netns", netns), os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
    finally:
        os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=MODULE)
    ap.add_argument("--netns", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--addr", action="append", default=[])
    ap.add_argument("servers", nargs="*")
    args = ap.parse_args(argv)
    try:
        _enter(args.netns)
        asyncio.run(_serve(args.workload, args.addr, args.servers))
    except Exception as e:  # report to the parent on the ready line, then exit
        print(f"error: {e}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
