"""The one exception a client call raises: `ClientError`, with the HTTP status (None when the manager
was not reached or the client is misconfigured) and the server's own message and problem list."""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """A call to the manager failed.

    - `status`: the HTTP status of the answer; None when no answer came (connection refused, timeout,
      TLS failure) or the client could not be set up (no token, unreadable config or CA file).
    - `message`: the server's `message` (the API's error shape, docs/api.md), else a description.
    - `errors`: the 422 problems, each `{"document", "path", "reason"}`; [] otherwise.
    - `body`: the whole decoded error body ({} when it was not JSON).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        errors: list[dict[str, Any]] | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.errors = list(errors or [])
        self.body = dict(body or {})

    def __str__(self) -> str:
        return self.message if self.status is None else f"{self.message} (HTTP {self.status})"

    def lines(self) -> list[str]:
        """The message, then one indented line per problem: what the CLI prints."""
        out = [str(self)]
        for e in self.errors:
            out.append(f"  {e.get('document', '')}: {e.get('path', '')}: {e.get('reason', '')}")
        return out


__all__ = ["ClientError"]
