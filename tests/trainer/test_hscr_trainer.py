"""Train the real fixture model for a few steps with every loss type, LoRA and the pairs config."""

from __future__ import annotations

import math

import pytest
import torch

from hscr_trainer import HSCRConfig, HSCRTrainer
from hscr_trainer.data import PreferenceStream
from hscr_worker.generate import DEFAULT_MODEL as FIXTURE_MODEL

CASES = {
    "explicit": {"loss_type": "explicit"},
    "implicit": {"loss_type": "implicit"},
    "explicit+implicit": {"loss_type": "hscr"},
    "hscr+nll": {"loss_type": "hscr", "nll_weight": 0.5},
    "hscr+dpop": {"loss_type": "hscr", "dpop_lambda": 50.0},
    "mdpo": {"loss_type": "mdpo"},  # explicit + anchor + image-conditional (the image dropped at the projector)
    "sft": {"loss_type": "sft"},
    "pairs-config": {"loss_type": "hscr", "dataset_config": "pairs"},
    "lora": {"loss_type": "hscr", "use_peft": True, "learning_rate": 1e-2},
    "grad-accumulation": {"loss_type": "hscr", "gradient_accumulation_steps": 2},
    "bf16": {"loss_type": "hscr", "bf16": True},  # the GPU setting; CPU autocast runs the same code path
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_moves_parameters(case, hscr_dataset, tmp_path):
    options = {"use_peft": False, "learning_rate": 1e-3, **CASES[case]}
    # One batch holds the whole small dataset, so every step has implicit pairs (items with >= 2 levels).
    every_item = len(PreferenceStream(str(hscr_dataset)))
    config = HSCRConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=every_item, logging_steps=1,
                        save_strategy="no", use_cpu=True, disable_tqdm=True, **options)
    trainer = HSCRTrainer(FIXTURE_MODEL, config, str(hscr_dataset))
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert changed, "no trainable parameter changed"
    if options["use_peft"]:  # adapters on the family's targets, in the language model only
        assert all("lora_" in n and ".language_model." in n for n in trainable)
        assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == set(trainer.family.lora_targets)
    else:
        assert not any("vision_tower" in n for n in trainable)  # frozen by default
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(math.isfinite(h["loss"]) for h in logged)
    for term in config.loss_type:
        assert f"loss/{term}" in logged[-1]
    if "explicit" in config.loss_type:
        # Step 1 scores the reference itself: every margin is 0 and no pair is won (margin > 0). One update
        # of a loss with the explicit term later, the preferred answer leads in nearly all of its pairs.
        assert logged[0]["margins/explicit"] == logged[0]["accuracies/explicit"] == 0.0
        assert logged[-1]["margins/explicit"] > 0.1 and logged[-1]["accuracies/explicit"] >= 0.9


def test_dropped_image_changes_only_the_visual_tokens_and_is_the_same_for_both_models(hscr_dataset, tmp_path):
    """mDPO's conditional term sees the item's image with 95 % of its visual tokens zeroed at the projector's
    output; the kept tokens are unchanged, and one sequence key gives one mask on the policy and the reference."""
    from hscr_trainer.hscr_trainer import dropped_image

    config = HSCRConfig(output_dir=str(tmp_path), use_peft=False, loss_type="mdpo", use_cpu=True, max_steps=1)
    trainer = HSCRTrainer(FIXTURE_MODEL, config, str(hscr_dataset))
    batch = next(iter(torch.utils.data.DataLoader(trainer.train_dataset, batch_size=2,
                                                  collate_fn=trainer.data_collator)))
    pixels = batch["pixel_values"][:2]

    def features(model) -> torch.Tensor:
        with torch.no_grad():
            out = model.model.get_image_features(pixel_values=pixels)
        out = getattr(out, "pooler_output", out)
        return torch.stack(list(out)) if isinstance(out, list | tuple) else out

    full = features(trainer.model)
    with dropped_image(trainer.model, trainer.family, 0.95, ["a", "b"]):
        policy = features(trainer.model)
    with dropped_image(trainer.ref_model, trainer.family, 0.95, ["a", "b"]):
        reference = features(trainer.ref_model)
    kept = policy.abs().sum(-1) != 0
    assert kept.shape == full.shape[:2]
    assert int(kept[0].sum()) == full.shape[1] - round(0.95 * full.shape[1])  # the worker's keep_masks
    assert torch.allclose(policy[kept], full[kept])
    assert not torch.equal(kept[0], kept[1])  # one mask per key
    assert torch.equal(reference.abs().sum(-1) != 0, kept)
    assert torch.equal(features(trainer.model), full)  # the hook is gone after the context


def test_both_configs_read_the_same_items(hscr_dataset):
    ranked = {i["custom_id"]: i["responses"] for i in PreferenceStream(str(hscr_dataset), "ranked")}
    pairs = {i["custom_id"]: i["responses"] for i in PreferenceStream(str(hscr_dataset), "pairs")}
    assert ranked == pairs and len(ranked) == len(PreferenceStream(str(hscr_dataset), "pairs"))
    assert any(len(r) > 2 for r in ranked.values())  # multi-level items exist


def test_stream_order_is_a_function_of_seed_and_epoch(hscr_dataset):
    stream = PreferenceStream(str(hscr_dataset), seed=3, shuffle_buffer=5)
    first = [i["custom_id"] for i in stream]
    assert first == [i["custom_id"] for i in stream]
    stream.set_epoch(1)
    second = [i["custom_id"] for i in stream]
    assert second != first and sorted(second) == sorted(first) and len(first) == len(stream)


def test_streams_from_s3(hscr_dataset, s3_endpoint):
    from hscr_client.storage import open_location

    local, remote = open_location(str(hscr_dataset)), open_location(f"{s3_endpoint}/datasets/job-1")
    for config in ("ranked", "pairs"):
        for path in local.list(config):
            remote.write_bytes(path, local.read_bytes(path))
    from_s3 = list(PreferenceStream(remote.uri, seed=0))
    from_dir = list(PreferenceStream(str(hscr_dataset), seed=0))
    assert [i["responses"] for i in from_s3] == [i["responses"] for i in from_dir]
    assert from_s3[0]["image"].tobytes() == from_dir[0]["image"].tobytes()


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ranked shards"):
        PreferenceStream(str(tmp_path))


def test_precomputed_reference_equals_on_the_fly(hscr_dataset, tmp_path):
    """--precompute_ref_log_probs changes when the reference is scored, not the loss."""
    first_losses = []
    for precompute in (False, True):
        config = HSCRConfig(output_dir=str(tmp_path / str(precompute)), max_steps=1, per_device_train_batch_size=4,
                            logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True, use_peft=False,
                            learning_rate=1e-3, precompute_ref_log_probs=precompute, seed=11)
        trainer = HSCRTrainer(FIXTURE_MODEL, config, str(hscr_dataset))
        trainer.train()
        assert (trainer.ref_logps is not None) == precompute
        first_losses.append(next(h["loss"] for h in trainer.state.log_history if "loss" in h))
    assert first_losses[0] == pytest.approx(first_losses[1], abs=1e-5)
