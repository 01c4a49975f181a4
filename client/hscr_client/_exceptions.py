"""Errors raised by the SDK. One root, so ``except HSCRError`` catches everything we raise.

::

    HSCRError
     ├── APIError                      the request reached (or tried to reach) the service
     │    ├── APIStatusError           the service answered 4xx/5xx (status_code, request_id, body)
     │    │    ├── BadRequestError            400
     │    │    ├── AuthenticationError        401
     │    │    ├── PermissionDeniedError      403
     │    │    ├── NotFoundError              404 (also: another tenant's id)
     │    │    ├── ConflictError              409 (e.g. cancelling a finished job)
     │    │    ├── UnprocessableEntityError   422 (validation: parameters, limits)
     │    │    ├── RateLimitError             429
     │    │    └── InternalServerError        >= 500
     │    └── APIConnectionError       no answer: refused, reset, DNS, TLS ...
     │         └── APITimeoutError     no answer in time
     └── WaitTimeoutError              ``jobs.wait(timeout=...)`` ran out before the job ended

httpx's own exceptions are converted in exactly one place, :func:`map_httpx_exceptions`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "HSCRError",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "UnprocessableEntityError",
    "WaitTimeoutError",
]


class HSCRError(Exception):
    """Root of every error the SDK raises."""


class APIError(HSCRError):
    """A request to the service did not succeed. ``request`` is the httpx request that was sent."""

    message: str
    request: httpx.Request
    body: Any

    def __init__(self, message: str, *, request: httpx.Request, body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        self.body = body


class APIStatusError(APIError):
    """The service answered with a 4xx or 5xx status."""

    response: httpx.Response
    status_code: int
    request_id: str | None
    code: str | None
    param: str | None

    def __init__(self, message: str, *, response: httpx.Response, body: Any) -> None:
        super().__init__(message, request=response.request, body=body)
        self.response = response
        self.status_code = response.status_code
        self.request_id = response.headers.get("x-request-id")
        # The service's ErrorResponse: {"error": {"code", "message", "param"}}.
        error = body.get("error") if isinstance(body, dict) else None
        self.code = error.get("code") if isinstance(error, dict) else None
        self.param = error.get("param") if isinstance(error, dict) else None

    def __str__(self) -> str:
        suffix = f" (request id {self.request_id})" if self.request_id else ""
        return f"{self.status_code}: {self.message}{suffix}"


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class PermissionDeniedError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class ConflictError(APIStatusError):
    pass


class UnprocessableEntityError(APIStatusError):
    pass


class RateLimitError(APIStatusError):
    pass


class InternalServerError(APIStatusError):
    pass


class APIConnectionError(APIError):
    """No answer from the service: the connection was refused, reset or never made."""

    def __init__(self, *, request: httpx.Request, message: str = "Connection error.") -> None:
        super().__init__(message, request=request)


class APITimeoutError(APIConnectionError):
    """No answer in time."""

    def __init__(self, *, request: httpx.Request) -> None:
        super().__init__(request=request, message="Request timed out.")


class WaitTimeoutError(HSCRError, TimeoutError):
    """``jobs.wait`` gave up before the job reached a terminal status; ``job`` is its last state."""

    def __init__(self, job: Any, waited: float) -> None:
        super().__init__(f"job {job.id} is still {job.status} after {waited:.0f} s")
        self.job = job


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def status_error(response: httpx.Response) -> APIStatusError:
    """The typed error for a 4xx/5xx ``response`` (its body must have been read)."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text or None
    cls = _STATUS_ERRORS.get(response.status_code)
    if cls is None:
        cls = InternalServerError if response.status_code >= 500 else APIStatusError
    return cls(_message(body, response), response=response, body=body)


def _message(body: Any, response: httpx.Response) -> str:
    """FastAPI puts the reason under ``detail``: a string, or a list of validation errors."""
    detail = body.get("detail", body.get("error", body)) if isinstance(body, dict) else body
    if isinstance(detail, dict):
        detail = detail.get("message", detail)
    if isinstance(detail, list):
        parts = []
        for error in detail:
            if isinstance(error, dict) and "msg" in error:
                location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
                parts.append(f"{location}: {error['msg']}" if location else str(error["msg"]))
            else:
                parts.append(str(error))
        detail = "; ".join(parts)
    return str(detail) if detail else response.reason_phrase or f"HTTP {response.status_code}"


@contextmanager
def map_httpx_exceptions(request: httpx.Request) -> Iterator[None]:
    """Translate httpx's transport errors into ours: the one place that knows httpx's tree."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise APITimeoutError(request=request) from exc
    except httpx.TransportError as exc:
        raise APIConnectionError(request=request, message=f"Connection error: {exc}") from exc
