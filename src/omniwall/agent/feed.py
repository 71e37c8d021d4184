"""The host feed, agent side: connect, parse the NDJSON lines, and the reconnect backoff.

Wire format (served by the manager, `omniwall.stream`; the codec is `omniwall.stream.wire`, shared with
the server so the two cannot drift):
    GET /v1/hosts/{host}/feed?from=R&heartbeat=S      Authorization: Bearer <host token>
    -> one JSON object per line, over a long-lived response:
       {"type": "snapshot", "revision": R, "state": <HostDesiredState JSON>}   (from=0/unknown/compacted)
       {"type": "delta", "delta": <HostDelta JSON>}
       {"type": "heartbeat", "revision": R}                                    (after S s of silence)
       {"type": "command", "id": ID, "op": OP, "args": {...}}                   (agent/commands.py)
    The response header `X-Omniwall-Status-Stream: 1` says the manager takes status streams
    (agent/upstream.py); `Opened.status_stream` carries it to the reporter.

The transport is a raw HTTP/1.1 client on an asyncio connection (like the status stream's,
agent/upstream.py), not httpx: a fleet change is one delta line per agent, and httpx's streaming layers
(httpcore, h11, anyio's socket stream, which re-arms the socket in the selector on every read) were
~40% of an agent's CPU per delta (BENCHMARKS.md "Fan-out on etcd, part 3"). The reader takes the
manager's chunked response (or a body ended by Content-Length or by the connection), splits lines on
bytes, and closes the connection at once when the agent leaves early (gap -> reconnect). The read
timeout is the idle watchdog: no data, not even a heartbeat, for `idle_timeout` seconds = a dead link.
Like the status stream, the feed connects to the manager directly (no proxy from the environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections.abc import AsyncIterator
from urllib.parse import quote, urlsplit

from omniwall.stream.wire import (
    STATUS_STREAM_HEADER,
    Command,
    Delta,
    Heartbeat,
    Snapshot,
    Unknown,
    decode,
)


class FeedError(Exception):
    """The feed could not be read: connection lost, refused, or a line we cannot parse."""


class FeedRejected(FeedError):
    """The manager answered with an HTTP error (bad token, unknown host, ...)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"feed refused: HTTP {status}: {' '.join(body.split())[:200]}")
        self.status = status


class Opened:
    """Not a line: the manager accepted the feed (HTTP 200). An agent already at the manager's revision
    gets no line until the first heartbeat, yet it is attached (failover is timed from here).
    `status_stream`: the manager takes the agent's reports on a status stream (agent/upstream.py)."""

    def __init__(self, status_stream: bool = False) -> None:
        self.status_stream = status_stream


FeedMessage = Snapshot | Delta | Heartbeat | Command | Opened


def parse_line(line: str | bytes) -> FeedMessage | None:
    """One NDJSON line -> a message; None for a blank line or a message type we do not know (forward
    compatible: a newer manager may send more kinds). Raises FeedError when the line is malformed."""
    if not line.strip():
        return None
    try:
        msg = decode(line)
        if isinstance(msg, Snapshot) and msg.revision != msg.state.revision:
            raise ValueError(f"snapshot revision {msg.revision} != state revision {msg.state.revision}")
    except ValueError as e:
        text = line.decode(errors="replace") if isinstance(line, bytes) else line
        raise FeedError(f"bad feed line ({e}): {text.strip()[:200]}") from e
    return None if isinstance(msg, Unknown) else msg


def feed_url(manager_url: str, host: str) -> str:
    return f"{manager_url.rstrip('/')}/v1/hosts/{quote(host, safe='')}/feed"


CONNECT_TIMEOUT = 10.0
READ_SIZE = 65536
MAX_HEAD = 65536  # bytes of status line and headers


