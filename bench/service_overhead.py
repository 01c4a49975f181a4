"""What the service costs on top of the work: end to end through the API vs in-process ``generate_dataset``.

Runs side by side in one process tree: a private redis-server, the API under uvicorn, one ``hscr worker``
(micro-batch = chunk size, like ``generate_dataset``), local-directory storage, the fixture model.

1. end to end: create job -> completed (through API, Redis, RQ, the worker, the shard writer, finalize;
   the bench waits on the job's event stream)
   vs ``generate_dataset`` in this process on the same items and parameters (model load excluded from
   both: the worker loads once at start; both warmed once). Both run torch on the same number of CPU
   threads (``--torch-threads``, default 1): with torch's default (one per core) on a shared 2-core
   machine, OpenMP threads spin against the other process and other load, and a run takes 10-30x longer
   at random, which is what made earlier in-process baselines slower than the service. Alternating
   repeats; medians; ratio of the medians and median of the per-repeat ratios (target <= 1.05).
   Also, per service job: its wall time minus the model's compute (``compute_s`` in each chunk's RQ result),
   i.e. what the service spends off the model on the critical path (reading inputs and images, RQ and
   Redis bookkeeping, finalize; shard writes overlap the next chunk's compute). On a shared machine
   this moves far less with load than the end-to-end times do.
2. job-create throughput (items/s): POST /v1/jobs from an uploaded items file, worker stopped.
3. status read latency: GET /v1/jobs/{id} p50/p99 on loopback.

    python bench/service_overhead.py [--items 48] [--chunk-size 16] [--repeats 3] [--torch-threads 1]

Prints one JSON object with an ``env`` block.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise TimeoutError(what)


def env_block() -> dict:
    from importlib import metadata

    import torch

    versions = {}
    for name in ("hscr-service", "hscr-worker", "fastapi", "uvicorn", "rq", "redis", "torch", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.is_available(), "redis": redis_version,
            "versions": versions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch CPU threads in both paths (0: torch's default, one per core).")
    parser.add_argument("--status-reads", type=int, default=500)
    parser.add_argument("--create-jobs", type=int, default=5)
    parser.add_argument("--create-items", type=int, default=500, help="Items per job in the create benchmark.")
    args = parser.parse_args()

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    threads = torch.get_num_threads()  # what the worker gets too

    from hscr_client import TERMINAL_STATUSES, HSCRParams
    from hscr_service.core.security import hash_key
    from hscr_worker.fixture.items import write_items
    from hscr_worker.generate import DEFAULT_MODEL, generate_dataset, load_backend

    root = Path(tempfile.mkdtemp(prefix="hscr-bench-"))
    processes: list[subprocess.Popen] = []
    key = "bench-" + uuid.uuid4().hex
    params = HSCRParams(n_masks=2, max_new_tokens=32)
    try:
        rows = write_items(args.items, 4242, root / "items.jsonl", root / "img")
        redis_port = free_port()
        (root / "redis").mkdir()
        processes.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                           "--save", "", "--appendonly", "yes", "--dir", str(root / "redis")],
                                          stdout=subprocess.DEVNULL))
        env = {**os.environ, "HSCR_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
               "HSCR_STORAGE_URI": str(root / "storage"), "HSCR_API_KEYS": f"bench:{hash_key(key)}",
               "HSCR_CHUNK_SIZE": str(args.chunk_size), "HSCR_QUEUE": "bench",
               "HSCR_MAX_ITEMS_PER_JOB": str(max(args.items, args.create_items))}
        api_port = free_port()
        processes.append(subprocess.Popen([sys.executable, "-m", "uvicorn", "hscr_service.main:app", "--host",
                                           "127.0.0.1", "--port", str(api_port), "--log-level", "warning"], env=env))
        worker_log = open(root / "worker.log", "ab")
        worker = subprocess.Popen([sys.executable, "-c", "from hscr_client._cli import main; main()", "worker",
                                   "--queue", "bench", "--micro-batch", str(args.chunk_size),
                                   "--torch-threads", str(threads)], env=env,
                                  stdout=worker_log, stderr=subprocess.STDOUT)
        processes.append(worker)
        client = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers={"Authorization": f"Bearer {key}"},
                              timeout=60)
        wait_until(lambda: client.get("/readyz").status_code == 200, 60, "API ready")

        # Upload once: images and an items file that names them by file id.
        lines = []
        for row in rows:
            with open(root / row["image"], "rb") as f:
                image_id = client.post("/v1/files", data={"purpose": "image"},
                                       files={"file": (row["image"], f)}).json()["id"]
            lines.append(json.dumps({"custom_id": row["custom_id"], "image": image_id, "question": row["question"],
                                     "answer": row["answer"]}))
        items_id = client.post("/v1/files", data={"purpose": "items"},
                               files={"file": ("items.jsonl", "\n".join(lines).encode())}).json()["id"]

        import redis
        from rq import Worker
        from rq.job import Job as RQJob

        from hscr_jobs.lifecycle import rq_job_id

        connection = redis.Redis(port=redis_port)
        wait_until(lambda: Worker.count(connection=connection) >= 1, 180, "worker up")

        backend = load_backend("transformers", DEFAULT_MODEL)
        # Warm both paths once (first-call costs), then alternate timed repeats.
        generate_dataset(backend, str(root / "items.jsonl"), str(root / "warm"), params, chunk_size=args.chunk_size)

        def through_service() -> float:
            start = time.perf_counter()
            job = client.post("/v1/jobs", json={"input_file_id": items_id, "params": params.model_dump()}).json()
            # Wait on the event stream (pushed, ends after the terminal status): polling would spend the CPU
            # the worker needs on a 2-core machine.
            with client.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
                for line in events.iter_lines():
                    if line.startswith("data:") and json.loads(line[5:])["status"] in TERMINAL_STATUSES:
                        break
            elapsed = time.perf_counter() - start
            status = client.get(f"/v1/jobs/{job['id']}").json()
            assert status["status"] == "completed", status
            counts.setdefault("service", status["request_counts"])
            compute = 0.0
            for chunk in range(status["chunk_counts"]["total"]):
                result = RQJob.fetch(rq_job_id(job["id"], chunk), connection=connection).return_value()
                compute += result.get("compute_s", 0.0) if isinstance(result, dict) else 0.0
            off_model.append(elapsed - compute)
            return elapsed

        def in_process(run: int) -> float:
            start = time.perf_counter()
            manifest = generate_dataset(backend, str(root / "items.jsonl"), str(root / f"direct-{run}"), params,
                                        chunk_size=args.chunk_size)
            counts.setdefault("in_process", manifest["request_counts"])
            return time.perf_counter() - start

        counts: dict = {}
        off_model: list[float] = []
        through_service()  # warm the worker
        off_model.clear()
        service_times, direct_times = [], []
        for run in range(args.repeats):  # alternate which goes first: load from other processes hits both
            if run % 2:
                service_times.append(through_service())
                direct_times.append(in_process(run))
            else:
                direct_times.append(in_process(run))
                service_times.append(through_service())

        # Job-create throughput with the worker stopped (creates only; nothing runs).
        worker.terminate()
        worker.wait(timeout=30)
        big_lines = [json.dumps({**json.loads(lines[i % len(lines)]), "custom_id": f"c-{i}"})
                     for i in range(args.create_items)]
        big_id = client.post("/v1/files", data={"purpose": "items"},
                             files={"file": ("big.jsonl", "\n".join(big_lines).encode())}).json()["id"]
        start = time.perf_counter()
        created = [client.post("/v1/jobs", json={"input_file_id": big_id}).json()["id"]
                   for _ in range(args.create_jobs)]
        create_seconds = time.perf_counter() - start

        latencies = []
        for _ in range(args.status_reads):
            t0 = time.perf_counter()
            client.get(f"/v1/jobs/{created[0]}").raise_for_status()
            latencies.append((time.perf_counter() - t0) * 1000)
        latencies.sort()

        service, direct = statistics.median(service_times), statistics.median(direct_times)
        print(json.dumps({
            "benchmark": "service_overhead",
            "items": args.items, "chunk_size": args.chunk_size, "repeats": args.repeats, "torch_threads": threads,
            "params": {"n_masks": params.n_masks, "max_new_tokens": params.max_new_tokens},
            "end_to_end": {"service_s": round(service, 3), "in_process_s": round(direct, 3),
                           "ratio": round(service / direct, 3), "target_ratio": 1.05,
                           # Each repeat runs both paths back to back: their ratio shares the machine's load.
                           "pair_ratio_median": round(statistics.median(
                               s / d for s, d in zip(service_times, direct_times, strict=True)), 3),
                           # The service's time off the model per job: wall minus the chunks' compute_s.
                           "service_off_model_s": round(statistics.median(off_model), 3),
                           "service_off_model_runs_s": [round(t, 3) for t in off_model],
                           "service_runs_s": [round(t, 3) for t in service_times],
                           "in_process_runs_s": [round(t, 3) for t in direct_times],
                           "request_counts": counts},
            "job_create": {"jobs": args.create_jobs, "items_per_job": args.create_items,
                           "items_per_s": round(args.create_jobs * args.create_items / create_seconds, 1),
                           "jobs_per_s": round(args.create_jobs / create_seconds, 2)},
            "status_read_ms": {"n": len(latencies), "p50": round(latencies[len(latencies) // 2], 3),
                               "p99": round(latencies[int(len(latencies) * 0.99) - 1], 3)},
            "env": env_block(),
        }, indent=2))
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
