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
- Pipelining: inside :class:`HSCRWorker`, a chunk's commit (shards, counts, RQ's success bookkeeping) runs
  on one background thread (:class:`ChunkCommitter`) while the main thread dequeues and computes the next
  chunk. One commit at a time, in order; the chunk stays in RQ's started registry with its heartbeat until
  its commit is done, so its RQ job succeeds only after its shards are written, and a SIGKILL mid-commit
  re-queues it like any running chunk.
- The chunk that settles last enqueues :func:`finalize_job`, which writes the manifest and card last
  and only then marks the job ``completed`` (or ``cancelled``).

Job state and Redis keys belong to ``hscr_service.core.store`` (no torch there), shared with the API.
"""

from __future__ import annotations

import json
import logging
import queue as queue_module
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import click
from rq import Callback, Queue, Retry, SimpleWorker, get_current_job
from rq.job import Job as RQJob
from rq.scheduler import RQScheduler
from rq.timeouts import BaseDeathPenalty, JobTimeoutException, TimerDeathPenalty, UnixSignalDeathPenalty

from .cli import backend_options_or_usage_error, image_size_options, vllm_engine_options
from .families import PROFILES

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
    dead: str | None = None  # why the model server died: the worker stops taking chunks and the process exits
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


# Delete a scheduler lock whose holder stopped refreshing it: its TTL has run down below ARGV[1].
# Atomic, so a holder that refreshes in between keeps its lock.
_RELEASE_STALE_LOCK = """
local ttl = redis.call('TTL', KEYS[1])
if ttl >= 0 and ttl < tonumber(ARGV[1]) then return redis.call('DEL', KEYS[1]) end
return 0
"""


class _Heartbeats:
    """One thread per worker that keeps the RQ heartbeat of each chunk it holds, computing or committing
    (SimpleWorker does not beat mid-job). One long-lived thread: starting a thread per chunk costs a context
    switch on a loaded machine."""

    def __init__(self, worker: HSCRWorker) -> None:
        self._worker = worker
        self._held: dict[str, tuple[RQJob, object]] = {}  # execution id -> (job, execution)
        self._lock = threading.Lock()  # held while beating, so a removed chunk is never beaten afterwards
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, job: RQJob, execution) -> None:
        with self._lock:
            self._held[execution.id] = (job, execution)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hscr-heartbeat", daemon=True)
            self._thread.start()

    def remove(self, execution) -> None:
        with self._lock:
            self._held.pop(execution.id, None)

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self._worker.heartbeat_interval):
            with self._lock:
                for job, execution in list(self._held.values()):
                    try:
                        self._worker.maintain_heartbeats(job, execution)
                    except Exception as exc:  # Redis restarting: the next beat retries
                        log.warning("heartbeat failed: %s", exc)


class _MainOrTimerDeathPenalty(BaseDeathPenalty):
    """RQ's job timeout on any thread: SIGALRM on the main thread (RQ's default, no thread per job), a timer
    thread elsewhere (a failure callback run on the commit thread; signals work only on the main thread)."""

    def __init__(self, timeout, exception=JobTimeoutException, **kwargs) -> None:
        super().__init__(timeout, exception, **kwargs)
        on_main = threading.current_thread() is threading.main_thread()
        self._impl = (UnixSignalDeathPenalty if on_main else TimerDeathPenalty)(timeout, exception, **kwargs)

    def setup_death_penalty(self) -> None:
        self._impl.setup_death_penalty()

    def cancel_death_penalty(self) -> None:
        self._impl.cancel_death_penalty()


class ChunkCommitter:
    """One background thread that commits computed chunks (shards, counts, RQ's success bookkeeping) in order.

    Bounded: :meth:`submit` first waits for the previous commit, so at most one commit overlaps the next
    chunk's compute and results never pile up in memory.
    """

    def __init__(self) -> None:
        self._tasks: queue_module.SimpleQueue[Callable[[], None]] = queue_module.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None

    def submit(self, task: Callable[[], None]) -> None:
        self._idle.wait()
        self._idle.clear()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="hscr-commit", daemon=True)
            self._thread.start()
        self._tasks.put(task)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the submitted commit is done; False if it still runs after ``timeout`` seconds."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                task()
            except Exception:  # the task records its own failure; never let the thread die
                log.exception("chunk commit failed")
            finally:
                self._idle.set()


_defer = threading.local()  # set while HSCRWorker performs a job: run_chunk may hand its commit back


class HSCRWorker(SimpleWorker):
    # A chunk's success or failure handling (with its failure callback's timeout) may run on the commit thread.
    death_penalty_class = _MainOrTimerDeathPenalty
    pipeline_commits = True  # commit chunk k on a background thread while chunk k+1 computes
    commit_flush_timeout = 300.0  # seconds a stopping worker waits for its last commit
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

    _committer: ChunkCommitter | None = None
    _beats: _Heartbeats | None = None
    _running = None  # the execution of the job the main thread performs
    _worker_beat_at = float("-inf")  # monotonic time of the last worker heartbeat
    _burst = False

    @property
    def committer(self) -> ChunkCommitter:
        if self._committer is None:
            self._committer = ChunkCommitter()
        return self._committer

    @property
    def heartbeats(self) -> _Heartbeats:
        if self._beats is None:
            self._beats = _Heartbeats(self)
        return self._beats

    def work(self, burst: bool = False, *args, **kwargs):
        self._burst = burst  # burst mode must see the finalize job the last commit enqueues: commit inline
        return super().work(burst, *args, **kwargs)

    def execute_job(self, job: RQJob, queue: Queue):
        execution = self.prepare_execution(job)
        runtime().stop.clear()
        self.heartbeats.add(job, execution)
        self._running = execution
        _defer.enabled = self.pipeline_commits and not self._burst
        try:
            self.perform_job(job, queue, execution)
        finally:
            _defer.enabled = False
            if self._running is not None:  # not handed to the committer: the job has ended
                self._running = None
                self.heartbeats.remove(execution)
            if runtime().dead:  # every later chunk would fail too: take no more, let the process exit
                self.log.error("the model server died (%s): this worker takes no more chunks", runtime().dead)
                self._stop_requested = True
                _shutdown.set()
        # No set_state(IDLE) here (SimpleWorker's): the dequeue that follows at once sets it, one write per chunk.

    def heartbeat(self, timeout: int | None = None, pipeline=None):
        # RQ beats the worker key up to three times between two chunks (after a job, before and after a dequeue),
        # each a round trip on the critical path. Its TTL is worker_ttl + 60 s: one plain beat a second is plenty.
        # Beats with a timeout or inside a pipeline (job start, the heartbeat thread) always go through.
        if timeout is None and pipeline is None and time.monotonic() - self._worker_beat_at < 1.0:
            return
        super().heartbeat(timeout, pipeline)
        self._worker_beat_at = time.monotonic()

    def _finalize_success(self, job: RQJob, queue: Queue, execution, return_value) -> None:
        if not isinstance(return_value, ChunkCommit):
            return super()._finalize_success(job, queue, execution, return_value)
        # A computed chunk: the commit thread writes it and only then finishes the RQ job; the chunk keeps its
        # heartbeat (and its entry in the started registry) until then.
        self._running = None
        self.committer.submit(lambda: self._commit(job, queue, execution, return_value))

    def _commit(self, job: RQJob, queue: Queue, execution, commit: ChunkCommit) -> None:
        """On the commit thread: what RQ's perform_job does after the function returns, for a deferred chunk."""
        try:
            try:
                result = commit()
                self.heartbeats.remove(execution)  # before RQ removes it from the started registry
                super()._finalize_success(job, queue, execution, result)
            except Exception:  # storage down: RQ retries the chunk with backoff, as if run_chunk had raised
                self.heartbeats.remove(execution)
                self._finalize_failure(job, queue, execution, sys.exc_info())
        except Exception:  # Redis down too: no more heartbeats, the chunk expires and is re-queued
            log.exception("cannot record the end of %s", job.id)
        finally:
            self.heartbeats.remove(execution)

    def get_current_job_id(self) -> str | None:
        # RQ's stop-job command targets the chunk being computed, not one whose commit is finishing.
        running = self._running
        return running.job_id if running is not None else super().get_current_job_id()

    def teardown(self):
        if self._committer is not None and not self._committer.flush(self.commit_flush_timeout):
            log.warning("a chunk commit still runs after %.0f s; its chunk will be re-queued",
                        self.commit_flush_timeout)
        if self._beats is not None:
            self._beats.stop()
        super().teardown()

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


def _stop_reason(store, record, status: str | None = None) -> str | None:
    """Why this chunk must stop: ``skipped`` (cancel, or an operator's stop), ``expired`` (the job's completion
    window ended), or None. ``status``: the job's status if just read (else it is read here)."""
    if runtime().stop.is_set() or (status or store.status(record.tenant, record.id)) in ("cancelling", "cancelled"):
        return "skipped"
    if record.expires_at is not None and time.time() >= record.expires_at:
        return "expired"
    return None


def run_chunk(tenant: str, job_id: str, chunk: int) -> dict | ChunkCommit:
    """Run HSCR over one chunk and write its shards; settle its counts once; the last chunk finalizes.

    Inside :class:`HSCRWorker` the write is handed back as a :class:`ChunkCommit` that the worker's commit
    thread runs (and only then marks the RQ job done) while this thread computes the next chunk.
    """

    from .backends.base import BackendDead
    from .generate import prepare_all
    from .pipeline import check_params_supported, run_hscr_stream

    store = _store()
    record, settled, status = store.chunk_context(tenant, job_id, chunk)  # one round trip
    if record is None:
        return {"outcome": "job gone"}
    if settled:  # a re-run of a chunk that already counted
        _maybe_finalize(record)
        return {"outcome": "already settled"}
    rt = runtime()
    if record.model != rt.model_name:
        raise RuntimeError(f"job wants model {record.model!r}; this worker serves {rt.model_name!r}")
    if reason := _stop_reason(store, record, status):
        return _skip(record, chunk, reason)
    params = rt.backend.profile.params(record.params)  # what the job set, else the model family's defaults
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
    commit = ChunkCommit(record, chunk, results, pre_errors + [e.as_dict() for e in errors], get_current_job(),
                         compute_s=time.perf_counter() - began)
    return commit if getattr(_defer, "enabled", False) else commit()


@dataclass
class ChunkCommit:
    """A computed chunk still to be committed: its shards and error file, then its counts (once), then maybe the
    job's finalize. Calling it does all three and returns run_chunk's result."""

    record: object  # hscr_service.core.store.JobRecord
    chunk: int
    results: list
    errors: list[dict]
    rq_job: RQJob | None  # the chunk's RQ job: its retry policy is the finalize job's
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
        _maybe_finalize(self.record, done=done, rq_job=self.rq_job)
        return {"outcome": "written", "completed": sidecar["completed"], "failed": sidecar["failed"],
                "compute_s": round(self.compute_s, 4)}


def _skip(record, chunk: int, reason: str) -> dict:
    """Settle a chunk that stopped for a cancel or an expiry (no shard); an operator's stop is a failure."""
    if reason == "expired" or not runtime().stop.is_set() or \
            _store().status(record.tenant, record.id) in ("cancelling", "cancelled"):
        _store().settle_chunk(record.tenant, record.id, chunk, completed=0, failed=0, outcome=reason)
        _maybe_finalize(record)
        return {"outcome": "skipped (cancelled)" if reason == "skipped" else "skipped (expired)"}
    raise RuntimeError("stopped by an operator's stop command")


def _maybe_finalize(record, *, done: int | None = None, rq_job: RQJob | None = None) -> None:
    """Enqueue the job's finalize once every chunk has settled. ``done``: the settled count if just known;
    ``rq_job``: the calling chunk's RQ job (RQ's current job is per thread)."""
    if done is not None and done < record.n_chunks:
        return
    store = _store()
    job = store.get_job(record.tenant, record.id)
    if job is None or job.is_terminal or job.chunk_counts.done < record.n_chunks:
        return
    queue = Queue(runtime().queue, connection=store.redis)
    current = rq_job or get_current_job()
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
        params = runtime().backend.profile.params(record.params).model_dump()  # the values used
        manifest = finalize(open_location(record.dataset_uri), params=params, model=runtime().model_info,
                            extra={"job_id": job_id, "metadata": record.metadata or {}})
    except OSError as exc:
        raise TransientError(f"cannot write the manifest: {exc}") from exc
    store.set_status(tenant, job_id, final, allowed_from=("finalizing", "cancelling"))
    return {"outcome": final, "request_counts": manifest["request_counts"]}


def on_chunk_failure(job: RQJob, connection, exc_type, exc_value, traceback) -> None:
    """Retries exhausted: the chunk's items fail with the reason, and the job goes on without them."""
    if job.retries_left:
        return  # RQ retries it
    tenant, job_id, chunk = job.args
    record = _store().get_record(tenant, job_id)
    if record is not None:
        _fail_chunk(record, chunk, f"chunk {chunk} failed after retries: {exc_type.__name__}: {exc_value}")


def _fail_chunk(record, chunk: int, reason: str) -> None:
    """Every item of the chunk fails with ``reason`` (errors.jsonl); the job goes on without them."""
    from hscr_client.storage import open_location

    from .dataset import write_chunk

    store = _store()
    try:
        rows = _read_chunk_input(record, chunk)
        write_chunk(open_location(record.dataset_uri), chunk, [],
                    [{"custom_id": r["custom_id"], "error": r.get("error") or reason} for r in rows])
    except Exception as exc:  # storage still down: the counts below still let the job end
        log.error("cannot record the failure of %s chunk %s: %s", record.id, chunk, exc)
    n_items = min(record.chunk_size, record.total - chunk * record.chunk_size)
    store.settle_chunk(record.tenant, record.id, chunk, completed=0, failed=n_items, outcome="failed")
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
@click.option("--device", envvar="HSCR_WORKER_DEVICE", default=None,
              help="torch device of the transformers backend, or of the vLLM backend's vision tower.")
@click.option("--profile", envvar="HSCR_WORKER_PROFILE", type=click.Choice(sorted(PROFILES)),
              default=None, help="Model family: prompt template and image preprocessing [default: detected].")
@click.option("--score-values", envvar="HSCR_WORKER_SCORE_VALUES", type=click.Choice(["logits", "logprobs"]),
              default=None, help="vLLM: what top-k score rows hold. logprobs (the default with top-k rows) keeps "
                                 "the logprob shift exact; jobs with shift=logit need logits.")
@click.option("--score-top-k", envvar="HSCR_WORKER_SCORE_TOP_K", type=click.IntRange(min=1), default=None,
              help="vLLM: tokens per score row [default: 20 for vocabularies over 4,096 tokens, whole rows "
                   "below]; jobs need top_k_candidates <= this.")
@click.option("--torch-threads", envvar="HSCR_WORKER_TORCH_THREADS", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch [default: torch's, one per core]. 1 suits a small model on a shared "
                   "CPU: idle OpenMP threads spinning against other processes can slow it many times over.")
@vllm_engine_options("HSCR_WORKER")
@image_size_options("HSCR_WORKER")
@click.option("--micro-batch", envvar="HSCR_WORKER_MICRO_BATCH", default=8, show_default=True,
              type=click.IntRange(min=1), help="Items per model call; cancel is checked between micro-batches.")
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
def worker(redis_url, queue, model, model_name, backend, device, profile, score_values, score_top_k, torch_threads,
           gpu_memory_utilization, max_model_len, min_pixels, max_pixels, micro_batch, with_scheduler, worker_ttl,
           maintenance_interval,
           heartbeat_interval, storage_uri, abort_uploads_after, burst):
    """Run one HSCR worker (one per GPU: set CUDA_VISIBLE_DEVICES). Loads the model once."""
    from hscr_service.cli import parse_duration
    from hscr_service.core.store import connect

    from .generate import DEFAULT_MODEL

    upload_age = parse_duration(abort_uploads_after)  # a bad value fails before the model loads
    options = backend_options_or_usage_error(
        backend, device=device, profile=profile, score_values=score_values, score_top_k=score_top_k,
        gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, min_pixels=min_pixels,
        max_pixels=max_pixels)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    load_runtime(model=model or DEFAULT_MODEL, model_name=model_name, backend=backend, backend_options=options,
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
        if runtime().dead:  # a non-zero exit, so the container (restart: unless-stopped) starts a fresh one
            sys.exit(f"hscr worker: exiting, the model server died: {runtime().dead}")
        if burst or _shutdown.is_set():
            return
        log.warning("worker loop ended (Redis unreachable?); restarting in 2 s")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: _shutdown.set())
        _shutdown.wait(2)
