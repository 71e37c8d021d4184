"""Feed commands (live migration, docs/design/migration.md): conntrack export/import/flush on request.

A command arrives on the feed as `{"type": "command", "id", "op", "args"}`, in order with the deltas,
and is run at once on the backend (synchronously, like a delta) through the `Backend` protocol only
(each backend picks its fastest way: NftBackend's export/import are dataplane/ct_migrate.py's); its
result goes back with `POST /v1/hosts/{host}/commands/{id}`, retried a few times, never blocking the feed.

ops:
- `export_connections {addresses}` -> `{"entries": [ConnEntry JSON]}`: entries to or from them
- `import_connections {entries}` -> `{"imported": n}`
- `flush_connections {addresses}` -> `{"flushed": n}`: entries to or from them, except those whose other
  end is a vNIC this host still holds (its hop still needs them)
A failure answers `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
from typing import Any
from urllib.parse import quote

import httpx

from omniwall.compiler.ir import HostDesiredState
from omniwall.dataplane.backend import Backend, ConnEntry

log = logging.getLogger("omniwall.agent")

_FIELDS = {f.name for f in dataclasses.fields(ConnEntry)}


def entry_to_json(e: ConnEntry) -> dict[str, Any]:
    return dataclasses.asdict(e)


def entry_from_json(d: dict[str, Any]) -> ConnEntry:
    unknown = set(d) - _FIELDS
    if unknown:
        raise ValueError(f"unknown conntrack entry field(s): {', '.join(sorted(unknown))}")
    return ConnEntry(**d)


def _canon(a: str) -> str:
    return str(ipaddress.ip_address(a))


def run_command(
    backend: Backend, state: HostDesiredState | None, op: str, args: dict[str, Any]
) -> dict[str, Any]:
    try:
        if op == "export_connections":
            entries = backend.export_connections([str(a) for a in args.get("addresses", [])])
            return {"entries": [entry_to_json(e) for e in entries]}
        if op == "import_connections":
            entries = [entry_from_json(d) for d in args.get("entries", [])]
            return {"imported": backend.import_connections(entries)}
        if op == "flush_connections":
            moving = {_canon(a) for a in args.get("addresses", [])}
            local = {_canon(a) for v in (state.vnics if state else ()) for a in v.addresses} - moving
            doomed = [
                e
                for e in backend.export_connections(sorted(moving))
                if not any(x and _canon(x) in local for x in (e.src, e.dst, e.reply_src, e.reply_dst))
            ]
            return {"flushed": backend.flush_connections(doomed) if doomed else 0}
        return {"error": f"unknown command op {op!r}"}
    except Exception as e:  # answer with the reason; the manager rolls back
        log.warning("command %s failed: %s: %s", op, type(e).__name__, e)
        return {"error": f"{type(e).__name__}: {e}"}


async def post_result(
    client: httpx.AsyncClient, manager_url: str, host: str, token: str, cid: str, result: dict[str, Any]
) -> None:
    url = f"{manager_url.rstrip('/')}/v1/hosts/{quote(host, safe='')}/commands/{quote(cid, safe='')}"
    for attempt in range(5):
        try:
            resp = await client.post(
                url, json=result, headers={"Authorization": f"Bearer {token}"}, timeout=30
            )
            if resp.status_code < 500:
                if resp.status_code >= 400:
                    log.warning("command %s result refused: HTTP %d", cid, resp.status_code)
                return
        except httpx.HTTPError as e:
            log.warning("command %s result: %s", cid, e)
        await asyncio.sleep(0.2 * (attempt + 1))


__all__ = ["entry_from_json", "entry_to_json", "post_result", "run_command"]
