"""``client.datasets``: a job's dataset, readable while the job is still ``in_progress``.

``download`` copies the shards (checked against their sha256) and the manifest, card and error
file into a folder laid out like the dataset itself; ``load`` opens one config as a
``datasets.Dataset`` (extra ``data``). Presigned URLs are fetched without the API key.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal
from urllib.parse import quote, urlparse
from urllib.request import url2pathname

import anyio

from .. import schema
from .._exceptions import HSCRError, map_httpx_exceptions
from .._models import DatasetInfo
from .._types import NOT_GIVEN, NotGiven, Timeout
from ._resource import AsyncAPIResource, SyncAPIResource, path_id

if TYPE_CHECKING:
    import datasets

__all__ = ["AsyncDatasets", "Datasets"]

Config = Literal["pairs", "ranked"]


@dataclass(frozen=True)
class _Download:
    url: str
    target: Path
    sha256: str | None  # None: not checked (manifest, card, error file: written once, last)


def _plan(info: DatasetInfo, directory: Path, config: Config | NotGiven) -> list[_Download]:
    """What to fetch, skipping shards already there with the right sha256 (a re-run resumes)."""
    plan = []
    for shard in info.shards:
        if isinstance(config, str) and shard.config != config:
            continue
        if shard.url is None:
            raise HSCRError(f"the service gave no URL for {shard.path} of {info.job_id}")
        target = _inside(directory, shard.path)
        if target.is_file() and _sha256_file(target) == shard.sha256:
            continue
        plan.append(_Download(shard.url, target, shard.sha256))
    for url, name in ((info.manifest_url, schema.MANIFEST), (info.card_url, schema.CARD),
                      (info.errors_url, schema.ERRORS), (info.skipped_url, schema.SKIPPED)):
        if url:
            plan.append(_Download(url, directory / name, None))
    return plan


def _inside(directory: Path, relative: str) -> Path:
    """A shard path from the server, refused if it would land outside ``directory``."""
    target = (directory / relative).resolve()
    if directory.resolve() not in target.parents:
        raise HSCRError(f"refusing shard path {relative!r}: it leaves {directory}")
    return target


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _local_path(url: str) -> Path | None:
    """The path of a file:// URL (local storage on this machine), else None."""
    parsed = urlparse(url)
    return Path(url2pathname(parsed.path)) if parsed.scheme == "file" else None


@contextmanager
def _landing(item: _Download) -> Iterator[tuple[IO[bytes], hashlib._Hash]]:
    """A temp file beside the target; renamed over it only when complete and matching its sha256."""
    item.target.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=item.target.parent, prefix=".part-", delete=False)
    digest = hashlib.sha256()
    try:
        with handle:
            yield handle, digest
        if item.sha256 is not None and digest.hexdigest() != item.sha256:
            raise HSCRError(f"{item.target.name}: sha256 {digest.hexdigest()} does not match the manifest's "
                            f"{item.sha256}; download again")
        os.replace(handle.name, item.target)
    finally:
        if os.path.exists(handle.name):
            os.unlink(handle.name)


def _copy_local(item: _Download, source: Path) -> None:
    if not source.is_file():
        raise HSCRError(f"{item.url} is not a file on this machine: the service's storage is a local folder "
                        "elsewhere; give the service S3 storage to download remotely")
    with _landing(item) as (out, digest), open(source, "rb") as src:
        for block in iter(lambda: src.read(1 << 20), b""):
            digest.update(block)
            out.write(block)


def _cache_dir(job_id: str, cache_dir: str | os.PathLike | NotGiven) -> Path:
    if isinstance(cache_dir, (str, os.PathLike)):
        return Path(cache_dir)
    root = os.environ.get("HSCR_CACHE_DIR") or Path.home() / ".cache" / "hscr"
    return Path(root) / "datasets" / quote(job_id, safe="")


