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

The transport is here rather than in the tests' `FeedClient` (tests/doubles): the agent needs what that client
does not offer: a caller-supplied `httpx.AsyncClient` (1,000 agents share one in the fan-out benchmark),
and the stream closed at once when the agent leaves it early (gap -> reconnect). httpx's read timeout
doubles as the idle watchdog: no line, not even a heartbeat, for `idle_timeout` seconds = a dead link.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from urllib.parse import quote

import httpx

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


def parse_line(line: str) -> FeedMessage | None:
    """One NDJSON line -> a message; None for a blank line or a message type we do not know (forward
    compatible: a newer manager may send more kinds). Raises FeedError when the line is malformed."""
    if not line.strip():
        return None
    try:
        msg = decode(line)
        if isinstance(msg, Snapshot) and msg.revision != msg.state.revision:
            raise ValueError(f"snapshot revision {msg.revision} != state revision {msg.state.revision}")
    except ValueError as e:
        raise FeedError(f"bad feed line ({e}): {line.strip()[:200]}") from e
    return None if isinstance(msg, Unknown) else msg


def feed_url(manager_url: str, host: str) -> str:
    return f"{manager_url.rstrip('/')}/v1/hosts/{quote(host, safe='')}/feed"


async def read_feed(
    client: httpx.AsyncClient,
    manager_url: str,
    host: str,
    token: str,
    from_revision: int,
    idle_timeout: float = 60.0,
) -> AsyncIterator[FeedMessage]:
    """Yield the feed's messages until the connection ends; every way it can end raises FeedError."""
    timeout = httpx.Timeout(connect=10.0, read=idle_timeout, write=10.0, pool=10.0)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/x-ndjson"}
    # ask for heartbeats well inside the idle timeout, so a quiet but healthy feed is never dropped
    params = {"from": str(from_revision), "heartbeat": f"{min(300.0, max(0.05, idle_timeout / 4)):g}"}
    try:
        async with client.stream(
            "GET",
            feed_url(manager_url, host),
            params=params,
            headers=headers,
            timeout=timeout,
        ) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                raise FeedRejected(resp.status_code, body)
            yield Opened(resp.headers.get(STATUS_STREAM_HEADER) == "1")
            async for line in resp.aiter_lines():
                msg = parse_line(line)
                if msg is not None:
                    yield msg
    except httpx.HTTPError as e:
        raise FeedError(f"feed connection: {type(e).__name__}: {e}") from e
    raise FeedError("feed ended by the manager")


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
