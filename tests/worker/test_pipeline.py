"""run_hscr edge cases on the real fixture model."""

from hscr_client import HSCRParams
from hscr_worker.fixture import synthetic
from hscr_worker.pipeline import PreparedItem, run_hscr
from hscr_worker.similarity import lexical


def test_preferred_answer_longer_than_the_budget_only_couples_inside_it(fixture_backend):
    """Regression: with corrupt='preferred', a coupled position beyond max_new_tokens made the
    re-decode request invalid (the vLLM hook rejected it and the whole batch failed)."""
    examples = [e for e in synthetic.make_examples(60, 51) if len(e.answer.split()) > 12][:4]
    items = [PreparedItem(f"long-{i}", e.question, e.image.convert("RGB"), e.answer) for i, e in enumerate(examples)]
    params = HSCRParams(corrupt="preferred", max_new_tokens=6)
    results = run_hscr(fixture_backend, items, params, lexical)
    assert len(results) == len(items)
    for result in results:
        # a real result, coupled on a response that does reach past the budget (word-level tokenizer)
        assert result.error is None and result.coupled and result.levels, result
        assert len(result.corrupted.split()) > 12
        assert all(c["position"] < 6 for c in result.coupled)
        for level in result.levels:
            assert all(r["position"] < 6 for r in level.replacements)


def test_an_item_beyond_the_context_fails_alone(fixture_backend):
    """A question too long for the model's context (256 tokens for the fixture) is that item's error;
    the others come out as they would without it, in input order."""
    examples = synthetic.make_examples(3, 52)
    items = [PreparedItem(f"ctx-{i}", e.question, e.image.convert("RGB")) for i, e in enumerate(examples)]
    long_item = PreparedItem("ctx-long", "what is seen " * 300, examples[0].image.convert("RGB"))
    params = HSCRParams()
    alone = run_hscr(fixture_backend, items, params, lexical)
    assert all(r.error is None and r.coupled and r.levels for r in alone)  # real results to compare with
    mixed = run_hscr(fixture_backend, [items[0], long_item, *items[1:]], params, lexical)
    assert [r.custom_id for r in mixed] == ["ctx-0", "ctx-long", "ctx-1", "ctx-2"]
    assert "context of 256 tokens" in mixed[1].error and not mixed[1].levels
    assert [(r.error, [lv.text for lv in r.levels]) for r in (mixed[0], *mixed[2:])] == \
        [(r.error, [lv.text for lv in r.levels]) for r in alone]


def test_chosen_and_own_rejected_pair_options(fixture_backend):
    """chosen='own' keeps the model's answer where it agrees with the reference; own_rejected adds the model's
    own answer, where it disagrees, as a dispreferred level with 0 replacements (the error it actually makes)."""
    examples = synthetic.make_examples(24, 53)
    right = [PreparedItem(f"r-{i}", e.question, e.image.convert("RGB"), e.answer) for i, e in enumerate(examples)]
    base = run_hscr(fixture_backend, right, HSCRParams(), lexical)
    own = run_hscr(fixture_backend, right, HSCRParams(chosen="own"), lexical)
    agreeing = [k for k, r in enumerate(base) if r.own_answer == examples[k].answer]
    differing = [k for k, r in enumerate(base) if r.own_answer != examples[k].answer]
    assert agreeing and differing  # both cases occur on these items
    assert all(own[k].chosen == base[k].own_answer for k in agreeing)
    assert all(own[k].chosen == examples[k].answer for k in differing)

    with_own = run_hscr(fixture_backend, right, HSCRParams(own_rejected=True), lexical)
    for k in differing:
        levels = {lv.text: lv for lv in with_own[k].levels}
        assert base[k].own_answer in levels or with_own[k].shortfall is False, with_own[k]
        if base[k].own_answer in levels:
            assert levels[base[k].own_answer].n_replacements == 0
            assert levels[base[k].own_answer].level == 1  # severity order: no replacement is the mildest
    assert any(base[k].own_answer in {lv.text for lv in with_own[k].levels} for k in differing)
    for k in agreeing:  # the own answer is the preferred one: never dispreferred
        assert [lv.text for lv in with_own[k].levels] == [lv.text for lv in base[k].levels]

    # An answer nothing in the image moves (here: no shift reaches min_shift) is the item's error, unless the
    # own answer disagrees with the preferred one: then it is the one level (answered without looking).
    blind = run_hscr(fixture_backend, right, HSCRParams(own_rejected=True, min_shift=1e6), lexical)
    for k, result in enumerate(blind):
        if k in differing:
            assert result.error is None and [lv.text for lv in result.levels] == [base[k].own_answer]
        else:
            assert "no modality-coupled token" in result.error and not result.levels


