"""The quickstart's two commands show our progress, and the libraries' progress bars ("Loading weights",
"Generating train split") only at HSCR_LOG_LEVEL=debug (issue #16 item 12)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
HSCR = [sys.executable, "-c", "from hscr_client._cli import main; main()"]
LIBRARY_BARS = ("Loading weights", "Generating train split")


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> Path:
    """Three of the bundled example items (absolute image paths): enough for a dataset, quick to generate."""
    path = tmp_path_factory.mktemp("items") / "items.jsonl"
    rows = [json.loads(line) for line in (EXAMPLES / "items.jsonl").read_text().splitlines()[:3]]
    for row in rows:
        row["image"] = str(EXAMPLES / row["image"])
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _quickstart(items: Path, out: Path, log_level: str | None) -> str:
    """What scripts/quickstart.sh runs after the install: generate, then the summary; stdout + stderr."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("HSCR_LOG_LEVEL", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")}
    env["HF_DATASETS_CACHE"] = str(out.parent / "datasets-cache")  # a fresh cache: datasets generates the splits
    if log_level is not None:
        env["HSCR_LOG_LEVEL"] = log_level
    generate = subprocess.run([*HSCR, "generate", "--input", str(items), "--output", str(out)], capture_output=True,
                              text=True, env=env, timeout=600)
    assert generate.returncode == 0, generate.stderr[-3000:]
    summary = subprocess.run([sys.executable, str(ROOT / "scripts" / "quickstart_summary.py"), str(out)],
                             capture_output=True, text=True, env=env, timeout=600)
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert "items: 3 total" in generate.stdout and f"Dataset at {out}" in summary.stdout
    return generate.stdout + generate.stderr + summary.stdout + summary.stderr


def test_quickstart_shows_our_progress_and_not_the_libraries(items, tmp_path):
    output = _quickstart(items, tmp_path / "ds", log_level=None)
    assert "hscr generate: 100%" in output  # ours
    for bar in LIBRARY_BARS:
        assert bar not in output, output[-3000:]


def test_debug_level_shows_the_libraries_bars_too(items, tmp_path):
    """Guards the test above: the bars it looks for are there when asked for."""
    output = _quickstart(items, tmp_path / "ds", log_level="debug")
    assert "hscr generate: 100%" in output
    for bar in LIBRARY_BARS:
        assert bar in output, output[-3000:]
