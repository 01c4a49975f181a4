"""``bench/hscr_overhead.py``: HSCR vs plain greedy on the fixture model, and the baseline check."""

import json
import math

import hscr_overhead
from common import compare_to_baseline


def test_overhead_run_and_baseline_check(tmp_path, capsys):
    out, strict = tmp_path / "overhead.json", tmp_path / "strict.json"
    # a baseline no real run can meet: HSCR at 1 % of plain's time
    strict.write_text(json.dumps({"results": [{"batch_size": 2, "hscr_over_plain_cpu_time": 0.01}]}))
    code = hscr_overhead.main(["--batch-sizes", "1", "2", "--min-rows", "1", "--params", "paper", "--no-warmup",
                               "--out", str(out), "--baseline", str(strict), "--tolerance", "0.5"])
    assert code == 1
    assert "REGRESSION batch 2" in capsys.readouterr().err

    report = json.loads(out.read_text())  # written before the comparison
    assert report["env"]["cpu"] and report["backend"] == "transformers"
    for r in report["results"]:
        for key in ("hscr_over_plain_time", "hscr_over_plain_cpu_time"):
            assert math.isfinite(r[key]) and r[key] > 0
        assert r["plain"]["rows"] == r["hscr"]["rows"] == r["batch_size"]
        assert r["hscr"]["generated_tokens"] > r["plain"]["generated_tokens"] > 0
        assert r["hscr"]["mean_levels_per_row"] > 0
        assert r["plain"]["peak_memory_bytes"] > 0 and r["hscr"]["peak_memory_bytes"] > 0
    # a run compared with itself is within any tolerance
    assert compare_to_baseline(report["results"], report, tolerance=0.0, key="hscr_over_plain_cpu_time") == []
