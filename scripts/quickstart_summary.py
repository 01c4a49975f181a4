"""The summary ``scripts/quickstart.sh`` prints of the dataset it generated: pair counts, failed items, one item's
levels, read back with ``datasets`` as a user would (libraries' progress bars only at HSCR_LOG_LEVEL=debug).

    python scripts/quickstart_summary.py out/example-dataset
"""

from __future__ import annotations

import json
import sys

from hscr_worker.cli import library_progress_at_debug


def main(out: str) -> None:
    library_progress_at_debug()
    from datasets import load_dataset

    with open(f"{out}/manifest.json", encoding="utf-8") as f:
        manifest = json.load(f)
    pairs = load_dataset("parquet", data_files=f"{out}/pairs/*.parquet", split="train")
    ranked = load_dataset("parquet", data_files=f"{out}/ranked/*.parquet", split="train")
    row = ranked[0]
    print(f"\nDataset at {out}: {len(pairs)} preference pairs (images decode on load) and {len(ranked)} ranked items")
    print(f"  explicit pairs: {sum(t == 'explicit' for t in pairs['pair_type'])}, "
          f"implicit pairs: {sum(t == 'implicit' for t in pairs['pair_type'])}, failed items: "
          f"{manifest['request_counts']['failed']} (see {out}/errors.jsonl)")
    print(f"  example: Q: {row['question']}\n    preferred: {row['chosen']}\n    model's own: {row['own_answer']}")
    for level in row["levels"]:
        swaps = ", ".join(f"{r['original']}->{r['replacement']}" for r in level["replacements"])
        print(f"    level {level['level']} (similarity {level['similarity']:.2f}; {swaps}): {level['text']}")
    print(f"Train on it with TRL: load_dataset('parquet', data_files='{out}/pairs/*.parquet')")


if __name__ == "__main__":
    main(sys.argv[1])
