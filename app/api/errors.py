"""The handlers that render every error as RFC 9457 problem+json: the service's own
(app/errors.py), FastAPI's validation errors, HTTP errors and anything unexpected."""

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import (
    Conflict,
    InvalidCsv,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    ServiceUnavailable,
    Unauthorized,
)
from app.storage import StoreFailure

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://errors.batch-image-service.dev/"
RETRY_AFTER_SECONDS = "5"


def database_unavailable(exc: BaseException) -> bool:
    """The database cannot be reached or has no connection to spare, as opposed to a
    query it refused: the client may try the same request again shortly."""
    if isinstance(exc, OperationalError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def database_problem(exc: BaseException) -> str:
    """Why the database is unavailable, in a line: the driver's first line (connection
    refused, server closed the connection, pool timeout), which names no password."""
    cause = getattr(exc, "orig", None) or exc
    first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {first_line[:200]}" if first_line else type(cause).__name__


# The one place where each kind of error gets its status code.
HTTP_STATUS: dict[type[ServiceError], int] = {
    NotFound: 404,
    Conflict: 409,
    InvalidCsv: 422,
    InvalidInput: 422,
    PayloadTooLarge: 413,
    Unauthorized: 401,
    ServiceUnavailable: 503,
}


def http_status(error: ServiceError) -> int:
    for kind in type(error).__mro__:
        if kind in HTTP_STATUS:
            return HTTP_STATUS[kind]
    return 400


def problem_response(
    status: int,
    title: str,
    detail: str | None,
    *,
    slug: str | None = None,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + slug if slug else "about:blank",
        "title": title,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    if instance:
        body["instance"] = instance
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_CONTENT_TYPE, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _problem(request: Request, exc: ServiceError):
        return problem_response(
            http_status(exc),
            exc.title,
            exc.detail,
            slug=exc.slug,
            instance=request.url.path,
            headers=exc.headers,
            **exc.extra,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        title = (
            HTTPStatus(exc.status_code).phrase
            if exc.status_code in HTTPStatus._value2member_map_
            else "Error"
        )
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != title else None
        return problem_response(
            exc.status_code,
            title,
            detail,
            instance=request.url.path,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = [
            {
                "location": ".".join(str(part) for part in error.get("loc", ())),
                "message": error.get("msg", ""),
            }
            for error in exc.errors()
        ]
        return problem_response(
            422,
            "The request is not valid",
            "; ".join(f"{e['location']}: {e['message']}" for e in errors),
            slug="invalid-input",
            instance=request.url.path,
            errors=errors,
        )

    @app.exception_handler(StoreFailure)
    async def _storage(request: Request, exc: StoreFailure):
        # The outputs' storage is away or full (thumbnails, deletes): try again later.
        return problem_response(
            503,
            "Service unavailable",
            f"the outputs' storage did not answer: {exc.message}",
            slug="unavailable",
            instance=request.url.path,
            headers={"Retry-After": "5"},
        )

    async def _database_away(request: Request, exc: Exception):
        if not database_unavailable(exc):
            return await _unexpected(request, exc)
        problem = database_problem(exc)
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, problem)
        return problem_response(
            503,
            "Service unavailable",
            f"the database does not answer ({problem}); try again shortly",
            slug="unavailable",
            instance=request.url.path,
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )

    for kind in (DBAPIError, PoolTimeout):
        app.add_exception_handler(kind, _database_away)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(
            500,
            "Internal server error",
            "The server could not complete the request; it has been logged.",
            slug="internal",
            instance=request.url.path,
        )
