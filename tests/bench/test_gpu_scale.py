"""``bench/gpu_scale.py --tiny``: the GPU-scale script runs end to end on the CPU and reports every figure."""

import json
import math

import gpu_scale

MAX_NEW_TOKENS = 6
FIGURES = ("rows", "seconds", "cpu_seconds", "rows_per_s", "generated_tokens", "tokens_per_s",
           "device_seconds_per_1000_rows", "peak_memory_bytes")


def test_tiny_run_reports_every_figure(tmp_path):
    out = tmp_path / "gpu_scale.json"
    assert gpu_scale.main(["--tiny", "--batch-sizes", "1", "2", "--min-rows", "1", "--max-new-tokens",
                           str(MAX_NEW_TOKENS), "--question-words", "12", "--no-warmup", "--out", str(out)]) == 0
    report = json.loads(out.read_text())

    assert report["env"]["device"] == "cpu" and report["env"]["versions"]["torch"]
    assert report["parameters"] > 0 and report["visual_tokens"] == 16
    assert report["params"]["min_shift"] == 0.0 and report["params"]["n_levels"] == 3
    assert "skipped" in report["backends"]["vllm"]  # no CUDA here
    results = report["backends"]["transformers"]["results"]
    assert [r["batch_size"] for r in results] == [1, 2]
    for r in results:
        rows = r["batch_size"]  # one whole batch each
        assert r["plain"]["rows"] == r["hscr"]["rows"] == rows
        for mode in ("plain", "hscr"):
            for name in FIGURES:
                value = r[mode][name]
                assert math.isfinite(value) and value > 0, (mode, name, value)
        ratio = r["hscr_over_plain_time"]
        assert math.isfinite(ratio) and ratio > 0
        # ignore_eos: random weights still decode exactly max_new_tokens per plain response
        assert r["plain"]["generated_tokens"] == rows * MAX_NEW_TOKENS
        # HSCR re-decodes every level on top of the own answer, so it generates more than plain
        assert r["hscr"]["generated_tokens"] > r["plain"]["generated_tokens"]
        assert r["hscr"]["mean_levels_per_row"] > 0 and r["hscr"]["scored_tokens"] > 0


def test_architecture_is_llava_1_5_7b():
    """The full config has llava-1.5-7b-hf's exact parameter count (built on the meta device: no memory)."""
    import torch

    config = gpu_scale.model_config(tiny=False)
    with torch.device("meta"):
        model = gpu_scale.LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072
    assert config.image_seq_length == 576 and config.vision_config.image_size == 336
