"""``hscr serve``: the whole stack on one machine (API, one worker, Redis, local-directory storage).

Registered through the ``hscr.commands`` entry point. The worker runs as its own process (``hscr worker``,
the only one that imports torch); a private ``redis-server`` (AOF on, under the data directory) is
started when no ``--redis-url`` / ``HSCR_REDIS_URL`` is given.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import click

from .core.security import hash_key, new_key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(data_dir: Path) -> tuple[subprocess.Popen, str]:
    """A private redis-server on a free loopback port, persisting (AOF) under ``data_dir``."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise click.ClickException("no redis-server on PATH: install Redis (or valkey) or pass --redis-url")
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
                                "--appendonly", "yes", "--save", ""], stdout=subprocess.DEVNULL,
                               start_new_session=True)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return process, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise click.ClickException("redis-server did not start")


def api_key_for(data_dir: Path) -> tuple[str, Path | None]:
    """HSCR_API_KEY if set; else a key generated once and kept in ``data_dir/api_key`` (mode 0600)."""
    if os.environ.get("HSCR_API_KEY"):
        return os.environ["HSCR_API_KEY"], None
    path = data_dir / "api_key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(new_key() + "\n")
    return path.read_text().strip(), path


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--data-dir", default="./hscr-data", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Storage, the local Redis's files and the generated API key.")
@click.option("--redis-url", envvar="HSCR_REDIS_URL", default=None, help="Use this Redis instead of a local one.")
@click.option("--storage-uri", envvar="HSCR_STORAGE_URI", default=None,
              help="Local directory or s3://bucket/prefix [default: DATA_DIR/storage].")
@click.option("--model", default=None, help="Model directory or fixture name (fixture, fixture-qwen2.5-vl) for the "
              "worker; jobs name it by that name or the folder's [default: the bundled LLaVA fixture].")
@click.option("--backend", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True)
@click.option("--chunk-size", default=16, show_default=True)
@click.option("--torch-threads", type=click.IntRange(min=1), default=None,
              help="The worker's CPU threads for torch (see `hscr worker --help`).")
def serve(host, port, data_dir, redis_url, storage_uri, model, backend, chunk_size, torch_threads):
    """Run the API, one worker and (if needed) Redis locally, with the fixture model."""
    import uvicorn

    from .core.config import Settings
    from .main import create_app

    data_dir = data_dir.absolute()
    processes: list[subprocess.Popen] = []
    # SIGTERM must unwind through the `finally` below, which stops the children. uvicorn handles SIGTERM
    # while it runs and re-raises it once shut down; the default action would kill this process on the spot.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if redis_url is None:
            redis_process, redis_url = start_redis(data_dir / "redis")
            processes.append(redis_process)
        storage_uri = storage_uri or str(data_dir / "storage")
        key, key_file = api_key_for(data_dir)
        tenant = "local"
        worker_cmd = [sys.executable, "-c", "from hscr_client._cli import main; main()", "worker",
                      "--redis-url", redis_url, "--backend", backend]
        # Jobs name the model by its fixture name or its folder's name (the API's default model).
        model_name = Path(model).name if model else "fixture"
        worker_cmd += ["--model-name", model_name]
        if model:
            worker_cmd += ["--model", model]
        if torch_threads:
            worker_cmd += ["--torch-threads", str(torch_threads)]
        # Own process groups: a Ctrl-C reaches only `serve`, which stops each child (and its children) in turn.
        processes.append(subprocess.Popen(worker_cmd, env={**os.environ, "HSCR_STORAGE_URI": storage_uri},
                                          start_new_session=True))
        settings = Settings(redis_url=redis_url, storage_uri=storage_uri, api_keys=[f"{tenant}:{hash_key(key)}"],
                            chunk_size=chunk_size, default_model=model_name)
        click.echo(f"hscr serve: API on http://{host}:{port} (docs at /docs), storage {storage_uri}")
        if key_file:
            click.echo(f"API key (tenant {tenant!r}) is in {key_file}: export HSCR_API_KEY=$(cat {key_file})")
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
    finally:
        stop_children(processes)


def stop_children(processes: list[subprocess.Popen], timeout: float = 30) -> None:
    """Stop the children one by one, last started first: the worker before Redis, since its shutdown still
    writes to Redis (and would wait out its reconnect backoff). SIGTERM lets the worker finish or stop its
    chunk and its RQ scheduler; a child still running after ``timeout`` loses its whole process group."""
    for process in reversed(processes):
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def parse_duration(value: str) -> timedelta:
    """'90s', '30m', '24h', '7d' -> timedelta, or a usage error."""
    from hscr_jobs.maintenance import parse_duration as parse

    try:
        return parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.group("maintenance")
def maintenance():
    """Storage housekeeping (workers also run it periodically)."""


@maintenance.command("abort-uploads")
@click.option("--storage-uri", envvar="HSCR_STORAGE_URI", required=True, help="The service's storage root.")
@click.option("--older-than", default="24h", show_default=True, help="Only uploads started this long ago.")
def abort_uploads(storage_uri: str, older_than: str):
    """Abort incomplete S3 multipart uploads under STORAGE_URI/datasets/ (left by killed writers)."""
    from hscr_jobs.maintenance import abort_stale_uploads

    aborted = abort_stale_uploads(storage_uri, older_than=parse_duration(older_than))
    for key in aborted:
        click.echo(f"aborted {key}")
    click.echo(f"{len(aborted)} incomplete upload(s) aborted")


def commands() -> list[click.Command]:
    return [serve, maintenance]
