"""One error body everywhere (``ErrorResponse``); domain errors and backing-service outages map here."""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hscr_client import ErrorDetail, ErrorResponse

from ..core.errors import ServiceError

log = logging.getLogger("hscr_service")

# Documented on every authenticated route.
ERROR_RESPONSES = {
    401: {"model": ErrorResponse, "description": "Missing or invalid API key."},
    404: {"model": ErrorResponse, "description": "No such resource for this tenant."},
    422: {"model": ErrorResponse, "description": "The request is invalid; the message says which field and why."},
    503: {"model": ErrorResponse, "description": "Redis or storage is unreachable; retry later."},
}


def _body(status: int, code: str, message: str, param: str | None = None, headers: dict | None = None):
    content = ErrorResponse(error=ErrorDetail(code=code, message=message, param=param)).model_dump()
    return JSONResponse(status_code=status, content=content, headers=headers)


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in ("body", "query", "path", "header"))


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return _body(exc.status_code, exc.code, exc.message, exc.param, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        message = "; ".join(f"{_loc(e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errors[:5])
        return _body(422, "invalid_request", message, _loc(first.get("loc", ())) or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        return _body(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(redis.RedisError)
    async def redis_down(_: Request, exc: redis.RedisError):
        log.warning("redis error: %s", exc)
        return _body(503, "unavailable", "job state (Redis) is unreachable; retry shortly",
                     headers={"Retry-After": "5"})

    @app.exception_handler(OSError)
    async def storage_down(_: Request, exc: OSError):
        log.warning("storage error: %s", exc)
        return _body(503, "unavailable", "storage is unreachable; retry shortly", headers={"Retry-After": "5"})
