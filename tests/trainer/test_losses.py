"""The loss terms as pure functions, against hand-computed values, and the explicit term against TRL's DPO loss."""

import math

import pytest
import torch

from hscr_trainer.hscr_config import HSCRConfig
from hscr_trainer.losses import (
    LOSSES,
    VARIANTS,
    anchor_loss,
    explicit_loss,
    image_conditional_loss,
    implicit_loss,
    nll_loss,
    pair_statistics,
)


def softplus(x: float) -> float:  # -log sigmoid(x) = log(1 + e^-x)
    return math.log1p(math.exp(-x))


LOGRATIOS = torch.tensor([[0.5, -1.0, -2.0, -4.0],   # three levels
                          [1.0, 3.0, 0.0, 0.0]])     # one level (columns 2, 3 are padding)
LEVEL_MASK = torch.tensor([[True, True, True, True], [True, True, False, False]])
GAMMA = 0.1


def test_explicit_is_preferred_vs_each_level():
    expected_0 = sum(softplus(GAMMA * (0.5 - lj)) for lj in (-1.0, -2.0, -4.0))
    expected_1 = softplus(GAMMA * (1.0 - 3.0))
    got = explicit_loss(LOGRATIOS, LEVEL_MASK, GAMMA)
    assert got.tolist() == pytest.approx([expected_0, expected_1], rel=1e-6)


def test_implicit_is_milder_level_vs_worse_level():
    pairs = [(-1.0, -2.0), (-1.0, -4.0), (-2.0, -4.0)]  # j < m
    expected_0 = sum(softplus(GAMMA * (a - b)) for a, b in pairs)
    got = implicit_loss(LOGRATIOS, LEVEL_MASK, GAMMA)
    assert got.tolist() == pytest.approx([expected_0, 0.0], rel=1e-6)  # one level: no implicit pair


def test_explicit_loss_is_trls_sigmoid_dpo_loss_over_the_explicit_pairs(hscr_dataset, tmp_path):
    """Against TRL's own loss code: ``DPOTrainer`` (sigmoid loss) evaluates each explicit pair of one item of a
    real HSCR dataset (``pairs`` config) and reports its loss and both rewards, beta * log-ratio. The explicit
    term over the item's log-ratios [preferred, level 1, level 2, ...] is the sum of TRL's pair losses, and
    with a single level TRL's loss itself (gamma is TRL's beta)."""
    from datasets import load_dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    from hscr_worker.generate import DEFAULT_MODEL

    pairs = load_dataset("parquet", data_files=str(hscr_dataset / "pairs" / "*.parquet"), split="train")
    explicit_rows: dict[str, list[int]] = {}
    for index, (custom_id, kind) in enumerate(zip(pairs["custom_id"], pairs["pair_type"], strict=True)):
        if kind == "explicit":
            explicit_rows.setdefault(custom_id, []).append(index)
    rows = next(found for found in explicit_rows.values() if len(found) >= 2)  # an item with several levels
    # A policy that is not the reference (its output layer scaled), so that no log-ratio is 0.
    reference = AutoModelForImageTextToText.from_pretrained(DEFAULT_MODEL)
    policy = AutoModelForImageTextToText.from_pretrained(DEFAULT_MODEL)
    with torch.no_grad():
        policy.lm_head.weight.mul_(1.3)
    beta = 0.3
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=["sigmoid"], per_device_eval_batch_size=1,
                     report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=pairs,
                         processing_class=AutoProcessor.from_pretrained(DEFAULT_MODEL))
    trl = [trainer.evaluate(eval_dataset=pairs.select([row])) for row in rows]
    preferred = [m["eval_rewards/chosen"] / beta for m in trl]
    levels = [m["eval_rewards/rejected"] / beta for m in trl]
    assert preferred == pytest.approx([preferred[0]] * len(rows), abs=1e-4)  # one preferred answer, every pair
    assert all(abs(x) > 0.01 for x in [preferred[0], *levels])

    logratios = torch.tensor([[preferred[0], *levels]])
    summed = explicit_loss(logratios, torch.ones_like(logratios, dtype=torch.bool), beta)
    assert summed.item() == pytest.approx(sum(m["eval_loss"] for m in trl), rel=1e-5)
    single = explicit_loss(logratios[:, :2], torch.ones(1, 2, dtype=torch.bool), beta)
    assert single.item() == pytest.approx(trl[0]["eval_loss"], rel=1e-5)


def test_padding_columns_never_contribute():
    noisy = LOGRATIOS.clone()
    noisy[1, 2:] = torch.tensor([100.0, -100.0])
    for loss in (explicit_loss, implicit_loss):
        assert torch.equal(loss(noisy, LEVEL_MASK, GAMMA), loss(LOGRATIOS, LEVEL_MASK, GAMMA))


def test_losses_push_the_right_way():
    """A gradient step on each term raises the preferred (or milder) response's log-ratio."""
    for loss, winner, loser in ((explicit_loss, 0, 1), (implicit_loss, 1, 3)):
        logratios = torch.zeros(1, 4, requires_grad=True)
        loss(logratios, torch.ones(1, 4, dtype=torch.bool), GAMMA).sum().backward()
        assert logratios.grad[0, winner] < 0 < logratios.grad[0, loser]


