"""Domain errors. Core code raises these; the API maps each to its status code in one place."""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 400
    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidInput(ServiceError):
    status_code = 422
    code = "invalid_request"


class NotFound(ServiceError):
    """Also what another tenant's id gets: existence is never revealed."""

    status_code = 404
    code = "not_found"


class Conflict(ServiceError):
    status_code = 409
    code = "conflict"


class TooLarge(ServiceError):
    status_code = 413
    code = "too_large"


class Unavailable(ServiceError):
    """A backing service (Redis, storage) did not answer; retrying later is right."""

    status_code = 503
    code = "unavailable"
