"""Status reports to the manager: realized revision (the ack), last error, rule counters, vNIC addresses.

    POST /v1/hosts/{host}/status   Authorization: Bearer <host token>
    {"realized_revision": R, "error": str|null,
     "counters": [{"rule_id", "packets", "bytes"}],     (only when changed since last sent)
     "addresses": {"<ifname>": ["<ip>", ...]},          (only when changed since last sent)
     "conntrack": {"count": n, "max": m}}                (only when it moved, below)

One loop per agent. A change of revision, error or addresses is sent at once; counters are read every
`counters_interval` seconds and sent only when they moved, so a thousand idle agents cost the manager
nothing. The conntrack table's usage is read on the same tick and sent when its alarm level (80%, 95%:
agent/conntrack_usage.py) or its maximum changed, or the count moved by 1% of the maximum.
A failed POST is retried with backoff; the manager being away never blocks the data plane.

A manager whose feed advertises it (`use_stream(True)`, from the feed's `X-Omniwall-Status-Stream`
header) gets the same reports as lines on one long-lived status stream instead (agent/upstream.py):
no request per ack. Every new stream, feed connection or failover starts with the whole report
(`resend`), and a stream that ends for any reason makes the reporter fall back to POSTs and re-send the
whole report: a line lost with its connection is superseded, never lost silently. An older manager (no
header) keeps getting POSTs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx

from omniwall.agent.conntrack_usage import ConntrackUsage
from omniwall.agent.feed import Backoff
from omniwall.agent.upstream import StatusUpstream, UpstreamClosed
from omniwall.dataplane.backend import RuleCounters

log = logging.getLogger("omniwall.agent")

Addresses = dict[str, list[str]]
STREAM_IDLE = 30.0  # seconds: an idle status stream gets an empty line (`Reporter._keep_stream`)


def status_url(manager_url: str, host: str) -> str:
    return f"{manager_url.rstrip('/')}/v1/hosts/{quote(host, safe='')}/status"


class Reporter:
    def __init__(
        self,
        client: httpx.AsyncClient,
        manager_url: str | Callable[[], str],
        host: str,
        token: str,
        counters_source: Callable[[], list[RuleCounters]] | None = None,
        counters_interval: float = 5.0,
        backoff: Backoff | None = None,
        conntrack_source: Callable[[], ConntrackUsage | None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.client = client
        # a callable: the manager the agent talks to now (it changes on failover, agent/managers.py)
        self._manager = manager_url if callable(manager_url) else (lambda: manager_url)
        self.host = host
        self.token = token
        self.counters_source = counters_source
        self.counters_interval = counters_interval
        self.conntrack_source = conntrack_source
        self.backoff = backoff or Backoff(base=0.5, cap=15.0)
        # what we want the manager to know
        self.revision = 0
        self.error: str | None = None
        self.addresses: Addresses | None = None
        # what it acknowledged (HTTP 2xx)
        self._sent_revision: int | None = None
        self._sent_error: str | None = None
        self._sent_addresses: Addresses | None = None
        self._sent_counters: list[dict[str, int]] | None = None
        self._sent_conntrack: ConntrackUsage | None = None
        self._dirty = asyncio.Event()
        self.posts = 0  # successful POSTs (tests, bench)
        self.streamed = 0  # reports written on a status stream (tests, bench)
        self.ssl_context = ssl_context
        self._stream_ok = False  # the current manager takes status streams (its feed said so)
        self._upstream: StatusUpstream | None = None
        self._epoch = 0  # bumped by resend(): a report sent before it must not count as known
        self.last_stream_close: str | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.stream_idle = STREAM_IDLE

    def set_realized(self, revision: int, error: str | None) -> None:
        if (revision, error) != (self.revision, self.error):
            self.revision, self.error = revision, error
            self._dirty.set()
        elif self._sent_revision is None:
            self._dirty.set()  # first report after start, even when it says "0, no error"

    @property
    def url(self) -> str:
        return status_url(self._manager(), self.host)

    def use_stream(self, ok: bool) -> None:
        """Whether the manager the feed just opened on takes status streams (its feed's header)."""
        self._stream_ok = ok

    def resend(self) -> None:
        """Send everything again (a manager we just attached to may know nothing of this host), on a new
        stream: the open one may lead to the manager we left."""
        self._drop_upstream()
        self._forget_sent()

    def set_addresses(self, addresses: Addresses) -> None:
        if addresses != self.addresses:
            self.addresses = addresses
            self._dirty.set()

    def build(
        self, counters: list[dict[str, int]] | None, conntrack: ConntrackUsage | None = None
    ) -> dict[str, Any] | None:
        """The next payload, or None when the manager already knows all of it."""
        body: dict[str, Any] = {"realized_revision": self.revision, "error": self.error}
        changed = (self.revision, self.error) != (self._sent_revision, self._sent_error)
        if self.addresses is not None and self.addresses != self._sent_addresses:
            body["addresses"] = self.addresses
            changed = True
        if counters is not None and counters != self._sent_counters:
            body["counters"] = counters
            changed = True
        if conntrack is not None and _moved(self._sent_conntrack, conntrack):
            body["conntrack"] = conntrack.to_json()
            changed = True
        return body if changed else None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_counters = loop.time()
        while True:
            wait = max(0.0, next_counters - loop.time())
            if self._upstream is not None:  # wake for the stream's keep-alive too
                wait = min(wait, self.stream_idle)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), timeout=wait)
            self._dirty.clear()
            counters = conntrack = None
            if loop.time() >= next_counters:
                next_counters = loop.time() + self.counters_interval
                if self.counters_source is not None:
                    counters = self._read_counters()
                conntrack = self._read_conntrack()
            body = self.build(counters, conntrack)
            if body is None:
                await self._keep_stream()
                continue
            epoch = self._epoch
            sent = await self._stream(body) if self._stream_ok else await self._post(body)
            if sent and epoch != self._epoch:
                continue  # resend() meanwhile: the new manager or stream gets the whole report
            if sent:
                self.backoff.reset()
                self._sent_revision, self._sent_error = body["realized_revision"], body["error"]
                self._sent_addresses = body.get("addresses", self._sent_addresses)
                self._sent_counters = body.get("counters", self._sent_counters)
                if "conntrack" in body:
                    self._sent_conntrack = ConntrackUsage(**body["conntrack"])
            else:
                await asyncio.sleep(self.backoff.next())
                self._dirty.set()

    def _read_counters(self) -> list[dict[str, int]] | None:
        assert self.counters_source is not None
        try:
            return [
                {"rule_id": c.rule_id, "packets": c.packets, "bytes": c.bytes} for c in self.counters_source()
            ]
        except Exception as e:
            log.warning("reading rule counters failed: %s", e)
            return None

    def _read_conntrack(self) -> ConntrackUsage | None:
        if self.conntrack_source is None:
            return None
        try:
            return self.conntrack_source()
        except (OSError, ValueError) as e:
            log.warning("reading conntrack usage failed: %s", e)
            return None

    async def _stream(self, body: dict[str, Any]) -> bool:
        """Write the report on the status stream, opening one when there is none. False: not sent, and
        the reporter goes back to POSTs until the feed next advertises streams."""
        try:
            if self._upstream is None or self._upstream.closed:
                up = StatusUpstream(self._manager(), self.host, self.token, lambda _: None, self.ssl_context)
                up.on_closed = lambda reason, up=up: self._stream_closed(up, reason)  # type: ignore[misc]
                await up.open()
                self._upstream = up
            await self._upstream.send(json.dumps(body, separators=(",", ":")).encode())
        except (UpstreamClosed, ValueError) as e:
            log.info("status stream: %s; reporting by POST", e)
            self._stream_ok = False
            self._drop_upstream()
            return False
        self.streamed += 1
        return True

    async def _keep_stream(self) -> None:
        """An idle status stream gets an empty line every `stream_idle` seconds (the manager skips it):
        a middlebox that drops idle connections keeps it, and a dead one is found now, not at the next
        ack (its end sends the whole report by POST)."""
        up = self._upstream
        if up is None or up.closed or not self._stream_ok:
            return
        if asyncio.get_running_loop().time() - up.last_write >= self.stream_idle:
            with contextlib.suppress(UpstreamClosed):
                await up.send(b"")

    def _stream_closed(self, up: StatusUpstream, reason: str) -> None:
        """The stream ended (refused, ended, lost): POSTs from now on, and the whole report again, since
        its last lines may not have been recorded. A stream already replaced (resend: a failover) is
        not the reporter's concern any more: its end must not send the new manager's agent to POSTs."""
        if up is not self._upstream:
            return
        self.last_stream_close = reason
        if reason != "closed by the agent":
            log.warning("status stream to %s ended: %s; reporting by POST", self._manager(), reason)
            self._stream_ok = False
            self._forget_sent()

    def _forget_sent(self) -> None:
        """Report everything again, in a new epoch: the manager may have missed what was sent."""
        self._epoch += 1
        self._sent_revision = self._sent_error = None
        self._sent_addresses = None
        self._sent_counters = None
        self._sent_conntrack = None
        self._dirty.set()

    def _drop_upstream(self) -> None:
        up, self._upstream = self._upstream, None
        if up is not None and not up.closed:
            task = asyncio.get_running_loop().create_task(up.close())  # an open one: a loop runs
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Close the status stream (the agent stops)."""
        up, self._upstream = self._upstream, None
        if up is not None:
            await up.close()

    async def _post(self, body: dict[str, Any]) -> bool:
        try:
            resp = await self.client.post(
                self.url, json=body, headers={"Authorization": f"Bearer {self.token}"}, timeout=10.0
            )
        except httpx.HTTPError as e:
            log.info("status report failed: %s: %s", type(e).__name__, e)
            return False
        if resp.status_code >= 300:
            log.warning("status report refused: HTTP %d: %s", resp.status_code, resp.text[:200])
            return False
        self.posts += 1
        return True


def _moved(sent: ConntrackUsage | None, now: ConntrackUsage) -> bool:
    """Worth a report: first reading, a new alarm level or maximum, or 1% of the maximum moved."""
    if sent is None or sent.alarm != now.alarm or sent.max != now.max:
        return True
    return abs(now.count - sent.count) * 100 >= max(now.max, 1)


__all__ = ["Addresses", "Reporter", "status_url"]
