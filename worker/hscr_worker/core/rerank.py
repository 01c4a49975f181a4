"""Step 7: similarity-aware reranking of the dispreferred candidates."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


def token_f1(a: str, b: str) -> float:
    """Lexical similarity: F1 of the bags of lower-cased whitespace tokens (1.0 for two empties)."""
    ta, tb = Counter(a.lower().split()), Counter(b.lower().split())
    if not ta and not tb:
        return 1.0
    common = sum((ta & tb).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(ta.values()), common / sum(tb.values())
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class Selection:
    indices: list[int]  # into the candidate list, most similar (mildest) first
    shortfall: bool  # True when fewer than j candidates met the gap: the widest-spread set was kept


def select_levels(similarities: Sequence[float], j: int, min_gap: float,
                  severity: Sequence[int] | None = None, keep_ties: bool = True) -> Selection:
    """Keep ``j`` candidates, most similar first, whose adjacent similarities differ by >= ``min_gap``.

    Greedy from the most similar candidate. With ``severity`` (e.g. the number of replaced tokens),
    a kept candidate must also be at least as severe as the one before it, so both orderings agree.
    When fewer than ``j`` qualify, keep the ``j`` severity-consistent candidates whose smallest
    adjacent gap is largest (ties: the larger total spread), or the greedy set when no ``j`` are
    consistent, and flag a shortfall; with fewer than ``j`` candidates in all, keep them all.
    Without ``keep_ties`` a shortfall never keeps two adjacent levels of equal similarity (the
    reranker cannot order them): it keeps the largest such set that has none, down to the greedy one.
    """
    order = sorted(range(len(similarities)), key=lambda i: (-similarities[i], i))

    def consistent(a: int, b: int) -> bool:
        return severity is None or severity[b] >= severity[a]

    kept: list[int] = []
    for i in order:
        if not kept or (similarities[kept[-1]] - similarities[i] >= min_gap - 1e-9 and consistent(kept[-1], i)):
            kept.append(i)
        if len(kept) == j:
            return Selection(kept, shortfall=False)

    def spread(combo: tuple[int, ...]) -> tuple[float, float]:
        gaps = [similarities[a] - similarities[b] for a, b in itertools.pairwise(combo)]
        return min(gaps), similarities[combo[0]] - similarities[combo[-1]]

    def allowed(combo: tuple[int, ...]) -> bool:
        return all(consistent(a, b) and (keep_ties or similarities[a] - similarities[b] > 1e-9)
                   for a, b in itertools.pairwise(combo))

    for size in range(min(j, len(order)), max(len(kept), 1), -1):
        ordered = [c for c in itertools.combinations(order, size) if allowed(c)]
        if ordered:
            return Selection(list(max(ordered, key=spread)), shortfall=True)
        if keep_ties:
            break  # the widest-spread set of this size or, where none is consistent, the greedy one
    return Selection(kept, shortfall=len(kept) < j)