def test_nll_is_per_token_mean():
    got = nll_loss(LOGRATIOS, LEVEL_MASK, GAMMA, chosen_logps=torch.tensor([-6.0, -2.0]),
                   chosen_lengths=torch.tensor([3, 4]))
    assert got.tolist() == pytest.approx([2.0, 0.5])


def test_statistics_count_only_real_pairs():
    stats = pair_statistics(LOGRATIOS, LEVEL_MASK, GAMMA)
    # explicit margins: item 0: 0.15, 0.25, 0.45; item 1: -0.2 -> 3 of 4 correct
    assert stats["accuracies/explicit"].item() == pytest.approx(0.75)
    assert stats["margins/explicit"].item() == pytest.approx((0.15 + 0.25 + 0.45 - 0.2) / 4)
    assert stats["accuracies/implicit"].item() == pytest.approx(1.0)


def test_config_normalizes_and_checks(tmp_path):
    # The NLL anchor is on by default (weight 1); --nll_weight 0 is the paper's loss.
    default = HSCRConfig(output_dir=str(tmp_path))
    assert (default.loss_type, default.loss_weights) == (["explicit", "implicit", "nll"], [1.0, 1.0, 1.0])
    assert HSCRConfig(output_dir=str(tmp_path), loss_type="hscr", nll_weight=0).loss_type == ["explicit", "implicit"]
    assert HSCRConfig(output_dir=str(tmp_path), loss_type="dpo", nll_weight=0).loss_type == ["explicit"]
    config = HSCRConfig(output_dir=str(tmp_path), loss_type="implicit", nll_weight=0.5)
    assert (config.loss_type, config.loss_weights) == (["implicit", "nll"], [1.0, 0.5])
    for bad in ({"loss_type": "ipo"}, {"loss_weights": [1.0]}, {"gamma": 0.0}, {"dataset_config": "x"},
                {"loss_type": "nll"}):
        with pytest.raises(ValueError):
            HSCRConfig(output_dir=str(tmp_path), **bad)
    assert set(VARIANTS) == {"dpo", "explicit", "implicit", "hscr", "sft", "mdpo"}
    assert set(LOSSES) >= {"explicit", "implicit", "anchor", "image_conditional"}
    # SFT only when asked for by name: the control of the benchmarks, never an accident.
    assert HSCRConfig(output_dir=str(tmp_path), loss_type="sft").loss_type == ["nll"]
    assert HSCRConfig(output_dir=str(tmp_path), loss_type="sft", nll_weight=0).loss_type == ["nll"]
    assert HSCRConfig(output_dir=str(tmp_path), loss_type="mdpo", nll_weight=0).loss_type == \
        ["explicit", "anchor", "image_conditional"]
    for bad in ({"dpop_lambda": -1.0}, {"image_dropout_ratio": 0.0}, {"image_dropout_ratio": 1.5}):
        with pytest.raises(ValueError):
            HSCRConfig(output_dir=str(tmp_path), **bad)


def test_dpop_penalises_only_a_winner_below_its_reference():
    """DPOP (arXiv 2402.13228): margin - lambda * max(0, -log pi/ref (winner)), scaled by gamma."""
    lam = 5.0
    got = explicit_loss(LOGRATIOS, LEVEL_MASK, GAMMA, dpop_lambda=lam)
    # item 0's winner is above its reference (0.5): no penalty; item 1's (1.0) too.
    assert torch.allclose(got, explicit_loss(LOGRATIOS, LEVEL_MASK, GAMMA))
    below = torch.tensor([[-0.5, -1.0, -2.0, -4.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    expected = sum(softplus(GAMMA * (-0.5 - lj) - GAMMA * lam * 0.5) for lj in (-1.0, -2.0, -4.0))
    assert explicit_loss(below, mask, GAMMA, dpop_lambda=lam).item() == pytest.approx(expected, rel=1e-6)
    # Implicit pairs: the milder level is the winner; level 1 at -1.0 pays lambda * 1.0 against levels 2 and 3.
    expected_implicit = (softplus(GAMMA * (-1.0 + 2.0) - GAMMA * lam) + softplus(GAMMA * (-1.0 + 4.0) - GAMMA * lam)
                         + softplus(GAMMA * (-2.0 + 4.0) - GAMMA * lam * 2.0))
    assert implicit_loss(below, mask, GAMMA, dpop_lambda=lam).item() == pytest.approx(expected_implicit, rel=1e-6)


def test_mdpo_terms():
    """mDPO (arXiv 2406.11839): the anchor keeps the preferred reward above 0; the conditional term prefers the
    preferred answer with the real image over the same answer with the image dropped."""
    assert anchor_loss(LOGRATIOS, LEVEL_MASK, GAMMA).tolist() == pytest.approx([softplus(0.05), softplus(0.1)])
    dropped = torch.tensor([2.0, -1.0])
    got = image_conditional_loss(LOGRATIOS, LEVEL_MASK, GAMMA, dropped_logratios=dropped)
    assert got.tolist() == pytest.approx([softplus(GAMMA * (0.5 - 2.0)), softplus(GAMMA * (1.0 + 1.0))])
    logratios = torch.zeros(1, 2, requires_grad=True)
    dropped = torch.zeros(1, requires_grad=True)
    image_conditional_loss(logratios, torch.ones(1, 2, dtype=torch.bool), GAMMA, dropped_logratios=dropped).backward()
    assert logratios.grad[0, 0] < 0 < dropped.grad[0]
