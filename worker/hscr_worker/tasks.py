"""The functions RQ runs on a worker (by dotted path, as :mod:`hscr_jobs.lifecycle` names them), and the model
they run with.

- :func:`run_chunk` is the unit of work and of retry: it reads the chunk's input and writes that chunk's
  immutable shards with :func:`hscr_worker.dataset.write_chunk`, so a re-run overwrites its own files. Its counts
  settle in Redis exactly once, after its shards and error file are written.
- :func:`record_chunk_failure`: a chunk out of retries has each of its items' errors written, then its count.
- :func:`finalize_job`: once every chunk has settled, the manifest is written last and the job gets its final
  status.

What these share with the API (records, keys, accounting, finalize) is :mod:`hscr_jobs`; the RQ worker class
that runs them is :mod:`hscr_worker.rq_worker`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from rq import Queue
from rq.job import Job as RQJob

from hscr_jobs import lifecycle
from hscr_jobs.failpoints import failpoint
from hscr_jobs.store import JobRecord, Store, connect

log = logging.getLogger("hscr_worker.tasks")

TRANSIENT_READ = "cannot read s3://"  # load_image's message when object storage does not answer


class TransientError(RuntimeError):
    """Storage or Redis did not answer; RQ retries the job with backoff."""


@dataclass
class Runtime:
    """What a worker process holds for its lifetime: the model, loaded once."""

    backend: object  # hscr_worker.backends.base.Backend
    model_name: str
    micro_batch: int
    redis_url: str
    queue: str
    model_info: dict = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    dead: str | None = None  # why the model server died: the worker stops taking chunks and the process exits
    _similarities: dict = field(default_factory=dict)
    _store: Store | None = None

    def similarity(self, name: str):
        from .similarity import get_similarity

        if name not in self._similarities:
            self._similarities[name] = get_similarity(name)
        return self._similarities[name]

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(connect(self.redis_url, ride_out_restarts=True))
        return self._store


_runtime: Runtime | None = None
# Set while HSCRWorker performs a job: run_chunk hands its commit back to the worker's commit thread.
deferred_commits = threading.local()


def load_runtime(*, model: str, model_name: str, backend: str, backend_options: dict, micro_batch: int,
                 redis_url: str, queue: str) -> Runtime:
    """Load the model once per process; later calls (a worker restarted after a Redis outage) reuse it."""
    global _runtime
    if _runtime is None:
        from .generate import load_backend, model_info

        engine = load_backend(backend, model, **backend_options)
        _runtime = Runtime(backend=engine, model_name=model_name, micro_batch=micro_batch, redis_url=redis_url,
                           queue=queue, model_info={"name": model_name, **model_info(engine)})
    return _runtime


def runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("no model loaded: chunks run only inside `hscr worker` (HSCRWorker)")
    return _runtime


def _read_chunk_input(record: JobRecord, chunk: int) -> list[dict]:
    try:
        return lifecycle.read_chunk_input(record, chunk)
    except OSError as exc:
        raise TransientError(f"cannot read the chunk input: {exc}") from exc


def _stop_reason(store: Store, record: JobRecord, status: str | None = None) -> str | None:
    """Why this chunk must stop: ``skipped`` (cancel, or an operator's stop), ``expired`` (the job's completion
    window ended), or None. ``status``: the job's status if just read (else it is read here)."""
    if runtime().stop.is_set() or (status or store.status(record.tenant, record.id)) in ("cancelling", "cancelled"):
        return "skipped"
    if record.expires_at is not None and time.time() >= record.expires_at:
        return "expired"
    return None


def _enqueue_finalize(record: JobRecord, done: int | None = None) -> None:
    lifecycle.enqueue_finalize(runtime().store, record, queue_name=runtime().queue, done=done)


