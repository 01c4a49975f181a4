"""The vLLM backend against the transformers reference on held-out fixture items (real CPU engine).

Decisions are compared exactly: greedy token ids, coupled positions, every dispreferred level
(text, replacements, unfired count) and per-item errors, on every item. Scores are compared with
``SCORE_ATOL``: both run float32, but vLLM's CPU kernels (oneDNN GEMMs, paged attention) sum in
another order than PyTorch's, which moves logits of magnitude ~10 by ~1e-5 (measured max 2e-5);
1e-4 leaves headroom for that and is still far below any decision margin these tests exercise.
"""

from __future__ import annotations

import pytest
import torch

from hscr_client import HSCRParams
from hscr_worker.backends.base import GenerateRequest, ScoreRequest
from hscr_worker.core.dropout import keep_masks, mask_generator
from hscr_worker.pipeline import run_hscr
from hscr_worker.similarity import get_similarity

pytestmark = pytest.mark.vllm

QWEN_FIXTURE = "fixture-qwen2.5-vl"
SCORE_ATOL = 1e-4
FLOAT_ATOL = 1e-3  # rewards and shifts recorded in the results: differences of SCORE_ATOL-sized logits


@pytest.fixture(scope="module")
def encoded(vllm_backend, hf_backend, heldout_items):
    images = [it.image for it in heldout_items]
    visual = hf_backend.encode_images(images)
    prompts = [hf_backend.prompt_ids(it.question) for it in heldout_items]
    return prompts, visual


def test_prompts_and_visual_tokens_match(vllm_backend, hf_backend, heldout_items, encoded):
    prompts, visual = encoded
    assert [vllm_backend.prompt_ids(it.question) for it in heldout_items] == prompts
    mine = vllm_backend.encode_images([it.image for it in heldout_items])
    assert all(torch.equal(a.embeds, b.embeds) for a, b in zip(mine, visual, strict=True))


def test_greedy_answers_are_the_same_token_ids(vllm_backend, hf_backend, encoded):
    prompts, visual = encoded
    requests = [GenerateRequest(p, v, 64) for p, v in zip(prompts, visual, strict=True)]
    from_vllm = vllm_backend.generate(requests)
    assert from_vllm == hf_backend.generate(requests)
    assert all(from_vllm) and vllm_backend.eos_token_id not in sum(from_vllm, [])


def test_scores_match_within_tolerance_full_and_dropped(vllm_backend, hf_backend, heldout_items, encoded):
    prompts, visual = encoded
    answers = hf_backend.generate([GenerateRequest(p, v, 64) for p, v in zip(prompts[:16], visual[:16], strict=True)])
    requests = []
    # 16 items x (full, removed, zeroed): scores are exercised again, on all items, through run_hscr below.
    for it, p, v, a in zip(heldout_items[:16], prompts[:16], visual[:16], answers, strict=True):
        keep = keep_masks(v.n_tokens, 0.7, 1, mask_generator(0, it.custom_id))[0]
        requests += [ScoreRequest(p, v, a), ScoreRequest(p, v.dropped(keep, "remove"), a),
                     ScoreRequest(p, v.dropped(keep, "zero"), a)]
    from_vllm, from_hf = vllm_backend.score(requests), hf_backend.score(requests)
    worst = max(float((a - b).abs().max()) for a, b in zip(from_vllm, from_hf, strict=True))
    assert worst <= SCORE_ATOL, f"largest logit difference {worst:.2e} > {SCORE_ATOL:.0e}"
    assert all(r.shape == (len(q.response_ids), vllm_backend.vocab_size) for r, q in zip(from_vllm, requests,
                                                                                           strict=True))


def _decisions(result) -> tuple:
    levels = [(lv.text, lv.n_replacements, lv.unfired,
               [(r["position"], r["original"], r["replacement"]) for r in lv.replacements]) for lv in result.levels]
    return result.own_answer, result.corrupted, [c["position"] for c in result.coupled], levels, result.error


