"""A job's dataset as clients see it: shards (readable while the job runs), manifest, error file, URLs.

While the job runs, the shard list comes from the chunk sidecars (``_chunks/part-*.json``, written after
a chunk's shards, so a listed shard is always complete); once ``manifest.json`` exists, from it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

from hscr_client import DatasetInfo, ShardInfo, schema
from hscr_jobs.store import Store

from .errors import NotFound
from .storage import Storage, join

_CHUNK_NUMBER = re.compile(r"part-(\d+)\.")


def _chunk_of(path: str) -> int:
    match = _CHUNK_NUMBER.search(path)
    return int(match.group(1)) if match else -1


def dataset_info(*, tenant: str, job_id: str, store: Store, storage: Storage, expires: int) -> DatasetInfo:
    job = store.get_job(tenant, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    location = storage.location
    prefix = storage.relative(job.dataset_uri)
    manifest = None
    if location.exists(f"{prefix}/{schema.MANIFEST}"):
        manifest = json.loads(location.read_bytes(f"{prefix}/{schema.MANIFEST}"))
        entries = [(config, s) for config in schema.CONFIGS for s in manifest["configs"][config]["shards"]]
    else:
        sidecars = [json.loads(location.read_bytes(p)) for p in location.list(f"{prefix}/_chunks")]
        entries = [(config, s["shards"][config]) for s in sorted(sidecars, key=lambda s: s["chunk"])
                   for config in schema.CONFIGS if config in s["shards"]]
    shards = [ShardInfo(config=config, chunk=_chunk_of(s["path"]), path=s["path"], rows=s["rows"],
                        sha256=s["sha256"], bytes=s["bytes"]) for config, s in entries]
    extras = [schema.MANIFEST, schema.CARD, schema.ERRORS] if manifest else []
    if manifest and manifest.get("skipped"):  # datasets finalized before skipped.jsonl existed have none
        extras.append(schema.SKIPPED)
    urls = storage.urls([join(job.dataset_uri, s.path) for s in shards] + [join(job.dataset_uri, e) for e in extras],
                        expires)
    for shard, url in zip(shards, urls, strict=False):
        shard.url = url
    named = dict(zip(extras, urls[len(shards):], strict=True))
    return DatasetInfo(job_id=job.id, status=job.status, complete=manifest is not None, uri=job.dataset_uri,
                       shards=shards, manifest=manifest, manifest_url=named.get(schema.MANIFEST),
                       card_url=named.get(schema.CARD), errors_url=named.get(schema.ERRORS),
                       skipped_url=named.get(schema.SKIPPED),
                       url_expires_at=int(time.time()) + expires if storage.is_s3 else None,
                       storage_options=storage.public_options())


def iter_errors(*, tenant: str, job_id: str, store: Store, storage: Storage) -> Iterator[bytes]:
    """The error file: ``errors.jsonl`` once finalized, else the chunks' error files written so far."""
    job = store.get_job(tenant, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    location = storage.location
    prefix = storage.relative(job.dataset_uri)
    if location.exists(f"{prefix}/{schema.ERRORS}"):
        return iter([location.read_bytes(f"{prefix}/{schema.ERRORS}")])
    paths = location.list(f"{prefix}/_errors")
    return (location.read_bytes(p) for p in paths)
