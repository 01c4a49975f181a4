"""Job, file and event state in Redis. The one module that owns these keys; the API and the workers share it.

Keys (every one under its tenant, so another tenant's id simply finds nothing)::

    hscr:t:<tenant>:job:<id>          hash: doc (immutable JSON), status, <status>_at, completed, failed,
                                      cancelled, expired, chunks_done, errors, model (what the worker that
                                      ran it reported)
    hscr:t:<tenant>:job:<id>:chunks   hash: chunk -> its counts; a chunk settles once (HSETNX)
    hscr:t:<tenant>:job:<id>:events   stream of Event JSON (the SSE feed)
    hscr:t:<tenant>:jobs              zset: job ids by creation time (listing, pagination)
    hscr:t:<tenant>:file:<id>         hash: a FileObject plus its storage URI
    hscr:t:<tenant>:files             zset: file ids by creation time
    hscr:t:<tenant>:idem:<sha256>     the job an Idempotency-Key created (24 h)
    hscr:deadlines                    zset: [tenant, job id] of unfinished jobs by expires_at (the expiry sweep)

Every user-supplied part of a key (tenant, job id, file id) goes through :func:`key_part`, which escapes ``:``
and ``%``: ids are validated at the API's edge, and even a string that slipped past cannot reach another key.
No HTTP and no torch here.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from hscr_client import TERMINAL_STATUSES, ChunkCounts, Event, FileObject, Job, JobList, RequestCounts
from hscr_client._models import FileList

PREFIX = "hscr"
EVENTS_MAXLEN = 10_000
IDEMPOTENCY_TTL = 24 * 3600
STATUS_FIELDS = ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")

# Set a status only when the current one is among the allowed ones (ARGV[3:]); stamp <status>_at.
_SET_STATUS = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return -1 end
for i = 3, #ARGV do
  if current == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[1] .. '_at', ARGV[2])
    return 1
  end
end
return 0
"""

# A chunk's counts are added exactly once, however often the chunk runs. Returns {newly, chunks_done}.
# ARGV[3..6]: completed, failed, cancelled, expired. ARGV[7] (optional): the worker's model info, kept if none
# is recorded yet (one round trip for both).
_SETTLE_CHUNK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
if ARGV[7] then redis.call('HSETNX', KEYS[1], 'model', ARGV[7]) end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'completed', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'failed', ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'cancelled', ARGV[5])
  redis.call('HINCRBY', KEYS[1], 'expired', ARGV[6])
  return {1, redis.call('HINCRBY', KEYS[1], 'chunks_done', 1)}
end
return {0, tonumber(redis.call('HGET', KEYS[1], 'chunks_done') or '0')}
"""


def connect(url: str, *, ride_out_restarts: bool = False) -> redis.Redis:
    """A Redis client whose every call is bounded in time.

    The default (the API, the CLI) gives up within about a second when Redis does not answer, so a request
    is answered 503 at once instead of hanging. ``ride_out_restarts`` (a worker, mid-chunk) reconnects with
    backoff for about half a minute, so a Redis restart costs no work.
    """
    if ride_out_restarts:
        retry, connect_timeout, read_timeout = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=20), 2, 30
    else:
        retry, connect_timeout, read_timeout = Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1), 0.5, 5
    return redis.Redis.from_url(url, retry=retry, retry_on_error=[redis.ConnectionError, redis.TimeoutError],
                                health_check_interval=10, socket_connect_timeout=connect_timeout,
                                socket_timeout=read_timeout)


def key_part(value: str) -> str:
    """A user-supplied string as one key segment: ``:`` (the separator) and ``%`` (the escape) are escaped."""
    return value.replace("%", "%25").replace(":", "%3A")


@dataclass
class JobRecord:
    """What a job is made of; stored as the job hash's immutable ``doc``."""

    id: str
    tenant: str
    model: str
    params: dict
    created_at: int
    total: int
    n_chunks: int
    chunk_size: int
    input_uri: str  # the folder of per-chunk input files
    dataset_uri: str
    input_file_id: str | None = None
    metadata: dict | None = None
    extra: dict = field(default_factory=dict)
    expires_at: int | None = None  # the end of the completion window
    queue: str | None = None  # the RQ queue its chunks went to


