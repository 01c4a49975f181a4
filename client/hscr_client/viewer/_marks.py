"""Place token-level annotations (replacements, coupled tokens) on the text they belong to.

HSCR records a position per annotated token: ``coupled[].position`` indexes the tokens of the
corrupted response and ``levels[].replacements[].position`` the tokens of that level's text, both in
the *model's* tokenization. The viewer has only the decoded text, so a mark is placed:

1. ``position``: on the whitespace-separated word at that index when that word is the token (exact
   for word-level tokenizers such as the fixture model's);
2. ``match``: otherwise on the occurrence of the token's text nearest to that index (a whole word
   first, then any substring, for sub-word tokens of BPE/SentencePiece models), never on a span
   already marked;
3. ``unplaced``: otherwise not at all; the viewer lists such tokens under the text instead.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# Word-boundary markers that sub-word tokenizers keep in decoded single tokens.
_TOKEN_MARKERS = "\u2581\u0120\u010a"  # SentencePiece "▁", GPT-2 "Ġ" (space) and "Ċ" (newline)
_WORD = re.compile(r"\S+")

POSITION, MATCH, UNPLACED = "position", "match", "unplaced"


@dataclass(frozen=True)
class Placement:
    """Where one token sits in the text: characters ``[start, end)``, or nowhere (``how == "unplaced"``)."""

    start: int
    end: int
    how: str


def token_text(token: str) -> str:
    """The visible text of a decoded token: no surrounding whitespace or word-boundary markers."""
    return token.strip().strip(_TOKEN_MARKERS).strip()


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the whitespace-separated words of ``text``."""
    return [m.span() for m in _WORD.finditer(text)]


def _overlaps(span: tuple[int, int], taken: list[tuple[int, int]]) -> bool:
    return any(span[0] < end and start < span[1] for start, end in taken)


def place_tokens(text: str, tokens: Sequence[tuple[int, str]]) -> list[Placement]:
    """Placements of ``(position, token)`` pairs in ``text``, in the order given (see the module doc).

    Exact position hits are placed first, so a fallback match never takes a word that another
    token's position names.
    """
    words = word_spans(text)
    placements: list[Placement | None] = [None] * len(tokens)
    taken: list[tuple[int, int]] = []
    for k, (position, token) in enumerate(tokens):
        wanted = token_text(token)
        if wanted and 0 <= position < len(words):
            start, end = words[position]
            if text[start:end] == wanted and not _overlaps((start, end), taken):
                placements[k] = Placement(start, end, POSITION)
                taken.append((start, end))
    for k, (position, token) in enumerate(tokens):
        wanted = token_text(token)
        if placements[k] is not None or not wanted:
            continue
        whole = [(i, span) for i, span in enumerate(words) if text[span[0]:span[1]] == wanted]
        partial = [(_word_index(words, m.start()), m.span()) for m in re.finditer(re.escape(wanted), text)]
        for candidates in (whole, partial):
            free = [(i, span) for i, span in candidates if not _overlaps(span, taken)]
            if free:
                _, span = min(free, key=lambda c: (abs(c[0] - position), c[0]))
                placements[k] = Placement(span[0], span[1], MATCH)
                taken.append(span)
                break
    return [p if p is not None else Placement(-1, -1, UNPLACED) for p in placements]


def _word_index(words: list[tuple[int, int]], char: int) -> int:
    for i, (start, end) in enumerate(words):
        if start <= char < end:
            return i
    return len(words)
