"""Inputs that one item gets wrong fail that item alone, on both backends (never the engine call)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hscr_client import HSCRParams
from hscr_worker.pipeline import run_hscr
from hscr_worker.similarity import lexical

BACKENDS = ["hf_backend", pytest.param("vllm_backend", marks=pytest.mark.vllm)]


def _summary(results):
    return [(r.custom_id, r.error, r.own_answer, [lv.text for lv in r.levels]) for r in results]


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_llava_style_image_marker_in_the_question_is_dropped(backend_name, heldout_items, request):
    """LLaVA-format data writes "<image>\\n" into the question; the profile places the image itself."""
    backend = request.getfixturevalue(backend_name)
    items = heldout_items[:3]
    marked = [replace(items[0], question="<image>\n" + items[0].question),
              replace(items[1], question=items[1].question + " <image>"), items[2]]
    assert backend.prompt_ids(marked[0].question) == backend.prompt_ids(items[0].question)
    assert _summary(run_hscr(backend, marked, HSCRParams(), lexical)) == \
        _summary(run_hscr(backend, items, HSCRParams(), lexical))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_preferred_answer_holding_the_image_token_fails_alone(backend_name, heldout_items, request):
    backend = request.getfixturevalue(backend_name)
    params = HSCRParams(corrupt="preferred")
    items = [replace(it, preferred=it.preferred or "no abnormality is seen") for it in heldout_items[:3]]
    bad = replace(items[1], custom_id="image-in-answer", preferred=items[1].preferred + " <image>")
    alone = run_hscr(backend, [items[0], items[2]], params, lexical)
    mixed = run_hscr(backend, [items[0], bad, items[2]], params, lexical)
    assert "image placeholder" in mixed[1].error and not mixed[1].levels
    assert _summary([mixed[0], mixed[2]]) == _summary(alone)


@pytest.mark.vllm
def test_vllm_context_boundary_is_exact(vllm_backend, heldout_items):
    """A score request is prompt + response + one output token: the last admitted item must still run."""
    params = HSCRParams(max_new_tokens=4, dropout_mode="zero")  # zero: the dropped prompt is as long as the full
    limit = vllm_backend.max_context_tokens
    n_visual = vllm_backend.encode_images([heldout_items[0].image])[0].n_tokens

    def padded(custom_id: str, prompt_tokens: int):
        question = heldout_items[0].question
        while len(vllm_backend.prompt_ids(question)) - 1 + n_visual < prompt_tokens:
            question = "seen " + question
        assert len(vllm_backend.prompt_ids(question)) - 1 + n_visual == prompt_tokens
        return replace(heldout_items[0], custom_id=custom_id, question=question)

    fits = padded("fits", limit - params.max_new_tokens)
    over = padded("over", limit - params.max_new_tokens + 1)
    results = run_hscr(vllm_backend, [fits, over, heldout_items[1]], params, lexical)
    assert results[0].own_answer and "context" not in (results[0].error or "")
    assert f"context of {limit} tokens" in results[1].error
    assert results[2].own_answer
