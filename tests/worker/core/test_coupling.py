import math

import pytest
import torch

from hscr_worker.core.coupling import contrastive_reward, coupled_positions, token_shift


def rows(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_token_shift_logit_and_logprob():
    full = rows([2.0, 0.0, 0.0], [5.0, 5.0, 0.0])
    dropped = rows([1.0, 1.0, 0.0], [4.0, 4.0, -1.0])
    response = torch.tensor([0, 1])
    assert torch.allclose(token_shift(full, dropped, response, "logit"), torch.tensor([1.0, 1.0]))  # raw
    # A uniform offset of all logits (position 1) is no shift in log-prob terms.
    logprob = token_shift(full, dropped, response, "logprob")
    assert logprob[1].abs() < 1e-5
    expected0 = (2 - math.log(math.exp(2) + 2)) - (1 - math.log(2 * math.e + 1))
    assert logprob[0] == pytest.approx(expected0, abs=1e-5)
    with pytest.raises(ValueError):
        token_shift(full, dropped, response, "prob")


def test_coupled_positions_top_n_with_floor_eligibility_and_ties():
    shift = torch.tensor([0.5, 3.0, -1.0, 3.0, 0.05, 2.0])
    assert coupled_positions(shift, 3) == [1, 3, 5]  # ties: earlier position first
    assert coupled_positions(shift, 10, min_shift=0.1) == [1, 3, 5, 0]
    eligible = torch.tensor([True, False, True, True, True, True])
    assert coupled_positions(shift, 2, eligible=eligible) == [3, 5]
    assert coupled_positions(shift, 10) == [1, 3, 5, 0, 4]  # negative shifts never couple


def test_contrastive_reward_is_the_vcd_form():
    full, dropped = rows([1.0, 2.0]), rows([3.0, -1.0])
    assert torch.allclose(contrastive_reward(full, dropped, 0.9), rows([1.9 - 2.7, 3.8 + 0.9]))
    assert torch.equal(contrastive_reward(full, dropped, 0.0), full)
