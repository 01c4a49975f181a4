"""Where the service keeps things, under one root (local directory or ``s3://bucket/prefix``)::

    files/<tenant>/<file_id>           uploaded items files and images
    inputs/<job_id>/part-<chunk>.jsonl one normalized input file per chunk (what a worker reads)
    datasets/<job_id>/                 the dataset (layout: hscr_client.schema)

Reads and writes go through ``hscr_client.storage`` (pyarrow.fs); presigned URLs come from obstore.
"""

from __future__ import annotations

import os
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

from hscr_client.storage import Location, open_location
from hscr_jobs.maintenance import check_storage


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


class Storage:
    def __init__(self, root_uri: str):
        parsed = urlparse(root_uri)
        self.is_s3 = parsed.scheme == "s3"
        self.root = root_uri.rstrip("/") if self.is_s3 else os.path.abspath(
            parsed.path if parsed.scheme == "file" else root_uri)

    @cached_property
    def location(self) -> Location:
        return open_location(self.root)

    def uri(self, *parts: str) -> str:
        return join(self.root, *parts)

    def file_uri(self, tenant: str, file_id: str) -> str:
        return self.uri("files", tenant, file_id)

    def input_uri(self, job_id: str) -> str:
        return self.uri("inputs", job_id)

    def dataset_uri(self, job_id: str) -> str:
        return self.uri("datasets", job_id)

    def write(self, uri: str, data: bytes) -> None:
        location = self.location
        location.write_bytes(self.relative(uri), data)

    def read(self, uri: str) -> bytes:
        return self.location.read_bytes(self.relative(uri))

    def relative(self, uri: str) -> str:
        if not uri.startswith(self.root + "/"):
            raise ValueError(f"{uri!r} is outside the storage root")
        return uri[len(self.root) + 1:]

    def check(self) -> None:
        """Raise (readiness) unless the root can be used now: for S3, the endpoint answers, the bucket exists and
        the credentials may read it. The service does not create the bucket: ``/readyz`` stays 503 until it
        exists."""
        check_storage(self.root, timeout=2.0)

    # --- URLs handed to clients ---
    @cached_property
    def _signer(self):
        from obstore.store import S3Store

        parsed = urlparse(self.root)
        endpoint = os.environ.get("HSCR_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        options = {"region": os.environ.get("AWS_REGION", "us-east-1")}
        if endpoint:
            options["endpoint"] = endpoint
        if os.environ.get("AWS_ACCESS_KEY_ID"):
            options["access_key_id"] = os.environ["AWS_ACCESS_KEY_ID"]
            options["secret_access_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        else:
            options["skip_signature"] = True
        return parsed.netloc, S3Store(parsed.netloc, client_options={"allow_http": True}, **options)

    def urls(self, uris: list[str], expires: int) -> list[str]:
        """Presigned GET URLs (S3) or file:// URLs (local), one per object URI."""
        if not uris:
            return []
        if not self.is_s3:
            return [Path(u).as_uri() for u in uris]
        bucket, store = self._signer
        keys = [urlparse(u).path.lstrip("/") for u in uris]
        from obstore import sign

        return list(sign(store, "GET", keys, timedelta(seconds=expires)))

    def public_options(self) -> dict | None:
        """Non-secret settings a reader needs besides credentials (the S3 endpoint)."""
        if not self.is_s3:
            return None
        endpoint = os.environ.get("HSCR_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        return {"endpoint_url": endpoint} if endpoint else {}
