import math

import pytest
import torch

from hscr_worker.core.replace import ForcedDecoder, Replacement, divergence, hallucinated_token, level_plans, splice


def test_hallucinated_token_prefers_plausible_image_disfavoured_candidates():
    # vocab: 0 left, 1 right, 2 upper, 3 '.', 4 <pad>
    full = torch.tensor([6.0, 2.0, 0.0, -4.0, 5.0])
    dropped = torch.tensor([3.0, 3.0, 2.9, -4.0, 5.0])
    token, reward = hallucinated_token(full, dropped, original=0, beta=0.9, top_k=10, banned=[4])
    # 'right' and 'upper' pass plausibility; 'upper' has the lower reward (1.9*0 - 0.9*2.9).
    assert token == 2
    assert reward == pytest.approx(1.9 * 0.0 - 0.9 * 2.9, abs=1e-5)
    # '.' is implausible without the image, so it is never picked even though its reward is lowest.
    token, _ = hallucinated_token(full, dropped, original=0, beta=0.9, top_k=10, banned=[4, 2])
    assert token == 1


def test_hallucinated_token_full_pool_top_k_and_no_candidate():
    full = torch.tensor([5.0, 4.0, 1.0])
    dropped = torch.tensor([5.0, 0.0, 0.0])
    assert hallucinated_token(full, dropped, 0, beta=0.9, top_k=10, pool="full", plausibility=0.0)[0] == 2
    assert hallucinated_token(full, dropped, 0, beta=0.9, top_k=2, pool="full", plausibility=0.0)[0] == 1
    # The dropped distribution is sure of the original: nothing plausible remains.
    assert hallucinated_token(full, dropped, 0, beta=0.9, top_k=10, pool="dropped", plausibility=0.5) is None


def r(position, original, token, shift):
    return Replacement(position, original, token, reward=-1.0, shift=shift)


def test_level_plans_take_top_m_by_shift_in_response_order():
    reps = [r(5, 50, 51, 3.0), r(1, 10, 11, 2.0), r(3, 30, 31, 1.0)]
    plans = level_plans(reps)
    assert [[x.position for x in p] for p in plans] == [[5], [1, 5], [1, 3, 5]]


def test_splice_substitutes_in_place():
    assert splice([1, 2, 3, 4], [r(1, 2, 9, 1.0), r(3, 4, 8, 1.0)]) == [1, 9, 3, 8]


def drive(decoder, model_choice):
    """Greedy decode where ``model_choice(prefix)`` is the model's own next token (None = stop)."""
    prefix = []
    while True:
        greedy = model_choice(prefix)
        if greedy is None:
            return prefix
        forced = decoder.next_token(prefix, greedy)
        prefix.append(greedy if forced is None else forced)


def test_forced_decoder_fires_at_planned_steps_while_aligned():
    original = [10, 20, 30, 40]
    plan = [r(1, 20, 21, 2.0), r(3, 40, 41, 1.0)]
    decoder = ForcedDecoder(original, plan)
    out = drive(decoder, lambda p: original[len(p)] if len(p) < len(original) else None)
    assert out == [10, 21, 30, 41]
    assert [step for step, _ in decoder.fired] == [1, 3] and decoder.unfired == []


def test_forced_decoder_follows_a_diverged_continuation_by_token():
    """After a replacement shifts the continuation by one token, the next replacement fires where
    the model next wants its original token, not at the stale step."""
    original = [10, 20, 30, 40]
    plan = [r(1, 20, 21, 2.0), r(3, 40, 41, 1.0)]
    continuation = {(10,): 20, (10, 21): 99, (10, 21, 99): 30, (10, 21, 99, 30): 40}
    decoder = ForcedDecoder(original, plan)
    out = drive(decoder, lambda p: 10 if not p else continuation.get(tuple(p)))
    assert out == [10, 21, 99, 30, 41]
    assert [step for step, _ in decoder.fired] == [1, 4]


def test_forced_decoder_without_firing_after_divergence_leaves_later_replacements_unfired():
    """``after_divergence=False`` (HSCRParams.fire_after_divergence): once the continuation left the original,
    the later replacement does not fire where the model next wants its token; ``divergence`` agrees."""
    original = [10, 20, 30, 40]
    plan = [r(1, 20, 21, 2.0), r(3, 40, 41, 1.0)]
    continuation = {(10,): 20, (10, 21): 99, (10, 21, 99): 30, (10, 21, 99, 30): 40}
    decoder = ForcedDecoder(original, plan, after_divergence=False)
    out = drive(decoder, lambda p: 10 if not p else continuation.get(tuple(p)))
    assert out == [10, 21, 99, 30, 40]
    assert [step for step, _ in decoder.fired] == [1] and decoder.unfired == [plan[1]]
    aligned = ForcedDecoder(original, plan, after_divergence=False)  # no divergence: both fire as planned
    assert drive(aligned, lambda p: original[len(p)] if len(p) < len(original) else None) == [10, 21, 30, 41]
    greedy_at = {1: 20}  # the earlier decode forced 21 at step 1, where the model wanted 20
    assert divergence(original, plan, out, greedy_at, after_divergence=False) == (len(out), [(1, plan[0])])
    assert divergence(original, plan, out, greedy_at)[0] == 4  # firing after divergence: it forces 41 at step 4


