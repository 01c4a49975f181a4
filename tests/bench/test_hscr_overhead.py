"""``bench/hscr_overhead.py``: HSCR vs plain greedy on the fixture model, and the baseline check."""

import json
import math

import hscr_overhead
from common import compare_to_baseline

RATIO = "hscr_over_plain_cpu_time"


def flagged_batches(results: list[dict], scale: float, tolerance: float, sizes=(1, 2)) -> list[str]:
    """The batches ``compare_to_baseline`` flags against a baseline of these results' ratios times ``scale``."""
    ratios = {r["batch_size"]: r[RATIO] for r in results}
    baseline = {"results": [{"batch_size": b, RATIO: ratios[b] * scale} for b in sizes]}
    return [line.split(":")[0] for line in compare_to_baseline(results, baseline, tolerance, key=RATIO)]


def test_overhead_run_and_baseline_check(tmp_path, capsys):
    """Both fixture models by default, a row each in the table; a baseline entry checks its own model."""
    out, strict = tmp_path / "overhead.json", tmp_path / "strict.json"
    # a baseline no real run can meet: HSCR at 1 % of plain's time, for the Qwen fixture only
    strict.write_text(json.dumps({"models": [{"model": "fixture-qwen2.5-vl",
                                              "results": [{"batch_size": 2, "hscr_over_plain_cpu_time": 0.01}]}]}))
    code = hscr_overhead.main(["--batch-sizes", "1", "2", "--min-rows", "1", "--params", "paper", "--no-warmup",
                               "--out", str(out), "--baseline", str(strict), "--tolerance", "0.5"])
    assert code == 1
    captured = capsys.readouterr()
    assert "REGRESSION fixture-qwen2.5-vl: batch 2" in captured.err
    assert "fixture: no baseline" in captured.out  # the LLaVA fixture is not in that baseline
    table = [line for line in captured.out.splitlines() if line.startswith("| fixture")]
    assert [line.split(" | ")[0:3] for line in table] == [
        ["| fixture", "transformers", "1"], ["| fixture", "transformers", "2"],
        ["| fixture-qwen2.5-vl", "transformers", "1"], ["| fixture-qwen2.5-vl", "transformers", "2"]]

    report = json.loads(out.read_text())  # written before the comparison
    assert report["env"]["cpu"]
    assert [(m["model"], m["profile"]) for m in report["models"]] == [("fixture", "fixture"),
                                                                      ("fixture-qwen2.5-vl", "qwen2.5-vl")]
    for entry in report["models"]:
        assert entry["backend"] == "transformers" and entry["parameters"] > 0
        for r in entry["results"]:
            for key in ("hscr_over_plain_time", "hscr_over_plain_cpu_time"):
                assert math.isfinite(r[key]) and r[key] > 0
            assert r["plain"]["rows"] == r["hscr"]["rows"] == r["batch_size"]
            assert r["hscr"]["generated_tokens"] > r["plain"]["generated_tokens"] > 0
            assert r["hscr"]["mean_levels_per_row"] > 0
            assert r["plain"]["peak_memory_bytes"] > 0 and r["hscr"]["peak_memory_bytes"] > 0
        # The check against baselines around this run's own ratios: one 10 % above each passes; one 10 % below
        # is a regression of exactly the batches it lists, which a 20 % tolerance absorbs.
        assert flagged_batches(entry["results"], 1.1, 0.0) == []
        assert flagged_batches(entry["results"], 1 / 1.1, 0.0) == ["batch 1", "batch 2"]
        assert flagged_batches(entry["results"], 1 / 1.1, 0.2) == []
        assert flagged_batches(entry["results"], 1 / 1.1, 0.0, sizes=(2,)) == ["batch 2"]

def test_one_model_baseline_of_the_format_before_models(tmp_path, capsys):
    """The committed baseline (one model's JSON, no ``models``) still checks the model it names."""
    from hscr_worker.fixture import resolve_model

    baseline = tmp_path / "old.json"
    baseline.write_text(json.dumps({"model": resolve_model("fixture"),
                                    "results": [{"batch_size": 1, "hscr_over_plain_cpu_time": 0.01}]}))
    code = hscr_overhead.main(["--model", "fixture", "--batch-sizes", "1", "--min-rows", "1", "--params", "paper",
                               "--no-warmup", "--baseline", str(baseline)])
    assert code == 1
    assert "REGRESSION fixture: batch 1" in capsys.readouterr().err
