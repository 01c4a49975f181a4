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