def _floats(result) -> list[float]:
    return ([c["shift"] for c in result.coupled]
            + [x for lv in result.levels for r in lv.replacements for x in (r["reward"], r["shift"])])


@pytest.fixture(scope="module")
def qwen_backends(vllm_engine):
    """The Qwen2.5-VL fixture on both backends."""
    from hscr_worker.backends.transformers import TransformersBackend

    return vllm_engine(QWEN_FIXTURE), TransformersBackend(QWEN_FIXTURE, device="cpu")


def _family_backends(family: str, request) -> tuple:
    """(vLLM, transformers) backends of the family's bundled fixture."""
    if family == "llava":
        return request.getfixturevalue("vllm_backend"), request.getfixturevalue("hf_backend")
    return request.getfixturevalue("qwen_backends")


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
def test_prompts_and_images_are_what_the_checkpoints_own_processor_makes(family, heldout_items, request):
    """Every other test here runs both backends through the same family code (``prompt_ids``, ``prepare_images``,
    ``encode_images``), so a bug there is invisible to them. The reference here is the checkpoint's own
    processor (``AutoProcessor``: its chat template, tokenizer and image processor) and the HF model's own
    forward and ``generate`` over what it makes (the model merges the image and, for Qwen, places M-RoPE itself).
    Images: held-out items and two non-square ones (Qwen keeps their aspect: an h x w grid, h != w)."""
    from hscr_worker._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import AutoProcessor

    vllm_backend, hf_backend = _family_backends(family, request)
    processor = AutoProcessor.from_pretrained(hf_backend.model_path)
    model = hf_backend.model  # the checkpoint's weights, run through the model's own forward below
    question, picture = heldout_items[3].question, heldout_items[3].image.convert("RGB")
    cases = [(it.question, it.image) for it in heldout_items[:3]]
    cases += [(question, picture.resize((96, 64))), (question, picture.resize((64, 96)))]
    image_token = hf_backend.image_token_id
    for question, image in cases:
        content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        run = [k for k, t in enumerate(ids) if t == image_token]
        assert run == list(range(run[0], run[0] + len(run)))  # one image: one run of placeholders
        prompt = hf_backend.prompt_ids(question)
        assert prompt == ids[:run[0] + 1] + ids[run[-1] + 1:]  # the processor's ids, the run as one placeholder
        for backend in (hf_backend, vllm_backend):
            assert backend.prompt_ids(question) == prompt
        visual = hf_backend.encode_images([image])[0]
        assert visual.n_tokens == len(run)

        # The model's own greedy answer to the processor's input is the backends' answer ...
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=64, do_sample=False)[0, len(ids):].tolist()
        stops = [k for k, t in enumerate(generated) if t in hf_backend.stop_token_ids]
        expected = generated[:stops[0]] if stops else generated
        answers = [b.generate([GenerateRequest(prompt, b.encode_images([image])[0], 64)])[0]
                   for b in (hf_backend, vllm_backend)]
        assert answers == [expected, expected] and expected

        # ... and its logits over the processor's input + that answer are the backends' score rows.
        full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], torch.tensor([expected])], 1)}
        full["attention_mask"] = torch.ones_like(full["input_ids"])
        if "mm_token_type_ids" in inputs:  # Qwen: which positions are image tokens (the answer's are text)
            full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"],
                                                   torch.zeros(1, len(expected), dtype=torch.long)], 1)
        with torch.no_grad():
            logits = model(**full).logits[0, len(ids) - 1:-1]
        for backend in (hf_backend, vllm_backend):
            rows = backend.score([ScoreRequest(prompt, backend.encode_images([image])[0], expected)])[0]
            worst = float((rows - logits).abs().max())
            assert worst <= SCORE_ATOL, f"{backend.name}: largest logit difference {worst:.2e}"


