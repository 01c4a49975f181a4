"""``client.jobs``: create, retrieve, list, cancel, wait for and stream the progress of generation jobs."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

import anyio
import httpx
from httpx_sse import EventSource
from tqdm.auto import tqdm

from .._base_client import RequestOptions, new_idempotency_key
from .._exceptions import APIConnectionError, WaitTimeoutError, map_httpx_exceptions
from .._models import TERMINAL_STATUSES, Event, ItemInput, Job, JobList
from .._params import HSCRParams
from .._types import NOT_GIVEN, NotGiven, Timeout, given, strip_not_given
from ._resource import AsyncAPIResource, SyncAPIResource, path_id

__all__ = ["AsyncJobs", "Jobs"]

# The event stream idles between updates (the server pings); a read this long without a byte means
# the connection is dead, and the stream reconnects from the last event it saw.
_STREAM_TIMEOUT = httpx.Timeout(120.0, connect=5.0)
DEFAULT_MAX_RECONNECTS = 5
_HEALTHY_STREAM_SECONDS = 30.0


def _create_options(*, input_file_id: str | NotGiven, items: Iterable[ItemInput | Mapping[str, Any]] | NotGiven,
                    model: str | NotGiven, params: HSCRParams | Mapping[str, Any] | NotGiven,
                    metadata: Mapping[str, str] | NotGiven, idempotency_key: str | NotGiven,
                    timeout: Timeout | NotGiven, completion_window: str | NotGiven = NOT_GIVEN) -> RequestOptions:
    body: dict[str, Any] = strip_not_given({"input_file_id": input_file_id, "model": model,
                                            "metadata": dict(metadata) if given(metadata) else NOT_GIVEN,
                                            "completion_window": completion_window})
    if given(items):
        body["items"] = [item.model_dump(mode="json", exclude_none=True) if isinstance(item, ItemInput)
                         else dict(item) for item in items]  # type: ignore[union-attr]
    if given(params):
        # A dict goes as is, so the service (not the SDK's copy of the model) judges it and says why.
        # Only what the caller set: the rest takes the served model family's defaults (docs/models.md).
        body["params"] = (params.model_dump(mode="json", exclude_unset=True) if isinstance(params, HSCRParams)
                          else dict(params))
    # One key per logical create, reused by every retry of it: a retry never makes a second job.
    key = idempotency_key if isinstance(idempotency_key, str) else new_idempotency_key()
    return RequestOptions("POST", "/v1/jobs", json=body, timeout=timeout, idempotency_key=key)


def _events_options(job_id: str, last_event_id: str | None) -> RequestOptions:
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    return RequestOptions("GET", f"/v1/jobs/{path_id(job_id, what='job_id')}/events", headers=headers,
                          timeout=_STREAM_TIMEOUT)


def _parse_errors(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class _Progress:
    """A tqdm bar over a job's items (every item accounted for, of total); silent unless asked for."""

    def __init__(self, job_id: str, enabled: bool) -> None:
        self._bar = tqdm(total=None, unit="item", desc=job_id, disable=not enabled, dynamic_ncols=True)

    def update(self, job: Job) -> None:
        counts = job.request_counts
        if counts.total and self._bar.total != counts.total:
            self._bar.total = counts.total
        self._bar.n = counts.completed + counts.failed + counts.cancelled + counts.expired
        self._bar.set_postfix(status=job.status, failed=counts.failed, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


class Jobs(SyncAPIResource):
    def create(
        self,
        *,
        input_file_id: str | NotGiven = NOT_GIVEN,
        items: Iterable[ItemInput | Mapping[str, Any]] | NotGiven = NOT_GIVEN,
        model: str | NotGiven = NOT_GIVEN,
        params: HSCRParams | Mapping[str, Any] | NotGiven = NOT_GIVEN,
        metadata: Mapping[str, str] | NotGiven = NOT_GIVEN,
        idempotency_key: str | NotGiven = NOT_GIVEN,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        completion_window: str | NotGiven = NOT_GIVEN,
    ) -> Job:
        """Create a job from an uploaded items file or inline items (exactly one of the two).

        ``idempotency_key`` [default: a fresh uuid per call] makes retries safe: the service answers
        a repeated key with the job it already made. ``completion_window`` (e.g. ``"24h"``) is how long
        the job may run before it ends ``expired`` [default: the service's].
        """
        options = _create_options(input_file_id=input_file_id, items=items, model=model, params=params,
                                  metadata=metadata, idempotency_key=idempotency_key, timeout=timeout,
                                  completion_window=completion_window)
        return self._client._request(Job, options)

    def retrieve(self, job_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> Job:
        return self._client._get(Job, f"/v1/jobs/{path_id(job_id, what='job_id')}", timeout=timeout)

    def list(self, *, limit: int | NotGiven = NOT_GIVEN, after: str | NotGiven = NOT_GIVEN,
             timeout: Timeout | NotGiven = NOT_GIVEN) -> JobList:
        """One page, newest first; pass ``after=page.last_id`` while ``page.has_more``."""
        params = strip_not_given({"limit": limit, "after": after})
        return self._client._get(JobList, "/v1/jobs", params=params, timeout=timeout)

    def cancel(self, job_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> Job:
        """Ask the job to stop; finished shards are kept. Returns the job (``cancelling`` or terminal)."""
        return self._client._post(Job, f"/v1/jobs/{path_id(job_id, what='job_id')}/cancel", timeout=timeout)

    def errors(self, job_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> list[dict[str, Any]]:
        """The per-item failures so far: ``{"custom_id", "error"}`` each."""
        options = RequestOptions("GET", f"/v1/jobs/{path_id(job_id, what='job_id')}/errors", timeout=timeout,
                                 headers={"Accept": "application/x-ndjson"})
        return _parse_errors(self._client._send(options).text)

    def wait(self, job_id: str, *, progress: bool = False, poll_interval: float = 1.0,
             timeout: float | None = None) -> Job:
        """Poll until the job is terminal and return it (whatever its status: check ``job.status``).

        ``progress=True`` draws a tqdm bar; ``timeout`` (seconds) raises :class:`WaitTimeoutError`.
        """
        started = time.monotonic()
        bar = _Progress(job_id, progress)
        try:
            while True:
                job = self.retrieve(job_id)
                bar.update(job)
                if job.status in TERMINAL_STATUSES:
                    return job
                waited = time.monotonic() - started
                if timeout is not None and waited >= timeout:
                    raise WaitTimeoutError(job, waited)
                time.sleep(poll_interval)
        finally:
            bar.close()

    def iter_events(self, job_id: str, *, last_event_id: str | NotGiven = NOT_GIVEN,
                    max_reconnects: int = DEFAULT_MAX_RECONNECTS) -> Iterator[Event]:
        """Progress events as the service sends them, until the job is terminal.

        A dropped connection reconnects with ``Last-Event-ID``, so no event is lost or repeated;
        ``max_reconnects`` failures in a row (with no event between) raise :class:`APIConnectionError`.
        """
        last_id = last_event_id if isinstance(last_event_id, str) else None
        failures = 0
        while True:
            opened = time.monotonic()
            try:
                with self._client._stream(_events_options(job_id, last_id)) as response:
                    with map_httpx_exceptions(response.request):
                        for sse in EventSource(response).iter_sse():
                            if not sse.data:
                                continue
                            event = Event.model_validate_json(sse.data)
                            last_id, failures = sse.id or event.id, 0
                            yield event
                            if event.status in TERMINAL_STATUSES:
                                return
            except APIConnectionError:
                pass
            # The stream ended or broke before a terminal status: pick it up where it stopped. A stream
            # that lived a while (a proxy closing idle connections) is no failure in a row.
            if time.monotonic() - opened > _HEALTHY_STREAM_SECONDS:
                failures = 0
            if failures >= max_reconnects:
                raise APIConnectionError(request=httpx.Request("GET", str(self._client.base_url)),
                                         message=f"event stream of {job_id} broke {failures + 1} times in a row")
            time.sleep(self._client._retry_delay(failures, None))
            failures += 1


class AsyncJobs(AsyncAPIResource):
    async def create(
        self,
        *,
        input_file_id: str | NotGiven = NOT_GIVEN,
        items: Iterable[ItemInput | Mapping[str, Any]] | NotGiven = NOT_GIVEN,
        model: str | NotGiven = NOT_GIVEN,
        params: HSCRParams | Mapping[str, Any] | NotGiven = NOT_GIVEN,
        metadata: Mapping[str, str] | NotGiven = NOT_GIVEN,
        idempotency_key: str | NotGiven = NOT_GIVEN,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        completion_window: str | NotGiven = NOT_GIVEN,
    ) -> Job:
        options = _create_options(input_file_id=input_file_id, items=items, model=model, params=params,
                                  metadata=metadata, idempotency_key=idempotency_key, timeout=timeout,
                                  completion_window=completion_window)
        return await self._client._request(Job, options)

    async def retrieve(self, job_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> Job:
        return await self._client._get(Job, f"/v1/jobs/{path_id(job_id, what='job_id')}", timeout=timeout)

    async def list(self, *, limit: int | NotGiven = NOT_GIVEN, after: str | NotGiven = NOT_GIVEN,
                   timeout: Timeout | NotGiven = NOT_GIVEN) -> JobList:
        params = strip_not_given({"limit": limit, "after": after})
        return await self._client._get(JobList, "/v1/jobs", params=params, timeout=timeout)

    async def cancel(self, job_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> Job:
        return await self._client._post(Job, f"/v1/jobs/{path_id(job_id, what='job_id')}/cancel",
                                        timeout=timeout)

    async def errors(self, job_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> list[dict[str, Any]]:
        options = RequestOptions("GET", f"/v1/jobs/{path_id(job_id, what='job_id')}/errors", timeout=timeout,
                                 headers={"Accept": "application/x-ndjson"})
        return _parse_errors((await self._client._send(options)).text)

    async def wait(self, job_id: str, *, progress: bool = False, poll_interval: float = 1.0,
                   timeout: float | None = None) -> Job:
        started = time.monotonic()
        bar = _Progress(job_id, progress)
        try:
            while True:
                job = await self.retrieve(job_id)
                bar.update(job)
                if job.status in TERMINAL_STATUSES:
                    return job
                waited = time.monotonic() - started
                if timeout is not None and waited >= timeout:
                    raise WaitTimeoutError(job, waited)
                await anyio.sleep(poll_interval)
        finally:
            bar.close()

    async def iter_events(self, job_id: str, *, last_event_id: str | NotGiven = NOT_GIVEN,
                          max_reconnects: int = DEFAULT_MAX_RECONNECTS) -> AsyncIterator[Event]:
        last_id = last_event_id if isinstance(last_event_id, str) else None
        failures = 0
        while True:
            opened = time.monotonic()
            try:
                async with self._client._stream(_events_options(job_id, last_id)) as response:
                    with map_httpx_exceptions(response.request):
                        async for sse in EventSource(response).aiter_sse():
                            if not sse.data:
                                continue
                            event = Event.model_validate_json(sse.data)
                            last_id, failures = sse.id or event.id, 0
                            yield event
                            if event.status in TERMINAL_STATUSES:
                                return
            except APIConnectionError:
                pass
            if time.monotonic() - opened > _HEALTHY_STREAM_SECONDS:
                failures = 0
            if failures >= max_reconnects:
                raise APIConnectionError(request=httpx.Request("GET", str(self._client.base_url)),
                                         message=f"event stream of {job_id} broke {failures + 1} times in a row")
            await anyio.sleep(self._client._retry_delay(failures, None))
            failures += 1
