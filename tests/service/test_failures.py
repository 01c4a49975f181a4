"""Failure semantics: a SIGKILLed worker, a Redis restart and an S3 outage mid-job lose nothing and duplicate
nothing (chunks are the unit of retry; a retried chunk overwrites its own shard).

Jobs here are 10-15 chunks of 4 items, so the failure lands while chunks are still to run (a chunk takes a
fraction of a second on one torch thread)."""

from __future__ import annotations

import json
import signal
import time

from service_helpers import FAST_PARAMS, inline_items, stop, wait_for_job, wait_until


def all_ids_exactly_once(client, job: dict, expected: set[str]) -> None:
    """Each item is written, failed or skipped (cancelled or expired before it ran), exactly once; the counts
    match the lists and add up to the total; and no chunk gave up on its retries."""
    from hscr_client import schema
    from hscr_client.storage import open_location
    from hscr_worker.dataset import read_rows

    ranked = [row["custom_id"] for row in read_rows(job["dataset_uri"], "ranked")]
    errors = [json.loads(line) for line in client.get(f"/v1/jobs/{job['id']}/errors").text.splitlines()]
    failed = [e["custom_id"] for e in errors]
    skipped = [json.loads(line) for line in
               open_location(job["dataset_uri"]).read_bytes(schema.SKIPPED).decode().splitlines()]
    listed = ranked + failed + [row["custom_id"] for row in skipped]
    assert len(listed) == len(set(listed)), "an item was written twice, or both written and failed or skipped"
    assert set(listed) == expected, f"lost: {sorted(expected - set(listed))}; unknown: {sorted(set(listed) - expected)}"
    counts = job["request_counts"]
    assert (len(ranked), len(failed)) == (counts["completed"], counts["failed"])
    assert [sum(r["reason"] == reason for r in skipped) for reason in ("cancelled", "expired")] == \
        [counts["cancelled"], counts["expired"]]
    assert counts["total"] == len(expected) == sum(counts[k] for k in ("completed", "failed", "cancelled", "expired"))
    assert not [e for e in errors if "after retries" in e["error"]], "a chunk ran out of retries"


def start_job(client, root, n: int, prefix: str) -> tuple[str, set[str]]:
    items = inline_items(root, n, prefix=prefix)
    response = client.post("/v1/jobs", json={"items": items, "params": FAST_PARAMS})
    assert response.status_code == 201, response.text
    return response.json()["id"], {i["custom_id"] for i in items}


def job_state(client, job_id: str) -> dict:
    return client.get(f"/v1/jobs/{job_id}").json()


def chunks_done(client, job_id: str) -> int:
    return job_state(client, job_id)["chunk_counts"]["done"]


def started_chunks(stack_env, job_id: str) -> list:
    """The job's chunks in RQ's started registry (a killed worker's stay there until a clean-up)."""
    from redis import Redis
    from rq import Queue

    queue = Queue(stack_env["env"]["HSCR_QUEUE"], connection=Redis.from_url(stack_env["env"]["HSCR_REDIS_URL"]))
    ids = queue.started_job_registry.get_job_ids(cleanup=False)
    return [queue.fetch_job(i) for i in ids if i.startswith(job_id)]


def test_sigkill_worker_mid_job_then_another_completes_it(alice, workers, fixture_items, stack_env):
    job_id, expected = start_job(alice, fixture_items, 40, "kill-")
    victim = workers.ensure()
    wait_until(lambda: chunks_done(alice, job_id) >= 1 and started_chunks(stack_env, job_id), 180,
               "a chunk running after the first shard", interval=0.05)
    stop(victim, signal.SIGKILL)  # whole process group (its scheduler too), mid-job: no cleanup runs
    killed_at = time.monotonic()
    assert chunks_done(alice, job_id) < 10
    abandoned = started_chunks(stack_env, job_id)  # normally the chunk it was running; [] if between two
    assert workers.ensure() is not victim

    def requeued():  # RQ took a retry off the abandoned chunk and queued (or ran) it again
        for chunk, retries in zip(abandoned, retries_before, strict=True):
            chunk.refresh()
            if chunk.retries_left == retries or chunk.get_status() not in ("queued", "started", "finished"):
                return False
        return True

    retries_before = [chunk.retries_left for chunk in abandoned]
    if abandoned:
        wait_until(requeued, 300, "the killed chunk to be re-queued", interval=0.2)
        print(f"\nkilled chunk re-queued {time.monotonic() - killed_at:.1f} s after SIGKILL (including the new "
              "worker's start-up)")
    job = wait_for_job(alice, job_id)
    assert job["status"] == "completed"
    all_ids_exactly_once(alice, job, expected)


def test_redis_restart_mid_job_loses_nothing(alice, workers, fixture_items, stack_env):
    job_id, expected = start_job(alice, fixture_items, 60, "redis-")
    wait_until(lambda: chunks_done(alice, job_id) >= 1, 180, "the first shard", interval=0.05)
    redis_server = stack_env["redis"]
    redis_server.stop()  # SIGTERM: AOF (appendfsync always) keeps every acknowledged write
    time.sleep(1)
    redis_server.start()
    job = wait_for_job(alice, job_id)
    assert job["status"] == "completed" and job["chunk_counts"]["total"] == 15
    all_ids_exactly_once(alice, job, expected)


def test_s3_unreachable_for_20_seconds_mid_job_loses_nothing(alice, workers, fixture_items, stack_env):
    job_id, expected = start_job(alice, fixture_items, 60, "s3-")
    wait_until(lambda: chunks_done(alice, job_id) >= 1, 180, "the first shard", interval=0.05)
    s3 = stack_env["s3"]
    s3.stop()
    assert job_state(alice, job_id)["status"] == "in_progress"
    time.sleep(20)
    s3.start()
    job = wait_for_job(alice, job_id)
    assert job["status"] == "completed"
    all_ids_exactly_once(alice, job, expected)


def test_cancel_keeps_finished_shards(alice, workers, fixture_items):
    job_id, _ = start_job(alice, fixture_items, 80, "cancel-")
    wait_until(lambda: chunks_done(alice, job_id) >= 1, 180, "the first shard", interval=0.05)
    cancelled = alice.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] in ("cancelling", "cancelled")
    job = wait_for_job(alice, job_id)
    assert job["status"] == "cancelled" and job["cancelled_at"]
    info = alice.get(f"/v1/jobs/{job_id}/dataset").json()
    assert info["complete"] and info["shards"], "finished shards are kept"
    assert info["manifest"]["request_counts"]["completed"] == job["request_counts"]["completed"] > 0
    assert job["request_counts"]["completed"] < 80
    assert alice.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
