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
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from omniwall.dataplane.netns import NetnsThread

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
    from omniwall.lab import vm  # VM workloads: probes from a guest run inside it (lab/vm.py)

    guests = {ns for ns in {p.src_netns for p in probes} if vm.is_guest(ns)}
    if guests:
        return vm.run_probes_mixed(
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