def _load(directory: Path, info: DatasetInfo, config: Config) -> datasets.Dataset:
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise HSCRError("datasets.load needs the data extra: pip install 'hscr-client[data]'") from exc
    files = sorted(str(_inside(directory, shard.path)) for shard in info.shards if shard.config == config)
    if not files:
        raise HSCRError(f"job {info.job_id} has no {config} shards yet (status {info.status})")
    return load_dataset("parquet", data_files=files, split="train", features=schema.features(config),
                        cache_dir=str(directory / ".hf-cache"))


class Datasets(SyncAPIResource):
    def retrieve(self, job_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> DatasetInfo:
        """The dataset's manifest (once written), shard list and download URLs."""
        return self._client._get(DatasetInfo, f"/v1/jobs/{path_id(job_id, what='job_id')}/dataset",
                                 timeout=timeout)

    def download(self, job_id: str, directory: str | os.PathLike, *, config: Config | NotGiven = NOT_GIVEN,
                 timeout: Timeout | NotGiven = NOT_GIVEN) -> DatasetInfo:
        """Copy the dataset (or one ``config``) into ``directory``; returns what was listed.

        Safe to re-run: shards already present with the right sha256 are skipped. While the job is
        ``in_progress`` this copies the shards finished so far (``info.complete`` is False).
        """
        info = self.retrieve(job_id, timeout=timeout)
        for item in _plan(info, Path(directory), config):
            self._fetch(item, timeout)
        return info

    def load(self, job_id: str, *, config: Config = "pairs", cache_dir: str | os.PathLike | NotGiven = NOT_GIVEN,
             timeout: Timeout | NotGiven = NOT_GIVEN) -> datasets.Dataset:
        """Download ``config`` [default ``$HSCR_CACHE_DIR/datasets/<job>``] and open it as a ``datasets.Dataset``."""
        directory = _cache_dir(job_id, cache_dir)
        info = self.download(job_id, directory, config=config, timeout=timeout)
        return _load(directory, info, config)

    def _fetch(self, item: _Download, timeout: Timeout | NotGiven) -> None:
        local = _local_path(item.url)
        if local is not None:
            _copy_local(item, local)
            return
        with self._client._stream_url(item.url, timeout=timeout) as response, _landing(item) as (out, digest):
            with map_httpx_exceptions(response.request):
                for block in response.iter_bytes():
                    digest.update(block)
                    out.write(block)


class AsyncDatasets(AsyncAPIResource):
    async def retrieve(self, job_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> DatasetInfo:
        return await self._client._get(DatasetInfo, f"/v1/jobs/{path_id(job_id, what='job_id')}/dataset",
                                       timeout=timeout)

    async def download(self, job_id: str, directory: str | os.PathLike, *, config: Config | NotGiven = NOT_GIVEN,
                       timeout: Timeout | NotGiven = NOT_GIVEN) -> DatasetInfo:
        info = await self.retrieve(job_id, timeout=timeout)
        for item in _plan(info, Path(directory), config):
            await self._fetch(item, timeout)
        return info

    async def load(self, job_id: str, *, config: Config = "pairs",
                   cache_dir: str | os.PathLike | NotGiven = NOT_GIVEN,
                   timeout: Timeout | NotGiven = NOT_GIVEN) -> datasets.Dataset:
        directory = _cache_dir(job_id, cache_dir)
        info = await self.download(job_id, directory, config=config, timeout=timeout)
        # Reading parquet is blocking work: keep it off the event loop.
        return await anyio.to_thread.run_sync(_load, directory, info, config)

    async def _fetch(self, item: _Download, timeout: Timeout | NotGiven) -> None:
        local = _local_path(item.url)
        if local is not None:
            await anyio.to_thread.run_sync(_copy_local, item, local)
            return
        async with self._client._stream_url(item.url, timeout=timeout) as response:
            with _landing(item) as (out, digest), map_httpx_exceptions(response.request):
                async for block in response.aiter_bytes():
                    digest.update(block)
                    out.write(block)