def run_chunk(tenant: str, job_id: str, chunk: int) -> dict | ChunkCommit:
    """Run HSCR over one chunk and write its shards; settle its counts once; the last chunk finalizes.

    Inside :class:`~hscr_worker.rq_worker.HSCRWorker` the write is handed back as a :class:`ChunkCommit` that the
    worker's commit thread runs (and only then marks the RQ job done) while this thread computes the next chunk.
    """
    from .backends.base import BackendDead
    from .generate import prepare_all
    from .pipeline import check_params_supported, run_hscr_stream

    rt = runtime()
    store = rt.store
    record, settled, status = store.chunk_context(tenant, job_id, chunk)  # one round trip
    if record is None:
        return {"outcome": "job gone"}
    if settled:  # a re-run of a chunk that already counted
        _enqueue_finalize(record)
        return {"outcome": "already settled"}
    if record.model != rt.model_name:
        raise RuntimeError(f"job wants model {record.model!r}; this worker serves {rt.model_name!r}")
    if reason := _stop_reason(store, record, status):
        return _skip(record, chunk, reason)
    params = rt.backend.params(record.params)  # what the job set, else the model family's defaults
    try:  # a setting this worker's model server cannot give: no retry can help, so the items fail now
        check_params_supported(rt.backend, params)
    except ValueError as exc:
        _fail_chunk(record, chunk, str(exc))
        return {"outcome": "failed (unsupported setting)"}
    rows = _read_chunk_input(record, chunk)
    pre_errors = [{"custom_id": r["custom_id"], "error": r["error"]} for r in rows if "error" in r]
    prepared, errors = prepare_all([r for r in rows if "error" not in r], base_dir=None)
    if any(e.error.startswith(TRANSIENT_READ) for e in errors):
        # Uploaded images were checked at upload: a read failure means storage is down, not a bad item.
        raise TransientError(next(e.error for e in errors if e.error.startswith(TRANSIENT_READ)))
    similarity = rt.similarity(params.similarity)
    stopped: list[str] = []

    def micro_batches():
        for start in range(0, len(prepared), rt.micro_batch):
            if start and (reason := _stop_reason(store, record)):  # the first micro-batch was checked above
                stopped.append(reason)
                return
            yield start, prepared[start:start + rt.micro_batch]

    results = []
    began = time.perf_counter()
    # On vLLM a micro-batch's re-decode shares engine steps with the next one's own answers.
    try:
        for _, batch_results in run_hscr_stream(rt.backend, micro_batches(), params, similarity):
            results += batch_results
    except BackendDead as exc:  # RQ retries this chunk (on a live worker); this one stops after it
        rt.dead = str(exc)
        raise
    if stopped:
        return _skip(record, chunk, stopped[0])
    failpoint("chunk.after_compute")
    commit = ChunkCommit(record, chunk, results, pre_errors + [e.as_dict() for e in errors],
                         compute_s=time.perf_counter() - began)
    return commit if getattr(deferred_commits, "enabled", False) else commit()


@dataclass
class ChunkCommit:
    """A computed chunk still to be committed: its shards and error file, then its counts (once), then maybe the
    job's finalize. Calling it does all three and returns run_chunk's result."""

    record: JobRecord
    chunk: int
    results: list
    errors: list[dict]
    compute_s: float = 0.0  # seconds in run_hscr_stream (in the chunk's RQ result: what the rest of the time went to)

    def __call__(self) -> dict:
        from hscr_client.storage import open_location

        from .dataset import write_chunk

        try:
            sidecar = write_chunk(open_location(self.record.dataset_uri), self.chunk, self.results, self.errors)
        except OSError as exc:
            raise TransientError(f"cannot write the shards: {exc}") from exc
        rt = runtime()
        _, done = rt.store.settle_chunk(self.record.tenant, self.record.id, self.chunk,
                                        completed=sidecar["completed"], failed=sidecar["failed"],
                                        model=rt.model_info)
        _enqueue_finalize(self.record, done=done)
        return {"outcome": "written", "completed": sidecar["completed"], "failed": sidecar["failed"],
                "compute_s": round(self.compute_s, 4)}


def _skip(record: JobRecord, chunk: int, reason: str) -> dict:
    """Settle a chunk that stopped for a cancel or an expiry (no shard; its items are listed as skipped at
    finalize); an operator's stop is a failure (RQ retries the chunk)."""
    store = runtime().store
    if reason == "expired" or not runtime().stop.is_set() or \
            store.status(record.tenant, record.id) in ("cancelling", "cancelled"):
        lifecycle.settle_skipped(store, record, chunk, reason)
        _enqueue_finalize(record)
        return {"outcome": "skipped (cancelled)" if reason == "skipped" else "skipped (expired)"}
    raise RuntimeError("stopped by an operator's stop command")


