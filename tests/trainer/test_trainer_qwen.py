"""The trainer on a Qwen2.5-VL model: the collator, the LoRA targets, the frozen vision encoder,
``hscr train --model fixture-qwen2.5-vl`` and the evaluations (random-weight model from conftest)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hscr_trainer import HSCRConfig, HSCRTrainer
from hscr_trainer.data import PreferenceStream
from hscr_trainer.hscr_trainer import language_model_lora_targets, sequence_logps

DATA = Path(__file__).parent / "data"


def config(tmp_path, **options) -> HSCRConfig:
    options = {"max_steps": 2, "per_device_train_batch_size": 2, **options}
    return HSCRConfig(output_dir=str(tmp_path), logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True,
                      **options)


def items(dataset, n: int = 2) -> list[dict]:
    return list(PreferenceStream(str(dataset), seed=0))[:n]


def test_collator_passes_what_the_qwen_processor_makes(qwen_model, qwen_dataset, tmp_path):
    trainer = HSCRTrainer(str(qwen_model), config(tmp_path), str(qwen_dataset))
    assert (trainer.family.family, trainer.family.name) == ("qwen2-vl", "qwen2.5-vl")
    batch_items = items(qwen_dataset)
    batch = trainer.data_collator(batch_items)
    n = sum(len(i["responses"]) for i in batch_items)
    processor = trainer.processing_class
    # The prompt is the family's (Qwen's ChatML with its vision markers), never LLaVA's "<image>".
    question = batch_items[0]["prompt"][0]["content"][1]["text"]
    prompt = trainer.data_collator.prompt_text(batch_items[0]["prompt"])
    assert prompt == trainer.family.prompt_text(processor, question)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in prompt and "<image>" not in prompt
    # One image per sequence: its patches, its grid, and which tokens are image placeholders.
    grid = batch["image_grid_thw"]
    assert grid.shape == (n, 3) and batch["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    merge = processor.image_processor.merge_size
    image_tokens = (batch["input_ids"] == trainer.model.config.image_token_id).sum(-1)
    assert image_tokens.tolist() == (grid.prod(-1) // merge**2).tolist()
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == trainer.model.config.image_token_id)
    # The response ends with Qwen's end of turn.
    last = [ids[mask].tolist()[-2:] for ids, mask in zip(batch["input_ids"], batch["completion_mask"], strict=True)]
    assert all(processor.tokenizer.decode(t) == "<|im_end|>\n" for t in last)


def test_log_probs_match_the_worker_backend(qwen_model, qwen_dataset, tmp_path):
    """The trainer scores a response as ``hscr generate`` did: same prompt, image and M-RoPE positions.
    Dropping ``mm_token_type_ids`` (text positions for the image) or the image grid breaks this."""
    from hscr_worker.backends.base import ScoreRequest
    from hscr_worker.backends.transformers import TransformersBackend

    trainer = HSCRTrainer(str(qwen_model), config(tmp_path), str(qwen_dataset))
    item = items(qwen_dataset, 1)[0]
    batch = trainer.data_collator([item])
    backend = TransformersBackend(str(qwen_model), device="cpu")
    question = item["prompt"][0]["content"][1]["text"]
    visual = backend.encode_images([item["image"]])[0]
    mask = torch.zeros_like(batch["completion_mask"])
    expected = []
    for row, response in enumerate(item["responses"]):
        ids = backend.encode_text(response)
        logits = backend.score([ScoreRequest(backend.prompt_ids(question), visual, ids)])[0]
        expected.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None]).sum().item())
        start = int(batch["completion_mask"][row].nonzero()[0])  # the response text, without the end of turn
        assert batch["input_ids"][row, start:start + len(ids)].tolist() == ids
        mask[row, start:start + len(ids)] = True
    with torch.no_grad():
        got, _ = sequence_logps(trainer.model.eval(), {**batch, "completion_mask": mask})
    assert got.tolist() == pytest.approx(expected, abs=1e-3)
    with torch.no_grad():
        text_positions, _ = sequence_logps(trainer.model, {**{k: v for k, v in batch.items()
                                                              if k != "mm_token_type_ids"}, "completion_mask": mask})
    assert not torch.allclose(text_positions, got, atol=1e-3)


def test_lora_targets_the_language_model_only(qwen_model, qwen_dataset, tmp_path):
    trainer = HSCRTrainer(str(qwen_model), config(tmp_path, use_peft=True, learning_rate=1e-2), str(qwen_dataset))
    adapted = {name.removesuffix(".lora_A") for name, module in trainer.model.named_modules()
               if name.endswith(".lora_A")}
    assert adapted, "no LoRA adapters"
    assert {name.rsplit(".", 1)[-1] for name in adapted} == set(trainer.family.lora_targets)
    assert all(".language_model." in name and ".visual." not in name for name in adapted)
    layers = trainer.model.config.get_text_config().num_hidden_layers
    assert len(adapted) == layers * len(trainer.family.lora_targets)
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    assert any(not torch.equal(p, trainable[n]) for n, p in trainer.model.named_parameters() if n in trainable)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(math.isfinite(h["loss"]) for h in logged)


def test_lora_target_names_are_checked(qwen_model):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(qwen_model))
    pattern = language_model_lora_targets(model, ["q_proj", "down_proj"])
    import re

    matched = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
    assert matched and all(".language_model." in n for n in matched)  # the vision MLP has a down_proj too
    with pytest.raises(ValueError, match="not linear layers of the language model"):
        language_model_lora_targets(model, ["qkv"])  # the vision tower's attention


def test_full_finetuning_freezes_the_qwen_vision_encoder(qwen_model, qwen_dataset, tmp_path):
    trainer = HSCRTrainer(str(qwen_model), config(tmp_path, use_peft=False, learning_rate=1e-3, max_steps=1,
                                                  dataset_config="pairs"), str(qwen_dataset))
    parameters = dict(trainer.model.named_parameters())
    encoder = [n for n in parameters if ".visual." in f".{n}" and ".merger." not in n]
    assert encoder and not any(parameters[n].requires_grad for n in encoder)
    assert all(p.requires_grad for n, p in parameters.items() if ".merger." in n or ".language_model." in n)
    before = {n: p.detach().clone() for n, p in parameters.items()}
    trainer.train()
    assert all(torch.equal(parameters[n], before[n]) for n in encoder)
    assert any(not torch.equal(parameters[n], before[n]) for n in parameters if ".language_model." in n)


def test_hscr_train_takes_the_fixture_name(qwen_fixture_name, qwen_dataset, tmp_path):
    from transformers import AutoModelForImageTextToText

    from hscr_trainer.train import main

    summary = main(["--model", qwen_fixture_name, "--dataset", str(qwen_dataset), "--output_dir", str(tmp_path),
                    "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "true",
                    "--disable_tqdm", "true", "--save_strategy", "no", "--learning_rate", "1e-2"])
    assert summary["global_step"] == 1
    final = AutoModelForImageTextToText.from_pretrained(summary["final_model"])  # LoRA merged, standalone
    assert final.config.model_type == "qwen2_5_vl"


def test_evaluations_run_on_a_qwen_model(qwen_fixture_name, tmp_path):
    from hscr_trainer import medvqa
    from hscr_trainer.evaluation import evaluate_fixture

    result = evaluate_fixture(qwen_fixture_name, n=2, seed=31, batch_size=2)
    assert result["items"] == 2 and 0.0 <= result["exact"] <= 1.0  # random weights: the numbers mean nothing
    answers = tmp_path / "answers.jsonl"
    result = medvqa.evaluate(qwen_fixture_name, "vqa-rad", DATA / "vqa-rad", predictions_path=answers)
    assert (result["closed_items"], result["open_items"]) == (1, 2) and len(answers.read_text().splitlines()) == 3
