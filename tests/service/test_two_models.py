"""Three model families served side by side: the LLaVA, Qwen2.5-VL and Gemma 3 fixtures, a worker each, each on
its model's queue; a job naming any of them completes on its own model and records that model's family."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
from service_helpers import KEYS, inline_items, start_api, stop, wait_for_job

QWEN = "fixture-qwen2.5-vl"
GEMMA = "fixture-gemma3"
# the model a job names -> the family its dataset must record
FAMILIES = {"fixture": "llava", QWEN: "qwen2-vl", GEMMA: "gemma3"}


def _worker(stack_env, queue: str, *model_args: str) -> subprocess.Popen:
    log = open(stack_env["root"] / f"worker-{queue}.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-c", "from hscr_client._cli import main; main()", "worker", "--queue", queue,
         "--worker-ttl", "10", "--heartbeat-interval", "1", "--micro-batch", "2", "--torch-threads", "1",
         *model_args],
        env={**os.environ}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_llava_qwen_and_gemma_served_side_by_side(stack_env, fixture_items):
    from hscr_worker.families import PROFILES

    base = "hscr-families"
    api, url = start_api(stack_env, "families-api", HSCR_QUEUE=base, HSCR_MODELS=f"fixture,{QWEN},{GEMMA}",
                         HSCR_DEFAULT_MODEL="fixture")
    workers = [_worker(stack_env, base, "--model", "fixture", "--model-name", "fixture")]
    workers += [_worker(stack_env, f"{base}.{name}", "--model", name, "--model-name", name) for name in (QWEN, GEMMA)]
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=60) as alice:
            params = {"max_new_tokens": 32}
            jobs = {}
            for name in FAMILIES:
                body = {"items": inline_items(fixture_items, 4, f"{FAMILIES[name]}-"), "params": params}
                jobs[name] = alice.post("/v1/jobs", json=body if name == "fixture" else {**body, "model": name})
            assert all(r.status_code == 201 for r in jobs.values()), {k: r.text for k, r in jobs.items()}
            for name, created in jobs.items():
                job = wait_for_job(alice, created.json()["id"], timeout=600)
                assert job["status"] == "completed", job
                assert job["request_counts"]["total"] == 4 and job["request_counts"]["completed"] >= 2, job
                info = alice.get(f"/v1/jobs/{job['id']}/dataset").json()
                model = info["manifest"]["model"]
                assert (model["family"], model["name"]) == (FAMILIES[name], name)
                # what the job did not set takes its model family's default; what it set stays
                parameters = info["manifest"]["parameters"]
                family_default = PROFILES[model["profile"]].params().n_masks
                assert parameters["n_masks"] == family_default and parameters["max_new_tokens"] == 32
                assert family_default == {"fixture": 1, GEMMA: 3}.get(name, 5)  # Gemma's three masks, Qwen's five
    finally:
        for process in workers:
            stop(process)
        stop(api)
