"""The RQ side of the service: a model-holding worker and the job functions it runs.

- :class:`HSCRWorker` is a non-forking ``SimpleWorker`` (a CUDA model cannot cross a fork, and it
  must load once per process, not per job). It overrides these hooks: ``execute_job`` (adds a
  heartbeat thread, since SimpleWorker stops heartbeating mid-job), ``get_heartbeat_ttl`` (short, so a
  SIGKILLed worker's chunk expires from the started registry in seconds), ``kill_horse`` (there is no
  horse: set a cooperative-stop flag the chunk checks between micro-batches), and ``_start_scheduler``
  / ``run_maintenance_tasks`` (take over the scheduler lock of a dead worker, see
  :meth:`HSCRWorker.release_dead_scheduler_locks`).
- :func:`run_chunk` is the unit of work and of retry: it reads ``inputs/<job>/part-<chunk>.jsonl`` and
  writes that chunk's immutable shards with :func:`hscr_worker.dataset.write_chunk`, so a re-run
  overwrites its own files. Its counts are settled in Redis exactly once (``Store.settle_chunk``).
- The chunk that settles last enqueues :func:`finalize_job`, which writes the manifest and card last
  and only then marks the job ``completed`` (or ``cancelled``).

Job state and Redis keys belong to ``hscr_service.core.store`` (no torch there), shared with the API.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import click
from rq import Callback, Queue, Retry, SimpleWorker, get_current_job
from rq.job import Job as RQJob
from rq.scheduler import RQScheduler
from rq.worker import WorkerStatus

log = logging.getLogger("hscr_worker.rq")

CHUNK_INPUT = "part-{chunk:05d}.jsonl"
TRANSIENT_READ = "cannot read s3://"  # load_image's message when object storage does not answer


class TransientError(RuntimeError):
    """Storage or Redis did not answer; RQ retries the chunk with backoff."""


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
    _similarities: dict = field(default_factory=dict)
    _store: object = None

    def similarity(self, name: str):
        from .similarity import get_similarity

        if name not in self._similarities:
            self._similarities[name] = get_similarity(name)
        return self._similarities[name]

    @property
    def store(self):
        from hscr_service.core.store import Store, connect

        if self._store is None:
            self._store = Store(connect(self.redis_url))
        return self._store


_runtime: Runtime | None = None


def load_runtime(*, model: str, model_name: str, backend: str, device: str | None, micro_batch: int,
                 redis_url: str, queue: str) -> Runtime:
    """Load the model once per process; later calls (a worker restarted after a Redis outage) reuse it."""
    global _runtime
    if _runtime is None:
        from .dataset import model_digest
        from .generate import load_backend

        options = {"device": device} if backend == "transformers" and device else {}
        engine = load_backend(backend, model, **options)
        _runtime = Runtime(backend=engine, model_name=model_name, micro_batch=micro_batch, redis_url=redis_url,
                           queue=queue, model_info={"name": model_name, "path": engine.model_path,
                                                    "backend": engine.name, "sha256": model_digest(engine.model_path)})
    return _runtime


def runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("no model loaded: chunks run only inside `hscr worker` (HSCRWorker)")
    return _runtime


# Delete a scheduler lock whose holder stopped refreshing it: its TTL has run down below ARGV[1].
# Atomic, so a holder that refreshes in between keeps its lock.
_RELEASE_STALE_LOCK = """
local ttl = redis.call('TTL', KEYS[1])
if ttl >= 0 and ttl < tonumber(ARGV[1]) then return redis.call('DEL', KEYS[1]) end
return 0
"""


class HSCRWorker(SimpleWorker):
    heartbeat_interval = 5.0
    storage_uri: str | None = None  # the storage root, for the upload sweep (None: no sweep)
    abort_uploads_after: timedelta | None = timedelta(hours=24)
    uploads_sweep_every = 3600  # seconds; one worker of all sweeps (a Redis key with this TTL)
    # A live RQ scheduler refreshes its lock every `interval` (1 s); one silent this long is dead.
    scheduler_stale_after = 10

    def release_dead_scheduler_locks(self) -> None:
        """Free the scheduler lock of a worker that was killed, so this worker's scheduler takes over now.

        Retries with an interval, including the retry RQ gives a chunk abandoned by a killed worker, wait in
        the ScheduledJobRegistry until a scheduler enqueues them. Each queue has one scheduler, elected by a
        lock that RQ sets with a TTL of ``interval + 60`` s and refreshes every ``interval``. A SIGKILLed
        worker's scheduler dies with it and never releases its lock, so without this the chunk sat for up
        to a minute after RQ had already re-queued it for retry. RQ handles a takeover: a scheduler that
        finds its lock taken drops it.
        """
        lock_ttl = (self.scheduler.interval if self.scheduler else 1) + 60  # RQScheduler's default interval: 1 s
        release = self.connection.register_script(_RELEASE_STALE_LOCK)
        for queue_name in self.queue_names():
            key = RQScheduler.get_locking_key(queue_name)
            if release(keys=[key], args=[lock_ttl - self.scheduler_stale_after]):
                self.log.warning("released the scheduler lock of %s: its holder stopped refreshing it", queue_name)

    def _start_scheduler(self, *args, **kwargs):
        self.release_dead_scheduler_locks()
        super()._start_scheduler(*args, **kwargs)

    def run_maintenance_tasks(self):
        scheduler_down = self.scheduler and (not self.scheduler._process or not self.scheduler._process.is_alive())
        if self.last_cleaned_at and scheduler_down:
            self.release_dead_scheduler_locks()  # then RQ's maintenance starts this worker's scheduler
        super().run_maintenance_tasks()
        self.expire_due_jobs()
        self.abort_stale_uploads()

    def expire_due_jobs(self) -> None:
        """End jobs whose completion window has passed and that no chunk is running (the API also does this
        when such a job is read)."""
        from hscr_service.core.jobs import expire_due_jobs

        try:
            rt = runtime()
            expire_due_jobs(store=rt.store, queue=Queue(rt.queue, connection=rt.store.redis), model=rt.model_info)
        except Exception as exc:  # Redis or storage unreachable: the next maintenance tries again
            log.warning("expiry sweep failed: %s", exc)

    def execute_job(self, job: RQJob, queue: Queue):
        execution = self.prepare_execution(job)
        runtime().stop.clear()
        done = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, done), name="hscr-heartbeat", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            beat.join(timeout=5)
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: RQJob, execution, done: threading.Event) -> None:
        while not done.wait(self.heartbeat_interval):
            try:
                self.maintain_heartbeats(job, execution)
            except Exception as exc:  # Redis restarting: the next beat retries
                log.warning("heartbeat failed: %s", exc)

    def get_heartbeat_ttl(self, job: RQJob, working_time: float = 0.0) -> int:
        # Short: an abandoned chunk (worker killed) expires from the started registry in seconds.
        return int(self.heartbeat_interval * 4)

    def abort_stale_uploads(self) -> None:
        """Hourly, in one worker: abort multipart uploads that killed writers left under datasets/."""
        if not self.storage_uri or self.abort_uploads_after is None:
            return
        from hscr_service.core.storage import abort_stale_uploads

        try:
            if not self.connection.set("hscr:maintenance:abort-uploads", self.name, nx=True,
                                       ex=self.uploads_sweep_every):
                return  # another worker swept within the hour
            aborted = abort_stale_uploads(self.storage_uri, older_than=self.abort_uploads_after)
            if aborted:
                log.warning("aborted %d incomplete upload(s) under datasets/", len(aborted))
        except Exception as exc:  # storage unreachable: the next sweep tries again
            log.warning("upload sweep failed: %s", exc)

    def kill_horse(self, sig: signal.Signals = signal.SIGKILL):
        runtime().stop.set()

    def handle_warm_shutdown_request(self):
        _shutdown.set()  # SIGTERM/SIGINT: the restart loop in `hscr worker` must end too
        super().handle_warm_shutdown_request()


_shutdown = threading.Event()


# --- job functions (module level: RQ imports them by dotted path) ---------------------------------

def _store():
    return runtime().store


def _read_chunk_input(record, chunk: int) -> list[dict]:
    from hscr_client.storage import open_location

    try:
        data = open_location(record.input_uri).read_bytes(CHUNK_INPUT.format(chunk=chunk))
    except OSError as exc:
        raise TransientError(f"cannot read the chunk input: {exc}") from exc
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def _stop_reason(store, record) -> str | None:
    """Why this chunk must stop: ``skipped`` (cancel, or an operator's stop), ``expired`` (the job's completion
    window ended), or None."""
    if runtime().stop.is_set() or store.status(record.tenant, record.id) in ("cancelling", "cancelled"):
        return "skipped"
    if record.expires_at is not None and time.time() >= record.expires_at:
        return "expired"
    return None


def run_chunk(tenant: str, job_id: str, chunk: int) -> dict:
    """Run HSCR over one chunk and write its shards; settle its counts once; the last chunk finalizes."""
    from hscr_client import HSCRParams
    from hscr_client.storage import open_location

    from .dataset import write_chunk
    from .generate import prepare_all
    from .pipeline import run_hscr

    store = _store()
    record = store.get_record(tenant, job_id)
    if record is None:
        return {"outcome": "job gone"}
    if store.chunk_settled(tenant, job_id, chunk):  # a re-run of a chunk that already counted
        _maybe_finalize(record)
        return {"outcome": "already settled"}
    rt = runtime()
    if record.model != rt.model_name:
        raise RuntimeError(f"job wants model {record.model!r}; this worker serves {rt.model_name!r}")
    if reason := _stop_reason(store, record):
        return _skip(record, chunk, reason)
    rows = _read_chunk_input(record, chunk)
    pre_errors = [{"custom_id": r["custom_id"], "error": r["error"]} for r in rows if "error" in r]
    prepared, errors = prepare_all([r for r in rows if "error" not in r], base_dir=None)
    if any(e.error.startswith(TRANSIENT_READ) for e in errors):
        # Uploaded images were checked at upload: a read failure means storage is down, not a bad item.
        raise TransientError(next(e.error for e in errors if e.error.startswith(TRANSIENT_READ)))
    params = HSCRParams(**record.params)
    similarity = rt.similarity(params.similarity)
    results = []
    for start in range(0, len(prepared), rt.micro_batch):
        if reason := _stop_reason(store, record):
            return _skip(record, chunk, reason)
        results += run_hscr(rt.backend, prepared[start:start + rt.micro_batch], params, similarity)
    try:
        sidecar = write_chunk(open_location(record.dataset_uri), chunk, results,
                              pre_errors + [e.as_dict() for e in errors])
    except OSError as exc:
        raise TransientError(f"cannot write the shards: {exc}") from exc
    store.set_model_info(tenant, job_id, rt.model_info)
    store.settle_chunk(tenant, job_id, chunk, completed=sidecar["completed"], failed=sidecar["failed"])
    _maybe_finalize(record)
    return {"outcome": "written", "completed": sidecar["completed"], "failed": sidecar["failed"]}


def _skip(record, chunk: int, reason: str) -> dict:
    """Settle a chunk that stopped for a cancel or an expiry (no shard); an operator's stop is a failure."""
    if reason == "expired" or not runtime().stop.is_set() or \
            _store().status(record.tenant, record.id) in ("cancelling", "cancelled"):
        _store().settle_chunk(record.tenant, record.id, chunk, completed=0, failed=0, outcome=reason)
        _maybe_finalize(record)
        return {"outcome": "skipped (cancelled)" if reason == "skipped" else "skipped (expired)"}
    raise RuntimeError("stopped by an operator's stop command")


