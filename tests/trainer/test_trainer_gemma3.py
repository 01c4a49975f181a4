"""The trainer on a Gemma 3 model (MedGemma's architecture; the bundled ``fixture-gemma3``): the collator passes
``token_type_ids``, log-probs are the worker's, LoRA on the language model only, the frozen SigLIP tower,
``hscr train --model fixture-gemma3``, TRL's DPOTrainer on the same ``pairs`` and the evaluations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hscr_trainer import HSCRConfig, HSCRTrainer
from hscr_trainer.data import PreferenceStream
from hscr_trainer.hscr_trainer import sequence_logps

DATA = Path(__file__).parent / "data"
GEMMA_FIXTURE = "fixture-gemma3"


@pytest.fixture(scope="module")
def gemma_model() -> Path:
    from hscr_worker.fixture import resolve_model

    return Path(resolve_model(GEMMA_FIXTURE))


@pytest.fixture(scope="module")
def gemma_dataset(gemma_model, tmp_path_factory) -> Path:
    """An HSCR dataset (``ranked`` + ``pairs``) from ``hscr generate`` with the Gemma fixture on 8 items."""
    from hscr_client import HSCRParams
    from hscr_worker.fixture.items import write_items
    from hscr_worker.generate import generate_dataset, load_backend

    root = tmp_path_factory.mktemp("gemma3-data")
    write_items(8, 2025, root / "items.jsonl", root / "images")
    generate_dataset(load_backend("transformers", str(gemma_model)), str(root / "items.jsonl"), str(root / "out"),
                     HSCRParams(), chunk_size=4)
    return root / "out"


def config(tmp_path, **options) -> HSCRConfig:
    options = {"max_steps": 2, "per_device_train_batch_size": 2, **options}
    return HSCRConfig(output_dir=str(tmp_path), logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True,
                      **options)


def items(dataset, n: int = 2) -> list[dict]:
    return list(PreferenceStream(str(dataset), seed=0))[:n]


def test_collator_passes_token_types_and_gemma_turns(gemma_model, gemma_dataset, tmp_path):
    trainer = HSCRTrainer(str(gemma_model), config(tmp_path), str(gemma_dataset))
    assert (trainer.family.family, trainer.family.name) == ("gemma3", "gemma3")
    batch_items = items(gemma_dataset)
    batch = trainer.data_collator(batch_items)
    n = sum(len(i["responses"]) for i in batch_items)
    processor, soft = trainer.processing_class, trainer.model.config.image_token_id
    # The processor's prompt: Gemma's turns, <start_of_image> expanded to the soft tokens, one <bos>.
    question = batch_items[0]["prompt"][0]["content"][1]["text"]
    prompt = trainer.data_collator.prompt_text(batch_items[0]["prompt"])
    assert prompt.startswith("<bos><start_of_turn>user\n<start_of_image>") and "<image>" not in prompt
    first = batch["input_ids"][0].tolist()
    assert first.count(processor.tokenizer.bos_token_id) == 1
    backends = trainer.family.prompt_ids(processor, question, soft)  # the prompt hscr generate used ...
    at = backends.index(soft)
    expanded = backends[:at] + [soft] * 64 + backends[at + 1:]  # ... its placeholder expanded to the soft tokens
    assert first[:len(expanded)] == expanded
    assert batch["pixel_values"].shape == (n, 3, 64, 64)
    assert ((batch["input_ids"] == soft).sum(-1) == 64).all()
    assert torch.equal(batch["token_type_ids"].bool(), batch["input_ids"] == soft)
    # The response ends with Gemma's end of turn.
    last = [ids[mask].tolist()[-2:] for ids, mask in zip(batch["input_ids"], batch["completion_mask"], strict=True)]
    assert all(processor.tokenizer.decode(t) == "<end_of_turn>\n" for t in last)


def test_log_probs_match_the_worker_backend(gemma_model, gemma_dataset, tmp_path):
    """The trainer scores a response as ``hscr generate`` did: same prompt, image and bidirectional image
    attention. Without ``token_type_ids`` the image attends causally and the log-probs move."""
    from hscr_worker.backends.base import ScoreRequest
    from hscr_worker.backends.transformers import TransformersBackend

    trainer = HSCRTrainer(str(gemma_model), config(tmp_path), str(gemma_dataset))
    item = items(gemma_dataset, 1)[0]
    batch = trainer.data_collator([item])
    backend = TransformersBackend(str(gemma_model), device="cpu")
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
        causal, _ = sequence_logps(trainer.model, {**{k: v for k, v in batch.items() if k != "token_type_ids"},
                                                   "completion_mask": mask})
    assert not torch.allclose(causal, got, atol=1e-3)


def test_lora_on_the_language_model_and_a_frozen_siglip_tower(gemma_model, gemma_dataset, tmp_path):
    trainer = HSCRTrainer(str(gemma_model), config(tmp_path / "lora", use_peft=True, learning_rate=1e-2),
                          str(gemma_dataset))
    adapted = {name.removesuffix(".lora_A") for name, module in trainer.model.named_modules()
               if name.endswith(".lora_A")}
    assert {name.rsplit(".", 1)[-1] for name in adapted} == set(trainer.family.lora_targets)
    assert all(".language_model." in name and ".vision_tower." not in name for name in adapted)
    assert len(adapted) == trainer.model.config.get_text_config().num_hidden_layers * len(trainer.family.lora_targets)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(math.isfinite(h["loss"]) for h in logged)

    full = HSCRTrainer(str(gemma_model), config(tmp_path / "full", use_peft=False, learning_rate=1e-3, max_steps=1,
                                                dataset_config="pairs"), str(gemma_dataset))
    parameters = dict(full.model.named_parameters())
    tower = [n for n in parameters if ".vision_tower." in f".{n}"]
    assert tower and not any(parameters[n].requires_grad for n in tower)
    projector = [n for n in parameters if ".multi_modal_projector." in f".{n}"]
    assert projector and all(parameters[n].requires_grad for n in projector)
    before = {n: p.detach().clone() for n, p in parameters.items()}
    full.train()
    assert all(torch.equal(parameters[n], before[n]) for n in tower)
    assert any(not torch.equal(parameters[n], before[n]) for n in parameters if ".language_model." in n)


def test_hscr_train_takes_the_fixture_name(gemma_dataset, tmp_path):
    from transformers import AutoModelForImageTextToText

    from hscr_trainer.train import main

    summary = main(["--model", GEMMA_FIXTURE, "--dataset", str(gemma_dataset), "--output_dir", str(tmp_path),
                    "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "true",
                    "--disable_tqdm", "true", "--save_strategy", "no", "--learning_rate", "1e-2"])
    assert summary["global_step"] == 1
    final = AutoModelForImageTextToText.from_pretrained(summary["final_model"])  # LoRA merged, standalone
    assert final.config.model_type == "gemma3"


def test_evaluations_run_on_the_gemma_fixture(tmp_path):
    from hscr_trainer import medvqa
    from hscr_trainer.evaluation import evaluate_fixture

    result = evaluate_fixture(GEMMA_FIXTURE, n=16, seed=31, batch_size=8)
    assert result["items"] == 16 and result["exact"] >= 0.5  # a trained fixture: it reads its images
    answers = tmp_path / "answers.jsonl"
    result = medvqa.evaluate(GEMMA_FIXTURE, "vqa-rad", DATA / "vqa-rad", predictions_path=answers)
    assert (result["closed_items"], result["open_items"]) == (1, 2) and len(answers.read_text().splitlines()) == 3


def test_trl_dpo_trainer_on_gemma_pairs(gemma_model, gemma_dataset, tmp_path):
    """TRL's DPOTrainer on the pairs the Gemma fixture generated, as they are: its Gemma 3 handling gives the
    model the pixels and the token types of the bidirectional image attention."""
    from datasets import load_dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    pairs = load_dataset("parquet", data_files=str(gemma_dataset / "pairs" / "*.parquet"), split="train")
    model = AutoModelForImageTextToText.from_pretrained(str(gemma_model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen: list[dict] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3,
                     logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs,
                         processing_class=AutoProcessor.from_pretrained(str(gemma_model)))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(math.isfinite(h["loss"]) for h in logged)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    soft = model.config.image_token_id
    assert seen and all({"pixel_values", "token_type_ids"} <= set(kwargs) for kwargs in seen)
    assert all(torch.equal(kwargs["token_type_ids"].bool(), kwargs["input_ids"] == soft) for kwargs in seen)
