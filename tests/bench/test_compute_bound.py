"""``bench/compute_bound.py --tiny``: the compute-bound benchmark runs on both backends and reports every figure, and
its token counts are the ones the backends computed (issue #18)."""

import json
import math

import compute_bound
import pytest
import torch

MAX_NEW_TOKENS = 6
RATIOS = ("hscr_over_plain", "generated_tokens_ratio", "prefill_tokens_ratio", "hscr_over_floor", "peak_memory_ratio")


def _run(tmp_path, *options: str) -> dict:
    out = tmp_path / "compute_bound.json"
    assert compute_bound.main(["--tiny", "--batch-sizes", "1", "2", "--min-rows", "2", "--max-new-tokens",
                               str(MAX_NEW_TOKENS), "--question-words", "8", "--out", str(out), *options]) == 0
    return json.loads(out.read_text())


def _check(results: list[dict]) -> None:
    assert [r["batch_size"] for r in results] == [1, 2]
    for r in results:
        for key in RATIOS:
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        # ignore_eos: plain decodes exactly max_new_tokens per row; the one-token decodes one
        assert r["plain"]["decoded_tokens"] == r["rows"] * MAX_NEW_TOKENS
        assert r["prefill_only"]["decoded_tokens"] == r["rows"]
        # the same prompts and images either way
        assert r["prefill_only"]["prefill_tokens"] == r["plain"]["prefill_tokens"] > 0
        assert r["hscr"]["decoded_tokens"] > r["plain"]["decoded_tokens"]  # the own answer and at least one level
        assert r["hscr"]["mean_levels_per_row"] > 0
        assert 0 <= r["hscr"]["prefix_hit_rate"] <= 1


def test_transformers_reports_every_figure_and_the_kept_cache(tmp_path):
    report = _run(tmp_path, "--backends", "transformers")
    assert report["parameters"] > 0 and report["visual_tokens"] == 16 and report["params"]["min_shift"] == 0.0
    results = report["backends"]["transformers"]["results"]
    _check(results)
    # re-decodes continue the own answer's KV cache: their prompts and images are not prefilled again
    assert all(r["hscr"]["cached_tokens"] > 0 for r in results)


def test_no_savings_decodes_every_level_and_prefills_every_redecode(tmp_path):
    saving = _run(tmp_path, "--backends", "transformers")["backends"]["transformers"]["results"]
    before = _run(tmp_path, "--backends", "transformers", "--no-savings")["backends"]["transformers"]["results"]
    _check(before)
    for now, then in zip(saving, before, strict=True):
        assert then["hscr"]["cached_tokens"] == 0
        assert now["prefill_tokens_ratio"] < then["prefill_tokens_ratio"]
        assert now["generated_tokens_ratio"] <= then["generated_tokens_ratio"]


@pytest.mark.vllm
def test_vllm_reports_every_figure(tmp_path):
    pytest.importorskip("vllm")
    report = _run(tmp_path, "--backends", "vllm")
    assert "skipped" not in report["backends"]["vllm"], report["backends"]["vllm"]
    _check(report["backends"]["vllm"]["results"])


def test_configuration_is_the_issues():
    """130 M parameters, 256 image tokens (built on the meta device: no memory)."""
    config = compute_bound.compute_bound_config()
    with torch.device("meta"):
        model = compute_bound.LlavaForConditionalGeneration._from_config(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 130
    assert config.image_seq_length == 256


def test_stream_runs_hscr_as_the_worker_does_and_shared_levels_decode_less(tmp_path):
    """``--stream``: HSCR through ``run_hscr_stream`` over the chunks; levels in rounds of one, each continuing the
    levels before it, never decode more than every level in one call (and the same items get their levels)."""
    one_call = _run(tmp_path, "--backends", "transformers", "--stream", "--candidates-per-round", "0")
    shared = _run(tmp_path, "--backends", "transformers", "--stream", "--stream-chain", "--candidates-per-round", "1")
    assert one_call["stream"] is shared["stream"] is True
    _check(shared["backends"]["transformers"]["results"])
    for now, then in zip(shared["backends"]["transformers"]["results"],
                         one_call["backends"]["transformers"]["results"], strict=True):
        assert now["hscr"]["decoded_tokens"] <= then["hscr"]["decoded_tokens"]
        assert now["hscr"]["mean_levels_per_row"] == then["hscr"]["mean_levels_per_row"]
        # batch by batch, side by side: the chained stream (--stream-chain) decodes the same tokens (each request is
        # run_hscr's)
        assert now["hscr_by_batch"]["decoded_tokens"] == now["hscr"]["decoded_tokens"]
        assert now["hscr_by_batch_over_plain"] > 0 and now["hscr_over_hscr_by_batch"] > 0
