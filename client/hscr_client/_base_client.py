"""What the sync and the async client share: configuration, request building, retry policy, errors.

Nothing here does I/O. ``Client`` and ``AsyncClient`` (``_client.py``) add only the send loop,
mirrored method by method, so both behave the same by construction.
"""

from __future__ import annotations

import os
import random
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from ._exceptions import APIStatusError, status_error
from ._types import NOT_GIVEN, NotGiven, Timeout, given

__all__ = ["DEFAULT_BASE_URL", "DEFAULT_MAX_RETRIES", "DEFAULT_TIMEOUT", "BaseClient", "RequestOptions"]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
DEFAULT_MAX_RETRIES = 2
MAX_RETRY_DELAY = 8.0  # seconds; a longer Retry-After is capped here too
# Statuses worth another try: the request may have been fine and the server busy or restarting.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass
class RequestOptions:
    """One logical call. Retries rebuild the request from these, so every attempt is identical."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    files: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: Timeout | NotGiven = NOT_GIVEN
    max_retries: int | NotGiven = NOT_GIVEN
    # A create call's idempotency key, made once per logical call and sent on every retry of it.
    idempotency_key: str | None = None


def new_idempotency_key() -> str:
    return f"hscr-{uuid.uuid4()}"


class BaseClient:
    """Configuration and the pure parts of every call.

    :param api_key: the bearer key [default: ``$HSCR_API_KEY``].
    :param base_url: the service [default: ``$HSCR_BASE_URL``, else ``http://127.0.0.1:8000``].
    :param timeout: seconds (or an ``httpx.Timeout``) per request; ``None`` waits forever.
    :param max_retries: extra attempts after a connection error, a timeout, 408, 429 or 5xx.
    :param retry_backoff: the first retry's delay in seconds; it doubles per attempt (jittered, at most
        8 s) unless the server sends ``Retry-After``.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | httpx.URL | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        max_retries: int = DEFAULT_MAX_RETRIES,
        retry_backoff: float = 0.5,
        default_headers: dict[str, str] | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.api_key = api_key if api_key is not None else os.environ.get("HSCR_API_KEY") or None
        self.base_url = httpx.URL(str(base_url or os.environ.get("HSCR_BASE_URL") or DEFAULT_BASE_URL).rstrip("/"))
        self.timeout: Timeout = timeout if given(timeout) else DEFAULT_TIMEOUT  # type: ignore[assignment]
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self._default_headers = dict(default_headers or {})

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}(base_url={str(self.base_url)!r})"

    # --- building ---------------------------------------------------------------------------------

    def _headers(self, options: RequestOptions) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": _user_agent(), **self._default_headers}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if options.idempotency_key is not None:
            headers["Idempotency-Key"] = options.idempotency_key
        headers.update(options.headers)
        return headers

    def _url(self, path: str) -> httpx.URL:
        if "://" in path:  # an absolute URL the service handed out (checked by _is_own_url)
            return httpx.URL(path)
        return self.base_url.copy_with(raw_path=(self.base_url.raw_path.rstrip(b"/") + path.encode()))

    def _timeout(self, options: RequestOptions) -> Timeout:
        return options.timeout if given(options.timeout) else self.timeout  # type: ignore[return-value]

    def _build_request(self, http: httpx.Client | httpx.AsyncClient, options: RequestOptions) -> httpx.Request:
        timeout = self._timeout(options)
        return http.build_request(
            options.method,
            self._url(options.path),
            params=options.params,
            json=options.json,
            files=options.files,
            data=options.data,
            headers=self._headers(options),
            timeout=timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout),
        )

    def _bare_request(self, url: str, timeout: Timeout | NotGiven) -> httpx.Request:
        """A GET with none of our headers: presigned URLs must never see the bearer key."""
        seconds = timeout if given(timeout) else self.timeout
        return httpx.Request("GET", url, extensions={"timeout": httpx.Timeout(seconds).as_dict()})  # type: ignore[arg-type]

    def _is_own_url(self, url: str) -> bool:
        """A URL on the service itself gets the bearer key; any other host (presigned S3) never does."""
        target = httpx.URL(url)
        return not target.is_absolute_url or (
            (target.scheme, target.host, target.port) == (self.base_url.scheme, self.base_url.host, self.base_url.port))

    # --- retry policy -----------------------------------------------------------------------------

    def _max_retries(self, options: RequestOptions) -> int:
        return options.max_retries if given(options.max_retries) else self.max_retries  # type: ignore[return-value]

    @staticmethod
    def _should_retry(response: httpx.Response) -> bool:
        # The server may say no explicitly (as openai's servers do); honour it either way.
        hint = response.headers.get("x-should-retry")
        if hint in ("true", "false"):
            return hint == "true"
        return response.status_code in RETRY_STATUSES

    def _retry_delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds before retry ``attempt`` (0-based): ``Retry-After`` if sane, else jittered doubling."""
        if response is not None:
            try:
                retry_after = float(response.headers.get("retry-after", ""))
            except ValueError:
                retry_after = -1.0
            if 0 <= retry_after <= 60:
                return min(retry_after, MAX_RETRY_DELAY)
        delay = min(self.retry_backoff * 2.0**attempt, MAX_RETRY_DELAY)
        return delay * (1 - 0.25 * random.random())  # jitter: clients that failed together retry apart

    # --- answers ----------------------------------------------------------------------------------

    @staticmethod
    def _error(response: httpx.Response) -> APIStatusError:
        return status_error(response)

    @staticmethod
    def _parse(cast_to: type[ModelT], response: httpx.Response) -> ModelT:
        return cast_to.model_validate_json(response.content)


@lru_cache(maxsize=1)
def _user_agent() -> str:

    try:
        return f"hscr-client/{version('hscr-client')}"
    except PackageNotFoundError:  # running from a source tree
        return "hscr-client/dev"
