"""Job lifecycle on the API side: validate and normalize items, write chunk inputs, enqueue, cancel.

Keyword-only functions that know nothing about HTTP; they raise ``core.errors`` and return wire models.
A job is split into chunks of ``chunk_size`` items; chunk ``i`` reads ``inputs/<job>/part-<i>.jsonl``
and writes shard ``i``. Items that fail validation here travel in their chunk as ``{"custom_id",
"error"}`` rows, so every input line lands in the dataset or in the error file exactly once.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid

from rq import Callback, Queue, Retry

from hscr_client import Job, JobCreate

from .config import Settings
from .errors import Conflict, InvalidInput, NotFound, ServiceError, TooLarge
from .storage import Storage
from .store import JobRecord, Store

CHUNK_FUNCTION = "hscr_worker.rq_worker.run_chunk"
CHUNK_FAILURE_CALLBACK = "hscr_worker.rq_worker.on_chunk_failure"


def chunk_file(chunk: int) -> str:
    return f"part-{chunk:05d}.jsonl"


def rq_job_id(job_id: str, chunk: int) -> str:
    return f"{job_id}-chunk-{chunk:05d}"


def parse_items_file(data: bytes) -> list[dict]:
    """JSONL -> raw items; a malformed line becomes an item that carries its error (never fatal)."""
    items: list[dict] = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict):
                raise ValueError("each line must be a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            items.append({"custom_id": f"line-{number}", "error": f"malformed JSON on line {number}: {exc}"})
            continue
        item.setdefault("custom_id", f"line-{number}")
        items.append(item)
    return items


def _resolve_image(ref: object, *, tenant: str, store: Store, settings: Settings) -> str:
    """An item's image -> what the worker loads. Only the tenant's own files or inline data: no paths, no URLs."""
    if isinstance(ref, str) and ref.startswith("file-"):
        record = store.get_file(tenant, ref)
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
            image = _resolve_image(item.get("image"), tenant=tenant, store=store, settings=settings)
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
    return parse_items_file(storage.read(record.uri))


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
    raw = _raw_items(request, tenant=tenant, store=store, storage=storage, settings=settings)
    if not raw:
        raise InvalidInput("the items file has no items", param="input_file_id")
    if len(raw) > settings.max_items_per_job:
        raise TooLarge(f"the job has {len(raw)} items; the limit is {settings.max_items_per_job} per job",
                       param="items")
    rows = normalize(raw, tenant=tenant, store=store, settings=settings)
    size = settings.chunk_size
    n_chunks = math.ceil(len(rows) / size)
    record = JobRecord(id=job_id, tenant=tenant, model=model, params=request.params.model_dump(),
                       created_at=int(time.time()), total=len(rows), n_chunks=n_chunks, chunk_size=size,
                       input_uri=storage.input_uri(job_id), dataset_uri=storage.dataset_uri(job_id),
                       input_file_id=request.input_file_id, metadata=request.metadata)
    for chunk in range(n_chunks):
        part = rows[chunk * size:(chunk + 1) * size]
        storage.write(f"{record.input_uri}/{chunk_file(chunk)}", "".join(json.dumps(r) + "\n" for r in part).encode())
    store.create_job(record, status="validating")
    enqueue_chunks(record, queue=queue, settings=settings)
    store.set_status(tenant, job_id, "in_progress", allowed_from=("validating",))
    return store.get_job(tenant, job_id)


def enqueue_chunks(record: JobRecord, *, queue: Queue, settings: Settings) -> None:
    retry = Retry(max=settings.chunk_retries, interval=settings.retry_intervals) if settings.chunk_retries else None
    jobs = [Queue.prepare_data(CHUNK_FUNCTION, args=(record.tenant, record.id, chunk),
                               job_id=rq_job_id(record.id, chunk), timeout=settings.chunk_timeout, retry=retry,
                               result_ttl=3600, failure_ttl=7 * 24 * 3600, on_failure=Callback(CHUNK_FAILURE_CALLBACK),
                               description=f"{record.id} chunk {chunk}")
            for chunk in range(record.n_chunks)]
    queue.enqueue_many(jobs)


def cancel_job(*, tenant: str, job_id: str, store: Store) -> Job:
    """Ask workers to stop: queued chunks are skipped, running ones stop between micro-batches.

    Finished shards stay; the last chunk to settle finalizes the dataset and the job ends ``cancelled``.
    """
    job = store.get_job(tenant, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    if job.status in ("cancelling", "cancelled"):
        return job
    if not store.set_status(tenant, job_id, "cancelling", allowed_from=("validating", "in_progress")):
        current = store.get_job(tenant, job_id)
        raise Conflict(f"job {job_id} is {current.status if current else 'gone'}; only validating or in_progress "
                       "jobs can be cancelled")
    return store.get_job(tenant, job_id)


__all__ = ["ServiceError", "cancel_job", "chunk_file", "create_job", "normalize", "parse_items_file", "rq_job_id"]
