"""Traffic primitives for lab tests and benchmarks: TCP sockets that live in a workload's namespace,
and a connected TCP pair between two workloads of a lab, both ends driven from this process."""

from __future__ import annotations

import socket
from typing import Any

from omniwall.dataplane.netns import NetnsThread


def tcp_sockets(netns: str, n: int) -> list[socket.socket]:
    """`n` TCP sockets created in `netns` (a socket belongs to the namespace it was created in)."""
    w = NetnsThread(netns, name="lab-socket")
    try:
        return [w.call(socket.socket, socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    finally:
        w.close()


def tcp_pair(
    lab: Any, src: str, dst: str, port: int, timeout: float = 3.0
) -> tuple[socket.socket, socket.socket]:
    """A TCP connection from workload `src` to `dst`:`port` (IPv4) of `lab`: (client end, server end),
    both blocking with `timeout`. Nothing is left open on failure."""
    s, d = lab.plan.workload(src), lab.plan.workload(dst)
    (listener,), (client,) = tcp_sockets(d.netns, 1), tcp_sockets(s.netns, 1)
    try:
        # SO_REUSEADDR: a later pair may listen on the port while this one's connection lives.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((d.address(4), port))
        listener.listen(1)
        listener.settimeout(timeout)
        client.bind((s.address(4), 0))
        client.settimeout(timeout)
        client.connect((d.address(4), port))
        server, _ = listener.accept()
    except BaseException:
        client.close()
        raise
    finally:
        listener.close()
    return client, server