@dataclass
class FileRecord:
    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    uri: str
    content_type: str | None = None
    sha256: str | None = None

    def public(self) -> FileObject:
        return FileObject(id=self.id, bytes=self.bytes, created_at=self.created_at, filename=self.filename,
                          purpose=self.purpose, content_type=self.content_type, sha256=self.sha256)


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class Store:
    def __init__(self, client: redis.Redis, prefix: str = PREFIX):
        self.redis = client
        self.prefix = prefix
        self._set_status = client.register_script(_SET_STATUS)
        self._settle = client.register_script(_SETTLE_CHUNK)

    # --- keys ---
    def _tenant(self, tenant: str) -> str:
        return f"{self.prefix}:t:{key_part(tenant)}"

    def job_key(self, tenant: str, job_id: str) -> str:
        return f"{self._tenant(tenant)}:job:{key_part(job_id)}"

    def jobs_index(self, tenant: str) -> str:
        return f"{self._tenant(tenant)}:jobs"

    def file_key(self, tenant: str, file_id: str) -> str:
        return f"{self._tenant(tenant)}:file:{key_part(file_id)}"

    def files_index(self, tenant: str) -> str:
        return f"{self._tenant(tenant)}:files"

    def idempotency_key(self, tenant: str, key_digest: str) -> str:
        return f"{self._tenant(tenant)}:idem:{key_part(key_digest)}"

    @property
    def deadlines_key(self) -> str:
        return f"{self.prefix}:deadlines"

    # --- files ---
    def add_file(self, record: FileRecord) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hset(self.file_key(record.tenant, record.id), mapping={"doc": json.dumps(asdict(record))})
            pipe.zadd(self.files_index(record.tenant), {record.id: time.time()})
            pipe.execute()

    def get_file(self, tenant: str, file_id: str) -> FileRecord | None:
        doc = self.redis.hget(self.file_key(tenant, file_id), "doc")
        return FileRecord(**json.loads(doc)) if doc else None

    def get_files(self, tenant: str, file_ids: list[str]) -> dict[str, FileRecord]:
        """The tenant's records of ``file_ids`` in one round trip (a job names hundreds); unknown ids are absent."""
        ids = list(dict.fromkeys(file_ids))
        if not ids:
            return {}
        with self.redis.pipeline(transaction=False) as pipe:
            for file_id in ids:
                pipe.hget(self.file_key(tenant, file_id), "doc")
            docs = pipe.execute()
        return {i: FileRecord(**json.loads(doc)) for i, doc in zip(ids, docs, strict=True) if doc}

    def list_files(self, tenant: str, *, limit: int, after: str | None) -> FileList:
        ids, has_more = self._page(self.files_index(tenant), limit=limit, after=after)
        files = [f.public() for f in (self.get_file(tenant, i) for i in ids) if f]
        return FileList(data=files, first_id=files[0].id if files else None,
                        last_id=files[-1].id if files else None, has_more=has_more)

    # --- jobs ---
    def create_job(self, record: JobRecord, *, status: str = "in_progress") -> None:
        now = int(time.time())
        key = self.job_key(record.tenant, record.id)
        with self.redis.pipeline() as pipe:
            pipe.hset(key, mapping={"doc": json.dumps(asdict(record)), "status": status, f"{status}_at": now,
                                    "completed": 0, "failed": 0, "cancelled": 0, "expired": 0, "chunks_done": 0})
            pipe.zadd(self.jobs_index(record.tenant), {record.id: time.time()})
            if record.expires_at is not None:
                pipe.zadd(self.deadlines_key, {json.dumps([record.tenant, record.id]): record.expires_at})
            pipe.execute()

    def due_jobs(self, now: float | None = None) -> list[tuple[str, str]]:
        """(tenant, job id) of unfinished jobs whose completion window has ended."""
        members = self.redis.zrangebyscore(self.deadlines_key, 0, time.time() if now is None else now)
        return [tuple(json.loads(m)) for m in members]

    def model_info(self, tenant: str, job_id: str) -> dict | None:
        raw = self.redis.hget(self.job_key(tenant, job_id), "model")
        return json.loads(raw) if raw else None

    def get_record(self, tenant: str, job_id: str) -> JobRecord | None:
        doc = self.redis.hget(self.job_key(tenant, job_id), "doc")
        return JobRecord(**json.loads(doc)) if doc else None

    def get_job(self, tenant: str, job_id: str) -> Job | None:
        fields = self.redis.hgetall(self.job_key(tenant, job_id))
        return self._job(fields) if fields.get(b"doc") or fields.get("doc") else None

    def _job(self, raw: dict) -> Job:
        fields = {_text(k): _text(v) for k, v in raw.items()}
        record = json.loads(fields["doc"])
        stamps = {f"{s}_at": int(fields[f"{s}_at"]) for s in STATUS_FIELDS if fields.get(f"{s}_at")}
        return Job(
            id=record["id"], status=fields["status"], model=record["model"], params=record["params"],
            input_file_id=record.get("input_file_id"), metadata=record.get("metadata"),
            request_counts=RequestCounts(total=record["total"], **{
                name: int(fields.get(name) or 0) for name in ("completed", "failed", "cancelled", "expired")}),
            chunk_counts=ChunkCounts(total=record["n_chunks"], done=int(fields.get("chunks_done", 0))),
            errors=json.loads(fields["errors"]) if fields.get("errors") else None,
            dataset_uri=record["dataset_uri"], created_at=record["created_at"], expires_at=record.get("expires_at"),
            **stamps,
        )

    def list_jobs(self, tenant: str, *, limit: int, after: str | None) -> JobList:
        ids, has_more = self._page(self.jobs_index(tenant), limit=limit, after=after)
        with self.redis.pipeline() as pipe:
            for job_id in ids:
                pipe.hgetall(self.job_key(tenant, job_id))
            jobs = [self._job(raw) for raw in pipe.execute() if raw]
        return JobList(data=jobs, first_id=jobs[0].id if jobs else None, last_id=jobs[-1].id if jobs else None,
                       has_more=has_more)

    def _page(self, index: str, *, limit: int, after: str | None) -> tuple[list[str], bool]:
        """Newest first; ``after`` is the last id of the previous page (an unknown id gives an empty page)."""
        start = 0
        if after is not None:
            rank = self.redis.zrevrank(index, after)
            if rank is None:
                return [], False
            start = rank + 1
        ids = [_text(i) for i in self.redis.zrevrange(index, start, start + limit)]
        return ids[:limit], len(ids) > limit

    def set_status(self, tenant: str, job_id: str, status: str, *, allowed_from: tuple[str, ...],
                   errors: list[dict] | None = None) -> bool:
        """Move a job to ``status`` if it is in one of ``allowed_from``; True when it moved."""
        key = self.job_key(tenant, job_id)
        moved = self._set_status(keys=[key], args=[status, int(time.time()), *allowed_from]) == 1
        if moved and errors:
            self.redis.hset(key, "errors", json.dumps(errors))
        if moved and is_terminal(status):
            self.redis.zrem(self.deadlines_key, json.dumps([tenant, job_id]))
        if moved:
            self.publish(tenant, job_id, "job.status")
        return moved

    def status(self, tenant: str, job_id: str) -> str | None:
        return _text(self.redis.hget(self.job_key(tenant, job_id), "status"))

    def chunk_context(self, tenant: str, job_id: str, chunk: int) -> tuple[JobRecord | None, bool, str | None]:
        """(record, chunk already settled, job status) in one round trip: what a worker checks before a chunk."""
        key = self.job_key(tenant, job_id)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(key, "doc", "status")
            pipe.hexists(key + ":chunks", str(chunk))
            (doc, status), settled = pipe.execute()
        return (JobRecord(**json.loads(doc)) if doc else None), bool(settled), _text(status)

    def settle_chunk(self, tenant: str, job_id: str, chunk: int, *, completed: int = 0, failed: int = 0,
                     cancelled: int = 0, expired: int = 0, outcome: str = "written",
                     model: dict | None = None) -> tuple[bool, int]:
        """Record a chunk's counts once (and ``model``, the worker's model info, if the job has none yet).
        Every item of a chunk lands in exactly one count. Returns (newly settled, chunks settled so far)."""
        key = self.job_key(tenant, job_id)
        counts = json.dumps({"completed": completed, "failed": failed, "cancelled": cancelled, "expired": expired,
                             "outcome": outcome, "at": time.time()})
        args = [chunk, counts, completed, failed, cancelled, expired] + (
            [json.dumps(model)] if model is not None else [])
        newly, done = self._settle(keys=[key, key + ":chunks"], args=args)
        if newly == 1:
            self.publish(tenant, job_id, "job.shard" if outcome == "written" else "job.progress", chunk=chunk)
        return newly == 1, int(done)

    def chunk_outcomes(self, tenant: str, job_id: str) -> dict[int, dict]:
        raw = self.redis.hgetall(self.job_key(tenant, job_id) + ":chunks")
        return {int(_text(k)): json.loads(v) for k, v in raw.items()}

    # --- idempotency ---
    def claim_idempotency(self, tenant: str, key_digest: str, job_id: str, body_digest: str) -> dict | None:
        """Claim the key for ``job_id``; None when claimed now, else the earlier claim."""
        key = self.idempotency_key(tenant, key_digest)
        claim = json.dumps({"job_id": job_id, "body": body_digest})
        if self.redis.set(key, claim, nx=True, ex=IDEMPOTENCY_TTL):
            return None
        earlier = self.redis.get(key)
        return json.loads(earlier) if earlier else None

    def release_idempotency(self, tenant: str, key_digest: str) -> None:
        self.redis.delete(self.idempotency_key(tenant, key_digest))

    # --- events ---
    def events_key(self, tenant: str, job_id: str) -> str:
        return self.job_key(tenant, job_id) + ":events"

    def publish(self, tenant: str, job_id: str, event_type: str, *, chunk: int | None = None) -> None:
        job = self.get_job(tenant, job_id)
        if job is None:
            return
        event = {"type": event_type, "job_id": job_id, "created_at": time.time(), "status": job.status,
                 "request_counts": job.request_counts.model_dump(), "chunk_counts": job.chunk_counts.model_dump(),
                 "chunk": chunk}
        self.redis.xadd(self.events_key(tenant, job_id), {"event": json.dumps(event)}, maxlen=EVENTS_MAXLEN,
                        approximate=True)


def parse_event(stream_id: bytes | str, fields: dict) -> Event:
    data = json.loads(fields.get(b"event") or fields.get("event"))
    return Event(id=_text(stream_id), **data)


def is_terminal(status: str | None) -> bool:
    return status in TERMINAL_STATUSES
