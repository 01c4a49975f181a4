"""Jobs on the API side: validate and normalize items, write chunk inputs, enqueue, cancel.

Keyword-only functions that know nothing about HTTP; they raise ``core.errors`` and return wire models.
What happens to a job after that (chunks, accounting, finalize, expiry) is :mod:`hscr_jobs.lifecycle`,
shared with the workers. A job is split into chunks of ``chunk_size`` items; chunk ``i`` reads
``inputs/<job>/part-<i>.jsonl`` and writes shard ``i``. Items that fail validation here travel in their chunk
as ``{"custom_id", "error"}`` rows, so every input line lands in the dataset or in the error file exactly once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from rq import Queue

from hscr_client import Job, JobCreate
from hscr_client._models import completion_window_seconds, id_problem, is_valid_id
from hscr_client.items import parse_items_lines
from hscr_jobs import lifecycle
from hscr_jobs.lifecycle import chunk_file
from hscr_jobs.store import FileRecord, JobRecord, Store

from .config import Settings
from .errors import Conflict, InvalidInput, NotFound, ServiceError, TooLarge
from .storage import Storage

INPUT_WRITERS = 8  # concurrent PUTs of a job's chunk inputs on S3

log = logging.getLogger(__name__)


def _resolve_image(ref: object, *, files: dict[str, FileRecord], settings: Settings) -> str:
    """An item's image -> what the worker loads. Only the tenant's own files or inline data: no paths, no URLs.
    ``files``: the tenant's records of the file ids the items name (read in one round trip)."""
    if isinstance(ref, str) and ref.startswith("file-"):
        if problem := id_problem(ref, "image file id"):
            raise ValueError(problem)
        record = files.get(ref)
        if record is None:
            raise ValueError(f"image file {ref!r} not found")
        if record.purpose != "image":
            raise ValueError(f"file {ref!r} has purpose {record.purpose!r}; images need purpose 'image'")
        return record.uri
    if isinstance(ref, str) and ref.startswith("data:"):
        if len(ref) * 3 // 4 > settings.max_image_bytes:
            raise ValueError(f"inline image is about {len(ref) * 3 // 4} bytes; the limit is "
                             f"{settings.max_image_bytes}")
        return ref
    raise ValueError("image must be an uploaded image file id (file-...) or a base64 data: URI; the service "
                     "does not read paths or URLs")


def normalize(items: list[dict], *, tenant: str, store: Store, settings: Settings) -> list[dict]:
    """Each item -> {custom_id, image, question, answer} or {custom_id, error}."""
    files = store.get_files(tenant, [item["image"] for item in items  # ids that break the id rule: per-item errors
                                     if isinstance(item.get("image"), str) and item["image"].startswith("file-")
                                     and is_valid_id(item["image"])])
    seen: set[str] = set()
    rows = []
    for index, item in enumerate(items):
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id.strip():
            custom_id = f"item-{index}" if custom_id is None else str(custom_id)
        if "error" in item and set(item) == {"custom_id", "error"}:
            rows.append({"custom_id": custom_id, "error": item["error"]})
            continue
        try:
            if custom_id in seen:
                raise ValueError(f"duplicate custom_id {custom_id!r}")
            seen.add(custom_id)
            image = _resolve_image(item.get("image"), files=files, settings=settings)
        except ValueError as exc:
            rows.append({"custom_id": custom_id, "error": str(exc)})
            continue
        rows.append({"custom_id": custom_id, "image": image, "question": item.get("question"),
                     "answer": item.get("answer")})
    return rows


def _raw_items(request: JobCreate, *, tenant: str, store: Store, storage: Storage, settings: Settings) -> list[dict]:
    if request.items is not None:
        return [item.model_dump(exclude_none=True) for item in request.items]
    record = store.get_file(tenant, request.input_file_id)
    if record is None:
        raise NotFound(f"no file {request.input_file_id!r}", param="input_file_id")
    if record.purpose != "items":
        raise InvalidInput(f"file {record.id!r} has purpose {record.purpose!r}; input_file_id needs an 'items' "
                           "file (JSONL)", param="input_file_id")
    return parse_items_lines(storage.read(record.uri).splitlines())


def create_job(*, tenant: str, request: JobCreate, idempotency_key: str | None, store: Store, storage: Storage,
               queue: Queue, settings: Settings) -> tuple[Job, bool]:
    """Create and enqueue a job. Returns (job, created); a replayed Idempotency-Key returns the first job."""
    job_id = "job-" + uuid.uuid4().hex
    key_digest = None
    if idempotency_key is not None:
        key_digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
        body_digest = hashlib.sha256(request.model_dump_json().encode()).hexdigest()
        earlier = store.claim_idempotency(tenant, key_digest, job_id, body_digest)
        if earlier is not None:
            if earlier["body"] != body_digest:
                raise Conflict("this Idempotency-Key was used with a different request body",
                               param="Idempotency-Key")
            return _wait_for_job(store, tenant, earlier["job_id"]), False
    try:
        job = _create(job_id, tenant=tenant, request=request, store=store, storage=storage, queue=queue,
                      settings=settings)
    except BaseException:
        if key_digest is not None:
            store.release_idempotency(tenant, key_digest)
        raise
    return job, True


