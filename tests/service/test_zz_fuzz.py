"""Schemathesis over the served OpenAPI spec with every check and the stateful phase (bounded examples): no request
makes a 5xx, and every answer conforms to the spec (status codes, headers such as Allow on a 405, content types,
body schemas); valid data is accepted, invalid data refused, and created jobs and files are reachable through the
spec's links. ``fuzz_hooks.py`` teaches the generator the rules no JSON schema can state (an image upload must
decode; ``n_levels <= n_coupled``); see its docstring."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from service_helpers import KEYS

HERE = Path(__file__).parent


def test_openapi_fuzz_all_checks_and_stateful(api, tmp_path):
    binary = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    if not Path(binary).exists():
        pytest.skip("schemathesis is not installed (pip install schemathesis 'torch==2.13.0')")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [binary, "run", f"{api}/openapi.json", "--checks", "all", "--max-examples", "15",
         "--phases", "examples,coverage,fuzzing,stateful", "--header", f"Authorization: Bearer {KEYS['alice']}",
         "--seed", "4", "--workers", "1", "--request-timeout", "30",
         # The event stream stays open until its job ends; tests/service/test_end_to_end.py reads it.
         "--exclude-path", "/v1/jobs/{job_id}/events", "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    print(result.stdout[-1500:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout
