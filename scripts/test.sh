#!/usr/bin/env bash
# Install everything, then run the whole test suite (starts its own Redis and SeaweedFS servers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider --timeout=900 "$@"
