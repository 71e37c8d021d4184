"""Run the manager: open the store, bootstrap the first admin token, serve the API with uvicorn.

TLS (docs/security.md): `--tls-cert/--tls-key` serve HTTPS; `--client-ca` verifies client certificates
in the handshake and hands the verified certificate to the API (`scope["extensions"]["tls"]`), which
binds an agent's certificate to its host (api/auth.py). The certificate files are re-read when they
change (checked every `RELOAD_INTERVAL` s) or on SIGHUP; established connections keep going.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omniwall import logformat, sdnotify
from omniwall.manager.audit import chained
from omniwall.manager.flows import FlowService
from omniwall.manager.flowstore import SqliteFlowStore
from omniwall.manager.service import Manager
from omniwall.manager.tokens import token_file_for
from omniwall.store import open_store, sqlite_path
from omniwall.tls import ReloadingContext, server_context

from .feed import RAW_SEND
from .listen import parse_listen, plain_http_warning

log = logging.getLogger(__name__)

SERVER_KEEPALIVE = 90  # seconds an idle HTTP connection stays open (see serve())
RELOAD_INTERVAL = 5.0  # seconds between checks of the certificate files
# On SIGTERM uvicorn waits for open requests to end, and agents' feeds and status streams, and the
# console's watches, never end by themselves: without a bound a manager never stopped while an agent
# was attached (systemd killed it after TimeoutStopSec). After this long they are cancelled; agents
# fail over to another manager and keep enforcing meanwhile.
SHUTDOWN_GRACE = 2.0


def build(db: str, token_dir: Path | None = None) -> tuple[Manager, Path | None]:
    """`db`: a store spec (`open_store`). With etcd the bootstrap token goes to the working directory
    (or `token_dir`), like with `:memory:`; of several managers starting at once on an empty etcd, only
    the one that created the token writes it (manager/tokens.py)."""
    store = chained(open_store(db))
    manager = Manager(store)
    token_file = token_file_for(sqlite_path(db) or ":memory:")
    if token_dir is not None and not token_file.is_absolute():
        token_file = token_dir / token_file
    written = manager.tokens.bootstrap(token_file)
    return manager, written


@dataclass(frozen=True, slots=True)
class FlowOptions:
    """Where flow records go and how long they stay (docs/flows.md)."""

    # default: `<store>.flows` next to the store (`:memory:` for a memory store, `omniwall.flows` in the
    # working directory for etcd: flow records stay local to each manager)
    db: str | None = None
    retention: float = 24 * 3600.0  # seconds
    max_records: int = 10_000_000

    def path_for(self, store_db: str) -> str:
        if self.db:
            return self.db
        local = sqlite_path(store_db)
        if local is None:
            return "omniwall.flows"
        return ":memory:" if local == ":memory:" else f"{local}.flows"


def flow_service(store_db: str, options: FlowOptions) -> FlowService:
    return FlowService(
        SqliteFlowStore(options.path_for(store_db)),
        retention=options.retention,
        max_records=options.max_records,
    )


ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def _peer_tls(transport: Any) -> dict[str, Any] | None:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    peer = ssl_object.getpeercert()  # {} or None without a (verified) client certificate
    return {"tls_version": ssl_object.version(), "peercert": peer or None}


def _with_tls(app: ASGIApp, tls: dict[str, Any]) -> ASGIApp:
    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope.setdefault("extensions", {})["tls"] = tls
        await app(scope, receive, send)

    return wrapped


def tls_protocol(base: type) -> type:
    """uvicorn's HTTP protocol, plus the verified client certificate of the connection in each request's
    scope (uvicorn does not implement the ASGI TLS extension). The handshake is complete when
    `connection_made` runs, so the certificate is known once per connection."""

    class PeerCertProtocol(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            tls = _peer_tls(transport)
            if tls is not None:
                self.app = _with_tls(self.app, tls)

    PeerCertProtocol.__name__ = f"PeerCert{base.__name__}"
    return PeerCertProtocol


def _base_protocol() -> type:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is a dependency
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


class EndStreams:
    """The app, with every open response ended cleanly when the manager stops.

    Agents' feeds and status streams and the console's watches never end by themselves, and uvicorn
    waits for open requests on SIGTERM: a manager never stopped while an agent was attached. At
    shutdown (`end`, after the listening sockets are closed, so nobody reconnects here) each request
    still running is cancelled; a response already started gets its last, empty chunk (the client
    sees a clean end of stream and goes to another manager), one not started gets a 503."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state = app.state  # what callers read through `server.config.app`
        self.running: set[asyncio.Task[Any]] = set()
        self.ending = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        task = asyncio.current_task()
        assert task is not None
        scope.setdefault(RAW_SEND, send)  # the server's own: a feed writes its deltas to it (api/feed.py)
        sent = {"started": False, "done": False}

        async def tracked(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                sent["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["done"] = True
            await send(message)

        self.running.add(task)
        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if not self.ending:
                raise
            with contextlib.suppress(Exception):  # the peer may be gone already
                if not sent["started"]:
                    await send({"type": "http.response.start", "status": 503, "headers": []})
                if not sent["done"]:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.running.discard(task)

    def end(self) -> None:
        self.ending = True
        for task in list(self.running):
            task.cancel()


def make_server(
    manager: Manager,
    host: str,
    port: int,
    *,
    tls: ReloadingContext | None = None,
    client_ca: bool = False,
    log_level: str = "info",
    flows: FlowService | None = None,
) -> Any:
    """A `uvicorn.Server` for the API (tests run it on a thread; `serve` on the main one)."""
    import uvicorn

    from . import flowrelay
    from .app import create_app

    app = create_app(manager, flows=flows)
    flowrelay.advertise(app, "https" if tls else "http", host, port)  # peers find it (flows across managers)
    # Agents must present their host's certificate when the manager can verify one (api/auth.py).
    app.state.agent_cert_required = client_ca
    kwargs: dict[str, Any] = {}
    if tls is not None:
        # uvicorn builds its own SSLContext from these files; it is replaced below by ours, which
        # reloads in place (and exists in every uvicorn version, unlike ssl_context_factory).
        kwargs = {
            "ssl_certfile": str(tls.cert),
            "ssl_keyfile": str(tls.key),
            "http": tls_protocol(_base_protocol()),
        }
    streams = EndStreams(app)
    config = uvicorn.Config(
        streams,
        host=host,
        port=port,
        log_level=log_level,
        # Agents ack each change on a second connection, often more than uvicorn's default 5 s apart:
        # a fresh TCP (TLS) connection per ack cost both sides more than the ack. Longer than the
        # agents' own keep-alive (AGENT_KEEPALIVE), so the client always closes first (no reuse race).
        timeout_keep_alive=SERVER_KEEPALIVE,
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
        **kwargs,
    )
    if tls is not None:
        config.load()
        config.ssl = tls.context

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[Any] | None = None) -> None:
            for listening in self.servers:  # first, so no agent reconnects to a manager that stops
                listening.close()
            streams.end()  # then uvicorn's wait for open requests is short
            await super().shutdown(sockets)

    return Server(config)


async def _reload_loop(tls: ReloadingContext, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        tls.reload_if_changed()


async def _notify_when_started(server: Any) -> None:
    """systemd (Type=notify): ready once uvicorn listens, so units ordered after the manager (an agent
    on the same machine) find it answering."""
    while not server.started:
        await asyncio.sleep(0.05)
    sdnotify.ready(f"serving at revision {server.config.app.state.manager.revision}")


def serve(
    db: str,
    listen: str,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    client_ca: str | None = None,
    *,
    flows: FlowOptions | None = None,
    metrics_address: str | None = None,
) -> None:
    if threading.current_thread() is threading.main_thread():
        # SIGHUP means "reload the certificate": never let one that arrives during start-up kill us
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if client_ca and not tls_cert:
        raise ValueError("--client-ca needs --tls-cert and --tls-key (client certificates need TLS)")
    host, port = parse_listen(listen)
    if metrics_address:
        parse_listen(metrics_address)  # a bad address fails before anything starts
    tls = server_context(tls_cert, tls_key, client_ca) if tls_cert and tls_key else None
    manager, _ = build(db)
    flow_opts = flows or FlowOptions()
    server = make_server(
        manager, host, port, tls=tls, client_ca=bool(client_ca), flows=flow_service(db, flow_opts)
    )
    logformat.adopt("uvicorn", "uvicorn.error", "uvicorn.access")  # after uvicorn set up its loggers
    app = server.config.app
    if metrics_address:
        from . import metrics

        metrics.serve(app.state.metrics, metrics_address)
        log.info("metrics on http://%s/metrics", metrics_address)
    log.info(
        # "manager on URL" first: operators and the docs tests wait for that text; the id tells replicas apart
        "manager on %s://%s:%d (id %s), store %s at revision %d, flows in %s%s",
        "https" if tls else "http",
        host,
        port,
        manager.id,
        db,
        manager.revision,
        flow_opts.path_for(db),
        ", client certificates verified" if client_ca else "",
    )
    warning = plain_http_warning(host, port, tls=tls is not None)
    if warning:
        log.warning(warning)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reloader = None
        if tls is not None:
            reloader = asyncio.create_task(_reload_loop(tls, RELOAD_INTERVAL))
            if threading.current_thread() is threading.main_thread():
                loop.add_signal_handler(signal.SIGHUP, tls.reload_if_changed)
        ready = asyncio.create_task(_notify_when_started(server))
        try:
            await server.serve()
        finally:
            ready.cancel()
            if reloader is not None:
                reloader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reloader

    factory = getattr(server.config, "get_loop_factory", lambda: None)()
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main())
    finally:
        app.state.flows.close()  # the queue is written before the process ends
