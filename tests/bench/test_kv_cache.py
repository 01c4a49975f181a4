"""``bench/kv_cache.py --tiny``: the two cache layers decode the same tokens and both are timed."""

import json
import math

import kv_cache


def test_kv_cache_bench_times_both_layers_on_the_same_tokens(tmp_path):
    out = tmp_path / "kv_cache.json"
    assert kv_cache.main(["--tiny", "--batch-sizes", "1", "2", "--max-new-tokens", "6", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["tiny"] and [r["batch_size"] for r in report["results"]] == [1, 2]
    for result in report["results"]:  # main raises where the layers' tokens differ
        assert set(result["decode_ms_per_step"]) == {"growing", "dynamic"}
        # a tiny model's decode is a difference of two short timings: its sign is noise, so no timing is asserted
        assert all(len(ms) == 2 and all(map(math.isfinite, ms)) for ms in result["decode_ms_per_step"].values())
        assert math.isfinite(result["growing_over_dynamic"])
