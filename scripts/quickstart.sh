#!/usr/bin/env bash
# Install everything, then generate an HSCR preference dataset from the bundled example items with
# the bundled fixture Med-VLM, and print where it is and a short summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out=${1:-out/example-dataset}
rm -rf "$out"
hscr generate --input examples/items.jsonl --output "$out"
python - "$out" <<'PY'
import json, sys
from datasets import load_dataset
out = sys.argv[1]
manifest = json.load(open(f"{out}/manifest.json"))
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
PY
