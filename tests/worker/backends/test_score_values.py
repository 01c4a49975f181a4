"""Top-k score rows as exact log-probabilities (``score_values="logprobs"``, vLLM's ``raw_logprobs``).

A real Med-VLM's 32k vocabulary gets top-k rows (``score_top_k``). Here the fixture model runs in a
second engine with ``score_top_k=5`` of its 62 tokens, so the dense engine's rows are the exact
reference: the logprob shift (the shipped default) and hence the coupled positions must come out
the same as with dense rows. Renormalising raw top-k logits, what the backend did before, does not.
"""

from __future__ import annotations

import pytest
import torch

from hscr_client import HSCRParams
from hscr_worker.backends.base import GenerateRequest, ScoreRequest
from hscr_worker.core.coupling import token_shift
from hscr_worker.core.dropout import keep_masks, mask_generator
from hscr_worker.pipeline import run_hscr
from hscr_worker.similarity import get_similarity

pytestmark = pytest.mark.vllm

TOP_K = 5
N_ITEMS = 16


@pytest.fixture(scope="module")
def top_k_backend(fixture_model, vllm_engine):
    return vllm_engine(fixture_model, score_top_k=TOP_K)


def _top_k_of(rows: torch.Tensor, response: list[int]) -> torch.Tensor:
    """Dense rows cut to what a top-k engine returns: the k best tokens and the response token."""
    keep = torch.zeros_like(rows, dtype=torch.bool)
    keep.scatter_(-1, rows.topk(TOP_K, -1).indices, True)
    keep[torch.arange(len(response)), torch.tensor(response)] = True
    return rows.masked_fill(~keep, float("-inf"))


def test_rows_are_exact_log_probabilities_of_the_top_k(top_k_backend, vllm_backend, heldout_items):
    assert top_k_backend.score_values == "logprobs" and vllm_backend.score_values == "logits"
    items = heldout_items[:N_ITEMS]
    visual = vllm_backend.encode_images([it.image for it in items])
    prompts = [vllm_backend.prompt_ids(it.question) for it in items]
    dense_answers = [GenerateRequest(p, v, 64, return_logits=True) for p, v in zip(prompts, visual, strict=True)]
    top_k_answers = [GenerateRequest(p, v, 64, return_logits=True) for p, v in zip(prompts, visual, strict=True)]
    answers = vllm_backend.generate(dense_answers)
    assert top_k_backend.generate(top_k_answers) == answers
    dropped = [v.dropped(keep_masks(v.n_tokens, 0.95, 1, mask_generator(0, it.custom_id))[0], "remove")
               for it, v in zip(items, visual, strict=True)]
    answered = [i for i, a in enumerate(answers) if a]
    requests = [ScoreRequest(prompts[i], dropped[i], answers[i]) for i in answered]
    dense_dropped, top_k_dropped = vllm_backend.score(requests), top_k_backend.score(requests)

    worst_new = worst_old = 0.0
    for k, (i, request) in enumerate(zip(answered, requests, strict=True)):
        response = torch.tensor(request.response_ids)
        exact = token_shift(dense_answers[i].logits, dense_dropped[k], response, "logprob")
        full_rows, dropped_rows = top_k_answers[i].logits, top_k_dropped[k]
        # Each top-k row: the exact log-probabilities where returned, -inf elsewhere.
        for mine, dense in ((full_rows, dense_answers[i].logits), (dropped_rows, dense_dropped[k])):
            reference = _top_k_of(dense.log_softmax(-1), request.response_ids)
            assert torch.equal(torch.isfinite(mine), torch.isfinite(reference))
            torch.testing.assert_close(mine[torch.isfinite(mine)], reference[torch.isfinite(reference)],
                                       atol=1e-4, rtol=0)
        shift = token_shift(full_rows, dropped_rows, response, "logprob", values="logprobs")
        worst_new = max(worst_new, float((shift - exact).abs().max()))
        renormalised = token_shift(_top_k_of(dense_answers[i].logits, request.response_ids),
                                   _top_k_of(dense_dropped[k], request.response_ids), response, "logprob")
        worst_old = max(worst_old, float((renormalised - exact).abs().max()))
    assert worst_new <= 1e-4, f"top-k logprob rows moved the shift by {worst_new:.2e}"
    assert worst_old > 1e-2  # the renormalised top-k logits this replaces were measurably off


@pytest.mark.parametrize("n_masks", [1, 3])
def test_hscr_finds_the_same_coupled_positions_as_dense_rows(top_k_backend, vllm_backend, heldout_items, n_masks):
    """Shifts averaged over the masks (method.md) agree between log-probability and logit rows."""
    params = HSCRParams(top_k_candidates=TOP_K, n_masks=n_masks)
    similarity = get_similarity(params.similarity)
    items = heldout_items[:N_ITEMS]
    dense, top_k = run_hscr(vllm_backend, items, params, similarity), run_hscr(top_k_backend, items, params,
                                                                                similarity)
    assert [r.own_answer for r in top_k] == [r.own_answer for r in dense]
    assert [[c["position"] for c in r.coupled] for r in top_k] == [[c["position"] for c in r.coupled] for r in dense]
    assert sum(bool(r.levels) for r in top_k) >= N_ITEMS // 2


def test_raw_logit_shift_is_refused_on_log_probability_rows(top_k_backend, heldout_items):
    params = HSCRParams.paper()
    assert params.shift == "logit"
    with pytest.raises(ValueError, match="score-values logits"):
        run_hscr(top_k_backend, heldout_items[:2], params, get_similarity(params.similarity))


def test_more_candidates_than_a_row_holds_is_refused(top_k_backend, vllm_backend, heldout_items):
    params = HSCRParams(top_k_candidates=TOP_K + 1)
    with pytest.raises(ValueError, match=f"score_top_k >= {TOP_K + 1}"):
        run_hscr(top_k_backend, heldout_items[:2], params, get_similarity(params.similarity))
    assert vllm_backend.score_top_k is None  # dense rows hold every candidate
    results = run_hscr(vllm_backend, heldout_items[:2], params, get_similarity(params.similarity))
    assert len(results) == 2 and any(r.levels for r in results)  # the same request runs on dense rows
