"""Object storage for datasets: a local directory (the default) or any S3-compatible endpoint.

URIs: a plain path or ``file://...`` for a local directory, ``s3://bucket/prefix`` for S3. The S3
endpoint and credentials come from the environment: ``HSCR_S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL``,
e.g. ``http://127.0.0.1:8333``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``.
Needs the ``data`` extra (pyarrow).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlparse


def s3_options() -> dict:
    """Endpoint and credentials from the environment, as pyarrow ``S3FileSystem`` keyword arguments."""
    endpoint = os.environ.get("HSCR_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict = {"region": os.environ.get("AWS_REGION", "us-east-1")}
    if endpoint:
        parsed = urlparse(endpoint)
        options["endpoint_override"] = parsed.netloc or parsed.path
        options["scheme"] = parsed.scheme or "http"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        options["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        options["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    return options


def storage_options() -> dict:
    """The same settings in fsspec form, for ``datasets.load_dataset(..., storage_options=...)``."""
    endpoint = os.environ.get("HSCR_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict = {}
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        options["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        options["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    return options


@dataclass
class Location:
    """A filesystem plus a base path inside it."""

    fs: object  # pyarrow.fs.FileSystem
    base: str
    uri: str

    def path(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts)

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write an object whole. Locally via a temporary file and a rename, so readers never see half."""
        self.write_stream(relative, (data,))

    def write_stream(self, relative: str, blocks: Iterable[bytes]) -> None:
        """Write an object from ``blocks`` without holding it whole (an upload streamed from its spool file).
        Locally via a temporary file and a rename, so readers never see half, and nothing is left if ``blocks``
        raises; on S3 the object may then hold what was written so far (pyarrow cannot abort the upload), so a
        caller records an object only after this returns."""
        from pyarrow import fs as pafs

        target = self.path(relative)
        parent = posixpath.dirname(target)
        if isinstance(self.fs, pafs.LocalFileSystem):
            self.fs.create_dir(parent, recursive=True)
            tmp = f"{target}.{uuid.uuid4().hex}.tmp"
            try:
                with self.fs.open_output_stream(tmp) as out:
                    for block in blocks:
                        out.write(block)
            except BaseException:
                self.fs.delete_file(tmp)
                raise
            self.fs.move(tmp, target)
        else:
            with self.fs.open_output_stream(target) as out:
                for block in blocks:
                    out.write(block)

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as f:
            return f.read()

    def exists(self, relative: str) -> bool:
        from pyarrow import fs as pafs

        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def list(self, relative: str) -> list[str]:
        """Relative paths of the files directly under ``relative`` (sorted; empty if missing)."""
        from pyarrow import fs as pafs

        selector = pafs.FileSelector(self.path(relative), allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        return sorted(posixpath.join(relative, posixpath.basename(i.path)) for i in infos
                      if i.type == pafs.FileType.File and not i.path.endswith(".tmp"))

    def delete(self, relative: str) -> None:
        self.fs.delete_file(self.path(relative))


def open_location(uri: str) -> Location:
    """Resolve ``uri`` (path, ``file://`` or ``s3://bucket/prefix``) to a :class:`Location`."""
    from pyarrow import fs as pafs

    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"{uri!r}: an S3 URI needs a bucket, e.g. s3://bucket/prefix")
        fs = pafs.S3FileSystem(**s3_options())
        return Location(fs, f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/"), uri)
    if parsed.scheme in ("", "file"):
        path = os.path.abspath(parsed.path if parsed.scheme == "file" else uri)
        return Location(pafs.LocalFileSystem(), path, uri)
    raise ValueError(f"{uri!r}: unsupported scheme {parsed.scheme!r}; use a path, file:// or s3://")
