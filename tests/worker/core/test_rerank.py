import pytest

from hscr_worker.core.rerank import select_levels, token_f1


def test_token_f1():
    assert token_f1("a b c", "a b c") == 1.0
    assert token_f1("a b", "c d") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("A b c d", "a b c e") == pytest.approx(0.75)


def test_select_levels_greedy_with_gap():
    sims = [0.95, 0.9, 0.8, 0.6, 0.55]
    selection = select_levels(sims, 3, 0.1)
    assert selection.indices == [0, 2, 3] and not selection.shortfall


def test_select_levels_shortfall_keeps_widest_spread():
    sims = [0.9, 0.88, 0.86, 0.5]
    selection = select_levels(sims, 3, 0.1)
    assert selection.shortfall
    assert selection.indices == [0, 2, 3]  # min gap 0.04 is the best any triple achieves, widest spread


def test_select_levels_fewer_candidates_than_levels():
    selection = select_levels([0.7, 0.9], 3, 0.1)
    assert selection.indices == [1, 0] and selection.shortfall


def test_select_levels_severity_order():
    sims = [0.9, 0.7, 0.5]
    severity = [1, 3, 2]  # the least similar candidate replaced fewer tokens than the one before it
    assert select_levels(sims, 3, 0.1).indices == [0, 1, 2]
    selection = select_levels(sims, 3, 0.1, severity)
    assert selection.shortfall and selection.indices == [0, 1]


def test_select_levels_shortfall_keeps_no_tied_levels_unless_asked():
    """Two candidates equally similar to the preferred answer cannot be ordered: in a shortfall the default keeps
    the largest set without such a tie (down to the greedy one); ``keep_ties`` keeps the widest-spread set."""
    sims = [0.6, 0.6, 0.2]  # only 0.6 -> 0.2 meets the gap; the third level would tie with the first
    assert select_levels(sims, 3, 0.1, keep_ties=True).indices == [0, 1, 2]
    selection = select_levels(sims, 3, 0.1, keep_ties=False)
    assert selection.indices == [0, 2] and selection.shortfall
    assert select_levels([0.5, 0.5], 3, 0.1, keep_ties=False).indices == [0]
    assert select_levels([0.5, 0.5], 3, 0.1, keep_ties=True).indices == [0, 1]
    # a tie-free triple still beats the greedy pair, and a strict gap is all it needs
    assert select_levels([0.9, 0.88, 0.88, 0.5], 3, 0.1, keep_ties=False).indices == [0, 1, 3]
    assert select_levels([0.9, 0.88, 0.87, 0.5], 3, 0.1, keep_ties=False).indices == [0, 2, 3]
