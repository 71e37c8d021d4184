"""A small synchronous QMP client (QEMU Machine Protocol, JSON lines on the guest's unix socket).

    with Qmp(path) as q:
        q.execute("query-status")              # -> {"status": "running", ...}
        q.execute("migrate", {"uri": "tcp:..."})
        q.wait_event("RESUME", timeout=5)

Events arriving while a command waits for its answer are kept (`events`), so a caller can wait for one
it raced (migration's STOP/RESUME). One client per socket at a time: QEMU serves one connection.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT = 10.0


class QmpError(RuntimeError):
    pass


class Qmp:
    def __init__(self, path: Path | str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = str(path)
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._buf = b""
        try:
            self._sock.connect(self.path)
            greeting = self._read()
            if "QMP" not in greeting:
                raise QmpError(f"{self.path}: not a QMP greeting: {greeting}")
            self.execute("qmp_capabilities")
        except OSError as e:
            self._sock.close()
            raise QmpError(f"QMP {self.path}: {e}") from None

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run `command`; its `return` value, or QmpError with QEMU's error description."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpError(f"{command}: {err.get('class', '')}: {err.get('desc', err)}")
            return reply.get("return")

    def wait_event(self, name: str, *, timeout: float | None = None) -> dict[str, Any]:
        """The first event `name` (already received or arriving within `timeout`); it is consumed."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("event") == name:
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError(f"{self.path}: no {name} event within the timeout")
            self._sock.settimeout(left)
            try:
                self.events.append(self._read())
            except TimeoutError:
                continue
            finally:
                self._sock.settimeout(self.timeout)

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise QmpError(f"{self.path}: QEMU closed the QMP connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)


__all__ = ["Qmp", "QmpError"]
