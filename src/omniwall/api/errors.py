"""One error shape for every non-2xx answer: `{"error": code, "message": text, ...details}`.

422 bodies list each problem as `{"document", "path", "reason"}`; 403 bodies name the `permission`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from omniwall.manager.contracts import InvalidResources, Problem
from omniwall.manager.service import Conflict, NotFound
from omniwall.store import CompactedError, FutureRevisionError, StoreLimitError, StoreUnavailable

CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    410: "gone",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "too_many_requests",
    500: "internal",
    503: "unavailable",
}


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, *, headers: dict[str, str] | None = None, **details: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers  # e.g. Retry-After on a 429
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": CODES.get(self.status, "error"), "message": self.message, **self.details}


def not_found(what: str) -> ApiError:
    return ApiError(404, f"{what} not found")


def invalid(problems: list[Problem], message: str | None = None) -> ApiError:
    msg = message or f"{len(problems)} validation error(s); nothing was written"
    return ApiError(422, msg, errors=[p.to_json() for p in problems])


def install(app: FastAPI) -> None:
    """The handlers that turn every error into the one shape (called once by create_app)."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, err: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
        headers.update(err.headers or {})
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(InvalidResources)
    async def _invalid(_: Request, err: InvalidResources) -> JSONResponse:
        e = invalid(err.problems)
        return JSONResponse(e.body(), status_code=422)

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, err: Conflict) -> JSONResponse:
        return JSONResponse(ApiError(409, str(err)).body(), status_code=409)

    @app.exception_handler(NotFound)
    async def _nf(_: Request, err: NotFound) -> JSONResponse:
        return JSONResponse(ApiError(404, str(err)).body(), status_code=404)

    @app.exception_handler(CompactedError)
    async def _gone(_: Request, err: CompactedError) -> JSONResponse:
        return JSONResponse(ApiError(410, str(err)).body(), status_code=410)

    @app.exception_handler(RequestValidationError)
    async def _req(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = [
            Problem("request", ".".join(str(p) for p in e.get("loc", ())), e.get("msg", "invalid"))
            for e in err.errors()
        ]
        return JSONResponse(invalid(problems, "invalid request").body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        details: dict[str, Any] = {}
        if err.status_code in (400, 413):  # FastAPI's own body parsing, or the body limit
            details["errors"] = [{"document": "request", "path": "body", "reason": str(err.detail)}]
        body = ApiError(err.status_code, str(err.detail), **details).body()
        return JSONResponse(body, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(StoreUnavailable)
    async def _unavailable(_: Request, err: StoreUnavailable) -> JSONResponse:
        # the store (etcd) is away: nothing was written; agents keep their last state, clients retry
        e = ApiError(503, f"the store is unavailable: {err}", headers={"Retry-After": "1"})
        return JSONResponse(e.body(), status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(StoreLimitError)
    async def _too_large(_: Request, err: StoreLimitError) -> JSONResponse:
        # a cluster store's per-transaction limit: nothing was written; the client splits the request
        e = ApiError(413, str(err), errors=[{"document": "request", "path": "body", "reason": str(err)}])
        return JSONResponse(e.body(), status_code=413)

    @app.exception_handler(FutureRevisionError)
    async def _future(_: Request, err: FutureRevisionError) -> JSONResponse:
        e = ApiError(400, str(err), errors=[{"document": "request", "path": "revision", "reason": str(err)}])
        return JSONResponse(e.body(), status_code=400)