def _maybe_finalize(record) -> None:
    store = _store()
    job = store.get_job(record.tenant, record.id)
    if job is None or job.is_terminal or job.chunk_counts.done < record.n_chunks:
        return
    queue = Queue(runtime().queue, connection=store.redis)
    current = get_current_job()
    retry = Retry(max=current.retries_left or 3, interval=current.retry_intervals or [2, 5, 10]) if current else None
    queue.enqueue("hscr_worker.rq_worker.finalize_job", record.tenant, record.id,
                  job_id=f"{record.id}-finalize", retry=retry, result_ttl=3600,
                  on_failure=Callback("hscr_worker.rq_worker.on_finalize_failure"),
                  description=f"{record.id} finalize")


def finalize_job(tenant: str, job_id: str) -> dict:
    """Write errors.jsonl, the card and the manifest (last); then the job is completed or cancelled."""
    from hscr_client.manifest import finalize
    from hscr_client.storage import open_location

    store = _store()
    record = store.get_record(tenant, job_id)
    if record is None or store.status(tenant, job_id) in ("completed", "cancelled", "failed", "expired"):
        return {"outcome": "nothing to do"}
    store.set_status(tenant, job_id, "finalizing", allowed_from=("in_progress",))
    if store.status(tenant, job_id) == "cancelling":
        final = "cancelled"
    elif any(c.get("outcome") == "expired" for c in store.chunk_outcomes(tenant, job_id).values()):
        final = "expired"  # some chunks never ran: the completion window ended first
    else:
        final = "completed"
    try:
        manifest = finalize(open_location(record.dataset_uri), params=record.params, model=runtime().model_info,
                            extra={"job_id": job_id, "metadata": record.metadata or {}})
    except OSError as exc:
        raise TransientError(f"cannot write the manifest: {exc}") from exc
    store.set_status(tenant, job_id, final, allowed_from=("finalizing", "cancelling"))
    return {"outcome": final, "request_counts": manifest["request_counts"]}


