"""`hscr maintenance abort-uploads` against SeaweedFS: incomplete multipart uploads under datasets/ that are old
enough are aborted; younger ones and ones elsewhere in the bucket stay."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest
from click.testing import CliRunner
from service_helpers import BUCKET


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
