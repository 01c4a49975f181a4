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
        assert all(c["position"] < 6 for c in result.coupled)
        for level in result.levels:
            assert all(r["position"] < 6 for r in level.replacements)
