"""Steps 2-4: logit shift, modality-coupled tokens and the contrastive reward.

All functions take per-position score rows ``[T, V]`` for the T response positions: row t holds the
model's scores for response token t given the prompt and the response prefix ``y_<t``.
"""

from __future__ import annotations

from typing import Literal

import torch

ShiftKind = Literal["logit", "logprob"]
RowValues = Literal["logits", "logprobs"]
Coupling = Literal["raise", "move"]


def token_shift(full: torch.Tensor, dropped: torch.Tensor, response: torch.Tensor,
                kind: ShiftKind = "logit", *, values: RowValues = "logits") -> torch.Tensor:
    """Shift of each response token, ``float[T]``: score under the full image minus the dropped one.

    ``kind='logit'`` compares raw logits; ``'logprob'`` compares log-softmax values (immune to a
    per-position offset of all logits). ``values``: what the rows hold, raw ``logits`` or
    ``logprobs`` already normalised over the whole vocabulary (used as they are: a top-k row cannot
    be renormalised without losing the mass outside it).
    """
    if kind == "logprob":
        if values == "logits":
            full, dropped = full.log_softmax(-1), dropped.log_softmax(-1)
    elif kind == "logit":
        if values != "logits":
            raise ValueError("the raw-logit shift needs rows of raw logits; these rows hold log-probabilities")
    else:
        raise ValueError(f"unknown shift kind {kind!r}")
    index = response.long().unsqueeze(-1)
    return (full.gather(-1, index) - dropped.gather(-1, index)).squeeze(-1).float()


def coupled_positions(shift: torch.Tensor, n: int, *, min_shift: float = 0.0,
                      eligible: torch.Tensor | None = None, coupling: Coupling = "raise") -> list[int]:
    """The top-``n`` modality-coupled positions, most coupled first.

    ``coupling='raise'`` ranks by the shift itself (the image raises the token: the paper's reading);
    ``'move'`` by its magnitude, so a token the image lowers is coupled too (the answer's word that is
    also what the model says when it sees poorly, e.g. its most common lesion kind). Positions whose
    score is below ``min_shift`` or with ``eligible == False`` (e.g. special tokens) are skipped.
    Ties keep the earlier position first.
    """
    if coupling == "move":
        shift = shift.abs()
    elif coupling != "raise":
        raise ValueError(f"unknown coupling {coupling!r}; use 'raise' or 'move'")
    ok = shift >= min_shift
    if eligible is not None:
        ok &= eligible
    candidates = [int(i) for i in torch.nonzero(ok).flatten()]
    candidates.sort(key=lambda i: (-float(shift[i]), i))
    return candidates[:n]


def contrastive_reward(full: torch.Tensor, dropped: torch.Tensor, beta: float) -> torch.Tensor:
    """Implicit alignment reward ``(1 + b) * logit_full - b * logit_drop`` (same shape as inputs).

    Its softmax is P_diff of the paper (the Visual Contrastive Decoding form): high where the image
    supports a token, low where the image disfavours it.
    """
    return (1.0 + beta) * full.float() - beta * dropped.float()
