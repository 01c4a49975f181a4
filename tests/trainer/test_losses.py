"""The loss terms as pure functions, against hand-computed values (no model)."""

import math

import pytest
import torch

from hscr_trainer.hscr_config import HSCRConfig
from hscr_trainer.losses import LOSSES, VARIANTS, explicit_loss, implicit_loss, nll_loss, pair_statistics


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


def test_single_level_explicit_equals_trl_sigmoid_dpo():
    chosen, rejected = torch.tensor([0.3, -0.2]), torch.tensor([-0.7, 0.4])
    trl_dpo = -torch.nn.functional.logsigmoid(GAMMA * (chosen - rejected))
    got = explicit_loss(torch.stack([chosen, rejected], 1), torch.ones(2, 2, dtype=torch.bool), GAMMA)
    assert torch.allclose(got, trl_dpo)


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
    assert HSCRConfig(output_dir=str(tmp_path), loss_type="hscr").loss_type == ["explicit", "implicit"]
    assert HSCRConfig(output_dir=str(tmp_path), loss_type="dpo").loss_type == ["explicit"]
    config = HSCRConfig(output_dir=str(tmp_path), loss_type="implicit", nll_weight=0.5)
    assert (config.loss_type, config.loss_weights) == (["implicit", "nll"], [1.0, 0.5])
    for bad in ({"loss_type": "ipo"}, {"loss_weights": [1.0]}, {"gamma": 0.0}, {"dataset_config": "x"},
                {"loss_type": "nll"}):
        with pytest.raises(ValueError):
            HSCRConfig(output_dir=str(tmp_path), **bad)
    assert set(VARIANTS) == {"dpo", "explicit", "implicit", "hscr"} and set(LOSSES) >= {"explicit", "implicit"}
