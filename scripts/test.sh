#!/usr/bin/env bash
# Install everything the tests use (the Python packages, and Debian's redis-server, docker-compose, chromium and
# chromedriver), then run the whole test suite (it starts its own Redis and SeaweedFS servers).
# With CI=true a skipped test fails the run unless tests/_ci_skips.py allows it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider --timeout=900 "$@"
