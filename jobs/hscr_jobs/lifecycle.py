"""A job's life after the API accepted it: chunks, their accounting, and how the job ends.

A job is split into chunks of ``chunk_size`` items. Chunk ``i`` reads ``<input_uri>/part-<i>.jsonl`` and
writes shard ``i`` of the dataset; it is the unit of work and of retry, and it *settles* exactly once
(:meth:`hscr_jobs.store.Store.settle_chunk`): every one of its items lands in one count, completed, failed,
cancelled or expired. The chunk that settles last enqueues the job's finalize, which writes the manifest last
and only then gives the job its final status. A job that no chunk is running ends at once (:func:`end_now`):
a cancel, or an expiry sweep.

The functions RQ runs live in the worker (``hscr_worker.tasks``); they are named here by dotted path, so the
API enqueues them without importing the worker.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from rq import Callback, Queue, Retry

from hscr_client.manifest import finalize
from hscr_client.storage import open_location

from .store import JobRecord, Store

RUN_CHUNK = "hscr_worker.tasks.run_chunk"
ON_CHUNK_FAILURE = "hscr_worker.tasks.on_chunk_failure"
RECORD_CHUNK_FAILURE = "hscr_worker.tasks.record_chunk_failure"
ON_RECORD_FAILURE = "hscr_worker.tasks.on_record_failure"
FINALIZE = "hscr_worker.tasks.finalize_job"
ON_FINALIZE_FAILURE = "hscr_worker.tasks.on_finalize_failure"
# Finalize and recording a failed chunk only touch storage and Redis: retry them through an outage of about two
# minutes, whatever the retry policy of the chunk that triggered them (a failure callback has none).
BOOKKEEPING_RETRY = {"max": 6, "interval": [2, 5, 10, 20, 30, 60]}
INPUT_READERS = 8  # concurrent reads of chunk inputs (listing the skipped items of a large job on S3)
SKIP_REASONS = {"skipped": "cancelled", "expired": "expired"}  # chunk outcome -> the reason its items carry

log = logging.getLogger(__name__)


def chunk_file(chunk: int) -> str:
    return f"part-{chunk:05d}.jsonl"


def rq_job_id(job_id: str, chunk: int) -> str:
    return f"{job_id}-chunk-{chunk:05d}"


def chunk_items(record: JobRecord, chunk: int) -> int:
    """How many items chunk ``chunk`` holds (the last one may be short)."""
    return min(record.chunk_size, record.total - chunk * record.chunk_size)


def read_chunk_input(record: JobRecord, chunk: int) -> list[dict]:
    """The chunk's normalized input rows (raises OSError when storage does not answer)."""
    data = open_location(record.input_uri).read_bytes(chunk_file(chunk))
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def enqueue_chunks(record: JobRecord, *, queue: Queue, timeout: int, retries: int,
                   retry_intervals: list[int]) -> None:
    retry = Retry(max=retries, interval=retry_intervals) if retries else None
    jobs = [Queue.prepare_data(RUN_CHUNK, args=(record.tenant, record.id, chunk),
                               job_id=rq_job_id(record.id, chunk), timeout=timeout, retry=retry,
                               result_ttl=3600, failure_ttl=7 * 24 * 3600, on_failure=Callback(ON_CHUNK_FAILURE),
                               description=f"{record.id} chunk {chunk}")
            for chunk in range(record.n_chunks)]
    queue.enqueue_many(jobs)


def running_chunks(queue: Queue, job_id: str) -> list[str]:
    """RQ ids of the job's chunks a live worker is running (a killed worker's entry has expired: not running)."""
    registry = queue.started_job_registry
    live = registry.connection.zrangebyscore(registry.key, time.time(), "+inf")  # score: heartbeat expiry
    return [i for i in map(registry.parse_job_id, live) if i.startswith(f"{job_id}-chunk-")]


def settle_skipped(store: Store, record: JobRecord, chunk: int, outcome: str) -> tuple[bool, int]:
    """Settle a chunk that will not run: its items count as cancelled (``outcome`` "skipped") or expired."""
    n_items = chunk_items(record, chunk)
    counts = {"cancelled": n_items} if outcome == "skipped" else {"expired": n_items}
    return store.settle_chunk(record.tenant, record.id, chunk, outcome=outcome, **counts)


def enqueue_record_failure(record: JobRecord, chunk: int, reason: str, *, queue: Queue) -> None:
    """A chunk failed for good: record each of its items' error (durably, with retries), then its count."""
    queue.enqueue(RECORD_CHUNK_FAILURE, record.tenant, record.id, chunk, reason,
                  job_id=f"{record.id}-chunk-{chunk:05d}-failed", retry=Retry(**BOOKKEEPING_RETRY),
                  result_ttl=3600, failure_ttl=7 * 24 * 3600, on_failure=Callback(ON_RECORD_FAILURE),
                  description=f"{record.id} record the failure of chunk {chunk}")