async def read_feed(
    manager_url: str,
    host: str,
    token: str,
    from_revision: int,
    idle_timeout: float = 60.0,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[FeedMessage]:
    """Yield the feed's messages until the connection ends; every way it can end raises FeedError.
    `ssl_context`: for an https manager (default: the system's CAs)."""
    u = urlsplit(feed_url(manager_url, host))
    if u.scheme not in ("http", "https") or not u.hostname:
        raise FeedError(f"manager URL {manager_url!r}: not http(s)://host[:port]")
    ctx = None
    if u.scheme == "https":
        ctx = ssl_context or ssl.create_default_context()
    # ask for heartbeats well inside the idle timeout, so a quiet but healthy feed is never dropped
    heartbeat = f"{min(300.0, max(0.05, idle_timeout / 4)):g}"
    target = f"{u.path}?from={from_revision}&heartbeat={heartbeat}"
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            port = u.port or (443 if ctx else 80)
            reader, writer = await asyncio.open_connection(
                u.hostname, port, ssl=ctx, server_hostname=u.hostname if ctx else None
            )
            writer.write(
                f"GET {target} HTTP/1.1\r\nHost: {u.netloc}\r\nAuthorization: Bearer {token}\r\n"
                "Accept: application/x-ndjson\r\nUser-Agent: omniwall-agent\r\n\r\n".encode()
            )
            await writer.drain()
        body = _Body(reader, idle_timeout)
        status, headers = await body.head()
        if status != 200:
            raise FeedRejected(status, (await body.some(2000)).decode(errors="replace"))
        yield Opened(headers.get(STATUS_STREAM_HEADER.lower()) == "1")
        async for line in body.lines():
            msg = parse_line(line)
            if msg is not None:
                yield msg
    except (OSError, TimeoutError, ssl.SSLError, ValueError, IndexError) as e:
        raise FeedError(f"feed connection: {type(e).__name__}: {e}") from e
    finally:
        if writer is not None:
            writer.close()  # at once, also when the caller leaves early (aclosing)
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    raise FeedError("feed ended by the manager")


class _Body:
    """An HTTP/1.1 response read from a stream: the head, then the body's bytes (chunked, sized or up
    to the connection's end), from one buffer refilled by reads of up to READ_SIZE bytes."""

    def __init__(self, reader: asyncio.StreamReader, idle_timeout: float) -> None:
        self._reader = reader
        self._idle = idle_timeout
        self._buf = bytearray()
        self._chunked = False
        self._length: int | None = None  # Content-Length (not chunked); None: up to the end

    async def _fill(self) -> bool:
        """Read more into the buffer; False at the end of the stream. No byte for `idle` s: TimeoutError."""
        async with asyncio.timeout(self._idle):
            data = await self._reader.read(READ_SIZE)
        self._buf += data
        return bool(data)

    async def head(self) -> tuple[int, dict[str, str]]:
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            if len(self._buf) > MAX_HEAD or not await self._fill():
                raise ValueError("no complete HTTP response head")
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[: end + 4]
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for h in lines[1:]:
            name, _, value = h.partition(":")
            headers[name.strip().lower()] = value.strip()
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if not self._chunked and "content-length" in headers:
            self._length = int(headers["content-length"])
        return status, headers

    async def some(self, limit: int) -> bytes:
        """Up to `limit` bytes of the body (an error's text)."""
        out = bytearray()
        with contextlib.suppress(OSError, TimeoutError, ValueError):
            async for data in self._data():
                out += data
                if len(out) >= limit:
                    break
        return bytes(out[:limit])

    async def lines(self) -> AsyncIterator[bytes]:
        """The body's lines, without their newline."""
        pending = bytearray()
        async for data in self._data():
            pending += data
            if b"\n" not in data:
                continue
            *done, rest = pending.split(b"\n")
            pending = bytearray(rest)
            for line in done:
                yield bytes(line)

    async def _data(self) -> AsyncIterator[bytes]:
        """The body's bytes as they come (chunk framing removed); ends with the body."""
        buf = self._buf
        if not self._chunked:
            left = self._length
            while left is None or left > 0:
                if not buf and not await self._fill():
                    if left is None:
                        return  # the body ends with the connection
                    raise ValueError("response body cut short")
                take = len(buf) if left is None else min(left, len(buf))
                data = bytes(buf[:take])
                del buf[:take]
                if left is not None:
                    left -= take
                yield data
            return
        while True:
            while (i := buf.find(b"\r\n")) < 0:
                if not await self._fill():
                    raise ValueError("chunked body cut short")
            size = int(bytes(buf[:i]).split(b";")[0], 16)
            del buf[: i + 2]
            if size == 0:
                return
            while size:
                if not buf and not await self._fill():
                    raise ValueError("chunked body cut short")
                take = min(size, len(buf))
                data = bytes(buf[:take])
                del buf[:take]
                size -= take
                yield data
            while len(buf) < 2:
                if not await self._fill():
                    raise ValueError("chunked body cut short")
            del buf[:2]  # the chunk's CRLF


class Backoff:
    """Jittered, capped exponential backoff ("equal jitter": half fixed, half random), so a thousand agents
    that lost the same manager do not come back in lockstep, and none comes back with zero delay."""

    def __init__(
        self, base: float = 0.5, cap: float = 30.0, factor: float = 2.0, rng: random.Random | None = None
    ) -> None:
        self.base, self.cap, self.factor = base, cap, factor
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.cap, self.base * self.factor**self.attempt)
        self.attempt = min(self.attempt + 1, 64)  # no float overflow after days offline
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempt = 0


__all__ = [
    "Backoff",
    "Delta",
    "FeedError",
    "FeedMessage",
    "FeedRejected",
    "Heartbeat",
    "Opened",
    "Snapshot",
    "feed_url",
    "parse_line",
    "read_feed",
]
