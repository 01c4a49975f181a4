"""Multi-level preference losses (method.md section 2) as pure tensor functions.

Every function takes the same precomputed inputs, so each term is testable without a model:

- ``logratios``: ``(B, K+1)`` float, ``log pi(y) - log ref(y)`` with log-probs summed over response
  tokens. Column 0 is the preferred answer ``y_w``; column ``j`` is level ``y_lj`` (1 = mildest error).
- ``level_mask``: ``(B, K+1)`` bool, True where the column holds a real response (items may have
  fewer than K levels after reranking; column 0 is always True).
- ``gamma``: the temperature ``g`` of the paper (TRL's ``beta``).

Each returns a ``(B,)`` per-item loss. ``LOSSES`` maps a ``loss_type`` name to its function.

Anchors against likelihood displacement (the summed-log-prob loss is met by pushing every response down, the
preferred one too): ``nll`` (RPO, arXiv 2404.19733; TRL's ``rpo_alpha``), ``dpop_lambda`` inside every pair (DPOP,
arXiv 2402.13228), and mDPO's two terms (arXiv 2406.11839): ``anchor`` (the preferred answer's reward above 0) and
``image_conditional`` (the preferred answer more likely with the real image than with a dropped one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

PREFERRED = 0


def pair_mask(level_mask: torch.Tensor, kind: str) -> torch.Tensor:
    """``(B, K+1, K+1)`` bool: True at ``[b, w, l]`` when (w preferred over l) is a pair of ``kind``.

    explicit: w = 0 (the preferred answer), l >= 1. implicit: 1 <= w < l (milder error preferred).
    """
    n = level_mask.shape[1]
    index = torch.arange(n, device=level_mask.device)
    winner, loser = index[:, None], index[None, :]
    if kind == "explicit":
        allowed = (winner == PREFERRED) & (loser > PREFERRED)
    elif kind == "implicit":
        allowed = (winner > PREFERRED) & (loser > winner)
    else:
        raise ValueError(f"unknown pair kind {kind!r}")
    return allowed[None] & level_mask[:, :, None] & level_mask[:, None, :]


def pair_margins(logratios: torch.Tensor, gamma: float) -> torch.Tensor:
    """``(B, K+1, K+1)``: ``g * (logratio[w] - logratio[l])``, the implicit-reward margin of every pair."""
    rewards = gamma * logratios
    return rewards[:, :, None] - rewards[:, None, :]


def _pairwise_logistic(logratios: torch.Tensor, level_mask: torch.Tensor, gamma: float, kind: str,
                       dpop_lambda: float = 0.0) -> torch.Tensor:
    mask = pair_mask(level_mask, kind)
    margins = pair_margins(logratios, gamma)
    if dpop_lambda > 0:  # DPOP: a winner that lost likelihood against the reference pays lambda * that loss
        margins = margins - gamma * dpop_lambda * F.relu(-logratios)[:, :, None]
    losses = -F.logsigmoid(margins)
    return (losses * mask).sum(dim=(1, 2))


def explicit_loss(logratios: torch.Tensor, level_mask: torch.Tensor, gamma: float, *, dpop_lambda: float = 0.0,
                  **_) -> torch.Tensor:
    """``L_E = - sum_j log s(g [log pi/ref (y_w)] - g [log pi/ref (y_lj)])``: preferred vs each level.

    With a single level this is exactly pairwise DPO (sigmoid loss). ``dpop_lambda`` > 0 subtracts
    ``g * lambda * max(0, -log pi/ref (y_w))`` inside each pair (DPOP).
    """
    return _pairwise_logistic(logratios, level_mask, gamma, "explicit", dpop_lambda)


def implicit_loss(logratios: torch.Tensor, level_mask: torch.Tensor, gamma: float, *, dpop_lambda: float = 0.0,
                  **_) -> torch.Tensor:
    """``L_I = - sum_{j<m} log s(g [log pi/ref (y_lj)] - g [log pi/ref (y_lm)])``: milder error vs worse."""
    return _pairwise_logistic(logratios, level_mask, gamma, "implicit", dpop_lambda)


def anchor_loss(logratios: torch.Tensor, level_mask: torch.Tensor, gamma: float, **_) -> torch.Tensor:
    """mDPO's reward anchor: ``- log s(g [log pi/ref (y_w)])``, the preferred answer's reward kept above 0."""
    return -F.logsigmoid(gamma * logratios[:, PREFERRED])


def image_conditional_loss(logratios: torch.Tensor, level_mask: torch.Tensor, gamma: float, *,
                           dropped_logratios: torch.Tensor, **_) -> torch.Tensor:
    """mDPO's conditional preference: ``- log s(g [log pi/ref (y_w | image)] - g [log pi/ref (y_w | dropped)])``.

    ``dropped_logratios``: ``(B,)`` the preferred answer's log-ratio with the image's visual tokens dropped
    (the worker's dropout), so the model is rewarded for answering from the image, not from the question.
    """
    return -F.logsigmoid(gamma * (logratios[:, PREFERRED] - dropped_logratios))


def nll_loss(logratios: torch.Tensor, level_mask: torch.Tensor, gamma: float, *,
             chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor, **_) -> torch.Tensor:
    """Negative log-likelihood of the preferred answer per token (an optional SFT term; the paper has none).

    ``chosen_logps``: ``(B,)`` summed policy log-probs of ``y_w``; ``chosen_lengths``: ``(B,)`` token counts.
    """
    return -chosen_logps / chosen_lengths.clamp(min=1)


LossFn = Callable[..., torch.Tensor]
LOSSES: dict[str, LossFn] = {"explicit": explicit_loss, "implicit": implicit_loss, "nll": nll_loss,
                             "anchor": anchor_loss, "image_conditional": image_conditional_loss}

# Named variants (the paper's ablation rows) -> the loss terms they sum.
VARIANTS: dict[str, tuple[str, ...]] = {
    "dpo": ("explicit",),  # pairwise DPO: preferred vs each dispreferred response
    "explicit": ("explicit",),
    "implicit": ("implicit",),
    "hscr": ("explicit", "implicit"),
    "sft": ("nll",),  # supervised fine-tuning on the preferred answers: the control every recipe must beat
    "mdpo": ("explicit", "anchor", "image_conditional"),  # mDPO's objective on HSCR's pairs
}


def pair_statistics(logratios: torch.Tensor, level_mask: torch.Tensor, gamma: float) -> dict[str, torch.Tensor]:
    """Detached logging statistics: mean reward margin and accuracy (margin > 0) per pair kind."""
    margins = pair_margins(logratios.detach(), gamma)
    stats: dict[str, torch.Tensor] = {}
    for kind in ("explicit", "implicit"):
        mask = pair_mask(level_mask, kind)
        count = mask.sum()
        if count == 0:
            continue
        stats[f"margins/{kind}"] = (margins * mask).sum() / count
        stats[f"accuracies/{kind}"] = ((margins > 0) & mask).sum() / count
    rewards = gamma * logratios.detach()
    stats["rewards/chosen"] = rewards[:, PREFERRED].mean()
    for level in range(1, logratios.shape[1]):
        present = level_mask[:, level]
        if present.any():
            stats[f"rewards/level{level}"] = rewards[present, level].mean()
    return stats
