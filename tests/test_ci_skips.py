"""CI must not go green on skipped areas (issue #19): the skip rule of ``tests/_ci_skips.py`` and the vLLM guard
of ``tests/conftest.py``, each run as a real pytest session in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

SKIPPING_TESTS = '''
import pytest

def test_runs():
    pass

def test_needs_a_tool():
    pytest.skip("frobnicator is not installed")

@pytest.mark.gpu
def test_needs_a_gpu():
    pytest.skip("no CUDA here")

@pytest.mark.xfail(reason="known bug")
def test_known_bug():
    assert False
'''


def _session(tmp_path: Path, source: str, ci: str | None) -> subprocess.CompletedProcess:
    """pytest on one test file with only the skip plugin (not this suite's conftest files or config)."""
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA GPU\n")
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(source))
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env["PYTHONPATH"] = str(TESTS)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "_ci_skips", "-p", "no:cacheprovider", "-q",
                           "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_under_ci_an_unlisted_skip_fails_the_run_and_is_named(tmp_path):
    result = _session(tmp_path, SKIPPING_TESTS, ci="true")
    assert result.returncode == 1, result.stdout
    assert "1 unexpected skip(s) under CI=true" in result.stdout
    assert "SKIPPED (not allowed in CI) test_sample.py::test_needs_a_tool: Skipped: frobnicator is not installed" \
        in result.stdout
    # the allowed (gpu) skip and the xfail are not named; every test still ran
    assert "test_needs_a_gpu:" not in result.stdout and "test_known_bug:" not in result.stdout
    assert "1 passed, 2 skipped, 1 xfailed" in result.stdout


def test_outside_ci_a_skip_is_a_skip(tmp_path):
    result = _session(tmp_path, SKIPPING_TESTS, ci=None)
    assert result.returncode == 0 and "unexpected skip" not in result.stdout, result.stdout
    assert _session(tmp_path, SKIPPING_TESTS, ci="false").returncode == 0


def test_under_ci_only_allow_listed_skips_pass(tmp_path):
    allowed_only = SKIPPING_TESTS.replace("def test_needs_a_tool", "def _not_a_test")
    result = _session(tmp_path, allowed_only, ci="true")
    assert result.returncode == 0, result.stdout
    assert "1 passed, 1 skipped, 1 xfailed" in result.stdout


def test_under_ci_a_module_skipped_at_import_fails_the_run(tmp_path):
    module_skip = 'import pytest\nfrobnicator = pytest.importorskip("frobnicator_not_installed")\n\ndef test_x():\n' \
                  '    pass\n'
    result = _session(tmp_path, module_skip, ci="true")
    assert result.returncode == 1, result.stdout
    assert "SKIPPED (not allowed in CI) test_sample.py: " in result.stdout and "frobnicator_not_installed" \
        in result.stdout


SITECUSTOMIZE_BREAKING_THE_HOOK = '''
import sys

class BreakTheHook:
    """What a vLLM release that moves a module does to ours: a ModuleNotFoundError from inside hscr_worker's
    own code, which pytest.importorskip takes for a missing optional package and skips."""

    def find_spec(self, name, path=None, target=None):
        if name == "hscr_worker.backends.vllm_hook":
            raise ModuleNotFoundError("simulated: No module named 'vllm.v1.worker.gpu.sample'",
                                      name="vllm.v1.worker.gpu.sample")
        return None

sys.meta_path.insert(0, BreakTheHook())
'''


def test_require_vllm_stops_the_session_when_our_vllm_module_does_not_import(tmp_path):
    """vllm itself imports, our hook module does not: under HSCR_REQUIRE_VLLM=1 the session stops (exit 2)
    instead of skipping tests/worker/backends/test_vllm_hook.py whole (exit 0, as the vllm-only guard did)."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE_BREAKING_THE_HOOK)
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env.update(HSCR_REQUIRE_VLLM="1", PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                             "tests/worker/backends/test_vllm_hook.py"], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "HSCR_REQUIRE_VLLM=1 but the vLLM modules do not import" in result.stdout + result.stderr
    assert "simulated: No module named 'vllm.v1.worker.gpu.sample'" in result.stdout + result.stderr
