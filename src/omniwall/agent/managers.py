"""The managers an agent may talk to, and which one it talks to now (failover).

Managers on one etcd are interchangeable (docs/ha.md): each serves every host's feed with the same
revisions for the same changes. An agent holds a list; it starts on one picked from its host name (so a
fleet spreads over the managers without coordination) and moves to the next one when the feed breaks or
is refused. The feed, the status reports, the flow records and the command results all follow `current`.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from omniwall.tls import check_manager_url


def parse_manager_urls(values: Iterable[str], *, option: str = "--manager") -> list[str]:
    """`--manager` values (repeatable, each possibly comma-separated) -> distinct URLs, in order.
    Raises ValueError naming the option when none is given or one is not a manager URL."""
    urls: list[str] = []
    for value in values:
        for part in str(value).split(","):
            url = part.strip().rstrip("/")
            if url and url not in urls:
                urls.append(url)
    if not urls:
        raise ValueError(f"{option}: give at least one manager URL, e.g. https://10.0.0.1:8443")
    for url in urls:
        check_manager_url(url, option=option)
    schemes = {u.split("://", 1)[0] for u in urls}
    if len(schemes) > 1:
        raise ValueError(f"{option}: mix of http:// and https:// managers; use one scheme for all")
    return urls


class Managers:
    """An ordered list of manager URLs with a cursor."""

    def __init__(self, urls: str | Iterable[str], host: str = "") -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("no manager URL")
        # a stable start per host: 1,000 agents of one fleet land evenly on 3 managers
        self.index = zlib.crc32(host.encode()) % len(self.urls) if host else 0
        self.switches = 0  # failovers so far (tests, bench)

    @property
    def current(self) -> str:
        return self.urls[self.index]

    def __len__(self) -> int:
        return len(self.urls)

    def failover(self) -> str:
        """Move to the next manager (a no-op with one); returns it."""
        if len(self.urls) > 1:
            self.index = (self.index + 1) % len(self.urls)
            self.switches += 1
        return self.current


__all__ = ["Managers", "parse_manager_urls"]
