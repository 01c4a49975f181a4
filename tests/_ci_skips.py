"""Under CI (``CI=true``) a skipped test fails the run, unless the allow-list below says why it may skip.

A skip means a part of the suite did not run: a setup step that failed to install ``docker-compose``,
chromium or ``redis-server`` used to leave CI green with those tests skipped. Outside CI a skip stays a
skip (a developer may lack a tool). Registered by ``tests/conftest.py``; the hooks only record and report,
so every test still runs, then the summary names each unexpected skip and the exit status is 1.

Test: ``tests/test_ci_skips.py`` runs pytest on small test files with this plugin and ``CI=true``.
"""

from __future__ import annotations

import os

import pytest

# marker -> why a test carrying it may skip under CI. Keep it short: every entry is a part CI never runs.
CI_ALLOWED_SKIPS: dict[str, str] = {
    "gpu": "needs a CUDA GPU, which CI machines do not have; run `pytest -m gpu` on a GPU host",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: why")
        return str(longrepr[2])
    return str(longrepr)


class UnexpectedSkips:
    """Records the skips CI does not allow; fails the session and names them in the summary."""

    def __init__(self) -> None:
        self.unexpected: list[tuple[str, str]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        allowed = any(marker in report.keywords for marker in CI_ALLOWED_SKIPS)
        if report.skipped and not hasattr(report, "wasxfail") and not allowed:
            self.unexpected.append((report.nodeid, _reason(report)))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        """A module skipped whole at import (``pytest.importorskip``, ``allow_module_level``): never allowed."""
        if report.skipped:
            self.unexpected.append((report.nodeid, _reason(report)))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.unexpected and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.unexpected:
            return
        terminalreporter.write_sep("=", f"{len(self.unexpected)} unexpected skip(s) under CI=true: the run fails",
                                   red=True)
        for nodeid, reason in self.unexpected:
            terminalreporter.write_line(f"SKIPPED (not allowed in CI) {nodeid}: {reason}")
        allowed = "; ".join(f"@pytest.mark.{name}: {why}" for name, why in CI_ALLOWED_SKIPS.items())
        terminalreporter.write_line(f"Install what they need (bash scripts/test.sh does), or, where skipping in CI is "
                                    f"right, mark the test from the allow-list in tests/_ci_skips.py ({allowed}).")


def pytest_configure(config: pytest.Config) -> None:
    if in_ci():
        config.pluginmanager.register(UnexpectedSkips(), "hscr-ci-unexpected-skips")
