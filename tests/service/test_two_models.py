"""Two model families served side by side: the LLaVA and Qwen2.5-VL fixtures, a worker each, each on its
model's queue; a job naming either completes on its own model and records that model's family."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
from service_helpers import KEYS, inline_items, start_api, stop, wait_for_job

QWEN = "fixture-qwen2.5-vl"


def _worker(stack_env, queue: str, *model_args: str) -> subprocess.Popen:
    log = open(stack_env["root"] / f"worker-{queue}.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-c", "from hscr_client._cli import main; main()", "worker", "--queue", queue,
         "--worker-ttl", "10", "--heartbeat-interval", "1", "--micro-batch", "2", "--torch-threads", "1",
         *model_args],
        env={**os.environ}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_llava_and_qwen_served_side_by_side(stack_env, fixture_items):
    base = "hscr-families"
    api, url = start_api(stack_env, "families-api", HSCR_QUEUE=base, HSCR_MODELS=f"fixture,{QWEN}",
                         HSCR_DEFAULT_MODEL="fixture")
    llava = _worker(stack_env, base, "--model", "fixture", "--model-name", "fixture")
    qwen = _worker(stack_env, f"{base}.{QWEN}", "--model", QWEN, "--model-name", QWEN)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=60) as alice:
            params = {"max_new_tokens": 32}
            jobs = {
                "llava": alice.post("/v1/jobs", json={"items": inline_items(fixture_items, 4, "llava-"),
                                                      "params": params}),
                "qwen2-vl": alice.post("/v1/jobs", json={"items": inline_items(fixture_items, 4, "qwen-"),
                                                          "model": QWEN, "params": params}),
            }
            assert all(r.status_code == 201 for r in jobs.values()), {k: r.text for k, r in jobs.items()}
            for family, created in jobs.items():
                job = wait_for_job(alice, created.json()["id"], timeout=600)
                assert job["status"] == "completed", job
                assert job["request_counts"]["total"] == 4 and job["request_counts"]["completed"] >= 2, job
                info = alice.get(f"/v1/jobs/{job['id']}/dataset").json()
                model = info["manifest"]["model"]
                assert model["family"] == family and model["name"] == ("fixture" if family == "llava" else QWEN)
                # what the job did not set takes its model family's default; what it set stays
                parameters = info["manifest"]["parameters"]
                assert parameters["n_masks"] == (1 if family == "llava" else 3) and parameters["max_new_tokens"] == 32
    finally:
        for process in (llava, qwen):
            stop(process)
        stop(api)
