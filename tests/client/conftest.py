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


# --- the real service, for test_client_live.py ------------------------------------------------------
# Reuse the service tests' stack (private redis-server, SeaweedFS, the API under uvicorn, `hscr worker`
# processes) by importing their conftest under its own name: one definition, no copy.

def _service_stack():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "service" / "conftest.py"
    if not path.is_file():
        return None
    if str(path.parent) not in sys.path:  # its helpers module (service_helpers.py) imports by name
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("hscr_tests_service_stack", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:  # the SDK installed alone, without hscr-service: the live tests skip
        return None
    sys.modules[spec.name] = module
    return module


service_stack = _service_stack()
if service_stack is not None:
    # Every fixture the live tests use, and every fixture those depend on.
    stack_env, session_workers, api, workers, fixture_items = (
        service_stack.stack_env, service_stack.session_workers, service_stack.api, service_stack.workers,
        service_stack.fixture_items)
