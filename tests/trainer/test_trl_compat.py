"""TRL's DPOTrainer trains on the `pairs` output of `hscr generate` with zero conversion code."""

from __future__ import annotations

import math

import torch
from datasets import load_dataset
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import DPOConfig, DPOTrainer

from hscr_worker.generate import DEFAULT_MODEL


def test_trl_dpo_trainer_on_pairs(hscr_dataset, tmp_path):
    pairs = load_dataset("parquet", data_files=str(hscr_dataset / "pairs" / "*.parquet"), split="train")
    model = AutoModelForImageTextToText.from_pretrained(DEFAULT_MODEL)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                     logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs,
                         processing_class=AutoProcessor.from_pretrained(DEFAULT_MODEL))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(math.isfinite(h["loss"]) for h in logged)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert logged[0]["logps/chosen"] > logged[0]["logps/rejected"]
    # TRL sees each pair's own image: its evaluation of the same pairs (one per item), each given another
    # item's image (prompts and answers unchanged), finds the chosen answers far less likely.
    first_of_item = {}
    for index, custom_id in enumerate(pairs["custom_id"]):
        first_of_item.setdefault(custom_id, index)
    rows = pairs.select(sorted(first_of_item.values())[:8])
    images = rows["images"]
    swapped = rows.map(lambda row, k: {"images": images[(k + 1) % len(images)]}, with_indices=True)
    matched, mismatched = trainer.evaluate(eval_dataset=rows), trainer.evaluate(eval_dataset=swapped)
    assert matched["eval_logps/chosen"] > mismatched["eval_logps/chosen"] + 5.0, (matched, mismatched)


def test_trl_dpo_trainer_on_qwen_pairs(qwen_model, qwen_dataset, tmp_path):
    """The same on the pairs a Qwen2.5-VL model generated: TRL's own Qwen handling takes them as they are."""
    pairs = load_dataset("parquet", data_files=str(qwen_dataset / "pairs" / "*.parquet"), split="train")
    model = AutoModelForImageTextToText.from_pretrained(str(qwen_model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen: list[set[str]] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3,
                     logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs,
                         processing_class=AutoProcessor.from_pretrained(str(qwen_model)))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(math.isfinite(h["loss"]) for h in logged)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    # The model saw the image as Qwen needs it: patches, their grid, and the placeholder map for M-RoPE.
    assert seen and all({"pixel_values", "image_grid_thw", "mm_token_type_ids"} <= keys for keys in seen)
