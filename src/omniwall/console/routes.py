"""`GET /ui/...`: the console's static assets, each with a strict Content-Security-Policy.

Only files that ship in `static/` are served (the set is read once at import: no path from the request
ever reaches the file system, so `..` and friends cannot escape). Explicit routes rather than a
StaticFiles mount, so the authorization matrix test sees them like any other route.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

STATIC = Path(__file__).resolve().parent / "static"

# No inline script or style, nothing from another origin, no framing, no form posts: data arrives only
# through fetch() to this same origin (connect-src), and rendering uses DOM APIs (textContent).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # The assets change with the package; a reload must pick them up (they are small).
    "Cache-Control": "no-cache",
}
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}


def _assets() -> dict[str, Path]:
    return {
        p.relative_to(STATIC).as_posix(): p
        for p in sorted(STATIC.rglob("*"))
        if p.is_file() and p.suffix in TYPES
    }


ASSETS = _assets()


def _serve(name: str) -> Response:
    path = ASSETS.get(name)
    if path is None:
        return Response("not found\n", status_code=404, media_type="text/plain", headers=HEADERS)
    return Response(path.read_bytes(), media_type=TYPES[path.suffix], headers=HEADERS)


def router() -> APIRouter:
    r = APIRouter(tags=["Console"], include_in_schema=False)

    @r.get("/ui", summary="the web console (redirects to /ui/)")
    def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    @r.get("/ui/", summary="the web console's page")
    def ui_index() -> Response:
        return _serve("index.html")

    @r.get("/ui/{asset:path}", summary="the web console's assets (scripts, styles)")
    def ui_asset(asset: str) -> Response:
        return _serve(asset)

    return r


__all__ = ["CSP", "router"]
