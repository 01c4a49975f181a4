"""Ways of running HSCR cheaper that must keep its decisions, on both backends.

- Prefix re-decode: up to a level's first planned replacement a re-decode only reproduces the
  response, so ``run_hscr`` puts that part in the prompt (``GenerateRequest.response_prefix``) and
  the decoder counts steps from the start of the response (``ForcedDecoder.response_prefix``): the
  results are exactly those of a full re-decode (``prefix_redecode=False``), field by field, floats
  included.
- Overlapped stream (``run_hscr_stream``): batch k's re-decode in the same engine call as batch
  k+1's own answers.
- Full-image score rows from the own answer's decode (``GenerateRequest.return_logits``) instead of
  a second, teacher-forced pass (``full_scores_from_decode=False``).
The last two move float rounding (batch composition, decode vs prefill kernels): decisions are
compared exactly, shifts and rewards within 1e-4.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from hscr_client import HSCRParams
from hscr_worker.backends.base import BackendStats, GenerateRequest
from hscr_worker.core.replace import ForcedDecoder, Replacement
from hscr_worker.pipeline import PreparedItem, reproduced_prefix, run_hscr, run_hscr_stream
from hscr_worker.similarity import get_similarity

N_ITEMS = 16  # held-out items per comparison: enough levels (asserted) at a few seconds per run


def _drive(decoder: ForcedDecoder, model, start: list[int], steps: int) -> list[int]:
    """Greedy decode after ``start`` with ``model(prefix) -> token`` and the decoder's forcing."""
    generated: list[int] = []
    for _ in range(steps):
        greedy = model([*start, *generated])
        forced = decoder.next_token(generated, greedy)
        generated.append(greedy if forced is None else forced)
    return generated


def test_decoder_with_a_response_prefix_fires_at_full_response_steps():
    original = [10, 20, 30, 40, 50]
    plan = [Replacement(2, 30, 31, -1.0, 2.0), Replacement(4, 50, 51, -0.5, 1.0)]

    def model(prefix):
        return original[len(prefix)] if len(prefix) < len(original) else 0

    full = ForcedDecoder(original, plan)
    from_start = _drive(full, model, [], 5)
    resumed = ForcedDecoder(original, plan, response_prefix=original[:2])
    continued = _drive(resumed, model, original[:2], 3)
    assert from_start == original[:2] + continued == [10, 20, 31, 40, 51]
    assert resumed.fired == full.fired and [step for step, _ in resumed.fired] == [2, 4]


def test_decoder_does_not_fire_where_the_model_leaves_the_response_after_the_prefix():
    original = [10, 20, 30]
    plan = [Replacement(2, 30, 31, -1.0, 2.0)]
    decoder = ForcedDecoder(original, plan, response_prefix=original[:2])
    assert decoder.next_token([], 99) is None  # the model wants 99, not the original 30: no forcing
    assert decoder.next_token([99], 30) == 31  # diverged: fires where the model next wants 30
    assert decoder.fired == [(3, plan[0])] and not decoder.aligned  # step 3 of the response, not 1


def test_request_and_decoder_must_agree_on_the_prefix():
    decoder = ForcedDecoder([1, 2, 3], [Replacement(2, 3, 4, 0.0, 0.0)], response_prefix=[1, 2])
    with pytest.raises(ValueError, match="response_prefix"):
        GenerateRequest([0], torch.zeros(1, 1), 4, forced=decoder, response_prefix=[1])
    GenerateRequest([0], torch.zeros(1, 1), 4, forced=decoder, response_prefix=[1, 2])


