"""The RQ glue of a GPU worker: :class:`HSCRWorker`, its scheduler, and the ``hscr worker`` command.

- :class:`HSCRWorker` is a non-forking ``SimpleWorker`` (a CUDA model cannot cross a fork, and it
  must load once per process, not per job). It overrides these hooks: ``execute_job`` (adds a
  heartbeat thread, since SimpleWorker stops heartbeating mid-job), ``get_heartbeat_ttl`` (short, so a
  SIGKILLed worker's chunk expires from the started registry in seconds), ``kill_horse`` (there is no
  horse: set a cooperative-stop flag the chunk checks between micro-batches), and ``_start_scheduler``
  / ``run_maintenance_tasks`` (an :class:`OwnedScheduler` that dies with its worker, and the takeover of a
  dead worker's scheduler lock, see :meth:`HSCRWorker.release_dead_scheduler_locks`).
- Pipelining: inside :class:`HSCRWorker`, a chunk's commit (shards, counts, RQ's success bookkeeping) runs
  on one background thread (:class:`ChunkCommitter`) while the main thread dequeues and computes the next
  chunk. One commit at a time, in order; the chunk stays in RQ's started registry with its heartbeat until
  its commit is done, so its RQ job succeeds only after its shards are written, and a SIGKILL mid-commit
  re-queues it like any running chunk.

The functions the worker runs are :mod:`hscr_worker.tasks`; job state, keys and accounting are :mod:`hscr_jobs`
(shared with the API, which the worker does not depend on).
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue as queue_module
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import click
from rq import Queue, SimpleWorker
from rq.job import Job as RQJob
from rq.scheduler import RQScheduler
from rq.timeouts import BaseDeathPenalty, JobTimeoutException, TimerDeathPenalty, UnixSignalDeathPenalty

from .cli import backend_options_or_usage_error, image_size_options, vllm_engine_options
from .families import PROFILES
from .tasks import ChunkCommit, deferred_commits, load_runtime, runtime

log = logging.getLogger("hscr_worker.rq")

PR_SET_PDEATHSIG = 1  # prctl(2)


# Delete a scheduler lock whose holder stopped refreshing it: its TTL has run down below ARGV[1].
# Atomic, so a holder that refreshes in between keeps its lock.
_RELEASE_STALE_LOCK = """
local ttl = redis.call('TTL', KEYS[1])
if ttl >= 0 and ttl < tonumber(ARGV[1]) then return redis.call('DEL', KEYS[1]) end
return 0
"""


class OwnedScheduler(RQScheduler):
    """RQ's scheduler, in a process that ends when its worker does.

    RQ forks the scheduler off the worker. Killed with SIGKILL (an OOM kill, ``docker kill``, a crash), the
    worker leaves RQ's scheduler running as an orphan that keeps refreshing the queue's scheduler lock, so no
    restarted worker can schedule again and retries with backoff wait forever. This one asks Linux for SIGTERM
    when its parent dies (``PR_SET_PDEATHSIG``) and also checks its parent on every tick (other systems, or a
    parent that died before the request): either way it stops and releases its lock within about a second.
    """

    def start(self):
        self._parent_pid = os.getpid()  # the worker; read in the forked child
        return super().start()

    def work(self):
        _ask_for_signal_on_parent_death(signal.SIGTERM)
        super().work()

    def heartbeat(self):
        if os.getppid() != getattr(self, "_parent_pid", os.getppid()):
            self.log.warning("scheduler: its worker (pid %s) is gone; stopping", self._parent_pid)
            self.request_stop()
        super().heartbeat()


def _ask_for_signal_on_parent_death(sig: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent check in OwnedScheduler.heartbeat still holds
        pass


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

    def _start_scheduler(self, burst: bool = False, logging_level: str | None = "INFO", *args, **kwargs):
        """RQ's, with an :class:`OwnedScheduler`: a scheduler that outlives its worker would hold the lock."""
        self.release_dead_scheduler_locks()
        self.scheduler = OwnedScheduler(self.queues, connection=self.connection, serializer=self.serializer,
                                        logging_level=logging_level if logging_level is not None else self.log.level)
        self.scheduler.acquire_locks()
        if not self.scheduler.acquired_locks:
            return  # another worker's scheduler runs; run_maintenance_tasks takes over if it dies
        if burst:
            try:
                self.scheduler.register_birth()
                self.scheduler.enqueue_scheduled_jobs()
            finally:
                self.scheduler.release_locks()
                self.scheduler.register_death()
        else:
            self.scheduler.start()

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
        from hscr_jobs.lifecycle import expire_due_jobs

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
        deferred_commits.enabled = self.pipeline_commits and not self._burst
        try:
            self.perform_job(job, queue, execution)
        finally:
            deferred_commits.enabled = False
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
        from hscr_jobs.maintenance import abort_stale_uploads

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
              help="The service's storage root: checked at start-up (the worker exits at once, saying why, if it "
                   "cannot be used), and the hourly abort of stale multipart uploads runs under it.")
@click.option("--abort-uploads-after", default="24h", show_default=True,
              help="Age (90s, 30m, 24h, 7d) at which an incomplete upload under datasets/ is aborted.")
@click.option("--burst", is_flag=True, help="Quit when the queue is empty.")
def worker(redis_url, queue, model, model_name, backend, device, profile, score_values, score_top_k, torch_threads,
           gpu_memory_utilization, max_model_len, min_pixels, max_pixels, micro_batch, with_scheduler, worker_ttl,
           maintenance_interval,
           heartbeat_interval, storage_uri, abort_uploads_after, burst):
    """Run one HSCR worker (one per GPU: set CUDA_VISIBLE_DEVICES). Loads the model once."""
    from hscr_jobs.maintenance import StorageUnavailable, check_storage, parse_duration
    from hscr_jobs.store import connect

    from .generate import DEFAULT_MODEL

    try:  # bad settings fail here, in seconds, before the model loads
        upload_age = parse_duration(abort_uploads_after)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--abort-uploads-after") from exc
    options = backend_options_or_usage_error(
        backend, device=device, profile=profile, score_values=score_values, score_top_k=score_top_k,
        gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, min_pixels=min_pixels,
        max_pixels=max_pixels)
    if storage_uri:
        try:
            check_storage(storage_uri)
        except StorageUnavailable as exc:
            raise click.ClickException(f"storage is not usable: {exc}") from exc
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
        connection = connect(redis_url, ride_out_restarts=True)
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
