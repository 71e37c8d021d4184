"""New-TCP-connection rate, client and server, for `bench/dataplane.py` (stdlib only, no C, no asyncio).

    python bench/_connrate.py server --addr 10.90.0.2 --port 5300
    python bench/_connrate.py client --dst 10.90.0.2 --port 5300 --seconds 5 --concurrency 64

Both run inside a workload namespace (the caller wraps them in `ip netns exec`). The client keeps
`concurrency` non-blocking connects in flight on one epoll; a connection counts once its handshake has
completed (the SYN crossed both hosts' forward hooks, and the SYN-ACK came back). It is then closed with
SO_LINGER 0, i.e. a RST: no TIME_WAIT, so the ephemeral ports never run out and the conntrack entries
leave through CLOSE (10 s) rather than TIME_WAIT (120 s). The server accepts and closes the same way.
Plain epoll rather than asyncio: asyncio's per-connection overhead (futures, transports) would be most of
the CPU time on a 2-core machine and hide the firewall's share of the cost.

The client prints one JSON line: {"conns": n, "seconds": s, "rate": n/s, "errors": e}.
"""

from __future__ import annotations

import argparse
import errno
import json
import select
import signal
import socket
import struct
import sys
import time

LINGER_RST = struct.pack("ii", 1, 0)


def serve(addr: str, port: int) -> None:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((addr, port))
    lsock.listen(4096)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    while True:
        try:
            conn, _ = lsock.accept()
        except InterruptedError:
            continue
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        conn.close()


def run_client(dst: str, port: int, seconds: float, concurrency: int) -> dict[str, object]:
    ep = select.epoll()
    socks: dict[int, socket.socket] = {}

    def open_one() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        rc = s.connect_ex((dst, port))
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            raise OSError(rc, f"connect: {errno.errorcode.get(rc, rc)}")
        socks[s.fileno()] = s
        ep.register(s.fileno(), select.EPOLLOUT)

    conns = errors = 0
    codes: dict[int, int] = {}
    start = time.monotonic()
    deadline = start + seconds
    for _ in range(concurrency):
        open_one()
    now = start
    while now < deadline:
        for fd, _ev in ep.poll(0.2):
            s = socks.pop(fd)
            ep.unregister(fd)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err in (0, errno.ECONNRESET):  # reset: established, then the server's RST won the race
                conns += 1
            else:
                errors += 1
                codes[err] = codes.get(err, 0) + 1
            s.close()
            open_one()
        now = time.monotonic()
    elapsed = now - start
    for s in socks.values():
        s.close()
    ep.close()
    return {
        "conns": conns,
        "seconds": round(elapsed, 3),
        "rate": conns / elapsed,
        "errors": errors,
        "codes": codes,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server")
    s.add_argument("--addr", required=True)
    s.add_argument("--port", type=int, default=5300)
    c = sub.add_parser("client")
    c.add_argument("--dst", required=True)
    c.add_argument("--port", type=int, default=5300)
    c.add_argument("--seconds", type=float, default=5.0)
    c.add_argument("--concurrency", type=int, default=64)
    a = p.parse_args(argv)
    if a.mode == "server":
        serve(a.addr, a.port)
        return 0
    print(json.dumps(run_client(a.dst, a.port, a.seconds, a.concurrency)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
