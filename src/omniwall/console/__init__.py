"""The web console: a read-only view over the REST API, served by the manager at `/ui/`.

Plain ES modules, fetch and streamed SSE, no build step and no third-party asset (docs/design/console.md).
The assets hold no data and no secret, so they are served without a token; every datum the console shows
comes from the `/v1` API with the bearer token the user signed in with. `router()` is mounted by
`api/app.py`.
"""

from .routes import router

__all__ = ["router"]
