"""Shared parts for the trainer tests: one small real HSCR dataset, made once by the fixture model."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hscr_worker._compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before any test module imports transformers' image processors

from hscr_worker.generate import DEFAULT_MODEL as FIXTURE_MODEL  # noqa: E402

S3_KEY, S3_SECRET, BUCKET = "trainer-test-key", "trainer-test-secret", "trainer-test"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads only spin against each other."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def hscr_dataset(tmp_path_factory) -> Path:
    """A real HSCR dataset (``ranked`` + ``pairs``) from ``hscr generate`` on 24 held-out fixture items."""
    from hscr_client import HSCRParams
    from hscr_worker.fixture.items import write_items
    from hscr_worker.generate import generate_dataset, load_backend

    root = tmp_path_factory.mktemp("hscr-data")
    write_items(24, 2025, root / "items.jsonl", root / "images")
    generate_dataset(load_backend("transformers", FIXTURE_MODEL), str(root / "items.jsonl"), str(root / "out"),
                     HSCRParams(), chunk_size=8)
    return root / "out"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A private SeaweedFS S3 server on 127.0.0.1 (SigV4 enforced); sets the HSCR S3 environment."""
    import httpx

    directory = tmp_path_factory.mktemp("s3")
    port = free_port()
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    ports = [f"-{name}={free_port()}" for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
        "s3.port.grpc", "admin.port", "admin.port.grpc")]
    env = {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "S3_BUCKET": BUCKET}
    with open(directory / "weed.log", "ab") as log:
        process = subprocess.Popen(
            [weed, "mini", f"-dir={directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
             "-admin.ui=false", "-webdav=false", f"-s3.port={port}", "-s3.port.iceberg=0", "-s3.port.lance=0",
             *ports], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{endpoint}/{BUCKET}", timeout=2).status_code in (200, 403):
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise RuntimeError(f"SeaweedFS did not start; see {directory / 'weed.log'}")
        time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in (*env, "HSCR_S3_ENDPOINT")}
    os.environ.update({**env, "HSCR_S3_ENDPOINT": endpoint})
    yield f"s3://{BUCKET}"
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