def test_reproduced_prefix_stops_at_the_first_token_greedy_would_not_choose():
    response = [2, 0, 1]
    logits = torch.tensor([[0.0, 0.0, 5.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])  # argmax 2, 0, 2
    assert reproduced_prefix(logits, response) == 2
    assert reproduced_prefix(logits[:2], response[:2]) == 2
    assert reproduced_prefix(logits, [1, 0, 2]) == 0


def _own_answers(backend, items, max_new_tokens=64):
    prompts = [backend.prompt_ids(it.question) for it in items]
    visual = backend.encode_images([it.image for it in items])
    answers = backend.generate([GenerateRequest(p, v, max_new_tokens) for p, v in zip(prompts, visual, strict=True)])
    return prompts, visual, answers


def _continues_the_greedy_answer(backend, items):
    """Greedy from prompt + answer[:k] gives the answer back (prefix included), for several k."""
    prompts, visual, answers = _own_answers(backend, items)
    requests, expected = [], []
    for p, v, a in zip(prompts, visual, answers, strict=True):
        for k in (1, len(a) // 2, len(a) - 1):
            requests.append(GenerateRequest(p, v, 64 - k, response_prefix=a[:k]))
            expected.append(a)
    assert backend.generate(requests) == expected


def _results(result) -> tuple:
    levels = [(lv.level, lv.text, lv.n_replacements, lv.unfired, lv.similarity, lv.replacements)
              for lv in result.levels]
    return (result.own_answer, result.corrupted, result.coupled, levels, result.n_candidates, result.shortfall,
            result.error)


def _decisions(result) -> tuple:
    """Everything but the floats (shifts, rewards): texts, positions, tokens, counts, errors."""
    levels = [(lv.level, lv.text, lv.n_replacements, lv.unfired,
               [(r["position"], r["original"], r["replacement"]) for r in lv.replacements]) for lv in result.levels]
    coupled = [(c["position"], c["token"]) for c in result.coupled]
    return (result.own_answer, result.corrupted, coupled, levels, result.n_candidates, result.shortfall, result.error)


def _floats(result) -> list[float]:
    return ([c["shift"] for c in result.coupled]
            + [x for lv in result.levels for r in lv.replacements for x in (r["reward"], r["shift"])])


def _same_decisions(results, reference, what: str, tolerance: float) -> None:
    differ = [a.custom_id for a, b in zip(results, reference, strict=True) if _decisions(a) != _decisions(b)]
    assert not differ, f"{what} changed the decisions of {len(differ)} items: {differ[:5]}"
    for a, b in zip(results, reference, strict=True):
        assert _floats(a) == pytest.approx(_floats(b), abs=tolerance), a.custom_id


def _same_as_full_redecode(backend, items, params):
    similarity = get_similarity(params.similarity)
    prefix = run_hscr(backend, items, params, similarity)
    full = run_hscr(backend, items, params, similarity, prefix_redecode=False)
    differ = [a.custom_id for a, b in zip(prefix, full, strict=True) if _results(a) != _results(b)]
    assert not differ, f"prefix re-decode changed the results of {len(differ)} items: {differ[:5]}"
    assert sum(len(r.levels) for r in prefix) >= 10  # the comparison covers real levels


# preferred: the teacher-forced response is followed only as far as greedy agrees (reproduced_prefix);
# rounds: one level per item per call, each continuing the earlier levels' decodes (share_decodes)
SETTINGS = {"shipped": HSCRParams(), "preferred": HSCRParams(corrupt="preferred"),
            "rounds": HSCRParams(candidates_per_round=1)}
SHARING = {"rounds": HSCRParams(candidates_per_round=1),
           "preferred rounds": HSCRParams(corrupt="preferred", candidates_per_round=1)}


def _shared_same_as_unshared(backend, items, params):
    """A level that continues an earlier level's decode gives the results of decoding it anew, field by field,
    and decodes fewer tokens."""
    similarity = get_similarity(params.similarity)
    start = backend.stats.decoded_tokens
    unshared = run_hscr(backend, items, params, similarity, share_decodes=False)
    middle = backend.stats.decoded_tokens
    shared = run_hscr(backend, items, params, similarity)
    differ = [a.custom_id for a, b in zip(shared, unshared, strict=True) if _results(a) != _results(b)]
    assert not differ, f"shared decodes changed the results of {len(differ)} items: {differ[:5]}"
    assert sum(len(r.levels) for r in shared) >= 10
    assert backend.stats.decoded_tokens - middle < 0.9 * (middle - start)


def test_transformers_continues_a_response_prefix(hf_backend, heldout_items):
    _continues_the_greedy_answer(hf_backend, heldout_items[:4])


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_transformers_prefix_redecode_gives_the_full_redecode_results(hf_backend, heldout_items, setting):
    _same_as_full_redecode(hf_backend, heldout_items[:N_ITEMS], SETTINGS[setting])


def test_transformers_rows_leave_the_batch_when_they_finish(hf_backend, heldout_items):
    """Re-decodes of unequal length in one batch: each gives what it gives alone, and a finished row stops costing
    steps (the batch shrinks to the rows still decoding)."""
    prompts, visual, answers = _own_answers(hf_backend, heldout_items[:4])

    def requests():  # each continues its own answer after one token, for a different number of steps
        return [GenerateRequest(p, v, budget, response_prefix=a[:1])
                for p, v, a, budget in zip(prompts, visual, answers, (1, 2, 4, 63), strict=True)]

    alone = [hf_backend.generate([r])[0] for r in requests()]
    widths = []
    forward = hf_backend._forward

    def recorded(embeds, *args, **kwargs):
        widths.append(embeds.shape[0])
        return forward(embeds, *args, **kwargs)

    hf_backend._forward = recorded  # instance attribute: shadows the method for this test only
    try:
        together = hf_backend.generate(requests())
    finally:
        del hf_backend._forward
    assert together == alone
    assert widths[0] == 4 and widths[-1] == 1 and sorted(widths, reverse=True) == widths


@pytest.mark.parametrize("setting", sorted(SHARING))
def test_transformers_shared_decodes_give_the_unshared_results(hf_backend, heldout_items, setting):
    _shared_same_as_unshared(hf_backend, heldout_items[:N_ITEMS], SHARING[setting])


def _levels_in_rounds(backend, items, params):
    """``run_hscr`` with the levels in rounds (``chain_redecodes=False``): what a chained run must give."""
    backend.chain_redecodes = False
    try:
        return run_hscr(backend, items, params, get_similarity(params.similarity))
    finally:
        backend.chain_redecodes = True


def test_transformers_chain_drops_the_columns_no_row_attends_to(hf_backend, heldout_items, monkeypatch):
    """A chained decode batch's cache stays near its widest row (followed-up rows mask the keys they do not
    continue, and those columns are dropped), and the results are those of the rounds, which never compact."""
    from hscr_worker.backends import transformers as module

    monkeypatch.setattr(module, "COMPACT_SLACK", 4)  # compact often: every follow-up's discarded keys count
    monkeypatch.setattr(module, "COMPACT_SHARE", 0.0)
    params = HSCRParams(candidates_per_round=1)
    similarity = get_similarity(params.similarity)
    items = heldout_items[:N_ITEMS]
    rounds = _levels_in_rounds(hf_backend, items, params)
    waste, compactions = [], [0]
    forward, compact = hf_backend._forward, hf_backend._compact

    def recorded(embeds, positions, mask, *args, **kwargs):
        if embeds.shape[1] == 1:  # a decode step: how many columns no row attends to
            widest = int(mask.sum(1).max())
            waste.append(mask.shape[1] - widest - module.COMPACT_SLACK)
        return forward(embeds, positions, mask, *args, **kwargs)

    def counted(*args):
        compactions[0] += 1
        return compact(*args)

    hf_backend._forward, hf_backend._compact = recorded, counted  # instance attributes: this test only
    try:
        chained = run_hscr(hf_backend, items, params, similarity)
    finally:
        del hf_backend._forward, hf_backend._compact
    _same_decisions(chained, rounds, "compacting the chained cache", 1e-4)
    assert sum(len(r.levels) for r in chained) >= 10
    assert compactions[0] >= 3
    assert max(waste) <= 1  # at most the step's own new column past the bound before the next compaction


def test_transformers_next_level_decodes_beside_the_level_it_leaves(hf_backend, heldout_items, monkeypatch):
    """With one level per round, an item's next level is requested at the step where it leaves the decode of the
    level before it (``HSCRBatch.successor``), not when that decode ends: the same results in fewer decode steps."""
    from hscr_worker.pipeline import HSCRBatch

    params = HSCRParams(candidates_per_round=1)
    similarity = get_similarity(params.similarity)
    items = heldout_items[:N_ITEMS]
    chained, forward, request_ahead = hf_backend.generate_chained, hf_backend._forward, HSCRBatch._request_ahead
    steps, ahead = [0], [0]

    def counted_steps(embeds, *args, **kwargs):
        steps[0] += embeds.shape[1] == 1
        return forward(embeds, *args, **kwargs)

    def counted_ahead(self, *args):
        ahead[0] += 1
        return request_ahead(self, *args)

    monkeypatch.setattr(HSCRBatch, "_request_ahead", counted_ahead)
    runs = {}
    for mid_decode in (False, True):
        steps[0] = 0
        # instance attributes: shadow the methods for this test only
        hf_backend._forward = counted_steps
        if not mid_decode:
            hf_backend.generate_chained = lambda requests, follow, successor=None: chained(requests, follow)
        try:
            runs[mid_decode] = run_hscr(hf_backend, items, params, similarity), steps[0]
        finally:
            del hf_backend._forward
            if not mid_decode:
                del hf_backend.generate_chained
    (after_end, steps_after_end), (mid, steps_mid) = runs[False], runs[True]
    _same_decisions(mid, after_end, "requesting the next level mid-decode", 1e-4)
    assert sum(len(r.levels) for r in mid) >= 10
    assert ahead[0] >= 10  # levels were requested mid-decode
    assert steps_mid < steps_after_end


@pytest.mark.parametrize("stream", [False, True], ids=["batch", "stream"])
def test_transformers_speculative_levels_fill_spare_rows_and_keep_the_results(hf_backend, heldout_items, monkeypatch,
                                                                                stream):
    """An item's level past ``n_levels`` is requested mid-decode too, speculatively (the reranker may not need it):
    it decodes in a row nothing else wants, is withdrawn where the item turns out done and wanted where it does not,
    and the results are those of waiting for each level, in no more decode steps. (Fewer where a batch's tail waits
    on such levels: ``bench/chain_profile.py``; the fixture's last levels decode alone either way.)"""
    from hscr_worker.pipeline import HSCRBatch

    # two levels: the fixture's items mostly have no more than three plans, so past two is where they are left
    params = HSCRParams(candidates_per_round=1, n_levels=2)
    similarity = get_similarity(params.similarity)
    forward, request_ahead = hf_backend._forward, HSCRBatch._request_ahead
    steps, speculative = [0], []

    def counted_steps(embeds, *args, **kwargs):
        steps[0] += embeds.shape[1] == 1
        return forward(embeds, *args, **kwargs)

    def recorded_ahead(self, *args):
        request = request_ahead(self, *args)
        if request.speculative:
            speculative.append(request)
        return request

    def run(items):
        if not stream:
            return run_hscr(hf_backend, items, params, similarity)
        batches = [(k, items[k:k + 2]) for k in range(0, len(items), 2)]
        return [r for _, results in run_hscr_stream(hf_backend, iter(batches), params, similarity) for r in results]

    monkeypatch.setattr(hf_backend, "speculative_levels", False)
    monkeypatch.setattr(hf_backend, "stream_chain", True)
    # the items whose reranker wanted more candidates than levels: the last of them waited for the one before
    items = [it for it, r in zip(heldout_items, run(heldout_items), strict=True) if r.n_candidates > params.n_levels]
    assert len(items) >= 3
    monkeypatch.setattr(HSCRBatch, "_request_ahead", recorded_ahead)
    runs = {}
    for speculate in (False, True):
        steps[0], withdrawn = 0, hf_backend.stats.withdrawn_tokens
        monkeypatch.setattr(hf_backend, "speculative_levels", speculate)
        hf_backend._forward = counted_steps  # instance attribute: shadows the method for this test only
        try:
            runs[speculate] = run(items), steps[0], hf_backend.stats.withdrawn_tokens - withdrawn
        finally:
            del hf_backend._forward
    (waited, steps_waited, _), (ahead, steps_ahead, wasted) = runs[False], runs[True]
    _same_decisions(ahead, waited, "decoding levels speculatively", 1e-4)
    assert len(speculative) >= len(items)
    # some were not needed: withdrawn after decoding ahead of the level that decided it, and stopped
    assert any(r.withdrawn for r in speculative) and wasted > 0
    assert any(not r.withdrawn and not r.speculative for r in speculative)  # some were: kept
    assert steps_ahead <= steps_waited


def test_transformers_levels_decode_in_the_own_answers_rows(hf_backend, heldout_items):
    """Batch by batch, a batch's levels decode in its own answers' KV cache (``_adopted``), each level in its item's
    own answer's row: every decode step runs on a cache that own answers were decoded into, none on a copy beside it
    (that copy was most of HSCR's peak memory above plain's). The results are the rounds', which copy."""
    params = HSCRParams(candidates_per_round=1)
    similarity = get_similarity(params.similarity)
    items = heldout_items[:N_ITEMS]
    rounds = _levels_in_rounds(hf_backend, items, params)
    forward, keep = hf_backend._forward, hf_backend._keep_for_reuse
    stepped, kept, own_steps = [], [], []

    def recorded(embeds, positions, mask, types=None, cache=None):
        if embeds.shape[1] == 1:
            stepped.append(cache)
        return forward(embeds, positions, mask, types, cache)

    def recorded_keep(requests, inputs, generated, cache, mask):
        kept.append(cache)
        own_steps.append(len(stepped))  # decode steps up to here: own answers'
        return keep(requests, inputs, generated, cache, mask)

    hf_backend._forward, hf_backend._keep_for_reuse = recorded, recorded_keep  # instance attributes: this test only
    try:
        chained = run_hscr(hf_backend, items, params, similarity)
    finally:
        del hf_backend._forward, hf_backend._keep_for_reuse
    _same_decisions(chained, rounds, "decoding the levels in the own answers' rows", 1e-4)
    assert sum(len(r.levels) for r in chained) >= 10
    levels_steps = stepped[own_steps[-1]:]  # the last own-answer batch's levels
    assert len(levels_steps) >= 10
    assert {id(cache) for cache in levels_steps} <= {id(cache) for cache in kept}


def test_transformers_chain_prefills_a_follow_up_that_no_row_holds(hf_backend, heldout_items):
    """A follow-up whose prompt and image no row of the chain holds, and no kept answer, is prefilled alone into a
    free row of the chain: it gets the answer it gets decoded on its own."""
    item = heldout_items[3]
    prompt, visual = hf_backend.prompt_ids(item.question), hf_backend.encode_images([item.image])[0]
    alone = hf_backend.generate([GenerateRequest(prompt, visual, 64)])[0]
    prompts, visuals, answers = _own_answers(hf_backend, heldout_items[:3])  # kept: items 0-2, not item 3
    first = GenerateRequest(prompts[0], visuals[0], 64, response_prefix=answers[0][:2])
    other = GenerateRequest(prompt, visual, 64, response_prefix=alone[:2])
    got, prefill, prefilled = {}, hf_backend._prefilled, []

    def follow(request, ids):
        got[id(request)] = ids
        return [other] if request is first else []

    def counted(request):
        prefilled.append(request)
        return prefill(request)

    hf_backend._prefilled = counted  # instance attribute: this test only
    try:
        hf_backend.generate_chained([first], follow)
    finally:
        del hf_backend._prefilled
    assert prefilled == [other]
    assert got == {id(first): answers[0], id(other): alone}


def test_preferred_answer_prefix_stops_where_greedy_leaves_it(hf_backend, heldout_items):
    """A teacher-forced preferred answer is only followed while greedy agrees with it."""
    from hscr_worker.backends.base import ScoreRequest

    prompts, visual, answers = _own_answers(hf_backend, heldout_items[:4])
    for p, v, a in zip(prompts, visual, answers, strict=True):
        other = [*a[:2], next(t for t in range(62) if t != a[2] and t not in hf_backend.special_token_ids), *a[3:]]
        full = hf_backend.score([ScoreRequest(p, v, other)])[0]
        assert reproduced_prefix(full, other) == 2
        assert reproduced_prefix(hf_backend.score([ScoreRequest(p, v, a)])[0], a) == len(a)


@pytest.mark.vllm
def test_vllm_continues_a_response_prefix(vllm_backend, heldout_items):
    _continues_the_greedy_answer(vllm_backend, heldout_items[:4])


@pytest.mark.vllm
def test_each_engine_fills_only_the_parameters_nobody_set(hf_backend, vllm_backend):
    """candidates_per_round: every level in one call on vLLM (continuous batching), rounds on transformers; a
    value given (or the paper's setting) stays as given."""
    assert (hf_backend.params().candidates_per_round, vllm_backend.params().candidates_per_round) == (1, 0)
    assert vllm_backend.params({"candidates_per_round": 2}).candidates_per_round == 2
    assert vllm_backend.params(HSCRParams.paper().model_dump(exclude_unset=True)) == HSCRParams.paper()
    assert vllm_backend.params().model_copy(update={"candidates_per_round": 1}) == hf_backend.params()


@pytest.mark.vllm
def test_vllm_redecodes_prefill_at_most_their_last_cache_block(vllm_backend, heldout_items):
    """A re-decode's prompt, image and response prefix come from the prefix cache but for the last partial KV
    block: 32 tokens on the CPU engine (its default 128 would hold none of the fixture's ~80-token prompts)."""
    from hscr_worker.backends.vllm import CPU_BLOCK_SIZE

    assert vllm_backend.llm.llm_engine.vllm_config.cache_config.block_size == CPU_BLOCK_SIZE == 32
    prompts, visual, answers = _own_answers(vllm_backend, heldout_items[:4])
    requests = [GenerateRequest(p, v, 64 - len(a) // 2, response_prefix=a[:len(a) // 2])
                for p, v, a in zip(prompts, visual, answers, strict=True)]
    before = BackendStats(**vars(vllm_backend.stats))
    vllm_backend.generate(requests)
    prefilled = vllm_backend.stats.prefill_tokens - before.prefill_tokens
    reused = vllm_backend.stats.reused_prefill_tokens - before.reused_prefill_tokens
    whole = sum(len(p) - 1 + v.n_tokens + len(r.response_prefix)
                for p, v, r in zip(prompts, visual, requests, strict=True))
    assert prefilled + reused == whole
    assert reused >= 2 * CPU_BLOCK_SIZE * len(requests) and prefilled <= CPU_BLOCK_SIZE * len(requests)


@pytest.mark.vllm
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_vllm_prefix_redecode_gives_the_full_redecode_results(vllm_backend, heldout_items, setting):
    _same_as_full_redecode(vllm_backend, heldout_items[:N_ITEMS], SETTINGS[setting])


@pytest.mark.vllm
@pytest.mark.parametrize("setting", sorted(SHARING))
def test_vllm_shared_decodes_give_the_unshared_results(vllm_backend, heldout_items, setting):
    _shared_same_as_unshared(vllm_backend, heldout_items[:N_ITEMS], SHARING[setting])


@pytest.mark.vllm
def test_hook_contract_carries_replacements_fired_in_the_prefix():
    """A level continuing another level's decode starts with a prefix where replacements already fired."""
    hook = pytest.importorskip("hscr_worker.backends.vllm_hook")
    from vllm import SamplingParams

    original = [1, 2, 3, 4, 5, 6]
    plan = [Replacement(1, 2, 9, -1.0, 3.0), Replacement(4, 5, 8, -1.0, 2.0)]
    prefix = [1, 9, 3]  # the first replacement fired at step 1; the prefix follows the original elsewhere
    spec = hook.force_args(ForcedDecoder(original, plan, response_prefix=prefix, fired=[(1, plan[0])]))[hook.FORCE_KEY]
    assert spec["fired"] == [1]

    def params(s):
        return SamplingParams(temperature=0.0, max_tokens=8, extra_args={hook.FORCE_KEY: s})

    decoder = hook.parse_force_args(params(spec))
    assert decoder.fired == [(1, plan[0])]
    assert decoder.next_token([], 4) is None and decoder.next_token([4], 5) == 8  # aligned: fires at step 4
    # a prefix that left the original: the pending replacement may fire anywhere after it
    derailed = hook.parse_force_args(params({**spec, "prefix": [1, 9, 7, 7, 7, 7]}))
    assert derailed.next_token([], 5) == 8 and derailed.fired[-1][0] == 6
    for bad, message in [({**spec, "fired": [2]}, "not the replacement"),
                         ({**spec, "fired": [5]}, "inside the prefix"),
                         ({**spec, "fired": "1"}, "inside the prefix"),
                         ({**spec, "fired": [], "prefix": [1, 2, 3, 4, 5]}, "inside the prefix")]:
        with pytest.raises(ValueError, match=message):
            hook.HSCRForcing.validate_params(params(bad))


@pytest.mark.vllm
def test_hook_contract_carries_the_prefix():
    hook = pytest.importorskip("hscr_worker.backends.vllm_hook")
    from vllm import SamplingParams

    original, plan = [1, 2, 3, 4, 5, 6], [Replacement(3, 4, 9, -1.0, 2.0)]
    spec = hook.force_args(ForcedDecoder(original, plan, response_prefix=original[:3]))[hook.FORCE_KEY]

    def params(s, max_tokens=8):
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args={hook.FORCE_KEY: s})

    decoder = hook.parse_force_args(params(spec))
    assert list(decoder.response_prefix) == original[:3] and list(decoder.plan) == plan
    assert decoder.next_token([], 4) == 9 and decoder.fired == [(3, plan[0])]
    assert hook.parse_force_args(params({**spec, "prefix": []})).response_prefix == []  # optional, default empty
    for bad, message in [({**spec, "prefix": "1 2 3"}, "'prefix'\\] must be a list"),
                         ({**spec, "prefix": [1, -2]}, "'prefix'\\] must be a list"),
                         ({**spec, "prefix": original[:4]}, "inside the prefix")]:
        with pytest.raises(ValueError, match=message):
            hook.HSCRForcing.validate_params(params(bad))
    # max_tokens counts decoded steps, after the prefix: step 3 is the first one here.
    hook.HSCRForcing.validate_params(params(spec, max_tokens=1))
    with pytest.raises(ValueError, match="beyond max_tokens \\(1\\) after the 3-token prefix"):
        hook.HSCRForcing.validate_params(params({**spec, "plan": [[4, 5, 9, 0.0, 0.0]]}, max_tokens=1))


# ---- run_hscr_stream: batch k's re-decode shares engine calls with batch k+1's own answers ----
def _same_as_batch_by_batch(backend, items, params, batch_size=6):
    similarity = get_similarity(params.similarity)
    batches = [(start, items[start:start + batch_size]) for start in range(0, len(items), batch_size)]
    calls = []
    generate = backend.generate

    def counted(requests):
        calls.append(len(requests))
        return generate(requests)

    backend.generate = counted  # instance attribute: shadows the method for this test only
    try:
        streamed = list(run_hscr_stream(backend, iter(batches), params, similarity, overlap=True))
    finally:
        del backend.generate
    assert [key for key, _ in streamed] == [key for key, _ in batches]
    # one call per batch, then the last batches' remaining re-decode rounds; every call that takes a batch's own
    # answers after the first also carries the re-decodes of the batch before it
    assert len(calls) >= len(batches) + 1
    assert all(n > batch_size for n in calls[1:len(batches)])
    for (key, batch), (_, results) in zip(batches, streamed, strict=True):
        # The own answers' full-image rows come from their decode, and a decode batch that also holds
        # longer re-decode prompts is padded differently (transformers): rounding moves, decisions must not.
        _same_decisions(results, run_hscr(backend, batch, params, similarity), f"overlapping (batch {key})", 1e-4)
    assert sum(len(r.levels) for _, results in streamed for r in results) >= 10


def test_stream_without_overlap_on_transformers_is_batch_by_batch(hf_backend, heldout_items):
    """``overlap=False``: a transformers stream decodes each batch's own answers, then its re-decodes, and hands its
    results over before the next batch's first engine call."""
    assert hf_backend.continuous_batching is False
    params = HSCRParams()
    items = heldout_items[:12]
    batches = [(k, items[4 * k:4 * k + 4]) for k in range(3)]
    # which batch a request belongs to, by its image's visual tokens (questions repeat between items)
    encoded = hf_backend.encode_images([it.image for it in items])

    def batch_of(request) -> int:
        return next(k // 4 for k, v in enumerate(encoded) if torch.equal(v.embeds, request.visual.embeds))

    events: list[tuple] = []
    generate = hf_backend.generate

    def recorded(requests):
        kinds = {"re-decode" if r.forced is not None else "answer" for r in requests}
        events.append(("/".join(sorted(kinds)), sorted({batch_of(r) for r in requests})))
        return generate(requests)

    chained = hf_backend.generate_chained

    def recorded_chain(requests, follow, successor=None):  # a batch's re-decodes, chained: each follow-up is one
        # call (no level is requested mid-decode: the order of whole calls is the point here)
        def followed(request, ids):
            new = follow(request, ids)
            events.extend(("re-decode", [batch_of(r)]) for r in new)
            return new
        events.append(("re-decode", sorted({batch_of(r) for r in requests})))
        return chained(requests, followed)

    # instance attributes: shadow the methods for this test only
    hf_backend.generate, hf_backend.generate_chained = recorded, recorded_chain
    try:
        for key, results in run_hscr_stream(hf_backend, iter(batches), params, get_similarity(params.similarity),
                                            overlap=False):
            events.append(("results", key))
            assert [r.custom_id for r in results] == [it.custom_id for it in batches[key][1]]
            assert any(r.levels for r in results)  # each batch has re-decodes to order
    finally:
        del hf_backend.generate, hf_backend.generate_chained
    # a batch's re-decode rounds (candidates_per_round levels per item each) follow one another
    rounds = [event for k, event in enumerate(events) if not (k and event == events[k - 1] == ("re-decode", event[1]))]
    assert rounds == [event for k in range(3) for event in (("answer", [k]), ("re-decode", [k]), ("results", k))]


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_transformers_chained_stream_gives_the_batch_results(hf_backend, heldout_items, setting):
    """With ``stream_chain`` a transformers stream is one chained decode batch (``stream_chained``): a batch's own
    answers take the rows the batch before it frees while that batch's last levels still decode, and no
    ``generate`` call is made; the decisions are those of ``run_hscr`` batch by batch. A batch whose every item
    is refused still comes out in its place."""
    params = SETTINGS[setting]
    similarity = get_similarity(params.similarity)
    items = heldout_items[:N_ITEMS]
    too_long = PreparedItem("too-long", "what is seen " * 300, items[0].image.copy())
    batches = [(0, items[:6]), (1, [too_long]), (2, items[6:12]), (3, items[12:N_ITEMS])]
    order: list[tuple[str, int]] = []  # (kind, batch) of each finished request, in the order they finished
    chained, kept_before = hf_backend.stream_chained, set(hf_backend._reusable)

    def recorded(more, follow, successor=None, max_rows=None):
        def followed(request, ids):
            batch = next(key for key, chunk in batches for it in chunk if it.image is images[id(request.visual.embeds)])
            order.append(("re-decode" if request.forced is not None else "answer", batch))
            return follow(request, ids)
        return chained(more, followed, successor, max_rows)

    images: dict[int, object] = {}
    encode = hf_backend.encode_images

    def encode_and_note(pictures):
        visual = encode(pictures)
        images.update((id(v.embeds), p) for v, p in zip(visual, pictures, strict=True))
        return visual

    def no_generate(requests):
        raise AssertionError("a chained stream makes no generate call")

    # by default where the rows are few or a batch fills at most half of them (this backend has 32)
    assert hf_backend.chains_stream(6) and hf_backend.chains_stream(16) and not hf_backend.chains_stream(17)
    # instance attributes: shadow the methods for this test only
    hf_backend.stream_chained, hf_backend.encode_images, hf_backend.generate = recorded, encode_and_note, no_generate
    hf_backend.stream_chain = True
    try:
        streamed = list(run_hscr_stream(hf_backend, iter(batches), params, similarity))
    finally:
        del hf_backend.stream_chained, hf_backend.encode_images, hf_backend.generate
        hf_backend.stream_chain = None
    assert set(hf_backend._reusable) <= kept_before  # each batch's kept caches went with its results
    assert [key for key, _ in streamed] == [0, 1, 2, 3]
    assert "context of" in streamed[1][1][0].error
    for (key, chunk), (_, results) in zip(batches, streamed, strict=True):
        if key != 1:
            _same_decisions(results, run_hscr(hf_backend, chunk, params, similarity), f"chained stream ({key})", 1e-4)
    assert sum(len(r.levels) for _, results in streamed for r in results) >= 10
    # overlap: some own answer of a later batch finished before the last re-decode of the batch before it
    last_redecode = {k: max(n for n, event in enumerate(order) if event == ("re-decode", k)) for k in (0, 2)}
    first_answer = {k: min(n for n, event in enumerate(order) if event == ("answer", k)) for k in (2, 3)}
    assert first_answer[2] < last_redecode[0] and first_answer[3] < last_redecode[2], order


def test_transformers_chained_stream_keeps_no_answer_and_no_prompt_past_its_row(hf_backend, heldout_items):
    """A chained stream's memory is its rows': a prompt prefilled for a row is dropped once copied into it (the
    first batch's were all held to the end before), and no copy of a finished own answer is kept beside its row
    (one was, for up to ``batch_size`` items: a second batch of caches); the levels continue the rows of their
    items. The stream still overlaps its batches, and its results are those of batch by batch."""
    params = HSCRParams()
    similarity = get_similarity(params.similarity)
    batches = [(k, heldout_items[4 * k:4 * k + 4]) for k in range(4)]
    kept_before = set(hf_backend._reusable)
    chained, rows, prefill = hf_backend.stream_chained, hf_backend.batch_size, hf_backend._prefilled
    most_kept, finished = 0, []  # kept answers of this stream after each finished request; (kind, batch) in order
    prompts: list[weakref.ref] = []  # each prompt prefilled for a row
    alive_at_first_redecode = None

    def prefilled(request):
        row = prefill(request)
        prompts.append(weakref.ref(row))
        return row

    def recorded(more, follow, successor=None, max_rows=None):
        def followed(request, ids):
            nonlocal most_kept, alive_at_first_redecode
            most_kept = max(most_kept, len(set(hf_backend._reusable) - kept_before))
            if request.forced is not None and alive_at_first_redecode is None:
                gc.collect()
                alive_at_first_redecode = sum(ref() is not None for ref in prompts)
            batch = next(k for k, embeds in embeds_of.items() if id(request.visual.embeds) in embeds)
            finished.append(("re-decode" if request.forced is not None else "answer", batch))
            return follow(request, ids)
        return chained(more, followed, successor, max_rows)

    embeds_of: dict[int, set[int]] = {k: set() for k, _ in batches}
    encode = hf_backend.encode_images

    def encode_and_note(pictures):
        visual = encode(pictures)
        k = next(k for k, chunk in batches if any(p is it.image for it in chunk for p in pictures))
        embeds_of[k] |= {id(v.embeds) for v in visual}
        return visual

    # instance attributes: shadow the methods for this test only
    hf_backend.stream_chained, hf_backend.encode_images, hf_backend._prefilled = recorded, encode_and_note, prefilled
    hf_backend.batch_size = 4
    try:
        assert hf_backend.chains_stream(4)  # the default at 4 rows
        streamed = list(run_hscr_stream(hf_backend, iter(batches), params, similarity))
    finally:
        del hf_backend.stream_chained, hf_backend.encode_images, hf_backend._prefilled
        hf_backend.batch_size = rows
    # by the first re-decode's end every prompt prefilled so far is in its row: none is held besides
    assert len(prompts) >= 4 and alive_at_first_redecode == 0
    assert most_kept == 0
    last_redecode = {k: max(n for n, event in enumerate(finished) if event == ("re-decode", k)) for k in range(3)}
    first_answer = {k: min(n for n, event in enumerate(finished) if event == ("answer", k)) for k in range(1, 4)}
    assert any(first_answer[k + 1] < last_redecode[k] for k in range(3)), finished  # the batches overlap
    for (key, chunk), (_, results) in zip(batches, streamed, strict=True):
        _same_decisions(results, run_hscr(hf_backend, chunk, params, similarity), f"chained stream ({key})", 1e-4)


def test_transformers_chained_stream_closed_early_keeps_no_cache(hf_backend, heldout_items):
    """A consumer that stops reading (a cancelled job) closes the stream: it leaves no kept cache behind (a stream
    keeps none: its levels continue its rows)."""
    params = HSCRParams()
    items = heldout_items[:12]
    kept_before = set(hf_backend._reusable)
    hf_backend.stream_chain = True
    try:
        stream = run_hscr_stream(hf_backend, iter([(0, items[:4]), (1, items[4:8]), (2, items[8:])]), params,
                                 get_similarity(params.similarity))
        key, results = next(stream)
        assert key == 0 and any(r.levels for r in results)
        stream.close()
    finally:
        hf_backend.stream_chain = None
    assert set(hf_backend._reusable) <= kept_before


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_transformers_overlapped_stream_gives_the_batch_results(hf_backend, heldout_items, setting):
    _same_as_batch_by_batch(hf_backend, heldout_items[:N_ITEMS], SETTINGS[setting])


@pytest.mark.vllm
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_vllm_overlapped_stream_gives_the_batch_results(vllm_backend, heldout_items, setting):
    assert vllm_backend.continuous_batching is True
    _same_as_batch_by_batch(vllm_backend, heldout_items[:N_ITEMS + 2], SETTINGS[setting])


# ---- the own answer's full-image score rows come from its decode ----
def _decode_logits_are_the_score_rows(backend, items):
    from hscr_worker.backends.base import ScoreRequest

    visual = backend.encode_images([it.image for it in items])
    prompts = [backend.prompt_ids(it.question) for it in items]
    requests = [GenerateRequest(p, v, 64, return_logits=True) for p, v in zip(prompts, visual, strict=True)]
    answers = backend.generate(requests)
    scored = backend.score([ScoreRequest(p, v, a) for p, v, a in zip(prompts, visual, answers, strict=True)])
    for request, answer, rows in zip(requests, answers, scored, strict=True):
        assert request.logits.shape == rows.shape == (len(answer), rows.shape[1])
        assert torch.equal(request.logits.argmax(-1), torch.tensor(answer))  # greedy: each row's argmax was emitted
        assert (request.logits - rows).abs().max() <= 1e-4


def _same_decisions_as_a_second_pass(backend, items, params):
    similarity = get_similarity(params.similarity)
    from_decode = run_hscr(backend, items, params, similarity)
    second_pass = run_hscr(backend, items, params, similarity, full_scores_from_decode=False)
    _same_decisions(from_decode, second_pass, "full-image rows from the decode", 1e-4)
    assert sum(len(r.levels) for r in from_decode) >= 10


DECODE_ROW_SETTINGS = {"shipped": HSCRParams(), "paper": HSCRParams.paper()}


def test_return_logits_needs_a_plain_decode():
    decoder = ForcedDecoder([1, 2, 3], [Replacement(2, 3, 4, 0.0, 0.0)])
    with pytest.raises(ValueError, match="return_logits"):
        GenerateRequest([0], torch.zeros(1, 1), 4, forced=decoder, return_logits=True)
    with pytest.raises(ValueError, match="return_logits"):
        GenerateRequest([0], torch.zeros(1, 1), 4, response_prefix=[1], return_logits=True)


def test_transformers_decode_logits_are_the_score_rows(hf_backend, heldout_items):
    _decode_logits_are_the_score_rows(hf_backend, heldout_items[:8])


@pytest.mark.parametrize("setting", sorted(DECODE_ROW_SETTINGS))
def test_transformers_full_rows_from_the_decode_give_the_same_decisions(hf_backend, heldout_items, setting):
    _same_decisions_as_a_second_pass(hf_backend, heldout_items[:N_ITEMS], DECODE_ROW_SETTINGS[setting])


@pytest.mark.vllm
def test_vllm_decode_logits_are_the_score_rows(vllm_backend, heldout_items):
    _decode_logits_are_the_score_rows(vllm_backend, heldout_items[:8])


@pytest.mark.vllm
@pytest.mark.parametrize("setting", sorted(DECODE_ROW_SETTINGS))
def test_vllm_full_rows_from_the_decode_give_the_same_decisions(vllm_backend, heldout_items, setting):
    _same_decisions_as_a_second_pass(vllm_backend, heldout_items[:N_ITEMS], DECODE_ROW_SETTINGS[setting])


@pytest.mark.vllm
def test_vllm_an_item_beyond_the_context_fails_alone_in_a_stream(vllm_backend, heldout_items):
    """vLLM refuses a whole engine call holding one over-long prompt; the pipeline keeps it out."""
    from dataclasses import replace

    params = HSCRParams()
    similarity = get_similarity(params.similarity)
    long_item = replace(heldout_items[0], custom_id="too-long", question="what is seen " * 300)
    batches = [(0, [*heldout_items[:3], long_item]), (1, heldout_items[3:6])]
    streamed = dict(run_hscr_stream(vllm_backend, iter(batches), params, similarity, overlap=True))
    assert "context of" in streamed[0][3].error
    _same_decisions(streamed[0][:3], run_hscr(vllm_backend, heldout_items[:3], params, similarity), "a long item", 1e-4)
    _same_decisions(streamed[1], run_hscr(vllm_backend, heldout_items[3:6], params, similarity), "a long item", 1e-4)


# ---- transformers: re-decodes continue the own answer's KV cache instead of prefilling prompt and image ----
@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl", "gemma3"])
def test_transformers_kept_prompt_cache_gives_the_prefilled_decisions(request, heldout_items, family):
    backend = request.getfixturevalue({"llava": "hf_backend", "qwen2.5-vl": "qwen_backend",
                                       "gemma3": "gemma_backend"}[family])
    params = backend.profile.params({})
    similarity = get_similarity(params.similarity)
    items = heldout_items[:N_ITEMS]
    runs = {}
    for reuse in (False, True):
        backend.reuse_prompt_cache, before = reuse, dict(vars(backend.stats))
        try:
            runs[reuse] = run_hscr(backend, items, params, similarity)
        finally:
            backend.reuse_prompt_cache = True
        runs[reuse, "stats"] = {k: v - before[k] for k, v in vars(backend.stats).items()}
    # Keys from the batched decode and from a prefill differ in float rounding only.
    _same_decisions(runs[True], runs[False], "continuing the kept cache", 1e-4)
    assert sum(len(r.levels) for r in runs[True]) >= 10
    kept, prefilled = runs[True, "stats"], runs[False, "stats"]
    assert prefilled["reused_prefill_tokens"] == 0 and kept["reused_prefill_tokens"] > 0
    assert kept["prefill_tokens"] + kept["reused_prefill_tokens"] == prefilled["prefill_tokens"]
    assert kept["prefill_tokens"] < prefilled["prefill_tokens"] / 2  # the re-decodes' image tokens came from cache
    assert kept["decoded_tokens"] == prefilled["decoded_tokens"]


def test_kept_prompt_cache_is_only_for_the_same_image_tensor(hf_backend, heldout_items):
    """The cache is keyed on the image tensor itself: an equal prompt with another image prefills."""
    first = heldout_items[0]
    second = next(it for it in heldout_items if it.question != first.question)
    prompts, visual, answers = _own_answers(hf_backend, [first, second])
    before = hf_backend.stats.reused_prefill_tokens
    other = [visual[1], visual[0]]  # each prompt with the other item's image
    hf_backend.generate([GenerateRequest(p, v, 8, response_prefix=a[:1])
                         for p, v, a in zip(prompts, other, answers, strict=True)])
    assert hf_backend.stats.reused_prefill_tokens == before
    hf_backend.generate([GenerateRequest(p, v, 8, response_prefix=a[:1])
                         for p, v, a in zip(prompts, visual, answers, strict=True)])
    assert hf_backend.stats.reused_prefill_tokens > before


# ---- re-decode rounds: levels mildest first, an item stops once its levels are kept ----
def test_rounds_decode_fewer_levels_and_keep_the_decisions(hf_backend, heldout_items):
    items = heldout_items[:N_ITEMS]
    similarity = get_similarity("lexical")
    decoded = {}
    results = {}
    chained = hf_backend.generate_chained
    for per_round in (0, 1):
        count = [0]

        def counted(requests, follow, successor=None, count=count):  # the re-decodes: first ones and follow-ups
            def followed(request, ids):
                new = follow(request, ids)
                count[0] += len(new)
                return new
            count[0] += len(requests)
            return chained(requests, followed)

        hf_backend.generate_chained = counted  # instance attribute: shadows the method for this test only
        try:
            results[per_round] = run_hscr(hf_backend, items, HSCRParams(candidates_per_round=per_round), similarity)
        finally:
            del hf_backend.generate_chained
        decoded[per_round] = count[0]
    # one level per round: an item whose levels are met stops; on these items the kept levels are those of
    # decoding every level (the greedy reranker keeps the mildest levels that meet the gap)
    _same_decisions(results[1], results[0], "re-decoding in rounds", 0.0)
    assert decoded[1] < decoded[0]
    full = [r for r in results[1] if r.levels and not r.shortfall]
    assert full, "no item kept its levels without a shortfall: the early stop is not exercised"
