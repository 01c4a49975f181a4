"""The worker's pipelined commits and the round trips it saves: the commit thread, the chunk's RQ result, and
the Store calls that replaced several round trips (on the session's real Redis)."""

from __future__ import annotations

import threading
import time
import uuid

from redis import Redis
from rq import Queue
from rq.job import Job as RQJob
from service_helpers import FAST_PARAMS, inline_items, wait_for_job

from hscr_jobs.lifecycle import rq_job_id
from hscr_jobs.store import FileRecord, JobRecord, Store
from hscr_worker.rq_worker import ChunkCommitter


def test_committer_runs_commits_in_order_one_at_a_time():
    committer, spans, lock = ChunkCommitter(), [], threading.Lock()

    def task(n: int):
        def run():
            began = time.monotonic()
            time.sleep(0.05)
            with lock:
                spans.append((n, began, time.monotonic(), threading.current_thread().name))
        return run

    submitted = []
    for n in range(4):
        committer.submit(task(n))  # waits for the previous commit: at most one in flight
        submitted.append(time.monotonic())
    assert committer.flush(timeout=10)
    assert [s[0] for s in spans] == [0, 1, 2, 3]
    assert all(s[3] == "hscr-commit" for s in spans)
    for (_, _, end, _), (_, begin, _, _) in zip(spans[:-1], spans[1:], strict=True):
        assert begin >= end  # never two at once
    for n in range(1, 4):
        assert submitted[n] >= spans[n - 1][2]  # submit n returned only after commit n-1 ended


def test_committer_survives_a_failing_commit():
    committer, ran = ChunkCommitter(), []

    def boom():
        raise RuntimeError("storage down")

    committer.submit(boom)
    committer.submit(lambda: ran.append(True))
    assert committer.flush(timeout=10)
    assert ran == [True]


def test_store_chunk_context_settle_with_model_and_file_batch(stack_env):
    store = Store(Redis.from_url(stack_env["env"]["HSCR_REDIS_URL"]), prefix=f"hscr-test-{uuid.uuid4().hex[:8]}")
    record = JobRecord(id="job-x", tenant="alice", model="fixture", params={}, created_at=0, total=8, n_chunks=2,
                       chunk_size=4, input_uri="mem://in", dataset_uri="mem://out")
    assert store.chunk_context("alice", "job-x", 0) == (None, False, None)
    store.create_job(record)
    got, settled, status = store.chunk_context("alice", "job-x", 0)
    assert (got, settled, status) == (record, False, "in_progress")

    first = {"name": "fixture", "sha256": "a"}
    assert store.settle_chunk("alice", "job-x", 0, completed=3, failed=1, model=first) == (True, 1)
    assert store.settle_chunk("alice", "job-x", 0, completed=3, failed=1, model={"name": "other"}) == (False, 1)
    assert store.model_info("alice", "job-x") == first  # the first worker's report wins
    assert store.chunk_context("alice", "job-x", 0)[1] is True
    assert store.chunk_context("alice", "job-x", 1)[1] is False
    job = store.get_job("alice", "job-x")
    assert (job.request_counts.completed, job.request_counts.failed, job.chunk_counts.done) == (3, 1, 1)

    mine = FileRecord(id="file-a", tenant="alice", filename="a.png", purpose="image", bytes=1, created_at=0,
                      uri="mem://a")
    theirs = FileRecord(id="file-b", tenant="bob", filename="b.png", purpose="image", bytes=1, created_at=0,
                        uri="mem://b")
    store.add_file(mine)
    store.add_file(theirs)
    assert store.get_files("alice", ["file-a", "file-b", "file-missing", "file-a"]) == {"file-a": mine}
    assert store.get_files("alice", []) == {}


def test_each_chunk_job_succeeds_with_its_commit_result(alice, workers, fixture_items, stack_env):
    """A chunk's RQ job ends with what its commit returned (written shards and counts), not before it."""
    job = alice.post("/v1/jobs", json={"items": inline_items(fixture_items, 12, "pipe-"),
                                       "params": FAST_PARAMS}).json()
    job = wait_for_job(alice, job["id"])
    assert job["status"] == "completed"
    connection = Redis.from_url(stack_env["env"]["HSCR_REDIS_URL"])
    queue = Queue(stack_env["env"]["HSCR_QUEUE"], connection=connection)
    completed = failed = 0
    for chunk in range(job["chunk_counts"]["total"]):
        rq_job = RQJob.fetch(rq_job_id(job["id"], chunk), connection=connection)
        assert rq_job.get_status() == "finished"
        result = rq_job.return_value()
        assert result["outcome"] == "written" and result["compute_s"] > 0, result
        completed, failed = completed + result["completed"], failed + result["failed"]
    assert (completed, failed) == (job["request_counts"]["completed"], job["request_counts"]["failed"])
    assert not [i for i in queue.started_job_registry.get_job_ids() if i.startswith(job["id"])]