def enqueue_finalize(store: Store, record: JobRecord, *, queue_name: str, done: int | None = None) -> bool:
    """Enqueue the job's finalize once every chunk has settled (``done``: the settled count, if just known).
    Returns True when it was enqueued."""
    if done is not None and done < record.n_chunks:
        return False
    job = store.get_job(record.tenant, record.id)
    if job is None or job.is_terminal or job.chunk_counts.done < record.n_chunks:
        return False
    Queue(queue_name, connection=store.redis).enqueue(
        FINALIZE, record.tenant, record.id, job_id=f"{record.id}-finalize", retry=Retry(**BOOKKEEPING_RETRY),
        result_ttl=3600, failure_ttl=7 * 24 * 3600, on_failure=Callback(ON_FINALIZE_FAILURE),
        description=f"{record.id} finalize")
    return True


def skipped_items(store: Store, record: JobRecord) -> list[dict]:
    """``{"custom_id", "reason"}`` of every item of the job's chunks that settled without running."""
    chunks = sorted((chunk, SKIP_REASONS[c["outcome"]]) for chunk, c in store.chunk_outcomes(
        record.tenant, record.id).items() if c.get("outcome") in SKIP_REASONS)
    if not chunks:
        return []
    with ThreadPoolExecutor(max_workers=min(INPUT_READERS, len(chunks))) as pool:
        inputs = list(pool.map(lambda c: read_chunk_input(record, c[0]), chunks))
    return [{"custom_id": row["custom_id"], "reason": reason}
            for (_, reason), rows in zip(chunks, inputs, strict=True) for row in rows]


def final_status(store: Store, record: JobRecord) -> str:
    """What a job whose chunks have all settled becomes: cancelled, expired (some chunks never ran because
    the completion window ended) or completed."""
    if store.status(record.tenant, record.id) in ("cancelling", "cancelled"):
        return "cancelled"
    if any(c.get("outcome") == "expired" for c in store.chunk_outcomes(record.tenant, record.id).values()):
        return "expired"
    return "completed"


def write_manifest(store: Store, record: JobRecord, *, params: dict, model: dict) -> dict:
    """The dataset's errors, skipped items, card and manifest (last). Raises OSError when storage fails."""
    return finalize(open_location(record.dataset_uri), params=params, model=model,
                    extra={"job_id": record.id, "metadata": record.metadata or {}},
                    skipped=skipped_items(store, record))


def end_now(record: JobRecord, final: str, *, store: Store, queue: Queue, model: dict | None = None) -> bool:
    """End a job no chunk is running: its unrun chunks settle as skipped, the manifest lists what exists.

    ``final`` is ``cancelled`` (from ``cancelling``) or ``expired`` (from ``in_progress``). Returns True when
    the job ended; False when a chunk is running (the worker that settles the last chunk finalizes) or storage
    failed (a later cancel or expiry sweep tries again). A queued chunk that a worker picks up later finds
    itself settled and does nothing; one dequeued while this runs sees the status first and skips.
    """
    if record.queue and record.queue != queue.name:  # a sweep from a worker of another queue
        queue = Queue(record.queue, connection=queue.connection)
    if running_chunks(queue, record.id):
        return False
    outcome = "skipped" if final == "cancelled" else "expired"
    settled = store.chunk_outcomes(record.tenant, record.id)
    for chunk in range(record.n_chunks):
        if chunk not in settled:
            settle_skipped(store, record, chunk, outcome)
    model = model or store.model_info(record.tenant, record.id) or {"name": record.model}
    try:
        write_manifest(store, record, params=record.params, model=model)
    except OSError as exc:
        log.warning("cannot write the manifest of %s yet: %s", record.id, exc)
        return False
    allowed = ("cancelling",) if final == "cancelled" else ("validating", "in_progress")
    return store.set_status(record.tenant, record.id, final, allowed_from=allowed)


def expire_if_due(record: JobRecord, *, store: Store, queue: Queue, model: dict | None = None) -> bool:
    """A job past its completion window ends ``expired`` (finished shards kept) unless it is finishing.

    With a chunk running, the worker skips the job's remaining work and the last chunk finalizes it as
    ``expired``; this ends it here when nothing runs (no worker, or its chunks wait behind other jobs).
    Returns True when it ended here.
    """
    status = store.status(record.tenant, record.id)
    if status not in ("validating", "in_progress") or record.expires_at is None or time.time() < record.expires_at:
        return False
    return end_now(record, "expired", store=store, queue=queue, model=model)


def expire_due_jobs(*, store: Store, queue: Queue, model: dict | None = None) -> int:
    """The expiry sweep (workers run it with their registry maintenance). Returns how many jobs ended."""
    ended = 0
    for tenant, job_id in store.due_jobs():
        record = store.get_record(tenant, job_id)
        if record is None or store.status(tenant, job_id) not in ("validating", "in_progress"):
            if record is None or store.get_job(tenant, job_id).is_terminal:
                store.redis.zrem(store.deadlines_key, json.dumps([tenant, job_id]))
            continue
        ended += expire_if_due(record, store=store, queue=queue, model=model)
    return ended