def _fail_chunk(record: JobRecord, chunk: int, reason: str) -> None:
    """Every item of the chunk fails with ``reason``: the error file first, then the count (so a failed count
    always has its errors). Raises TransientError when storage does not answer (the caller's RQ job retries)."""
    from hscr_client.storage import open_location

    from .dataset import write_chunk

    rows = _read_chunk_input(record, chunk)
    try:
        write_chunk(open_location(record.dataset_uri), chunk, [],
                    [{"custom_id": r["custom_id"], "error": r.get("error") or reason} for r in rows])
    except OSError as exc:
        raise TransientError(f"cannot write the errors of chunk {chunk}: {exc}") from exc
    runtime().store.settle_chunk(record.tenant, record.id, chunk, failed=len(rows), outcome="failed")
    _enqueue_finalize(record)


def on_chunk_failure(job: RQJob, connection, exc_type, exc_value, traceback) -> None:
    """Retries exhausted: the chunk's items fail with the reason, and the job goes on without them. The errors
    are recorded by a job of its own with retries (storage may be what failed the chunk)."""
    if job.retries_left:
        return  # RQ retries it
    tenant, job_id, chunk = job.args
    store = runtime().store
    record = store.get_record(tenant, job_id)
    if record is not None:
        reason = f"chunk {chunk} failed after retries: {exc_type.__name__}: {exc_value}"
        lifecycle.enqueue_record_failure(record, chunk, reason, queue=Queue(runtime().queue, connection=store.redis))


def record_chunk_failure(tenant: str, job_id: str, chunk: int, reason: str) -> dict:
    record, settled, _ = runtime().store.chunk_context(tenant, job_id, chunk)
    if record is None or settled:
        return {"outcome": "nothing to do"}
    _fail_chunk(record, chunk, reason)
    return {"outcome": "failed", "chunk": chunk}


def on_record_failure(job: RQJob, connection, exc_type, exc_value, traceback) -> None:
    """Even recording a failed chunk's errors failed, through every retry: the job fails, and says why (its
    counts would not add up, and no error may vanish silently)."""
    if job.retries_left:
        return
    tenant, job_id, chunk, _ = job.args
    runtime().store.set_status(
        tenant, job_id, "failed", allowed_from=("validating", "in_progress", "finalizing", "cancelling"),
        errors=[{"code": "storage_unavailable",
                 "message": f"could not record the failure of chunk {chunk}: {exc_type.__name__}: {exc_value}"}])


def finalize_job(tenant: str, job_id: str) -> dict:
    """Write errors.jsonl, skipped.jsonl, the card and the manifest (last); then the job is completed, cancelled
    or expired. Idempotent: a retry (or a re-run after the worker was killed) writes the same files again."""
    store = runtime().store
    record = store.get_record(tenant, job_id)
    if record is None or store.status(tenant, job_id) in ("completed", "cancelled", "failed", "expired"):
        return {"outcome": "nothing to do"}
    store.set_status(tenant, job_id, "finalizing", allowed_from=("in_progress",))
    final = lifecycle.final_status(store, record)
    failpoint("finalize.before_manifest")
    try:
        params = runtime().backend.params(record.params).model_dump()  # the values used
        manifest = lifecycle.write_manifest(store, record, params=params, model=runtime().model_info)
    except OSError as exc:
        raise TransientError(f"cannot write the manifest: {exc}") from exc
    store.set_status(tenant, job_id, final, allowed_from=("finalizing", "cancelling"))
    return {"outcome": final, "request_counts": manifest["request_counts"]}


def on_finalize_failure(job: RQJob, connection, exc_type, exc_value, traceback) -> None:
    if job.retries_left:
        return
    tenant, job_id = job.args
    runtime().store.set_status(tenant, job_id, "failed", allowed_from=("finalizing", "cancelling", "in_progress"),
                               errors=[{"code": "finalize_failed", "message": f"{exc_type.__name__}: {exc_value}"}])
