"""Write HSCR results as a dataset: immutable shards per chunk, then the manifest and card last.

A chunk (a batch of items; the service's unit of retry) writes ``pairs/part-<chunk>.parquet``,
``ranked/part-<chunk>.parquet``, ``_errors/part-<chunk>.jsonl`` and a sidecar
``_chunks/part-<chunk>.json`` with row counts and sha256 digests. Rewriting a chunk overwrites its
own files, so a retried chunk never duplicates rows. :func:`hscr_client.manifest.finalize` merges the sidecars and
error files into ``manifest.json``, ``errors.jsonl`` and ``README.md``; it needs no torch, so it lives in
:mod:`hscr_client.manifest` (the API also ends jobs that no worker is running).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from hscr_client import schema
from hscr_client.storage import Location, open_location

from .pipeline import ItemResult


def chunk_name(chunk: int) -> str:
    return f"part-{chunk:05d}"


def image_cell(image, name: str) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": name}


def ranked_row(result: ItemResult) -> dict:
    return {
        "custom_id": result.custom_id,
        "question": result.question,
        "image": image_cell(result.image, f"{result.custom_id}.png"),
        "chosen": result.chosen,
        "own_answer": result.own_answer,
        "corrupted": result.corrupted,
        "coupled": result.coupled,
        "levels": [{"level": lv.level, "text": lv.text, "n_replacements": lv.n_replacements,
                    "similarity": lv.similarity, "unfired": lv.unfired, "replacements": lv.replacements}
                   for lv in result.levels],
        "n_candidates": result.n_candidates,
        "shortfall": result.shortfall,
    }


def parquet_bytes(rows: list[dict], config: str) -> bytes:
    features = schema.features(config)
    table = pa.Table.from_pylist(rows, schema=features.arrow_schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def write_chunk(location: Location, chunk: int, results: Sequence[ItemResult], errors: Sequence[dict]) -> dict:
    """Write one chunk's shards, error file and sidecar. Returns the sidecar."""
    name = chunk_name(chunk)
    ranked = [ranked_row(r) for r in results if r.error is None]
    pairs = [p for row in ranked for p in schema.pair_rows(row)]
    failed = list(errors) + [{"custom_id": r.custom_id, "error": r.error} for r in results if r.error]
    sidecar: dict = {"chunk": chunk, "items": len(results) + len(errors), "completed": len(ranked),
                     "failed": len(failed), "shards": {}}
    for config, rows in ((schema.PAIRS, pairs), (schema.RANKED, ranked)):
        path = f"{config}/{name}.parquet"
        if not rows:  # an empty Parquet file breaks datasets' loader: write none (and drop a stale one)
            if location.exists(path):
                location.delete(path)
            continue
        data = parquet_bytes(rows, config)
        location.write_bytes(path, data)
        sidecar["shards"][config] = {"path": path, "rows": len(rows), "sha256": hashlib.sha256(data).hexdigest(),
                                     "bytes": len(data)}
    location.write_bytes(f"_errors/{name}.jsonl", "".join(json.dumps(e) + "\n" for e in failed).encode())
    location.write_bytes(f"_chunks/{name}.json", json.dumps(sidecar).encode())
    return sidecar


def model_digest(model_path: str) -> str | None:
    """sha256 over the model's weight files (None for a hub id or a missing path)."""
    from pathlib import Path

    root = Path(model_path)
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for f in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_rows(uri: str, config: str) -> list[dict]:
    """All rows of one config of a finished dataset (a small-data helper for tests and tools)."""
    location = open_location(uri)
    tables = [pq.read_table(io.BytesIO(location.read_bytes(p))) for p in location.list(config)]
    return [row for t in tables for row in t.to_pylist()]


def iter_chunks(items: Sequence, size: int) -> Iterable[tuple[int, Sequence]]:
    for chunk, start in enumerate(range(0, len(items), size)):
        yield chunk, items[start:start + size]
