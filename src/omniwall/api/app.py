"""The manager's HTTP application: REST v1 + OpenAPI (`/openapi.json`, docs at `/docs`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from omniwall import __version__
from omniwall import console as web_console
from omniwall.manager.flows import FlowService
from omniwall.manager.flowstore import SqliteFlowStore
from omniwall.manager.service import Manager

from . import admin, apply, errors, identity, limits, openapi, resources
from . import explain as explain_api
from . import feed as feed_api
from . import flows as flows_api
from . import insight as insight_api
from . import live as live_api
from . import metrics as metrics_api
from . import migrate as migrate_api


def create_app(manager: Manager, *, watch: bool = True, flows: FlowService | None = None) -> FastAPI:
    """`watch`: follow store writes made by other processes (replicas, `omniwall token --db`).
    `flows`: where flow records go (manager/flows.py); default an in-memory store (tests)."""
    flow_service = flows if flows is not None else FlowService(SqliteFlowStore(":memory:"))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if watch:
            manager.start_watch()
        try:
            yield
        finally:
            manager.stop_watch()
            # Write what is queued; the service stays usable (an app may be served again, as tests
            # do). Whoever made the service closes it (api/server.py after uvicorn returns).
            flow_service.flush(30)

    app = FastAPI(
        title="Omniwall manager",
        version=__version__,
        description="Distributed firewall policy: resources, apply/diff, audit, per-host feeds. "
        "Every call but /healthz needs `Authorization: Bearer <token>`.",
        lifespan=lifespan,
    )
    app.state.manager = manager
    app.state.flows = flow_service
    # What every route shares: typed OpenAPI schemas, the body limit, one error shape.
    openapi.install(app)
    limits.install(app)
    errors.install(app)
    feed_api.install(app)  # the agents' lean ack route, inside the request timer (api/feed.py)
    metrics_api.install(app)  # request latency; served apart (api/metrics.py)
    # Host feeds and acks first: they are the bulk of the requests (one per agent per change), and
    # routing tries every route in order. Their paths collide with no route of the routers below.
    app.include_router(feed_api.router())
    app.include_router(flows_api.router())  # POST /v1/hosts/{host}/flows (before resources, like feeds)
    app.include_router(live_api.router())  # /v1/audit/watch
    app.include_router(admin.router())
    app.include_router(apply.router())
    app.include_router(identity.router())
    app.include_router(explain_api.router())  # GET /v1/explain
    app.include_router(insight_api.router())  # group members, policy realization
    # Before resources, like the feed routes: /v1/hosts/{host}/feed must not be taken for a Host "feed".
    app.include_router(migrate_api.router())
    app.include_router(resources.router())
    app.include_router(web_console.router())  # GET /ui/: the web console's assets (no data)
    return app
