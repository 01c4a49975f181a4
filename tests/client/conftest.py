"""Fixtures of the SDK tests (helpers are in ``sdk_wire.py``)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The developer's own HSCR_* variables must not leak into what a test sees."""
    for name in ("HSCR_API_KEY", "HSCR_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HSCR_CACHE_DIR", str(tmp_path / "cache"))
