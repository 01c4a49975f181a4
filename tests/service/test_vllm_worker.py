"""A worker configured with the vLLM backend (`hscr worker --backend vllm`) serves jobs through the real API.

Its own queue and API (the session's transformers workers never see these jobs). Chunks of 4 items in
micro-batches of 2: inside a chunk the second micro-batch's own answers share engine calls with the
first one's re-decode (run_hscr_stream). The worker runs with ``--score-values logprobs`` (what a
32k-vocabulary model gets by default): a job asking for the raw-logit shift then fails its items at
once, each with the reason and the fix, instead of computing a wrong shift.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from service_helpers import FAST_PARAMS, KEYS, inline_items, start_api, stop, wait_for_job

pytestmark = pytest.mark.vllm


def test_a_vllm_worker_completes_a_job(stack_env, fixture_items):
    pytest.importorskip("vllm")
    from hscr_client import DatasetInfo, Job

    queue = "hscr-vllm"
    api, url = start_api(stack_env, "vllm-api", HSCR_QUEUE=queue)
    log = open(stack_env["root"] / "vllm-worker.log", "ab")
    worker = subprocess.Popen(
        [sys.executable, "-c", "from hscr_client._cli import main; main()", "worker", "--queue", queue,
         "--backend", "vllm", "--profile", "fixture", "--score-values", "logprobs", "--micro-batch", "2",
         "--torch-threads", "1", "--heartbeat-interval", "1"],
        env={**os.environ}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=60) as alice:
            created = alice.post("/v1/jobs", json={"items": inline_items(fixture_items, 8, "vllm-"),
                                                   "params": FAST_PARAMS})
            assert created.status_code == 201, created.text
            job = Job.model_validate(wait_for_job(alice, created.json()["id"], timeout=600))
            assert job.status == "completed", job
            assert job.request_counts.total == 8
            assert job.request_counts.completed + job.request_counts.failed == 8
            # Items fail only with HSCR's own per-item outcomes (the image does not move the answer, ...),
            # never with an engine or worker error.
            assert job.request_counts.completed >= 4
            lines = alice.get(f"/v1/jobs/{job.id}/errors").text.splitlines()
            item_errors = [json.loads(line)["error"] for line in lines]
            assert len(item_errors) == job.request_counts.failed
            hscr_outcomes = ("no modality-coupled token", "every replacement reproduced")
            assert all(e.startswith(hscr_outcomes) for e in item_errors), item_errors
            info = DatasetInfo.model_validate(alice.get(f"/v1/jobs/{job.id}/dataset").json())
            assert info.complete and info.manifest["model"]["backend"] == "vllm"
            assert info.manifest["configs"]["pairs"]["rows"] > 0

            paper = alice.post("/v1/jobs", json={"items": inline_items(fixture_items, 6, "vllm-logit-"),
                                                 "params": {**FAST_PARAMS, "shift": "logit"}})
            assert paper.status_code == 201, paper.text
            refused = Job.model_validate(wait_for_job(alice, paper.json()["id"], timeout=120))
            assert refused.request_counts.failed == 6 and refused.request_counts.completed == 0
            lines = alice.get(f"/v1/jobs/{refused.id}/errors").text.splitlines()
            errors = [json.loads(line)["error"] for line in lines]
            assert len(errors) == 6 and all("--score-values logits" in e and "after retries" not in e for e in errors)
    finally:
        stop(worker)
        stop(api)
