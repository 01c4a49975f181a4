"""Storage housekeeping and storage settings against SeaweedFS: `hscr maintenance abort-uploads` aborts incomplete
multipart uploads under datasets/ that are old enough (younger ones and ones elsewhere stay); a worker with
unusable storage settings exits at start-up saying why; /readyz waits for the bucket."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from urllib.parse import urlparse

import httpx
import pytest
from click.testing import CliRunner
from service_helpers import BUCKET, free_port, start_api, stop


def test_abort_uploads_left_by_killed_writers(stack_env):
    from botocore.exceptions import ClientError

    from hscr_jobs.maintenance import s3_client
    from hscr_service.cli import maintenance

    client = s3_client()
    root = stack_env["env"]["HSCR_STORAGE_URI"]
    prefix = urlparse(root).path.strip("/")
    try:  # `weed mini` creates S3_BUCKET on its own schedule; the other tests' writes create it too
        client.create_bucket(Bucket=BUCKET)
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    try:
        client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix)
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in ("NotImplemented", "501"):
            raise
        pytest.skip(f"this S3 server does not list multipart uploads: {exc}")

    def start_upload(key: str) -> str:
        """What a writer killed mid-file leaves: an upload with a part and no completion."""
        upload = client.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
        client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 1024)
        return upload

    def open_uploads() -> set[str]:
        return {u["Key"] for u in client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])}

    shard = f"{prefix}/datasets/job-killed/pairs/part-00003.parquet"
    upload_elsewhere = f"{prefix}/files/alice/file-in-flight"
    start_upload(shard)
    elsewhere_id = start_upload(upload_elsewhere)
    assert {shard, upload_elsewhere} <= open_uploads()

    runner = CliRunner()
    young = runner.invoke(maintenance, ["abort-uploads", "--storage-uri", root, "--older-than", "1h"])
    assert young.exit_code == 0 and "0 incomplete upload(s) aborted" in young.output, young.output
    assert shard in open_uploads()

    swept = runner.invoke(maintenance, ["abort-uploads", "--storage-uri", root, "--older-than", "0s"])
    assert swept.exit_code == 0 and f"aborted {shard}" in swept.output, swept.output
    assert open_uploads() & {shard, upload_elsewhere} == {upload_elsewhere}

    client.abort_multipart_upload(Bucket=BUCKET, Key=upload_elsewhere, UploadId=elsewhere_id)

    bad = runner.invoke(maintenance, ["abort-uploads", "--storage-uri", root, "--older-than", "soon"])
    assert bad.exit_code == 2 and "not a duration" in bad.output


def _worker(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from hscr_client._cli import main; main()", "worker", *args],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("setting", "says"), [
    ({"HSCR_STORAGE_URI": "s3://no-such-bucket-hscr/x"}, "bucket 'no-such-bucket-hscr' does not exist"),
    ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, "was denied"),
    ({"HSCR_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"}, "cannot reach the S3 endpoint"),
], ids=["missing bucket", "wrong secret", "no endpoint"])
def test_worker_with_unusable_storage_exits_at_start_up_saying_why(stack_env, setting, says):
    """Before: the worker started, and each chunk retried silently for minutes. Now it exits before loading the
    model, with a message that names the setting to fix and no secret."""
    result = _worker(setting, "--queue", "hscr-storage-check", "--burst")
    assert result.returncode != 0 and says in result.stderr, result.stderr[-2000:]
    assert "not-the-secret" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_readyz_is_unavailable_until_the_bucket_exists(stack_env):
    from hscr_jobs.maintenance import s3_client

    bucket = f"hscr-ready-{uuid.uuid4().hex[:8]}"
    process, url = start_api(stack_env, "ready-api", HSCR_STORAGE_URI=f"s3://{bucket}/run")
    try:
        not_ready = httpx.get(f"{url}/readyz", timeout=10)
        assert not_ready.status_code == 503 and not_ready.json()["checks"]["redis"] == "ok", not_ready.text
        assert not_ready.json()["checks"]["storage"] != "ok" and not_ready.headers["Retry-After"]
        s3_client().create_bucket(Bucket=bucket)
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok", "storage": "ok"}, ready.text
    finally:
        stop(process)
