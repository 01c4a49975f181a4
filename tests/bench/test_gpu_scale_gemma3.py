"""``bench/gpu_scale.py --arch gemma3-4b``: MedGemma-4b-it's architecture (Gemma 3 4B) built from its published
numbers, and a tiny run of the same shape end to end on the transformers backend."""

import json

import gpu_scale
import torch

from hscr_worker.families import PROFILES


def test_tiny_gemma3_run_reports_hscr_figures(tmp_path):
    out = tmp_path / "gpu_scale.json"
    assert gpu_scale.main(["--tiny", "--arch", "gemma3-4b", "--batch-sizes", "2", "--min-rows", "1",
                           "--max-new-tokens", "6", "--question-words", "12", "--no-warmup", "--backends",
                           "transformers", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["arch"], report["profile"], report["visual_tokens"]) == ("gemma3-4b", "gemma3", 16)
    [result] = report["backends"]["transformers"]["results"]
    assert result["plain"]["generated_tokens"] == 2 * 6  # ignore_eos: every response to its budget
    assert result["hscr"]["generated_tokens"] > result["plain"]["generated_tokens"]
    assert result["hscr"]["mean_levels_per_row"] > 0 and result["hscr_over_plain_time"] > 0


def test_architecture_is_medgemma_4b():
    """The full config has gemma-3-4b-it's (and medgemma-4b-it's) exact parameter count (meta device), its
    special tokens sit at the published ids, and an 896-px image takes 256 soft tokens."""
    config = gpu_scale.gemma_config(tiny=False)
    with torch.device("meta"):
        model = gpu_scale.Gemma3ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 4_300_079_472
    assert (config.image_token_index, config.boi_token_index, config.eoi_token_index) == (262144, 255999, 256000)
    assert gpu_scale.visual_tokens(config) == 256 and config.vision_config.image_size == 896
    processor = gpu_scale.build_gemma_processor(config)
    item = gpu_scale.synthetic_items(1, config, 50, 0)[0]
    assert processor.image_processor(images=[item.image], return_tensors="pt")["pixel_values"].shape == (1, 3, 896, 896)
    ids = PROFILES["gemma3"].prompt_ids(processor, item.question, config.image_token_index)
    assert ids[:6] == [2, 105, 4, 255999, 262144, 256000]  # <bos><start_of_turn>user <start_of_image>...
    assert ids[-3:] == [106, 105, 5] and len(ids) == 50 + 9  # ...<end_of_turn><start_of_turn>model
