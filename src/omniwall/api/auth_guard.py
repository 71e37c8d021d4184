"""Failed authentication: rate limit per client address, and its audit in aggregate (api/auth.py uses it).

Fixed windows per address: after `max_failures` failures in one window the address gets 429 until the
window ends. Failures are audited as kind `Authentication`, action `auth-failure`, in the provider tenant:
the first one after a quiet window at once, then at most one entry per window, so a flood from any
number of addresses cannot fill the audit log.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from omniwall import PROVIDER_TENANT
from omniwall.manager.audit import SYSTEM, entry_put


@dataclass
class AuthGuard:
    """Failed authentications per client address in fixed windows: after `max_failures` in one window,
    that address gets 429 (with Retry-After) until the window ends, whatever token it sends. Failures are
    audited in aggregate (`flush`): one entry per window listing at most `audit_addresses` addresses and
    their counts, so a flood cannot fill the audit log. Memory is bounded by `max_addresses`."""

    max_failures: int = 20
    window: float = 60.0
    audit: bool = True
    audit_addresses: int = 50
    max_addresses: int = 100_000
    clock: Any = time.monotonic
    _failures: dict[str, list[float]] = field(default_factory=dict)  # address -> [window start, count]
    _pending: dict[str, int] = field(default_factory=dict)  # failures not audited yet
    _last_flush: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def retry_after(self, address: str) -> int | None:
        """Seconds until `address` may try again, or None when it is not blocked."""
        with self._lock:
            slot = self._failures.get(address)
            if slot is None:
                return None
            left = slot[0] + self.window - self.clock()
            if left <= 0:
                del self._failures[address]
                return None
            return max(1, math.ceil(left)) if slot[1] >= self.max_failures else None

    def failed(self, address: str) -> None:
        now = self.clock()
        with self._lock:
            slot = self._failures.get(address)
            if slot is None or now - slot[0] >= self.window:
                if len(self._failures) >= self.max_addresses:
                    self._evict(now)
                slot = self._failures[address] = [now, 0]
            slot[1] += 1
            if len(self._pending) < self.max_addresses or address in self._pending:
                self._pending[address] = self._pending.get(address, 0) + 1
            else:
                self._pending["(other addresses)"] = self._pending.get("(other addresses)", 0) + 1

    def _evict(self, now: float) -> None:
        for a in [a for a, (start, _) in self._failures.items() if now - start >= self.window]:
            del self._failures[a]
        while len(self._failures) >= self.max_addresses:  # all recent: forget the oldest window
            del self._failures[min(self._failures, key=lambda a: self._failures[a][0])]

    def due(self) -> bool:
        with self._lock:
            return bool(self._pending) and (
                self._last_flush is None or self.clock() - self._last_flush >= self.window
            )

    def take(self) -> dict[str, Any] | None:
        """The aggregate of failures since the last one taken (for the audit entry), or None."""
        with self._lock:
            if not self._pending:
                return None
            pending, self._pending, self._last_flush = self._pending, {}, self.clock()
        top = sorted(pending.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = dict(top[: self.audit_addresses])
        return {
            "failures": sum(pending.values()),
            "addresses": len(pending),
            "byAddress": shown,
            "blocked": sorted(a for a, n in shown.items() if n >= self.max_failures),
        }

    def flush(self, store: Any) -> bool:
        """Write the pending aggregate as one audit entry (provider tenant). True when one was written."""
        summary = self.take() if self.audit else None
        if summary is None:
            return False
        store.txn(
            [], [entry_put(SYSTEM, "auth-failure", "Authentication", PROVIDER_TENANT, "failures", **summary)]
        )
        return True


def guard_of(request: Request) -> AuthGuard:
    state = request.app.state
    guard = getattr(state, "auth_guard", None)
    if guard is None:
        guard = state.auth_guard = AuthGuard()
    return guard  # type: ignore[no-any-return]
