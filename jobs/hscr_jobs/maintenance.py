"""Storage housekeeping the workers run periodically (and ``hscr maintenance`` on demand), and durations.

No HTTP and no torch: both the API's CLI and the workers use it.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta, timezone
from urllib.parse import urlparse

from hscr_client._models import completion_window_seconds


def parse_duration(value: str) -> timedelta:
    """'90s', '30m', '24h', '7d' -> timedelta (ValueError otherwise)."""
    if not re.fullmatch(r"[0-9]+[smhd]", value):
        raise ValueError(f"{value!r} is not a duration like 90s, 30m, 24h or 7d")
    return timedelta(seconds=completion_window_seconds(value))


def s3_client(config=None):
    """A boto3 S3 client from the service's settings (``HSCR_S3_ENDPOINT``, ``AWS_*``); path-style addressing
    for custom endpoints (SeaweedFS, MinIO). ``config``: a ``botocore.config.Config`` to use instead."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("HSCR_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if config is None and endpoint:
        config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3})
    return boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_REGION", "us-east-1"),
                        config=config)


def abort_stale_uploads(root_uri: str, *, older_than: timedelta, under: str = "datasets") -> list[str]:
    """Abort incomplete S3 multipart uploads under ``<root>/<under>/`` started more than ``older_than`` ago.

    A writer killed mid-upload (a SIGKILLed worker writing a shard) leaves its uploaded parts behind:
    invisible to listings, but stored (and billed) until aborted. A retried chunk writes its shard again
    under the same key, so nothing of value is lost; ``older_than`` keeps uploads still in flight. Returns
    the keys whose uploads were aborted; local storage has none.
    """
    parsed = urlparse(root_uri)
    if parsed.scheme != "s3":
        return []
    bucket = parsed.netloc
    prefix = "/".join(p for p in (parsed.path.strip("/"), under.strip("/")) if p) + "/"
    cutoff = datetime.now(timezone.utc) - older_than
    client = s3_client()
    aborted = []
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for upload in page.get("Uploads", []):
            if upload["Initiated"] <= cutoff:
                client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted.append(upload["Key"])
    return aborted


class StorageUnavailable(RuntimeError):
    """The storage root cannot be used; the message says what to fix (never a secret)."""


def check_storage(root_uri: str, *, timeout: float = 5.0) -> None:
    """Raise :class:`StorageUnavailable` unless ``root_uri`` can be used now: for S3, the endpoint answers within
    ``timeout`` seconds, the bucket exists and the credentials may read it; locally, the directory can be made."""
    parsed = urlparse(root_uri)
    if parsed.scheme != "s3":
        path = parsed.path if parsed.scheme == "file" else root_uri
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"storage root {path!r} cannot be created: {exc.strerror}") from exc
        if not os.access(path, os.W_OK):
            raise StorageUnavailable(f"storage root {path!r} is not writable by this process")
        return
    import botocore.exceptions
    from botocore.config import Config

    endpoint = os.environ.get("HSCR_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    client = s3_client(Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1},
                              s3={"addressing_style": "path"}))
    try:
        client.head_bucket(Bucket=parsed.netloc)
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            raise StorageUnavailable(f"bucket {parsed.netloc!r} does not exist at {endpoint}: create it, or point "
                                     "HSCR_STORAGE_URI at an existing one") from exc
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageUnavailable(f"access to bucket {parsed.netloc!r} at {endpoint} was denied ({code}): check "
                                     "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from exc
        raise StorageUnavailable(f"bucket {parsed.netloc!r} at {endpoint}: {code or exc}") from exc
    except botocore.exceptions.NoCredentialsError as exc:
        raise StorageUnavailable("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from exc
    except (botocore.exceptions.BotoCoreError, OSError) as exc:
        raise StorageUnavailable(f"cannot reach the S3 endpoint {endpoint} within {timeout:.0f} s: {exc}; check "
                                 "HSCR_S3_ENDPOINT") from exc