def on_chunk_failure(job: RQJob, connection, exc_type, exc_value, traceback) -> None:
    """Retries exhausted: the chunk's items fail with the reason, and the job goes on without them."""
    if job.retries_left:
        return  # RQ retries it
    from hscr_client.storage import open_location

    from .dataset import write_chunk

    tenant, job_id, chunk = job.args
    store = _store()
    record = store.get_record(tenant, job_id)
    if record is None:
        return
    reason = f"chunk {chunk} failed after retries: {exc_type.__name__}: {exc_value}"
    try:
        rows = _read_chunk_input(record, chunk)
        write_chunk(open_location(record.dataset_uri), chunk, [],
                    [{"custom_id": r["custom_id"], "error": r.get("error") or reason} for r in rows])
    except Exception as exc:  # storage still down: the counts below still let the job end
        log.error("cannot record the failure of %s chunk %s: %s", job_id, chunk, exc)
    n_items = min(record.chunk_size, record.total - chunk * record.chunk_size)
    store.settle_chunk(tenant, job_id, chunk, completed=0, failed=n_items, outcome="failed")
    _maybe_finalize(record)


def on_finalize_failure(job: RQJob, connection, exc_type, exc_value, traceback) -> None:
    if job.retries_left:
        return
    tenant, job_id = job.args
    _store().set_status(tenant, job_id, "failed", allowed_from=("finalizing", "cancelling", "in_progress"),
                        errors=[{"code": "finalize_failed", "message": f"{exc_type.__name__}: {exc_value}"}])


