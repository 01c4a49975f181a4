"""Steps 5-6: hallucinated replacements, level plans and the forced-decoding decision.

``ForcedDecoder.next_token`` is the one decision function both backends use: the transformers
backend calls it from a ``LogitsProcessor``, the vLLM backend from its logits-processor adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

CandidatePool = Literal["dropped", "full"]


@dataclass(frozen=True)
class Replacement:
    """Replace the token at ``position`` (``original``) by the hallucinated ``token``."""

    position: int
    original: int
    token: int
    reward: float
    shift: float


def hallucinated_token(full_row: torch.Tensor, dropped_row: torch.Tensor, original: int, *, beta: float,
                       top_k: int, pool: CandidatePool = "dropped", plausibility: float = 0.1,
                       banned: Sequence[int] = ()) -> tuple[int, float] | None:
    """Pick the hallucinated token for one position: ``(token, reward)`` or None if no candidate.

    Candidates are the ``top_k`` tokens of the ``pool`` distribution (the dropped-image one by
    default: what the model finds plausible when it sees the image poorly), minus ``original`` and
    ``banned``, that pass the adaptive plausibility test ``p(v) >= plausibility * max p``. The winner
    has the lowest contrastive reward: plausible, yet disfavoured by the image.

    Rows from an engine that returns only the top-k tokens hold -inf elsewhere. Candidates are
    tokens the pool row returned; in the reward, a candidate missing from the other row takes that
    row's smallest returned score, an upper bound on its own (with the default dropped pool: a token
    the full image ranks below its top-k is, if anything, more disfavoured than the bound says).
    """
    from .coupling import contrastive_reward

    source = dropped_row if pool == "dropped" else full_row
    probs = source.float().softmax(-1)
    allowed = (probs >= plausibility * probs.max()) & torch.isfinite(source)  # -inf: not returned by the engine
    allowed[original] = False
    if banned:
        allowed[list(banned)] = False
    k = min(top_k, source.numel())
    top = torch.topk(source.float(), k).indices
    top = top[allowed[top]]
    if top.numel() == 0:
        return None
    reward = contrastive_reward(_bounded(full_row)[top], _bounded(dropped_row)[top], beta)
    best = int(torch.argmin(reward))
    return int(top[best]), float(reward[best])


def _bounded(row: torch.Tensor) -> torch.Tensor:
    """``row`` with each -inf (a token the engine did not return) raised to the smallest finite score."""
    known = torch.isfinite(row)
    if bool(known.all()) or not bool(known.any()):
        return row
    return row.masked_fill(~known, row[known].min())


def level_plans(replacements: Sequence[Replacement]) -> list[list[Replacement]]:
    """Level m replaces the m most coupled positions (``replacements`` come in coupling order: by shift, or by
    |shift| with ``coupling='move'``).

    Each plan is returned in response order, the order in which decoding meets it.
    """
    return [sorted(replacements[:m], key=lambda r: r.position) for m in range(1, len(replacements) + 1)]


def splice(response: Sequence[int], plan: Sequence[Replacement]) -> list[int]:
    """Splice mode: substitute the planned tokens in place and keep the rest of the response."""
    out = list(response)
    for r in plan:
        out[r.position] = r.token
    return out


@dataclass
class ForcedDecoder:
    """Per-request state for re-decoding a response with planned replacements.

    A replacement fires only where the model itself is about to emit the original token: while the
    re-decoded prefix still follows ``original`` (except at replaced steps) that is exactly the
    planned step; once the re-decode diverges (a replacement changed what follows), it is the next
    step where the model wants that token. A replacement that never finds its token is left out and
    counted as unfired.

    ``response_prefix``: response tokens the re-decode starts from (they sit in the prompt, so
    they are never decoded). ``next_token`` is then given only the tokens generated after them;
    steps, alignment and ``fired`` still count from the start of the response. A prefix copied
    from an earlier decode (``divergence``) may hold replacements that already fired: ``fired``
    then starts with them, and the alignment is recomputed from the prefix on the first step.

    ``after_divergence=False``: once the re-decode has diverged, no later replacement fires (each is left
    unfired): the level keeps the replacements that fired at their planned steps and the continuation they led to.
    """

    original: Sequence[int]
    plan: Sequence[Replacement]
    response_prefix: Sequence[int] = ()
    fired: list[tuple[int, Replacement]] = field(default_factory=list)  # (step, replacement)
    aligned: bool = True
    _seen: int = 0
    after_divergence: bool = True

    def _ingest(self, prefix: Sequence[int]) -> None:
        fired_steps = {step for step, _ in self.fired}
        for step in range(self._seen, len(prefix)):
            expected = self.original[step] if step < len(self.original) else None
            if step not in fired_steps and prefix[step] != expected:
                self.aligned = False
        self._seen = len(prefix)

    def next_token(self, prefix: Sequence[int], greedy: int) -> int | None:
        """The token to force at the next step, or None to keep the model's choice.

        ``prefix``: the tokens generated so far (after ``response_prefix``); ``greedy``: the model's
        own choice for this step.
        """
        if self.response_prefix:
            prefix = [*self.response_prefix, *prefix]
        self._ingest(prefix)
        if len(self.fired) == len(self.plan) or not (self.aligned or self.after_divergence):
            return None
        pending = self.plan[len(self.fired)]
        step = len(prefix)
        # The model must still want the original token here: after an earlier replacement changed
        # the continuation (e.g. "a" -> "no" leads to "no abnormality"), forcing a later planned token
        # at its old step would produce malformed text.
        if greedy != pending.original or (self.aligned and step != pending.position):
            return None
        self.fired.append((step, pending))
        return pending.token

    @property
    def unfired(self) -> list[Replacement]:
        return list(self.plan[len(self.fired):])

    def follows_original(self) -> bool:
        """Whether the response prefix is the original but at its fired steps (so each pending replacement
        fires at its planned position); the first ``next_token`` would find the same."""
        self._ingest(self.response_prefix)
        return self.aligned


def divergence(original: Sequence[int], plan: Sequence[Replacement], tokens: Sequence[int], greedy_at: dict[int, int],
               *, after_divergence: bool = True) -> tuple[int, list[tuple[int, Replacement]]]:
    """How far a re-decode with ``plan`` would follow an earlier decode of the same prompt and image.

    ``tokens``: the earlier decode's response; ``greedy_at``: step -> the model's own greedy choice
    where that decode forced another token (everywhere else the emitted token is the greedy one).
    Greedy decoding is deterministic, so the new re-decode emits exactly ``tokens`` up to the first
    step where ``plan``'s decoder decides otherwise (fires where the earlier one did not, or the
    reverse). Returns ``(steps, fired)``: how many steps agree, and the replacements fired in them
    (``steps == len(tokens)``: it agrees all along, and where the earlier decode ended, by its stop
    token or its budget, the new one ends too).

    Level m+1 adds one replacement to level m, so its re-decode mostly repeats level m's; this is
    how much of it need not be decoded again (the levels share their decoding as a trie does).
    """
    decoder = ForcedDecoder(original, plan, after_divergence=after_divergence)
    for step, token in enumerate(tokens):
        before = list(decoder.fired)
        greedy = greedy_at.get(step, token)
        forced = decoder.next_token(tokens[:step], greedy)
        if (greedy if forced is None else forced) != token:
            return step, before
    return len(tokens), list(decoder.fired)