def test_drop_corrections_keeps_levels_no_closer_to_the_preferred_answer(fixture_backend):
    """Where the model's own answer is wrong, a re-decode can move it toward the preferred answer (e.g. a swap
    that restores the reference's region): with drop_corrections (the default) no such candidate is a level; with
    it off (the paper) it is, and it is the mildest level, less wrong than the model itself."""
    examples = synthetic.make_examples(200, 31415)
    picked = [25, 90, 91, 3]  # 25, 90, 91: the own answer is wrong and a level corrects it (seen without the check)
    items = [PreparedItem(f"q-{i}", examples[i].question, examples[i].image.convert("RGB"), examples[i].answer)
             for i in picked]
    checked = run_hscr(fixture_backend, items, HSCRParams(), lexical)
    paper = run_hscr(fixture_backend, items, HSCRParams(drop_corrections=False), lexical)
    corrections = 0
    for k, (on, off) in enumerate(zip(checked, paper, strict=True)):
        bar = lexical([on.corrupted], on.chosen)[0]
        for level in on.levels:
            assert lexical([level.text], on.chosen)[0] <= bar + 1e-9, (on.own_answer, level)
        closer = [lv for lv in off.levels if lexical([lv.text], off.chosen)[0] > bar + 1e-9]
        corrections += bool(closer)
        if not closer:  # nothing to drop: the same levels both ways
            assert [lv.text for lv in on.levels] == [lv.text for lv in off.levels]
        else:
            example = examples[picked[k]]
            wrong_own = synthetic.count_errors(off.own_answer, example.qtype, example.attrs)
            corrected = synthetic.count_errors(closer[0].text, example.qtype, example.attrs)
            assert wrong_own and corrected is not None and corrected < wrong_own
            assert on.error or all(lv.text not in {c.text for c in closer} for lv in on.levels)
    assert corrections == 3


def test_keep_tied_levels_false_keeps_no_tied_levels_in_a_shortfall(qwen_backend):
    """Two candidates equally similar to the preferred answer cannot be ordered by the reranker. On these Qwen
    fixture items the widest-spread set (the default and the paper) holds such a pair and its levels are out of
    order (a later level has fewer errors); with keep_tied_levels false a shortfall keeps fewer levels instead,
    every kept level strictly less similar than the one before it, here in order, and the same items keep levels."""
    examples = synthetic.make_examples(200, 9090)
    picked = [3, 146, 163, 86]
    items = [PreparedItem(f"q-{i}", examples[i].question, examples[i].image.convert("RGB"), examples[i].answer)
             for i in picked]
    assert qwen_backend.params({}).keep_tied_levels is True
    untied_results = run_hscr(qwen_backend, items, qwen_backend.params({"keep_tied_levels": False}), lexical)
    widest_results = run_hscr(qwen_backend, items, qwen_backend.params({}), lexical)
    with_ties = 0
    for k, (untied, widest) in enumerate(zip(untied_results, widest_results, strict=True)):
        assert untied.error is None and widest.error is None and untied.shortfall and widest.shortfall
        sims = [lv.similarity for lv in untied.levels]
        assert all(a > b for a, b in zip(sims, sims[1:], strict=False)), sims
        widest_sims = [lv.similarity for lv in widest.levels]
        if any(abs(a - b) < 1e-9 for a, b in zip(widest_sims, widest_sims[1:], strict=False)):
            with_ties += 1
            assert len(untied.levels) < len(widest.levels)
        else:
            assert [lv.text for lv in untied.levels] == [lv.text for lv in widest.levels]
        example = examples[picked[k]]
        for result, in_order in ((untied, True), (widest, False)):
            errors = [synthetic.count_errors(lv.text, example.qtype, example.attrs) for lv in result.levels]
            assert all(a <= b for a, b in zip(errors, errors[1:], strict=False)) is in_order, (errors, result.levels)
    assert with_ties == len(picked)
