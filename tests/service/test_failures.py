"""Failure semantics: a SIGKILLed worker, a Redis restart and an S3 outage mid-job lose nothing and duplicate
nothing (chunks are the unit of retry; a retried chunk overwrites its own shard)."""

from __future__ import annotations

import json
import signal
import time

from conftest import inline_items, stop, wait_for_job, wait_until


def all_ids_exactly_once(client, job: dict, expected: set[str], *, complete: bool = True) -> None:
    """Each item is written or failed, never both, never twice; with complete=False (a job that stopped
    early) some may be neither."""
    from hscr_worker.dataset import read_rows

    ranked = [row["custom_id"] for row in read_rows(job["dataset_uri"], "ranked")]
    errors = [json.loads(line)["custom_id"] for line in client.get(f"/v1/jobs/{job['id']}/errors").text.splitlines()]
    assert len(ranked) == len(set(ranked)), "an item was written twice"
    assert not set(ranked) & set(errors), "an item is both written and failed"
    if complete:
        assert set(ranked) | set(errors) == expected, "an item was lost"
    assert set(ranked) | set(errors) <= expected, "an unknown item"
    assert len(ranked) == job["request_counts"]["completed"] and len(errors) == job["request_counts"]["failed"]


def start_job(client, root, n: int, prefix: str) -> tuple[str, set[str]]:
    items = inline_items(root, n, prefix=prefix)
    response = client.post("/v1/jobs", json={"items": items, "params": {"n_masks": 1, "max_new_tokens": 12}})
    assert response.status_code == 201, response.text
    return response.json()["id"], {i["custom_id"] for i in items}


def chunks_done(client, job_id: str) -> int:
    return client.get(f"/v1/jobs/{job_id}").json()["chunk_counts"]["done"]


def running_chunks(stack_env) -> list:
    from redis import Redis
    from rq import Queue

    queue = Queue(stack_env["env"]["HSCR_QUEUE"], connection=Redis.from_url(stack_env["env"]["HSCR_REDIS_URL"]))
    return [queue.fetch_job(i) for i in queue.started_job_registry.get_job_ids(cleanup=False)]


def test_sigkill_worker_mid_job_then_another_completes_it(alice, workers, fixture_items, stack_env):
    job_id, expected = start_job(alice, fixture_items, 12, "kill-")
    victim = workers.ensure()
    wait_until(lambda: chunks_done(alice, job_id) >= 1, 180, "the first shard")
    killed = wait_until(lambda: running_chunks(stack_env), 60, "a running chunk")[0]
    killed_retries = killed.retries_left
    stop(victim, signal.SIGKILL)  # whole process group (its scheduler too), mid-chunk: no cleanup runs
    killed_at = time.monotonic()
    assert chunks_done(alice, job_id) < 3
    assert workers.ensure() is not victim

    def requeued():  # RQ took a retry off the abandoned chunk and queued (or ran) it again
        killed.refresh()
        return killed.retries_left < killed_retries and killed.get_status() in ("queued", "started", "finished")

    wait_until(requeued, 300, "the killed chunk to be re-queued", interval=0.5)
    print(f"\nkilled chunk re-queued {time.monotonic() - killed_at:.1f} s after SIGKILL (including the new "
          "worker's start-up)")
    job = wait_for_job(alice, job_id)
    assert job["status"] == "completed"
    all_ids_exactly_once(alice, job, expected)


def test_redis_restart_mid_job_loses_nothing(alice, workers, fixture_items, stack_env):
    job_id, expected = start_job(alice, fixture_items, 8, "redis-")
    wait_until(lambda: chunks_done(alice, job_id) >= 1, 180, "the first shard")
    redis_server = stack_env["redis"]
    redis_server.stop()  # SIGTERM: AOF (appendfsync always) keeps every acknowledged write
    time.sleep(3)
    redis_server.start()
    job = wait_for_job(alice, job_id)
    assert job["status"] == "completed"
    all_ids_exactly_once(alice, job, expected)


def test_s3_unreachable_for_20_seconds_mid_job_loses_nothing(alice, workers, fixture_items, stack_env):
    job_id, expected = start_job(alice, fixture_items, 8, "s3-")
    wait_until(lambda: chunks_done(alice, job_id) >= 1, 180, "the first shard")
    s3 = stack_env["s3"]
    s3.stop()
    time.sleep(20)
    s3.start()
    job = wait_for_job(alice, job_id)
    assert job["status"] == "completed"
    all_ids_exactly_once(alice, job, expected)


def test_cancel_keeps_finished_shards(alice, workers, fixture_items):
    job_id, _ = start_job(alice, fixture_items, 24, "cancel-")
    wait_until(lambda: chunks_done(alice, job_id) >= 1, 180, "the first shard")
    cancelled = alice.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] in ("cancelling", "cancelled")
    job = wait_for_job(alice, job_id)
    assert job["status"] == "cancelled" and job["cancelled_at"]
    info = alice.get(f"/v1/jobs/{job_id}/dataset").json()
    assert info["complete"] and info["shards"], "finished shards are kept"
    assert info["manifest"]["request_counts"]["completed"] == job["request_counts"]["completed"] > 0
    assert job["request_counts"]["completed"] < 24
    assert alice.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
