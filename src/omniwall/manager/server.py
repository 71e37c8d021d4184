"""Run the manager: open the store, bootstrap the first admin token, serve the API with uvicorn."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omniwall.store import open_store

from .flows import FlowService
from .flowstore import SqliteFlowStore
from .service import Manager
from .tokens import token_file_for

log = logging.getLogger(__name__)

SERVER_KEEPALIVE = 90  # seconds an idle HTTP connection stays open (see serve())


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` or `[v6]:PORT` -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT, like 127.0.0.1:8443")
    return (host.strip("[]") or "0.0.0.0"), int(port)


def build(db: str) -> tuple[Manager, Path | None]:
    store = open_store(db)
    manager = Manager(store)
    written = manager.tokens.bootstrap(token_file_for(db))
    return manager, written


@dataclass(frozen=True, slots=True)
class FlowOptions:
    """Where flow records go and how long they stay (docs/flows.md)."""

    db: str | None = None  # default: `<store>.flows` next to the store (`:memory:` for a memory store)
    retention: float = 24 * 3600.0  # seconds
    max_records: int = 10_000_000

    def path_for(self, store_db: str) -> str:
        if self.db:
            return self.db
        return ":memory:" if store_db == ":memory:" else f"{store_db}.flows"


def flow_service(store_db: str, options: FlowOptions) -> FlowService:
    return FlowService(
        SqliteFlowStore(options.path_for(store_db)),
        retention=options.retention,
        max_records=options.max_records,
    )


def serve(
    db: str,
    listen: str,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    *,
    flows: FlowOptions | None = None,
    metrics_address: str | None = None,
) -> None:
    import uvicorn

    from omniwall.api import metrics
    from omniwall.api.app import create_app

    if bool(tls_cert) != bool(tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    host, port = parse_listen(listen)
    if metrics_address:
        parse_listen(metrics_address)  # a bad address fails before anything starts
    manager, _ = build(db)
    flow_opts = flows or FlowOptions()
    app = create_app(manager, flows=flow_service(db, flow_opts))
    if metrics_address:
        metrics.serve(app.state.metrics, metrics_address)
        log.info("metrics on http://%s/metrics", metrics_address)
    log.info(
        "manager on %s://%s:%d, store %s at revision %d, flows in %s",
        "https" if tls_cert else "http",
        host,
        port,
        db,
        manager.revision,
        flow_opts.path_for(db),
    )
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            ssl_certfile=tls_cert,
            ssl_keyfile=tls_key,
            log_level="info",
            # Agents ack each change on a second connection, often more than uvicorn's default 5 s apart:
            # a fresh TCP (TLS) connection per ack cost both sides more than the ack. Longer than the
            # agents' own keep-alive (AGENT_KEEPALIVE), so the client always closes first (no reuse race).
            timeout_keep_alive=SERVER_KEEPALIVE,
        )
    finally:
        app.state.flows.close()  # the queue is written before the process ends
