"""A blocking client of the host feed (httpx), for tests: iterate messages from a revision, post status.
The agent's own transport is `omniwall.agent.feed` (asyncio).

    with FeedClient("https://manager:8443", token, "h1") as c:
        for msg in c.messages(from_revision=last_realized):
            ...  # Snapshot | Delta | Heartbeat (| Unknown: ignore)
            c.post_status(StatusReport(realized_revision=msg.revision))

`messages` follows one HTTP response; when it ends or breaks (manager restart, network) it raises
`FeedError` or returns, and the caller reconnects with its last realized revision. `read_timeout` should
exceed the heartbeat interval, so a dead connection is noticed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx

from omniwall.compiler.ir import HostDesiredState
from omniwall.stream.wire import Message, StatusReport, decode


class FeedError(Exception):
    """The manager refused the request (the message is the server's) or the stream broke."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _error(resp: httpx.Response) -> FeedError:
    try:
        msg = resp.json().get("message") or resp.text
    except ValueError:
        msg = resp.text
    return FeedError(f"{resp.status_code}: {msg}", resp.status_code)


class FeedClient:
    def __init__(
        self,
        server: str,
        token: str,
        host: str,
        *,
        heartbeat: float = 15.0,
        verify: bool | str = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.host = host
        self.heartbeat = heartbeat
        self._http = httpx.Client(
            base_url=server.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(10.0, read=heartbeat * 3 + 5),
            verify=verify,
            transport=transport,
        )

    def __enter__(self) -> FeedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def messages(self, from_revision: int = 0, *, follow: bool = True) -> Iterator[Message]:
        params: dict[str, Any] = {"from": from_revision, "follow": follow, "heartbeat": self.heartbeat}
        try:
            with self._http.stream("GET", f"/v1/hosts/{self.host}/feed", params=params) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise _error(resp)
                for line in resp.iter_lines():
                    if line.strip():
                        yield decode(line)
        except httpx.HTTPError as err:
            raise FeedError(f"feed connection failed: {err}") from err

    def desired(self) -> HostDesiredState:
        resp = self._http.get(f"/v1/hosts/{self.host}/desired")
        if resp.status_code != 200:
            raise _error(resp)
        return HostDesiredState.from_json(resp.json())

    def post_status(self, report: StatusReport) -> dict[str, Any]:
        try:
            resp = self._http.post(
                f"/v1/hosts/{self.host}/status", json=report.model_dump(mode="json", exclude_none=True)
            )
        except httpx.HTTPError as err:
            raise FeedError(f"status report failed: {err}") from err
        if resp.status_code != 200:
            raise _error(resp)
        return resp.json()  # type: ignore[no-any-return]
