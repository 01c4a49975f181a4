"""Placing token positions on decoded text (``hscr_client.viewer._marks``)."""

from __future__ import annotations

from hscr_client.viewer import place_tokens


def spans(text: str, tokens: list[tuple[int, str]]) -> list[tuple[str, str]]:
    return [(text[p.start:p.end] if p.start >= 0 else "", p.how) for p in place_tokens(text, tokens)]


def test_word_level_positions_are_exact():
    text = "the ct shows a small nodule in the left lower region ."
    expected = [("left", "position"), ("ct", "position"), (".", "position")]
    assert spans(text, [(8, "left"), (1, "ct"), (11, ".")]) == expected
    placed = place_tokens(text, [(8, "left")])[0]
    assert text[:placed.start].split() == text.split()[:8]


def test_position_of_another_word_falls_back_to_the_nearest_occurrence():
    """A sub-word model's positions do not index words: the token's text is matched instead."""
    text = "a small nodule and a small mass"
    placements = place_tokens(text, [(7, "small")])  # model-token index 7 ~ the second "small"
    assert (text[placements[0].start:placements[0].end], placements[0].how) == ("small", "match")
    assert placements[0].start == text.rindex("small")


def test_subword_tokens_with_markers_match_inside_words():
    text = "the xray demonstrates a mass"
    assert spans(text, [(3, "\u2581dem"), (1, "\u0120xray")]) == [("dem", "match"), ("xray", "position")]


def test_one_span_is_never_marked_twice_and_missing_tokens_are_unplaced():
    text = "left and left"
    result = spans(text, [(0, "left"), (5, "left"), (9, "left"), (1, "lower"), (2, "")])
    assert result == [("left", "position"), ("left", "match"), ("", "unplaced"), ("", "unplaced"), ("", "unplaced")]


def test_position_hits_are_placed_before_fallback_matches():
    text = "right upper right"
    # The first token's position (9) is out of range; it must not take word 2, which the second names.
    result = place_tokens(text, [(9, "right"), (2, "right")])
    assert [(p.start, p.how) for p in result] == [(0, "match"), (12, "position")]