# --- the `hscr worker` command --------------------------------------------------------------------

@click.command("worker")
@click.option("--redis-url", envvar="HSCR_REDIS_URL", default="redis://127.0.0.1:6379/0", show_default=True)
@click.option("--queue", envvar="HSCR_QUEUE", default="hscr", show_default=True)
@click.option("--model", envvar="HSCR_WORKER_MODEL", default=None,
              help="Model directory or hub id [default: the bundled fixture Med-VLM].")
@click.option("--model-name", envvar="HSCR_DEFAULT_MODEL", default="fixture", show_default=True,
              help="The name jobs use for this model (the API's HSCR_DEFAULT_MODEL / HSCR_MODELS).")
@click.option("--backend", envvar="HSCR_WORKER_BACKEND", type=click.Choice(["transformers", "vllm"]),
              default="transformers", show_default=True)
@click.option("--device", envvar="HSCR_WORKER_DEVICE", default=None, help="torch device (transformers backend).")
@click.option("--torch-threads", envvar="HSCR_WORKER_TORCH_THREADS", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch [default: torch's, one per core]. 1 suits a small model on a shared "
                   "CPU: idle OpenMP threads spinning against other processes can slow it many times over.")
@click.option("--micro-batch", default=8, show_default=True,
              help="Items per model call; cancel is checked between micro-batches.")
@click.option("--with-scheduler/--without-scheduler", default=True, show_default=True,
              help="Run RQ's scheduler (needed for retries with backoff; one is enough, extras stand by).")
@click.option("--worker-ttl", default=30, show_default=True, help="Seconds before a silent worker counts as dead.")
@click.option("--maintenance-interval", default=15, show_default=True,
              help="Seconds between registry clean-ups (re-queues chunks of dead workers).")
@click.option("--heartbeat-interval", default=5.0, show_default=True)
@click.option("--storage-uri", envvar="HSCR_STORAGE_URI", default=None,
              help="The service's storage root: enables the hourly abort of stale multipart uploads.")
@click.option("--abort-uploads-after", default="24h", show_default=True,
              help="Age (90s, 30m, 24h, 7d) at which an incomplete upload under datasets/ is aborted.")
@click.option("--burst", is_flag=True, help="Quit when the queue is empty.")
def worker(redis_url, queue, model, model_name, backend, device, torch_threads, micro_batch, with_scheduler,
           worker_ttl, maintenance_interval, heartbeat_interval, storage_uri, abort_uploads_after, burst):
    """Run one HSCR worker (one per GPU: set CUDA_VISIBLE_DEVICES). Loads the model once."""
    from hscr_service.cli import parse_duration
    from hscr_service.core.store import connect

    from .generate import DEFAULT_MODEL

    upload_age = parse_duration(abort_uploads_after)  # a bad value fails before the model loads
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    load_runtime(model=model or DEFAULT_MODEL, model_name=model_name, backend=backend, device=device,
                 micro_batch=micro_batch, redis_url=redis_url, queue=queue)
    HSCRWorker.heartbeat_interval = heartbeat_interval
    HSCRWorker.storage_uri = storage_uri
    HSCRWorker.abort_uploads_after = upload_age
    while not _shutdown.is_set():
        connection = connect(redis_url)
        rq_worker = HSCRWorker([queue], connection=connection, worker_ttl=worker_ttl,
                               maintenance_interval=maintenance_interval)
        try:
            rq_worker.work(burst=burst, with_scheduler=with_scheduler, logging_level="INFO")
        except Exception as exc:  # Redis unreachable while registering: wait and start again
            log.warning("worker stopped on %s; restarting in 2 s", exc)
        if burst or _shutdown.is_set():
            return
        log.warning("worker loop ended (Redis unreachable?); restarting in 2 s")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: _shutdown.set())
        _shutdown.wait(2)
