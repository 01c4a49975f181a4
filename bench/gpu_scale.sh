#!/usr/bin/env bash
# The prepared GPU measurement (issue #7): one H200, ~10 min of device time, results in $OUT (or bench/results).
# Needs torch + transformers (+ pydantic for hscr_client); extra arguments go to bench/gpu_scale.py.
# Files: $OUT/$GPU_SCALE_NAME.json and .log (default gpu_scale), e.g. for Qwen2.5-VL-7B:
#   GPU_SCALE_NAME=gpu_scale_qwen bash bench/gpu_scale.sh --arch qwen2.5-vl-7b
set -o pipefail; cd "$(dirname "$0")/.." && OUT="${OUT:-bench/results}" && mkdir -p "$OUT" && { python3 -c "import pydantic" 2>/dev/null || [ ! -d bench/wheels ] || python3 -m pip install -q --no-index --find-links bench/wheels pydantic; } && PYTHONPATH="client:worker${PYTHONPATH:+:$PYTHONPATH}" timeout -k 30 "${GPU_SCALE_TIMEOUT:-540}" python3 bench/gpu_scale.py --out "$OUT/${GPU_SCALE_NAME:-gpu_scale}.json" "$@" 2>&1 | tee "$OUT/${GPU_SCALE_NAME:-gpu_scale}.log"
