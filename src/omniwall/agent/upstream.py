"""The agent's status stream: one long-lived `POST /v1/hosts/{host}/status/stream` to its manager.

A manager whose feed carries the `X-Omniwall-Status-Stream` header takes the agent's status reports as
NDJSON lines on one chunked request instead of a POST each (api/feed.py `StatusStream`): an ack is then
one chunk on an open connection, not a request the manager parses, routes and answers. The response
flows back while the body is still being written, so this is a raw HTTP/1.1 client on an asyncio
connection (httpx sends the whole body before it reads the answer): the reader sees a refusal at the
start, a refused line, and the stream's end the moment they come.

Nothing is confirmed per line: a line the manager did not record can only be lost with the connection,
and the reporter then re-sends its whole report on the next stream or POST (agent/reporter.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Callable
from urllib.parse import quote, urlsplit

log = logging.getLogger("omniwall.agent")

CONNECT_TIMEOUT = 10.0
# How long closing may wait for the manager to take the stream's last bytes: a manager that stopped
# reading must not keep a stopping agent alive (the transport is aborted after it).
CLOSE_TIMEOUT = 2.0


def stream_path(host: str) -> str:
    return f"/v1/hosts/{quote(host, safe='')}/status/stream"


class UpstreamClosed(Exception):
    """The stream could not be opened or is gone; the reporter falls back to POSTs."""


class StatusUpstream:
    """One open status stream. `send` writes a line; `on_closed(reason)` is called once when the stream
    ends for any reason (refused at the start, ended by the manager, connection lost, `close()`)."""

    def __init__(
        self,
        manager_url: str,
        host: str,
        token: str,
        on_closed: Callable[[str], None],
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        u = urlsplit(manager_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"manager URL {manager_url!r}: not http(s)://host[:port]")
        self.tls = u.scheme == "https"
        self.addr = u.hostname
        self.port = u.port or (443 if self.tls else 80)
        self.netloc = u.netloc
        self.path = u.path.rstrip("/") + stream_path(host)
        self.host, self.token = host, token
        self.ssl_context = ssl_context
        self.on_closed = on_closed
        self.closed = False
        self.refused = 0  # lines the manager refused (each logged with its reason)
        self.lines = 0
        self.last_write = 0.0  # loop time of the last line written (the reporter's keep-alive)
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Connect and send the request head. Raises UpstreamClosed when the manager cannot be reached."""
        ctx = None
        if self.tls:
            ctx = self.ssl_context or ssl.create_default_context()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    self.addr, self.port, ssl=ctx, server_hostname=self.addr if ctx else None
                )
        except (OSError, TimeoutError, ssl.SSLError) as e:
            raise UpstreamClosed(f"status stream to {self.netloc}: {type(e).__name__}: {e}") from e
        writer.write(
            (
                f"POST {self.path} HTTP/1.1\r\nHost: {self.netloc}\r\nAuthorization: Bearer {self.token}\r\n"
                "Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )
        self._writer = writer
        self.last_write = asyncio.get_running_loop().time()
        self._reader_task = asyncio.create_task(self._read(reader), name=f"status-stream-{self.host}")

    async def send(self, line: bytes) -> None:
        """Write one report (a JSON object without the newline). Raises UpstreamClosed when the stream is
        gone: the caller keeps the report unsent."""
        w = self._writer
        if self.closed or w is None or w.is_closing():
            raise UpstreamClosed("status stream closed")
        data = line + b"\n"
        w.write(b"%x\r\n%s\r\n" % (len(data), data))
        try:
            await w.drain()
        except (OSError, RuntimeError) as e:
            self._closed(f"write failed: {type(e).__name__}: {e}")
            raise UpstreamClosed("status stream lost") from e
        self.lines += 1
        self.last_write = asyncio.get_running_loop().time()

    async def close(self) -> None:
        """End the body (the manager answers its summary) and the connection, within CLOSE_TIMEOUT."""
        w = self._writer
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                if w is not None and not w.is_closing():
                    with contextlib.suppress(OSError, RuntimeError):
                        w.write(b"0\r\n\r\n")
                        await w.drain()
                self._closed("closed by the agent")
                if self._reader_task is not None:
                    self._reader_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await self._reader_task
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()
        except TimeoutError:
            self._closed("closed by the agent (the manager did not take the last bytes)")
            if self._reader_task is not None:
                self._reader_task.cancel()
            if w is not None:
                w.transport.abort()

    def _closed(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            if self._writer is not None:
                self._writer.close()
            self.on_closed(reason)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            reason = await self._responses(reader)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            reason = f"connection lost: {type(e).__name__}: {e}"
        self._closed(reason)

    async def _responses(self, reader: asyncio.StreamReader) -> str:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for h in header_lines:
            name, _, value = h.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 200:
            body = b""
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
                if "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                else:
                    body = await reader.read(2000)
            return f"refused: HTTP {status}: {' '.join(body.decode(errors='replace').split())[:300]}"
        buf = b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            if size == 0:
                return "ended by the manager"
            buf += (await reader.readexactly(size + 2))[:-2]
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                closed = self._message(line)
                if closed is not None:
                    return closed

    def _message(self, line: bytes) -> str | None:
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            return f"bad line from the manager: {line[:200]!r}"
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "refused":
            self.refused += 1
            log.warning("status line %s refused by the manager: %s", msg.get("line"), msg.get("error"))
        elif kind == "closed":
            return f"closed by the manager: HTTP {msg.get('status')}: {msg.get('error', 'end of stream')}"
        return None  # unknown kinds: a newer manager's, ignored


__all__ = ["StatusUpstream", "UpstreamClosed", "stream_path"]
