"""The SDK and the API never import torch (they install and run without it); the worker never imports the API,
and the job lifecycle they share imports neither."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("module", ["hscr_client", "hscr_client._cli", "hscr_client.schema", "hscr_client.storage",
                                    "hscr_jobs.store", "hscr_jobs.lifecycle", "hscr_jobs.maintenance",
                                    "hscr_service.main"])
def test_light_components_do_not_import_torch(module):
    code = f"import sys, {module}; heavy = {{'torch', 'transformers', 'vllm'}} & set(sys.modules); " \
           "assert not heavy, heavy"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-1500:]


def test_client_distribution_does_not_depend_on_torch():
    from importlib.metadata import requires

    for dist in ("hscr-client", "hscr-jobs", "hscr-service"):
        assert not [r for r in requires(dist) or [] if r.split()[0].startswith(("torch", "vllm", "transformers"))]


ROOT = Path(__file__).resolve().parents[1]


def _imported_packages(folder: Path) -> set[str]:
    """Top-level names every module under ``folder`` imports (absolute imports, at any depth: lazy ones too)."""
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("worker/hscr_worker", {"hscr_service"}),  # a GPU worker carries no API code
    ("jobs/hscr_jobs", {"hscr_service", "hscr_worker", "hscr_trainer", "torch", "fastapi"}),
    ("service/hscr_service", {"hscr_worker", "hscr_trainer", "torch"}),
])
def test_components_import_only_what_they_may(folder, forbidden):
    assert not _imported_packages(ROOT / folder) & forbidden


def test_worker_distribution_does_not_depend_on_the_service():
    from importlib.metadata import requires

    assert not [r for r in requires("hscr-worker") or [] if r.split()[0].startswith("hscr-service")]
