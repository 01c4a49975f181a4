"""Tiny real dataset shards written with the dataset contract's own features."""

from __future__ import annotations

from pathlib import Path


def pairs_parquet(path: Path) -> Path:
    """Two ``pairs`` rows (no images) as a parquet shard carrying the ``datasets`` schema metadata."""
    from datasets import Dataset

    from hscr_client.schema import features

    def message(role: str, text: str) -> list[dict]:
        return [{"role": role, "content": [{"type": "text", "text": text}]}]

    rows = {
        "custom_id": ["a", "b"],
        "prompt": [message("user", "Which side?"), message("user", "How many?")],
        "chosen": [message("assistant", "left"), message("assistant", "two")],
        "rejected": [message("assistant", "right"), message("assistant", "three")],
        "images": [[], []],
        "pair_type": ["explicit", "explicit"],
        "chosen_level": [0, 0],
        "rejected_level": [1, 1],
        "chosen_similarity": [1.0, 1.0],
        "rejected_similarity": [0.5, 0.4],
        "rejected_reward": [-1.0, -2.0],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows, features=features("pairs")).to_parquet(str(path))
    return path
