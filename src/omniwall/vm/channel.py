"""The guest's command channel: shell commands run inside a guest over its second serial port.

The guest's /init (guest_init.sh) reads `<id> <base64 script>` lines on ttyS1, runs each script in the
background (so many run at once) and answers `<id> <exit code> <base64 output>` (stdout and stderr).
On the host, QEMU exposes that port as the unix socket `ctl.sock` of the guest's run directory. QEMU
serves one client at a time, so `run_many` sends a whole batch over one connection; a second process
waits in the socket's backlog until the first is done. Answers to requests of a closed connection are
lost (each batch uses fresh random ids, so a late answer is never taken for a new one).

This is the lab's way into a guest (probes from a VM, `lab exec`); it needs no network, so it works
whatever the firewall does to the guest's NIC.
"""

from __future__ import annotations

import base64
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class ChannelError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Result:
    returncode: int  # -1: no answer within the timeout
    output: str


def run_many(ctl: Path | str, scripts: Sequence[str], *, timeout: float) -> list[Result]:
    """Run every script in the guest at once; results in the same order. A script not answered within
    `timeout` gets returncode -1."""
    if not scripts:
        return []
    token = secrets.token_hex(4)
    ids = [f"{token}.{i}" for i in range(len(scripts))]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(str(ctl))
        except OSError as e:
            raise ChannelError(f"guest command channel {ctl}: {e.strerror or e}") from None
        payload = b"".join(
            f"{i} {base64.b64encode(s.encode()).decode()}\n".encode()
            for i, s in zip(ids, scripts, strict=True)
        )
        sock.sendall(payload)
        answers: dict[str, Result] = {}
        buf = b""
        while len(answers) < len(ids):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                parts = line.decode(errors="replace").strip().split(" ", 2)
                if len(parts) < 2 or parts[0] not in ids:
                    continue  # an answer to an earlier connection's request, or line noise
                try:
                    out = base64.b64decode(parts[2]) if len(parts) == 3 else b""
                    answers[parts[0]] = Result(int(parts[1]), out.decode(errors="replace"))
                except ValueError:
                    continue
    finally:
        sock.close()
    return [answers.get(i, Result(-1, "no answer from the guest")) for i in ids]


def run(ctl: Path | str, script: str, *, timeout: float = 30.0) -> Result:
    return run_many(ctl, [script], timeout=timeout)[0]


__all__ = ["ChannelError", "Result", "run", "run_many"]
