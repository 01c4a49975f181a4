"""Cancel and expiry: a job with no chunk running ends at once; one past its completion window ends `expired`.
Either way the finished shards stay and the manifest lists what exists."""

from __future__ import annotations

import json
import time

import httpx
from service_helpers import FAST_PARAMS, inline_items, wait_for_job
from test_failures import all_ids_exactly_once


def skipped_rows(job: dict) -> dict[str, str]:
    """custom_id -> reason, from the dataset's skipped.jsonl (items never run)."""
    from hscr_client import schema
    from hscr_client.storage import open_location

    lines = open_location(job["dataset_uri"]).read_bytes(schema.SKIPPED).decode().splitlines()
    return {row["custom_id"]: row["reason"] for row in map(json.loads, lines)}


def test_cancel_with_no_chunk_running_ends_cancelled_at_once(idle_alice, fixture_items):
    created = idle_alice.post("/v1/jobs", json={"items": inline_items(fixture_items, 6, prefix="idle-cancel-")})
    assert created.status_code == 201 and created.json()["status"] == "in_progress"
    job_id = created.json()["id"]
    cancelled = idle_alice.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    job = cancelled.json()
    assert job["status"] == "cancelled" and job["cancelling_at"] and job["cancelled_at"]
    assert job["chunk_counts"] == {"total": 2, "done": 2}
    assert job["request_counts"] == {"total": 6, "completed": 0, "failed": 0, "cancelled": 6, "expired": 0}
    info = idle_alice.get(f"/v1/jobs/{job_id}/dataset").json()
    assert info["complete"] and info["shards"] == [] and info["manifest"]["request_counts"] == job["request_counts"]
    assert httpx.get(info["skipped_url"]).text.count('"cancelled"') == 6  # a presigned URL of skipped.jsonl
    assert set(skipped_rows(job).values()) == {"cancelled"} and len(skipped_rows(job)) == 6
    assert idle_alice.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"


def test_job_past_its_completion_window_expires_without_a_worker(idle_alice, fixture_items):
    for window in ("0s", "24x", "h", "1234567h"):
        response = idle_alice.post("/v1/jobs", json={"items": inline_items(fixture_items, 1),
                                                     "completion_window": window})
        assert response.status_code == 422 and "completion_window" in response.text, (window, response.text)
    default = idle_alice.post("/v1/jobs", json={"items": inline_items(fixture_items, 1, prefix="idle-default-")})
    assert default.json()["expires_at"] == default.json()["created_at"] + 24 * 3600
    idle_alice.post(f"/v1/jobs/{default.json()['id']}/cancel")

    created = idle_alice.post("/v1/jobs", json={"items": inline_items(fixture_items, 3, prefix="idle-expire-"),
                                                "completion_window": "1s"})
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["expires_at"] == job["created_at"] + 1
    time.sleep(max(0.0, job["expires_at"] - time.time()) + 1.0)  # created_at is whole seconds
    job = idle_alice.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "expired" and job["expired_at"] >= job["expires_at"]
    info = idle_alice.get(f"/v1/jobs/{job['id']}/dataset").json()
    # Every item is counted and listed: none ran, all three expired.
    assert job["request_counts"] == {"total": 3, "completed": 0, "failed": 0, "cancelled": 0, "expired": 3}
    assert info["complete"] and info["manifest"]["request_counts"] == job["request_counts"]
    expected = {i["custom_id"]: "expired" for i in inline_items(fixture_items, 3, prefix="idle-expire-")}
    assert skipped_rows(job) == expected
    listed = {j["id"]: j["status"] for j in idle_alice.get("/v1/jobs", params={"limit": 100}).json()["data"]}
    assert listed[job["id"]] == "expired"
    assert idle_alice.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409


def test_expiry_mid_job_keeps_finished_shards(alice, workers, fixture_items):
    """A window shorter than the job (50 chunks): the worker stops between micro-batches and skips the rest;
    the job ends expired with the shards finished before the deadline."""
    items = inline_items(fixture_items, 200, prefix="expire-")
    created = alice.post("/v1/jobs", json={"items": items, "completion_window": "3s", "params": FAST_PARAMS})
    assert created.status_code == 201, created.text
    job = wait_for_job(alice, created.json()["id"])
    assert job["status"] == "expired" and job["expired_at"]
    counts = job["request_counts"]
    assert counts["expired"] > 0 and counts["cancelled"] == 0 and counts["total"] == 200
    info = alice.get(f"/v1/jobs/{job['id']}/dataset").json()
    assert info["complete"] and info["manifest"]["request_counts"] == counts
    assert len(info["shards"]) == 2 * len(info["manifest"]["configs"]["ranked"]["shards"])  # pairs + ranked
    all_ids_exactly_once(alice, job, {i["custom_id"] for i in items})


def test_each_served_model_has_its_own_queue(stack_env, fixture_items):
    """With several models served, a job's chunks go to its model's queue only: a worker holding another model
    never dequeues them (it used to, and failed them). The default model keeps the plain queue."""
    import httpx
    from redis import Redis
    from rq import Queue
    from service_helpers import KEYS, start_api, stop

    base = "hscr-models"
    api, url = start_api(stack_env, "models-api", HSCR_QUEUE=base, HSCR_MODELS="fixture,llava-med",
                         HSCR_DEFAULT_MODEL="fixture")
    redis = Redis.from_url(stack_env["redis"].url)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=60) as alice:
            other = alice.post("/v1/jobs", json={"items": inline_items(fixture_items, 6, "other-"),
                                                 "model": "llava-med"})
            default = alice.post("/v1/jobs", json={"items": inline_items(fixture_items, 2, "default-")})
            assert other.status_code == default.status_code == 201, (other.text, default.text)
            assert Queue(f"{base}.llava-med", connection=redis).count == 2  # 6 items in chunks of 4
            assert Queue(base, connection=redis).count == 1
            # no chunk of it runs (no worker holds llava-med here): it ends at once; its queued chunks are
            # settled, and a worker that dequeues them later does nothing
            cancelled = alice.post(f"/v1/jobs/{other.json()['id']}/cancel")
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    finally:
        stop(api)
