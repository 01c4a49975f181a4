"""`hscr serve`, the embedded default: API, one worker, a private Redis and local storage in one command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import psutil
from service_helpers import FAST_PARAMS, free_port, inline_items, stop, wait_until


def test_hscr_serve_runs_a_job_and_stops_cleanly(tmp_path, fixture_items):
    from hscr_client import Client, schema

    data_dir, port = tmp_path / "data", free_port()
    # Nothing from the other tests' stack (HSCR_REDIS_URL would replace the private Redis, AWS_* the storage).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HSCR_", "AWS_"))}
    log = open(tmp_path / "serve.log", "ab")
    serve = subprocess.Popen(
        [sys.executable, "-c", "from hscr_client._cli import main; main()", "serve", "--port", str(port),
         "--data-dir", str(data_dir), "--chunk-size", "2", "--torch-threads", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{base_url}/readyz").status_code == 200, 120, "hscr serve")
        key_file = data_dir / "api_key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        with Client(api_key=key_file.read_text().strip(), base_url=base_url) as client:
            job = client.jobs.create(items=inline_items(fixture_items, 3, prefix="serve-"),
                                     params=FAST_PARAMS)
            job = client.jobs.wait(job.id, timeout=300)
            assert job.status == "completed" and job.request_counts.total == 3
            pairs = client.datasets.load(job.id, config="pairs", cache_dir=tmp_path / "cache")
            assert pairs.features == schema.features(schema.PAIRS) and len(pairs) > 0
            assert job.dataset_uri.startswith(str(data_dir / "storage"))

        children = psutil.Process(serve.pid).children(recursive=True)
        names = {c.name() for c in children}
        assert any("redis" in n for n in names) and len(children) >= 2, names  # Redis and the worker at least
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0

        def gone(process: psutil.Process) -> bool:
            try:
                return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        left = [f"{c.pid} {c.name()}" for c in children if not gone(c)]
        assert not left, f"hscr serve left processes behind: {left}"
    finally:
        stop(serve, signal.SIGKILL)
