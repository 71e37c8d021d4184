"""The guest's command channel: shell commands run inside a guest over its second serial port.

The guest's /init (guest_init.sh) reads `<id> <base64 script>` lines on ttyS1, runs one script at a time
and answers `<id> <exit code> <base64 output>` (stdout and stderr). On the host, QEMU exposes that port
as the unix socket `ctl.sock` of the guest's run directory. `run_many` runs several scripts at once as
*one* request (a wrapper script starting each in the background and reporting each one's exit code and
output): concurrent replies on the serial line garbled each other. QEMU serves one client at a time; a
second process waits in the socket's backlog until the first is done. Answers to requests of a closed
connection are lost (fresh random ids: a late answer is never taken for a new one).

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
    lines = []
    for i, s in enumerate(scripts):
        enc = base64.b64encode(s.encode()).decode()
        lines.append(f"echo {enc} | base64 -d > /tmp/s{i}; sh /tmp/s{i} >/tmp/o{i} 2>&1 </dev/null & c{i}=$!")
    for i in range(len(scripts)):
        lines.append(
            f"wait $c{i}; echo \"{i} $? $(base64 </tmp/o{i} | tr -d '\\n')\"; rm -f /tmp/s{i} /tmp/o{i}"
        )
    whole = _request(ctl, "\n".join(lines), timeout)
    answers: dict[int, Result] = {}
    for line in whole.output.splitlines():
        parts = line.split(" ", 2)
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].lstrip("-").isdigit():
            out = base64.b64decode(parts[2]) if len(parts) == 3 else b""
            answers[int(parts[0])] = Result(int(parts[1]), out.decode(errors="replace"))
    return [answers.get(i, Result(-1, "no answer from the guest")) for i in range(len(scripts))]


def _request(ctl: Path | str, script: str, timeout: float) -> Result:
    """One request on the channel: the script's exit code and output (-1: no answer in time)."""
    ident = secrets.token_hex(6)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(str(ctl))
        except OSError as e:
            raise ChannelError(f"guest command channel {ctl}: {e.strerror or e}") from None
        sock.sendall(f"{ident} {base64.b64encode(script.encode()).decode()}\n".encode())
        while True:
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
                if len(parts) >= 2 and parts[0] == ident:  # else an earlier connection's answer
                    try:
                        out = base64.b64decode(parts[2]) if len(parts) == 3 else b""
                        return Result(int(parts[1]), out.decode(errors="replace"))
                    except ValueError:
                        continue
    finally:
        sock.close()
    return Result(-1, "no answer from the guest")


def run(ctl: Path | str, script: str, *, timeout: float = 30.0) -> Result:
    return _request(ctl, script, timeout)


__all__ = ["ChannelError", "Result", "run", "run_many"]
