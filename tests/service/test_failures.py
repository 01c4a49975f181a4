"""Failure semantics, the chaos suite: a SIGKILLed worker (mid-chunk and mid-finalize), a stale scheduler lock,
a Redis restart, an S3 outage and a cancel lose nothing and duplicate nothing (chunks are the unit of retry; a
retried chunk overwrites its own shard), and every item ends written, failed or skipped, exactly once.

Each fault lands at a known point by construction, not by timing: workers of the chaos queue run with
failpoints (``HSCR_FAILPOINTS``, :mod:`hscr_jobs.failpoints`) that hold them after a chunk's compute or before
the manifest, and the tests wait for the worker's log to say so before they strike."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from redis import Redis
from rq import Queue
from rq.scheduler import RQScheduler
from service_helpers import CHUNK_SIZE, FAST_PARAMS, KEYS, inline_items, start_api, stop, wait_for_job, wait_until

from hscr_jobs.lifecycle import rq_job_id

CHAOS_QUEUE = "hscr-chaos"


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


def started_chunks(stack_env, job_id: str, queue_name: str | None = None) -> list:
    """The job's chunks in RQ's started registry (a killed worker's stay there until a clean-up)."""
    queue = Queue(queue_name or stack_env["env"]["HSCR_QUEUE"],
                  connection=Redis.from_url(stack_env["env"]["HSCR_REDIS_URL"]))
    ids = queue.started_job_registry.get_job_ids(cleanup=False)
    return [queue.fetch_job(i) for i in ids if i.startswith(job_id)]


# --- the chaos queue: its own API (2 retries, 1 s apart) and workers started per test with failpoints ---

@pytest.fixture(scope="module")
def chaos(stack_env):
    """A client of an API whose jobs go to the chaos queue, which no session worker serves."""
    process, url = start_api(stack_env, "chaos-api", HSCR_QUEUE=CHAOS_QUEUE, HSCR_CHUNK_RETRIES="2",
                             HSCR_RETRY_INTERVALS="1")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=60) as client:
        yield client
    stop(process)


