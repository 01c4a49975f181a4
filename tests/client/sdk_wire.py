"""Helpers of the twin SDK tests: wire payloads and clients over ``httpx.MockTransport``.

MockTransport is httpx's own transport contract (one handler serves the sync and the async
client), so these tests exercise the real request building, retry loop and error mapping with
no server. Tests against the real service live in ``test_client_live.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import httpx

from hscr_client import AsyncClient, Client

BASE_URL = "http://hscr.test"
API_KEY = "sk-test-tenant-a"

Handler = Callable[[httpx.Request], httpx.Response]


def job_json(job_id: str = "job-1", status: str = "validating", **fields: Any) -> dict[str, Any]:
    return {"id": job_id, "object": "job", "status": status, "model": "fixture", "params": {},
            "created_at": 1_700_000_000, **fields}


def file_json(file_id: str = "file-1", filename: str = "items.jsonl", purpose: str = "items") -> dict[str, Any]:
    return {"id": file_id, "object": "file", "bytes": 10, "created_at": 1_700_000_000, "filename": filename,
            "purpose": purpose}


def error_json(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param}}


def sse(*events: dict[str, Any]) -> bytes:
    """A text/event-stream body, one ``id:``/``data:`` block per event, with a keep-alive comment."""
    import json

    blocks = [": ping\n\n"] + [f"id: {event['id']}\ndata: {json.dumps(event)}\n\n" for event in events]
    return "".join(blocks).encode()


def event_json(event_id: str, status: str = "in_progress", completed: int = 0, total: int = 4,
               kind: str = "job.progress") -> dict[str, Any]:
    return {"id": event_id, "type": kind, "job_id": "job-1", "created_at": 1.0, "status": status,
            "request_counts": {"total": total, "completed": completed, "failed": 0},
            "chunk_counts": {"total": 2, "done": completed // 2}}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Recorder:
    """Serves scripted responses in order (the last one repeats) and keeps every request it saw."""

    def __init__(self, *responses: httpx.Response | Handler | Exception) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        reply = self.responses[min(len(self.requests), len(self.responses)) - 1]
        if isinstance(reply, Exception):
            raise reply
        return reply(request) if callable(reply) else reply


def make_client(handler: Handler, **kwargs: Any) -> Client:
    kwargs = {"api_key": API_KEY, "base_url": BASE_URL, "retry_backoff": 0.0, **kwargs}
    return Client(http_client=httpx.Client(transport=httpx.MockTransport(handler)), **kwargs)


def make_async_client(handler: Handler, **kwargs: Any) -> AsyncClient:
    kwargs = {"api_key": API_KEY, "base_url": BASE_URL, "retry_backoff": 0.0, **kwargs}
    return AsyncClient(http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)), **kwargs)


class BrokenStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body that delivers ``head`` and then loses the connection."""

    def __init__(self, head: bytes) -> None:
        self.head = head

    def __iter__(self):
        yield self.head
        raise httpx.ReadError("connection reset")

    async def __aiter__(self):
        yield self.head
        raise httpx.ReadError("connection reset")


def dataset_json(shards: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"object": "dataset", "job_id": "job-1", "status": "in_progress", "complete": False,
            "uri": "s3://bucket/datasets/job-1", "shards": shards, **fields}
