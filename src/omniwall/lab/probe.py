"""Probes: real TCP, UDP and ICMP exchanges sent from inside a workload's namespace.

No process per probe: a socket belongs to the network namespace it was *created* in, whatever thread
later uses it. So one thread per source namespace (`NetnsThread`, which has `setns()`'d there) only
creates sockets, and a single asyncio loop in the calling thread drives every probe of a batch at once.
A full matrix therefore takes about one timeout, however many pairs it has.

- TCP: connect, then read the responder's line; allowed = the line came back (from the right workload).
- UDP: send a request (re-sent every 300 ms), allowed = the responder's answer came back.
- ICMP: one echo request from an ICMP datagram ("ping") socket; allowed = the echo reply came back.
A refusal (RST, ICMP unreachable/prohibited) is "denied" at once; silence is "denied" after `timeout`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import math
import os
import shlex
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from omniwall.dataplane.netns import NetnsThread
from omniwall.lab import guest
from omniwall.vm import channel

DEFAULT_TIMEOUT = 1.0
UDP_RESEND = 0.3
MAX_PARALLEL = 256
_seq = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Probe:
    src_netns: str
    addr: str  # destination address
    proto: str  # tcp | udp | icmp (icmpv6 for IPv6 is implied by the address)
    port: int | None = None
    src: str = ""  # labels for reports: workload keys
    dst: str = ""
    src_addr: str | None = None  # bind to it: the source address (and vNIC) is then what policy expects
    expect_name: str | None = None  # the responder must name this workload (tcp/udp)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    probe: Probe
    allowed: bool
    detail: str  # "ok", "timeout", "refused", an errno name, or who answered instead
    elapsed: float


def run_probes(
    probes: Sequence[Probe], *, timeout: float = DEFAULT_TIMEOUT, parallel: int = MAX_PARALLEL
) -> list[ProbeResult]:
    """Run every probe (concurrently) and return their results in the same order."""
    if not probes:
        return []
    guests = {ns for ns in {p.src_netns for p in probes} if guest.is_guest(ns)}
    if guests:  # VM workloads: probes from a guest run inside it
        return run_probes_mixed(
            probes, guests, timeout, lambda ps: run_probes(ps, timeout=timeout, parallel=parallel)
        )
    workers = {ns: NetnsThread(ns, name="lab-probe") for ns in sorted({p.src_netns for p in probes})}
    try:
        return asyncio.run(_run_all(probes, workers, timeout, parallel))
    finally:
        for w in workers.values():
            w.close()


def probe_once(probe: Probe, *, timeout: float = DEFAULT_TIMEOUT) -> ProbeResult:
    return run_probes([probe], timeout=timeout)[0]


async def _run_all(
    probes: Sequence[Probe], workers: dict[str, NetnsThread], timeout: float, parallel: int
) -> list[ProbeResult]:
    gate = asyncio.Semaphore(parallel)

    async def one(p: Probe) -> ProbeResult:
        async with gate:
            return await _probe(p, workers[p.src_netns], timeout)

    return list(await asyncio.gather(*(one(p) for p in probes)))


async def _probe(p: Probe, worker: NetnsThread, timeout: float) -> ProbeResult:
    start = time.monotonic()
    family = socket.AF_INET6 if ipaddress.ip_address(p.addr).version == 6 else socket.AF_INET
    if p.proto == "tcp":
        kind, proto = socket.SOCK_STREAM, 0
    elif p.proto == "udp":
        kind, proto = socket.SOCK_DGRAM, 0
    elif p.proto in ("icmp", "icmpv6"):
        kind = socket.SOCK_DGRAM
        proto = socket.IPPROTO_ICMPV6 if family == socket.AF_INET6 else socket.IPPROTO_ICMP
    else:
        raise ValueError(f"probe protocol {p.proto!r}: use tcp, udp or icmp")
    sock = worker.call(socket.socket, family, kind, proto)
    sock.setblocking(False)
    try:
        if p.src_addr:
            sock.bind((p.src_addr, 0))
        if p.proto == "tcp":
            coro = _tcp(sock, p)
        elif p.proto == "udp":
            coro = _udp(sock, p)
        else:
            coro = _icmp(sock, p, family)
        allowed, detail = await asyncio.wait_for(coro, timeout)
    except TimeoutError:
        allowed, detail = False, "timeout"
    except ConnectionRefusedError:
        allowed, detail = False, "refused"
    except OSError as e:
        allowed, detail = False, os.strerror(e.errno) if e.errno else str(e)
    finally:
        sock.close()
    return ProbeResult(p, allowed, detail, time.monotonic() - start)


def judge_reply(p: Probe, data: bytes) -> tuple[bool, str]:
    parts = data.decode(errors="replace").split()
    if len(parts) < 2 or parts[0] != "omniwall-lab":
        return False, f"unexpected reply {data[:40]!r}"
    if p.expect_name and parts[1] != p.expect_name:
        return False, f"answered by {parts[1]}"
    return True, "ok"


async def _tcp(sock: socket.socket, p: Probe) -> tuple[bool, str]:
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (p.addr, p.port or 0))
    data = b""
    while b"\n" not in data:
        chunk = await loop.sock_recv(sock, 512)
        if not chunk:
            break
        data += chunk
    return judge_reply(p, data)


async def _udp(sock: socket.socket, p: Probe) -> tuple[bool, str]:
    loop = asyncio.get_running_loop()
    sock.connect((p.addr, p.port or 0))  # a datagram connect never blocks
    nonce = f"probe-{next(_seq)}".encode()
    while True:
        await loop.sock_sendall(sock, nonce)
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 512), UDP_RESEND)
        except TimeoutError:
            continue
        if data.endswith(nonce):
            return judge_reply(p, data)


async def _icmp(sock: socket.socket, p: Probe, family: int) -> tuple[bool, str]:
    loop = asyncio.get_running_loop()
    sock.connect((p.addr, 0))  # a datagram connect never blocks (asyncio's would resolve, and fail)
    request, reply = (128, 129) if family == socket.AF_INET6 else (8, 0)
    seq = next(_seq) & 0xFFFF
    # The kernel fills in the identifier and the checksum of a ping socket's echo requests.
    await loop.sock_sendall(sock, struct.pack("!BBHHH", request, 0, 0, 0, seq) + b"omniwall-lab")
    while True:
        data = await loop.sock_recv(sock, 512)
        if len(data) >= 8:
            rtype, _, _, _, rseq = struct.unpack("!BBHHH", data[:8])
            if rtype == reply and rseq == seq:
                return True, "ok"


# ------------------------------------------------------------------------------ from inside a guest
CHANNEL_SLACK = 30.0  # a deadline, not a wait: a starved guest (TCG on a loaded machine) answers late
PER_PROBE = 0.3  # ... and each probe starts processes in the guest
NO_ANSWER = channel.Result(-1, "")


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
    res = channel.run(guest.rundir(name) / "ctl.sock", script, timeout=budget)
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
