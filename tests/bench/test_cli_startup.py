"""``bench/cli_startup.py`` runs every command it times and reports a figure for each."""

import json
import math
import sys

import cli_startup
import pytest


def test_one_pass_reports_every_command(tmp_path, capsys):
    out = tmp_path / "cli_startup.json"
    assert cli_startup.main(["--repeats", "1", "--no-warmup", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    names = set(cli_startup.commands("http://127.0.0.1:1"))
    assert set(report["median_seconds"]) == names and len(names) == 6
    for name in names:
        assert len(report["seconds"][name]) == 1
        assert math.isfinite(report["median_seconds"][name]) and report["median_seconds"][name] > 0
    assert report["ratio_to_heavy_import"][cli_startup.HEAVY_LABEL] == 1.0
    printed = capsys.readouterr().out
    assert all(name in printed for name in names)


def test_a_command_that_fails_unexpectedly_stops_the_run():
    """`time_once` refuses a wrong exit status, so a broken command is never timed as a fast one."""
    with pytest.raises(SystemExit, match="exited 3"):
        cli_startup.time_once([sys.executable, "-c", "raise SystemExit(3)"], 0)
