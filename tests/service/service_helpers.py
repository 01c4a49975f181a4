"""Plain helpers and constants of the service tests, importable by name from the test modules.

They live here, not in conftest.py: ``from conftest import ...`` picks up whichever directory's conftest
was imported last when pytest runs several test directories in one call.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
from _s3server import free_port  # noqa: F401  (re-exported: tests/_s3server.py)

S3_KEY, S3_SECRET, BUCKET = "hscr-test-key", "hscr-test-secret", "hscr-test"
KEYS = {"alice": "key-alice-" + uuid.uuid4().hex, "bob": "key-bob-" + uuid.uuid4().hex}
CHUNK_SIZE = 4
# Cheap HSCR settings for test jobs (the worker runs torch on one thread: see Workers.start).
FAST_PARAMS = {"n_masks": 1, "max_new_tokens": 12}


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception:
            pass
        time.sleep(interval)
    raise TimeoutError(f"gave up waiting for {what} after {timeout} s")


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    """Signal a process started with start_new_session (its whole group: the RQ scheduler child too)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def inline_items(root: Path, n: int, prefix: str = "") -> list[dict]:
    """n fixture items (the 40 in turn; custom_ids stay unique), images inline as data URIs."""
    rows = [json.loads(line) for line in (root / "items.jsonl").read_text().splitlines()]
    images = {r["image"]: "data:image/png;base64," + base64.b64encode((root / r["image"]).read_bytes()).decode()
              for r in rows}
    return [{"custom_id": f"{prefix}{r['custom_id']}" + (f"-{i // len(rows)}" if i >= len(rows) else ""),
             "question": r["question"], "answer": r["answer"], "image": images[r["image"]]}
            for i, r in ((i, rows[i % len(rows)]) for i in range(n))]


def wait_for_job(client: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    def finished():
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in ("completed", "failed", "cancelled", "expired") else None

    return wait_until(finished, timeout, f"job {job_id}", interval=0.5)