@pytest.mark.parametrize("setting", ["shipped", "paper"])
@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
def test_hscr_decisions_identical_on_every_item(family, setting, heldout_items, request):
    """>= 50 held-out items per family: identical answers, coupled positions, levels and errors."""
    vllm_backend, hf_backend = _family_backends(family, request)
    assert vllm_backend.profile.name == hf_backend.profile.name == ("fixture" if family == "llava" else family)
    params = hf_backend.profile.params() if setting == "shipped" else HSCRParams.paper()  # the family's defaults
    similarity = get_similarity(params.similarity)
    from_vllm = run_hscr(vllm_backend, heldout_items, params, similarity)
    from_hf = run_hscr(hf_backend, heldout_items, params, similarity)
    assert len(from_vllm) == len(heldout_items) >= 50
    mismatched = [a.custom_id for a, b in zip(from_vllm, from_hf, strict=True) if _decisions(a) != _decisions(b)]
    assert not mismatched, f"vLLM and transformers disagree on {len(mismatched)} items: {mismatched[:5]}"
    for a, b in zip(from_vllm, from_hf, strict=True):
        assert _floats(a) == pytest.approx(_floats(b), abs=FLOAT_ATOL)
    # The comparison must cover real levels, not only errors.
    assert sum(len(r.levels) for r in from_vllm) >= 20


def test_ignore_eos_decodes_every_response_to_its_budget(vllm_backend, hf_backend, encoded, monkeypatch):
    """Benchmarks on random weights: both backends decode exactly max_new_tokens, forced re-decodes too."""
    from hscr_worker.core.replace import ForcedDecoder, Replacement

    prompts, visual = encoded
    budget = 24  # the fixture's answers end at EOS well before this
    natural = vllm_backend.generate([GenerateRequest(p, v, budget)
                                     for p, v in zip(prompts[:4], visual[:4], strict=True)])
    assert max(map(len, natural)) < budget
    own = natural[0]
    other = next(t for t in range(vllm_backend.vocab_size) if t != own[0] and t not in vllm_backend.special_token_ids)
    for backend in (vllm_backend, hf_backend):
        monkeypatch.setattr(backend, "ignore_eos", True)
        forced = ForcedDecoder(own, [Replacement(0, own[0], other, 1.0, 1.0)])  # stateful: one per run
        requests = [GenerateRequest(p, v, budget) for p, v in zip(prompts[:4], visual[:4], strict=True)]
        responses = backend.generate([*requests, GenerateRequest(prompts[0], visual[0], budget, forced=forced)])
        assert [len(r) for r in responses] == [budget] * 5, backend.name
        assert responses[4][0] == other and len(forced.fired) == 1  # the replacement fired at step 0
        for response, before in zip(responses, natural, strict=False):  # the same answer up to its old end
            assert response[:len(before)] == before, backend.name


def test_a_forced_request_past_its_budget_never_fires_in_a_longer_batch(hf_backend, encoded):
    """The transformers batch decodes to its longest budget; a shorter request's decoder stops at its own
    budget, as vLLM's max_tokens stops it (there such a plan is refused at admission; in the pipeline a
    replacement that drifts after a divergence can still reach past the budget)."""
    from hscr_worker.core.replace import ForcedDecoder, Replacement

    prompts, visual = encoded
    own = hf_backend.generate([GenerateRequest(prompts[0], visual[0], 64)])[0]
    assert len(own) > 4
    other = next(t for t in range(len(hf_backend.tokenizer)) if t != own[3] and t not in hf_backend.special_token_ids)
    decoder = ForcedDecoder(own, [Replacement(3, own[3], other, 0.0, 1.0)])  # planned beyond a budget of 2
    short = GenerateRequest(prompts[0], visual[0], 2, forced=decoder)
    out = hf_backend.generate([GenerateRequest(prompts[1], visual[1], 64), short])
    assert out[1] == own[:2] and decoder.fired == [] and len(decoder.unfired) == 1