def _wait_for_job(store: Store, tenant: str, job_id: str, timeout: float = 30.0) -> Job:
    """A concurrent request with the same key may still be creating the job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.get_job(tenant, job_id)
        if job is not None:
            return job
        time.sleep(0.05)
    raise Conflict("a request with this Idempotency-Key is still being processed; retry shortly",
                   param="Idempotency-Key")


def _create(job_id: str, *, tenant: str, request: JobCreate, store: Store, storage: Storage, queue: Queue,
            settings: Settings) -> Job:
    model = request.model or settings.default_model
    if model not in settings.served_models:
        raise InvalidInput(f"model {model!r} is not served here; choose one of {settings.served_models}",
                           param="model")
    if settings.queue_for(model) != queue.name:
        queue = Queue(settings.queue_for(model), connection=queue.connection)
    raw = _raw_items(request, tenant=tenant, store=store, storage=storage, settings=settings)
    if not raw:
        raise InvalidInput("the items file has no items", param="input_file_id")
    if len(raw) > settings.max_items_per_job:
        raise TooLarge(f"the job has {len(raw)} items; the limit is {settings.max_items_per_job} per job "
                       "(HSCR_MAX_ITEMS_PER_JOB): split the items into several jobs",
                       param="items")
    rows = normalize(raw, tenant=tenant, store=store, settings=settings)
    size = settings.chunk_size
    n_chunks = math.ceil(len(rows) / size)
    created_at = int(time.time())
    window = completion_window_seconds(request.completion_window or settings.completion_window)
    record = JobRecord(id=job_id, tenant=tenant, model=model, params=request.params.model_dump(exclude_unset=True),
                       created_at=created_at, total=len(rows), n_chunks=n_chunks, chunk_size=size,
                       input_uri=storage.input_uri(job_id), dataset_uri=storage.dataset_uri(job_id),
                       input_file_id=request.input_file_id, metadata=request.metadata,
                       expires_at=created_at + window, queue=queue.name)
    _write_inputs(storage, {f"{record.input_uri}/{chunk_file(chunk)}":
                            "".join(json.dumps(r) + "\n" for r in rows[chunk * size:(chunk + 1) * size]).encode()
                            for chunk in range(n_chunks)})
    store.create_job(record, status="validating")
    lifecycle.enqueue_chunks(record, queue=queue, timeout=settings.chunk_timeout, retries=settings.chunk_retries,
                             retry_intervals=settings.retry_intervals)
    store.set_status(tenant, job_id, "in_progress", allowed_from=("validating",))
    return store.get_job(tenant, job_id)


def _write_inputs(storage: Storage, parts: dict[str, bytes]) -> None:
    """Write the chunk input files. On S3 each PUT is a round trip to the object store: overlap them (a
    10,000-item job has 625 chunks); local writes are quick enough one by one."""
    if not storage.is_s3 or len(parts) == 1:
        for uri, data in parts.items():
            storage.write(uri, data)
        return
    with ThreadPoolExecutor(max_workers=min(INPUT_WRITERS, len(parts))) as pool:
        for future in [pool.submit(storage.write, uri, data) for uri, data in parts.items()]:
            future.result()  # the first failure raises here (after the others finished)


def cancel_job(*, tenant: str, job_id: str, store: Store, queue: Queue) -> Job:
    """Stop the job. Queued chunks are skipped, running ones stop between micro-batches; finished shards stay.

    With no chunk running the job ends ``cancelled`` at once (manifest of what exists); otherwise it is
    ``cancelling`` until the worker of the last chunk finalizes. Cancelling again retries ending it.
    """
    job = store.get_job(tenant, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    if job.status == "cancelled":
        return job
    if job.status != "cancelling" and not store.set_status(tenant, job_id, "cancelling",
                                                           allowed_from=("validating", "in_progress")):
        current = store.get_job(tenant, job_id)
        raise Conflict(f"job {job_id} is {current.status if current else 'gone'}; only validating or in_progress "
                       "jobs can be cancelled")
    lifecycle.end_now(store.get_record(tenant, job_id), "cancelled", store=store, queue=queue)
    return store.get_job(tenant, job_id)


def expire_if_due(job: Job, *, tenant: str, store: Store, queue: Queue) -> Job:
    """A read that finds a job past its completion window ends it ``expired`` when nothing runs it (see
    :func:`hscr_jobs.lifecycle.expire_if_due`); returns the job as it is now."""
    if job.status not in ("validating", "in_progress") or job.expires_at is None or time.time() < job.expires_at:
        return job
    record = store.get_record(tenant, job.id)
    if record is not None:
        lifecycle.expire_if_due(record, store=store, queue=queue)
    return store.get_job(tenant, job.id) or job  # ended here, by a concurrent sweep, or not yet


__all__ = ["ServiceError", "cancel_job", "create_job", "expire_if_due", "normalize"]
