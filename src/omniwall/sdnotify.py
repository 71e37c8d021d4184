"""systemd readiness notification (`Type=notify`): one datagram to `$NOTIFY_SOCKET`.

The protocol is a line of `KEY=value` pairs sent to a Unix datagram socket (sd_notify(3)); a leading `@`
names an abstract socket. Doing it here spares a dependency (python-systemd needs libsystemd headers
to build). Without `NOTIFY_SOCKET` (not started by systemd) every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(state: str, *, environ: dict[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1", "STOPPING=1", "STATUS=...") to the service manager.
    True when sent; False without a socket or when the send fails (never raises: a daemon must not die
    because its supervisor went away)."""
    address = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def ready(status: str | None = None) -> bool:
    """The daemon is up: systemd ends `systemctl start` and starts the units ordered after it."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def stopping() -> bool:
    return notify("STOPPING=1")
