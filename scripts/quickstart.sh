#!/usr/bin/env bash
# Install everything, then generate an HSCR preference dataset from the bundled example items with
# the bundled fixture Med-VLM, and print where it is and a short summary. It shows its own progress;
# the libraries' progress bars (loading weights, dataset splits) only with HSCR_LOG_LEVEL=debug.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out=${1:-out/example-dataset}
rm -rf "$out"
hscr generate --input examples/items.jsonl --output "$out"
python scripts/quickstart_summary.py "$out"