class ChaosWorker:
    """One `hscr worker` on the chaos queue; ``failpoints`` as HSCR_FAILPOINTS. Its log is a file of its own."""

    def __init__(self, stack_env, name: str, failpoints: str = ""):
        self.log = stack_env["root"] / f"{name}.log"
        env = {**os.environ, "HSCR_FAILPOINTS": failpoints} if failpoints else {**os.environ}
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from hscr_client._cli import main; main()", "worker", "--queue", CHAOS_QUEUE,
             "--worker-ttl", "10", "--maintenance-interval", "3", "--heartbeat-interval", "1", "--micro-batch", "2",
             "--torch-threads", "1"],
            env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def logged(self, text: str) -> bool:
        return text in self.log.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 180) -> None:
        wait_until(lambda: self.logged(text) or self.process.poll() is not None, timeout, repr(text))
        assert self.logged(text), f"the worker exited ({self.process.returncode}) before logging {text!r}"

    def children(self) -> list[int]:
        return children_of(self.process.pid)

    def kill_alone(self) -> None:
        """SIGKILL the worker process only, as an OOM kill or a crash does: its children are not signalled."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        stop(self.process)


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited


def scheduler_lock(stack_env) -> str | None:
    value = Redis.from_url(stack_env["env"]["HSCR_REDIS_URL"]).get(RQScheduler.get_locking_key(CHAOS_QUEUE))
    return value.decode() if value else None


def test_sigkilled_worker_leaves_no_scheduler_and_its_chunk_is_retried(chaos, fixture_items, stack_env):
    """Kill -9 of the worker alone (its scheduler child gets no signal): the scheduler must die with it and
    free the lock, and the chunk it held mid-commit must be re-queued and finished by another worker. A stale
    lock left by a scheduler that died elsewhere is reclaimed first."""
    redis = Redis.from_url(stack_env["env"]["HSCR_REDIS_URL"])
    redis.set(RQScheduler.get_locking_key(CHAOS_QUEUE), "a-scheduler-on-a-dead-host", ex=61)  # never refreshed
    victim = ChaosWorker(stack_env, "chaos-victim", "chunk.after_compute=sleep(600)")
    rescuer = None
    try:
        wait_until(lambda: scheduler_lock(stack_env) not in (None, "a-scheduler-on-a-dead-host"), 120,
                   "the worker to reclaim the stale scheduler lock")
        job_id, expected = start_job(chaos, fixture_items, 12, "kill-")
        victim.wait_for_log("failpoint chunk.after_compute reached")
        held = started_chunks(stack_env, job_id, CHAOS_QUEUE)
        assert len(held) == 1 and chunks_done(chaos, job_id) == 0, "the victim holds its first chunk, uncommitted"
        schedulers = victim.children()
        assert schedulers, "the victim runs RQ's scheduler in a child process"
        retries_before = held[0].retries_left
        victim.kill_alone()
        killed_at = time.monotonic()
        wait_until(lambda: not any(alive(pid) for pid in schedulers), 15, "the orphaned scheduler to exit")
        print(f"\nthe killed worker's scheduler exited within {time.monotonic() - killed_at:.1f} s")
        wait_until(lambda: scheduler_lock(stack_env) is None, 15, "the dead worker's scheduler lock to be released")
        rescuer = ChaosWorker(stack_env, "chaos-rescuer")

        def requeued() -> bool:  # RQ took a retry off the abandoned chunk and queued (or ran) it again
            held[0].refresh()
            return held[0].retries_left == retries_before - 1

        wait_until(requeued, 180, "the killed chunk to be re-queued", interval=0.2)
        print(f"killed chunk re-queued {time.monotonic() - killed_at:.1f} s after SIGKILL (heartbeat TTL 4 s, "
              "maintenance every 3 s, including the replacement worker's start-up)")
        job = wait_for_job(chaos, job_id)
        assert job["status"] == "completed", job
        all_ids_exactly_once(chaos, job, expected)
    finally:
        victim.stop()
        if rescuer:
            rescuer.stop()


def bad_image_item(custom_id: str) -> dict:
    return {"custom_id": custom_id, "question": "What is shown?", "answer": "a circle",
            "image": "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()}


def test_sigkill_during_finalize_then_another_worker_finalizes(chaos, fixture_items, stack_env):
    """Kill -9 while the job is ``finalizing`` (before the manifest): finalize has retries of its own, so
    another worker finalizes; the item that failed keeps its error."""
    victim = ChaosWorker(stack_env, "chaos-finalize-victim", "finalize.before_manifest=sleep(600)")
    rescuer = None
    try:
        items = inline_items(fixture_items, 7, prefix="finalize-") + [bad_image_item("finalize-bad")]
        created = chaos.post("/v1/jobs", json={"items": items, "params": FAST_PARAMS})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        victim.wait_for_log("failpoint finalize.before_manifest reached")
        assert job_state(chaos, job_id)["status"] == "finalizing"
        victim.kill_alone()
        rescuer = ChaosWorker(stack_env, "chaos-finalize-rescuer")
        job = wait_for_job(chaos, job_id)
        assert job["status"] == "completed", job
        assert job["request_counts"]["failed"] == 1
        errors = [json.loads(line) for line in chaos.get(f"/v1/jobs/{job_id}/errors").text.splitlines()]
        assert [e["custom_id"] for e in errors] == ["finalize-bad"], errors
        all_ids_exactly_once(chaos, job, {i["custom_id"] for i in items})
    finally:
        victim.stop()
        if rescuer:
            rescuer.stop()


def test_chunk_out_of_retries_while_storage_is_down_keeps_every_error(chaos, fixture_items, stack_env):
    """S3 goes down after a chunk computed and stays down through its retries: the chunk fails for good. Its
    items' errors are recorded (with retries of their own) once S3 is back, before the count moves: never a
    failed count with an empty error file."""
    worker = ChaosWorker(stack_env, "chaos-storage", "chunk.after_compute=sleep(2)")
    s3 = stack_env["s3"]
    try:
        job_id, expected = start_job(chaos, fixture_items, CHUNK_SIZE, "s3-gone-")
        worker.wait_for_log("failpoint chunk.after_compute reached")
        s3.stop()
        try:
            chunk = Queue(CHAOS_QUEUE, connection=Redis.from_url(stack_env["env"]["HSCR_REDIS_URL"])).fetch_job(
                rq_job_id(job_id, 0))
            wait_until(lambda: chunk.get_status(refresh=True) == "failed", 90, "the chunk to run out of retries")
            time.sleep(3)  # the failure callback has run; storage is still down
            assert job_state(chaos, job_id)["request_counts"]["failed"] == 0, "a count moved before its errors"
        finally:
            s3.start()
        job = wait_for_job(chaos, job_id)
        assert job["status"] == "completed", job
        errors = [json.loads(line) for line in chaos.get(f"/v1/jobs/{job_id}/errors").text.splitlines()]
        assert job["request_counts"]["failed"] == CHUNK_SIZE == len(errors)
        assert {e["custom_id"] for e in errors} == expected and all("after retries" in e["error"] for e in errors)
    finally:
        worker.stop()


def test_redis_restart_mid_job_loses_nothing(alice, workers, fixture_items, stack_env):
    job_id, expected = start_job(alice, fixture_items, 60, "redis-")
    wait_until(lambda: chunks_done(alice, job_id) >= 1, 180, "the first shard", interval=0.05)
    running = job_state(alice, job_id)
    assert running["status"] == "in_progress" and running["chunk_counts"]["done"] < 15, "the job ended too soon"
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


def test_cancel_mid_job_keeps_finished_shards_and_lists_the_rest(chaos, fixture_items, stack_env):
    """Cancel while chunks are still to run (each chunk is held a second after its compute): finished shards stay,
    every other item is counted and listed as cancelled."""
    worker = ChaosWorker(stack_env, "chaos-cancel", "chunk.after_compute=sleep(1)")
    try:
        job_id, expected = start_job(chaos, fixture_items, 40, "cancel-")
        wait_until(lambda: chunks_done(chaos, job_id) >= 1, 180, "the first shard", interval=0.05)
        cancelled = chaos.post(f"/v1/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] in ("cancelling", "cancelled")
        job = wait_for_job(chaos, job_id)
        assert job["status"] == "cancelled" and job["cancelled_at"]
        counts = job["request_counts"]
        assert counts["completed"] > 0 and counts["cancelled"] > 0, counts
        info = chaos.get(f"/v1/jobs/{job_id}/dataset").json()
        assert info["complete"] and info["shards"], "finished shards are kept"
        assert info["manifest"]["request_counts"] == counts
        all_ids_exactly_once(chaos, job, expected)
        assert chaos.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    finally:
        worker.stop()
