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
import sys
import time
import uuid
from pathlib import Path

import httpx
from _s3server import free_port  # tests/_s3server.py (test_serve.py imports it from here)

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


def start_api(stack_env, name: str, **env: str):
    """The API under uvicorn in its own process; returns (process, base URL)."""
    port = free_port()
    log = open(stack_env["root"] / f"{name}.log", "ab")
    process = subprocess.Popen([sys.executable, "-m", "uvicorn", "hscr_service.main:app", "--host", "127.0.0.1",
                                "--port", str(port), "--log-level", "warning"],
                               env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, 30, f"the API ({name})")
    return process, url


class RedisServer:
    """A private redis-server (AOF on, appendfsync always: what was written survives a restart on its port)."""

    def __init__(self, directory: Path):
        self.directory, self.port = directory, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, start_new_session=True)
        import redis

        wait_until(lambda: redis.Redis(port=self.port).ping(), 10, "redis-server")

    def stop(self) -> None:
        stop(self.process)
