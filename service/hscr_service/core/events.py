"""The progress feed: a Redis stream per job, read with XREAD and served as server-sent events.

Stream ids are the SSE ids, so a client that reconnects with ``Last-Event-ID`` misses nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import redis
import redis.asyncio as aredis

from hscr_jobs.store import Store, is_terminal, parse_event

BLOCK_MS = 5000


async def stream_events(client: aredis.Redis, store: Store, *, tenant: str, job_id: str,
                        last_event_id: str | None, is_disconnected: Callable[[], Awaitable[bool]]
                        ) -> AsyncIterator[dict]:
    key = store.events_key(tenant, job_id)
    last = last_event_id or "0-0"
    while not await is_disconnected():
        try:
            batches = await client.xread({key: last}, count=100, block=BLOCK_MS)
        except (redis.RedisError, OSError):
            await asyncio.sleep(1.0)  # Redis restarting: keep the stream open and retry
            continue
        for _, entries in batches or []:
            for stream_id, fields in entries:
                event = parse_event(stream_id, fields)
                last = event.id
                yield {"id": event.id, "event": event.type, "data": event.model_dump_json()}
                if event.type == "job.status" and is_terminal(event.status):
                    return
        if not batches:
            try:
                status = await client.hget(store.job_key(tenant, job_id), "status")
            except (redis.RedisError, OSError):
                continue
            if status is None or is_terminal(status.decode()):
                return
