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


def test_coupled_positions_move_ranks_by_magnitude():
    """'move': a token the image lowers (here position 2, shift -1) couples by |shift|; the floor applies to |shift|."""
    shift = torch.tensor([0.5, 3.0, -1.0, 3.0, 0.05, 2.0, -0.02])
    assert coupled_positions(shift, 10, coupling="move") == [1, 3, 5, 2, 0, 4, 6]
    assert coupled_positions(shift, 10, coupling="move", min_shift=0.1) == [1, 3, 5, 2, 0]
    assert coupled_positions(shift, 10, coupling="raise") == coupled_positions(shift, 10)
    with pytest.raises(ValueError, match="unknown coupling"):
        coupled_positions(shift, 3, coupling="lower")


def test_contrastive_reward_is_the_vcd_form():
    full, dropped = rows([1.0, 2.0]), rows([3.0, -1.0])
    assert torch.allclose(contrastive_reward(full, dropped, 0.9), rows([1.9 - 2.7, 3.8 + 0.9]))
    assert torch.equal(contrastive_reward(full, dropped, 0.0), full)


def test_logprob_shift_from_top_k_logprob_rows_is_exact():
    """Rows holding exact log-probabilities of a few tokens (-inf elsewhere) give the dense logprob shift;
    raw logits of the same tokens, renormalised over them, do not (the mass outside is unknown)."""
    generator = torch.Generator().manual_seed(3)
    full, dropped = torch.randn(6, 40, generator=generator) * 3, torch.randn(6, 40, generator=generator) * 3
    response = torch.randint(0, 40, (6,), generator=generator)
    exact = token_shift(full, dropped, response, "logprob")

    def top_k(rows: torch.Tensor, k: int = 4) -> torch.Tensor:
        keep = torch.zeros_like(rows, dtype=torch.bool)
        keep.scatter_(-1, rows.topk(k, -1).indices, True)
        keep.scatter_(-1, response.unsqueeze(-1), True)
        return rows.masked_fill(~keep, float("-inf"))

    from_logprobs = token_shift(top_k(full.log_softmax(-1)), top_k(dropped.log_softmax(-1)), response, "logprob",
                                values="logprobs")
    torch.testing.assert_close(from_logprobs, exact)
    renormalised = token_shift(top_k(full), top_k(dropped), response, "logprob")
    assert (renormalised - exact).abs().max() > 0.1
    with pytest.raises(ValueError, match="raw logits"):
        token_shift(full.log_softmax(-1), dropped.log_softmax(-1), response, "logit", values="logprobs")
