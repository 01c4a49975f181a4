"""``bench/gpu_scale.py --tiny``: the GPU-scale script runs end to end on whatever device the machine has (the
CPU here, CUDA on a GPU host: the script picks it) and reports every figure."""

import json
import math

import gpu_scale
import pytest
import torch

MAX_NEW_TOKENS = 6
FIGURES = ("rows", "seconds", "cpu_seconds", "rows_per_s", "generated_tokens", "tokens_per_s",
           "device_seconds_per_1000_rows", "peak_memory_bytes")
CUDA_MEMORY = "torch.cuda.max_memory_allocated"


def _tiny_run(tmp_path, *options: str) -> dict:
    out = tmp_path / "gpu_scale.json"
    assert gpu_scale.main(["--tiny", "--batch-sizes", "1", "2", "--min-rows", "1", "--max-new-tokens",
                           str(MAX_NEW_TOKENS), "--question-words", "12", "--no-warmup", "--out", str(out),
                           *options]) == 0
    return json.loads(out.read_text())


def _check_results(results: list[dict], device: str) -> None:
    assert [r["batch_size"] for r in results] == [1, 2]
    for r in results:
        # peak memory: the allocator's on CUDA, the process's resident set on the CPU
        assert (r["peak_memory_source"] == CUDA_MEMORY) == (device == "cuda"), r["peak_memory_source"]
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


@pytest.mark.parametrize(("arch", "profile"), [("llava-1.5-7b", "llava-1.5"), ("qwen2.5-vl-7b", "qwen2.5-vl")])
def test_tiny_run_reports_every_figure(tmp_path, arch, profile):
    """On the device the script picks by default (what a user gets): the transformers backend, every figure."""
    report = _tiny_run(tmp_path, "--arch", arch, "--backends", "transformers")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    assert report["env"]["device"] == device and report["env"]["versions"]["torch"]
    assert (report["env"]["gpu"] is not None) == (device == "cuda")
    assert report["arch"] == arch and report["profile"] == profile
    assert report["parameters"] > 0 and report["visual_tokens"] == 16
    assert report["params"]["min_shift"] == 0.0 and report["params"]["n_levels"] == 3
    assert "skipped" in report["backends"]["vllm"]  # not requested
    _check_results(report["backends"]["transformers"]["results"], device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_tiny_run_on_cuda_measures_both_backends(tmp_path):
    """What only a GPU host runs: the script's default backends there, transformers and vLLM, on CUDA."""
    pytest.importorskip("vllm", reason="vLLM (a CUDA build) is not installed on this GPU host")
    report = _tiny_run(tmp_path)

    assert report["env"]["device"] == "cuda" and report["env"]["gpu"]["name"]
    assert "failed" not in report["backends"]["vllm"] and "skipped" not in report["backends"]["vllm"], \
        report["backends"]["vllm"]
    for backend in ("transformers", "vllm"):
        _check_results(report["backends"][backend]["results"], "cuda")


def test_architecture_is_llava_1_5_7b():
    """The full config has llava-1.5-7b-hf's exact parameter count (built on the meta device: no memory)."""
    config = gpu_scale.model_config(tiny=False)
    with torch.device("meta"):
        model = gpu_scale.LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072
    assert config.image_seq_length == 576 and config.vision_config.image_size == 336


def test_architecture_is_qwen2_5_vl_7b():
    """The full Qwen config has Qwen2.5-VL-7B-Instruct's exact parameter count (meta device), its special
    tokens sit at the published ids, and a 448x448 image takes 256 visual tokens."""
    config = gpu_scale.qwen_config(tiny=False)
    with torch.device("meta"):
        model = gpu_scale.Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 8_292_166_656
    assert (config.image_token_id, config.vision_start_token_id, config.text_config.eos_token_id) == (151655, 151652,
                                                                                                      151645)
    processor = gpu_scale.build_qwen_processor(config, 448)
    item = gpu_scale.synthetic_items(1, config, 50, 0, 448)[0]
    grid = processor.image_processor(images=[item.image], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 32, 32]] and gpu_scale.visual_tokens(config, 448) == 256
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": item.question}]}],
                                         add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text and text.endswith("<|im_start|>assistant\n")
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 151644 and 151655 in ids and len(ids) == 66  # 50 question words + the ChatML frame