def test_forced_decoder_never_forces_where_the_model_wants_something_else():
    """Regression: after 'a' -> 'no' the model says 'no abnormality'; forcing the next planned
    attribute at its old step produced malformed text."""
    original = [1, 2, 3]  # "a small mass"
    plan = [r(0, 1, 7, 2.0), r(1, 2, 8, 1.0)]  # a -> no, small -> large
    decoder = ForcedDecoder(original, plan)
    after_no = {(7,): 9, (7, 9): None}  # "no" -> "abnormality" -> end
    out = drive(decoder, lambda p: 1 if not p else after_no.get(tuple(p)))
    assert out == [7, 9]
    assert len(decoder.fired) == 1 and decoder.unfired == [plan[1]]


def test_candidate_missing_from_a_top_k_row_gets_a_finite_bounded_reward():
    """A top-k engine leaves -inf where it returned nothing; the reward must stay finite (the hook refuses inf)."""
    inf = float("-inf")
    dropped = torch.tensor([5.0, 4.0, 3.9, inf, inf])  # candidates 1 and 2 (0 is the original)
    full = torch.tensor([6.0, inf, 2.0, 1.0, inf])  # token 1 is below the full image's top-k
    token, reward = hallucinated_token(full, dropped, original=0, beta=0.9, top_k=3)
    # token 1: the full row's smallest known score (1.0) bounds it: 1.9 * 1.0 - 0.9 * 4.0 = -1.7 < token 2's 0.29
    assert token == 1 and math.isfinite(reward)
    assert reward == pytest.approx(1.9 * 1.0 - 0.9 * 4.0)


def test_tokens_no_row_returned_are_never_candidates():
    """Even with the plausibility test off, a token the pool row did not return (-inf) cannot win on a bound."""
    inf = float("-inf")
    dropped = torch.tensor([5.0, 4.0, inf, inf])
    full = torch.tensor([6.0, 3.0, 1.0, inf])
    token, _ = hallucinated_token(full, dropped, original=0, beta=0.9, top_k=4, plausibility=0.0)
    assert token == 1


def _toy_model(seed: int, vocab: int = 6, stop: int = 0, length: int = 14):
    """A deterministic greedy 'model': the next token is a hash of the prefix (small vocab, so tokens recur)."""
    def choice(prefix):
        if len(prefix) >= length:
            return None
        token = hash((seed, *prefix)) % vocab
        return None if token == stop and len(prefix) > 3 else token
    return choice


@pytest.mark.parametrize("seed", range(40))
def test_divergence_resumes_a_level_exactly_where_it_leaves_the_level_before(seed):
    """Level m+1 (level m's plan plus one replacement) decoded from scratch equals: level m's decode up to their
    divergence, then a decode resumed there with the replacements fired so far; and level m's decode itself
    where they never diverge."""
    import random

    model = _toy_model(seed)
    original = drive(ForcedDecoder([], []), model)
    if len(original) < 3:
        return
    rng = random.Random(seed)
    positions = rng.sample(range(len(original)), k=min(4, len(original)))
    replacements = [r(p, original[p], (original[p] + 1 + rng.randrange(4)) % 6 + 1, -float(k))
                    for k, p in enumerate(positions)]
    plans = level_plans(replacements)
    for parent_plan, child_plan in zip(plans, plans[1:], strict=False):
        parent_decoder = ForcedDecoder(original, parent_plan)
        parent = drive(parent_decoder, model)
        child = drive(ForcedDecoder(original, child_plan), model)
        greedy_at = {step: rep.original for step, rep in parent_decoder.fired}
        steps, fired = divergence(original, child_plan, parent, greedy_at)
        assert child[:steps] == parent[:steps]
        if steps == len(parent):
            assert child == parent
            continue
        assert child[steps] != parent[steps]
        resumed = ForcedDecoder(original, child_plan, response_prefix=parent[:steps], fired=fired)
        rest = drive(resumed, lambda p, start=parent[:steps]: model([*start, *p]))
        assert parent[:steps] + rest == child


def test_divergence_of_a_level_whose_new_replacement_never_fires_is_the_whole_decode():
    original = [10, 20, 30, 40]
    model = {(): 10, (10,): 20, (10, 21): 99, (10, 21, 99): 98, (10, 21, 99, 98): None}.get  # 20 -> 21 derails it
    level1 = [r(1, 20, 21, 2.0)]
    level2 = sorted([*level1, r(3, 40, 41, 1.0)], key=lambda x: x.position)  # 40 never comes back
    parent_decoder = ForcedDecoder(original, level1)
    parent = drive(parent_decoder, lambda p: model(tuple(p)))
    steps, fired = divergence(original, level2, parent, {step: rep.original for step, rep in parent_decoder.fired})
    assert (steps, [step for step, _ in fired]) == (len(parent), [1])
