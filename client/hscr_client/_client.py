"""``Client`` and ``AsyncClient``: the send loop over :class:`BaseClient`, mirrored method by method.

>>> from hscr_client import Client
>>> client = Client()                       # HSCR_API_KEY, HSCR_BASE_URL from the environment
>>> job = client.jobs.create(input_file_id=client.files.upload("items.jsonl", purpose="items").id)
>>> job = client.jobs.wait(job.id, progress=True)
>>> ds = client.datasets.load(job.id, config="pairs")   # a datasets.Dataset (extra: data)
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import cached_property
from types import TracebackType
from typing import Any

import anyio
import httpx

from ._base_client import DEFAULT_MAX_RETRIES, BaseClient, ModelT, RequestOptions
from ._exceptions import APIConnectionError, map_httpx_exceptions
from ._resources import AsyncDatasets, AsyncFiles, AsyncJobs, Datasets, Files, Jobs
from ._types import NOT_GIVEN, NotGiven, Timeout

__all__ = ["AsyncClient", "Client"]


class Client(BaseClient):
    """The synchronous client. Use it as a context manager, or call :meth:`close`.

    Takes :class:`BaseClient`'s keyword arguments, plus ``http_client`` (an ``httpx.Client`` of your
    own, e.g. with a proxy or ``transport=httpx.MockTransport(...)`` in tests).
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
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries,
                         retry_backoff=retry_backoff, default_headers=default_headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(follow_redirects=True)

    @cached_property
    def files(self) -> Files:
        return Files(self)

    @cached_property
    def jobs(self) -> Jobs:
        return Jobs(self)

    @cached_property
    def datasets(self) -> Datasets:
        return Datasets(self)

    # --- the send loop ----------------------------------------------------------------------------

    def _send(self, options: RequestOptions, *, stream: bool = False) -> httpx.Response:
        """Send with retries; return a 2xx/3xx response, raise a typed error for anything else."""
        max_retries = self._max_retries(options)
        attempt = 0
        while True:
            request = self._build_request(self._http, options)
            try:
                with map_httpx_exceptions(request):
                    response = self._http.send(request, stream=stream)
            except APIConnectionError:
                if attempt >= max_retries:
                    raise
                time.sleep(self._retry_delay(attempt, None))
                attempt += 1
                continue
            if response.is_success or response.is_redirect:
                return response
            if attempt < max_retries and self._should_retry(response):
                response.close()
                time.sleep(self._retry_delay(attempt, response))
                attempt += 1
                continue
            with map_httpx_exceptions(request):
                response.read()
            raise self._error(response)

    def _request(self, cast_to: type[ModelT], options: RequestOptions) -> ModelT:
        response = self._send(options)
        return self._parse(cast_to, response)

    def _get(self, cast_to: type[ModelT], path: str, **kwargs: Any) -> ModelT:
        return self._request(cast_to, RequestOptions("GET", path, **kwargs))

    def _post(self, cast_to: type[ModelT], path: str, **kwargs: Any) -> ModelT:
        return self._request(cast_to, RequestOptions("POST", path, **kwargs))

    @contextmanager
    def _stream(self, options: RequestOptions) -> Iterator[httpx.Response]:
        response = self._send(options, stream=True)
        try:
            yield response
        finally:
            response.close()

    @contextmanager
    def _stream_url(self, url: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> Iterator[httpx.Response]:
        """GET a URL the service handed out: its own routes authenticated, presigned URLs bare."""
        if self._is_own_url(url):
            with self._stream(RequestOptions("GET", url, timeout=timeout)) as r:
                yield r
            return
        request = self._bare_request(url, timeout)
        with map_httpx_exceptions(request):
            response = self._http.send(request, stream=True)
        try:
            if not response.is_success:
                with map_httpx_exceptions(request):
                    response.read()
                raise self._error(response)
            yield response
        finally:
            response.close()

    # --- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncClient(BaseClient):
    """The asynchronous twin of :class:`Client`: the same methods, awaited; ``async with`` or :meth:`aclose`."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | httpx.URL | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        max_retries: int = DEFAULT_MAX_RETRIES,
        retry_backoff: float = 0.5,
        default_headers: dict[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries,
                         retry_backoff=retry_backoff, default_headers=default_headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(follow_redirects=True)

    @cached_property
    def files(self) -> AsyncFiles:
        return AsyncFiles(self)

    @cached_property
    def jobs(self) -> AsyncJobs:
        return AsyncJobs(self)

    @cached_property
    def datasets(self) -> AsyncDatasets:
        return AsyncDatasets(self)

    # --- the send loop ----------------------------------------------------------------------------

    async def _send(self, options: RequestOptions, *, stream: bool = False) -> httpx.Response:
        max_retries = self._max_retries(options)
        attempt = 0
        while True:
            request = self._build_request(self._http, options)
            try:
                with map_httpx_exceptions(request):
                    response = await self._http.send(request, stream=stream)
            except APIConnectionError:
                if attempt >= max_retries:
                    raise
                await anyio.sleep(self._retry_delay(attempt, None))
                attempt += 1
                continue
            if response.is_success or response.is_redirect:
                return response
            if attempt < max_retries and self._should_retry(response):
                await response.aclose()
                await anyio.sleep(self._retry_delay(attempt, response))
                attempt += 1
                continue
            with map_httpx_exceptions(request):
                await response.aread()
            raise self._error(response)

    async def _request(self, cast_to: type[ModelT], options: RequestOptions) -> ModelT:
        response = await self._send(options)
        return self._parse(cast_to, response)

    async def _get(self, cast_to: type[ModelT], path: str, **kwargs: Any) -> ModelT:
        return await self._request(cast_to, RequestOptions("GET", path, **kwargs))

    async def _post(self, cast_to: type[ModelT], path: str, **kwargs: Any) -> ModelT:
        return await self._request(cast_to, RequestOptions("POST", path, **kwargs))

    @asynccontextmanager
    async def _stream(self, options: RequestOptions) -> AsyncIterator[httpx.Response]:
        response = await self._send(options, stream=True)
        try:
            yield response
        finally:
            await response.aclose()

    @asynccontextmanager
    async def _stream_url(self, url: str, *, timeout: Timeout | NotGiven = NOT_GIVEN
                          ) -> AsyncIterator[httpx.Response]:
        if self._is_own_url(url):
            async with self._stream(RequestOptions("GET", url, timeout=timeout)) as r:
                yield r
            return
        request = self._bare_request(url, timeout)
        with map_httpx_exceptions(request):
            response = await self._http.send(request, stream=True)
        try:
            if not response.is_success:
                with map_httpx_exceptions(request):
                    await response.aread()
                raise self._error(response)
            yield response
        finally:
            await response.aclose()

    # --- lifetime ---------------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
