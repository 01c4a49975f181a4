"""One error body everywhere (``ErrorResponse``); domain errors and backing-service outages map here.

Every error body carries the request's id (``X-Request-ID``, see ``api.edge``). Anything not mapped here
is answered by ``edge.RequestContext``: a JSON 500 with that id.
"""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hscr_client import ErrorDetail, ErrorResponse
from hscr_client._models import ID_PATTERN, ID_RULE

from ..core.errors import ServiceError

log = logging.getLogger("hscr_service")

RETRY_AFTER_SECONDS = 5
# Redis errors that mean "not reachable now" (BusyLoadingError, a Redis loading its AOF, is a ConnectionError);
# any other Redis error is a bug and answers 500.
REDIS_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)

# Documented on every route that takes a body.
BODY_ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "The body cannot be parsed (not UTF-8 JSON, or broken multipart)."},
    413: {"model": ErrorResponse, "description": "The body is over its limit; the message names the setting."},
}
# Documented on every authenticated route.
ERROR_RESPONSES = {
    401: {"model": ErrorResponse, "description": "Missing or invalid API key."},
    404: {"model": ErrorResponse, "description": "No such resource for this tenant."},
    422: {"model": ErrorResponse, "description": "The request is invalid; the message says which field and why."},
    503: {"model": ErrorResponse, "description": "Redis or storage is unreachable; retry after the Retry-After "
                                                 "header's seconds.",
          "headers": {"Retry-After": {"description": "Seconds to wait before retrying.",
                                      "schema": {"type": "integer"}}}},
}


def error_response(status: int, code: str, message: str, *, request_id: str | None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    detail = ErrorDetail(code=code, message=message, param=param, request_id=request_id)
    return JSONResponse(status_code=status, content=ErrorResponse(error=detail).model_dump(), headers=headers)


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in ("body", "query", "path", "header"))


def _message(error: dict) -> str:
    """One validation error in words; an id that breaks the id rule says the rule."""
    where = _loc(error.get("loc", ())) or "body"
    if error.get("type") == "string_pattern_mismatch" and error.get("ctx", {}).get("pattern") == ID_PATTERN:
        return f"{where}: must be {ID_RULE}"
    return f"{where}: {error.get('msg')}"


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        regex, route_methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is not None and route_methods and regex.match(request.url.path):
            methods |= set(route_methods)
    return sorted(methods)


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return error_response(exc.status_code, exc.code, exc.message, request_id=_request_id(request),
                              param=exc.param, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        message = "; ".join(_message(e) for e in errors[:5]) or "invalid request"
        return error_response(422, "invalid_request", message, request_id=_request_id(request),
                              param=_loc(first.get("loc", ())) or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        message = str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":  # FastAPI's words
            message = "the body cannot be parsed: send UTF-8 JSON with 'Content-Type: application/json'"
        elif exc.status_code == 400 and message == "Invalid multipart data.":  # Starlette's
            message = ("the body is not valid multipart/form-data: send the file as the 'file' field and its "
                       "purpose as the 'purpose' field")
        elif exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; the routes are listed at /docs"
        headers = dict(exc.headers or {})  # what the status needs, e.g. WWW-Authenticate
        if exc.status_code == 405:
            # Starlette names the methods of the first route that matched the path; a path served by several
            # routes (GET and POST /v1/jobs) allows them all (RFC 9110: Allow lists every method).
            headers["Allow"] = ", ".join(_allowed_methods(request))
            message = f"{request.method} is not allowed on {request.url.path}; allowed: {headers['Allow']}"
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), message,
                              request_id=_request_id(request), headers=headers or None)

    async def redis_down(request: Request, exc: Exception):
        log.warning("redis unreachable (request id %s): %s", _request_id(request), exc)
        return error_response(503, "unavailable", f"job state (Redis) is unreachable; retry in "
                              f"{RETRY_AFTER_SECONDS} s (the Retry-After header)", request_id=_request_id(request),
                              headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    for unreachable in REDIS_UNREACHABLE:
        app.add_exception_handler(unreachable, redis_down)

    @app.exception_handler(OSError)
    async def storage_down(request: Request, exc: OSError):
        log.warning("storage error (request id %s): %s", _request_id(request), exc)
        return error_response(503, "unavailable", f"storage is unreachable; retry in {RETRY_AFTER_SECONDS} s "
                              "(the Retry-After header)", request_id=_request_id(request),
                              headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
