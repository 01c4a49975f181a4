"""Step 1: visual-token dropout over post-projector visual tokens."""

from __future__ import annotations

from typing import Literal

import torch

DropoutMode = Literal["remove", "zero"]


def keep_masks(n_tokens: int, ratio: float, n_masks: int, generator: torch.Generator) -> torch.Tensor:
    """Random uniform dropout masks, ``bool[n_masks, n_tokens]`` (True = keep).

    Each mask drops exactly ``round(ratio * n_tokens)`` tokens: at least one while ratio > 0, and
    below ratio 1 at most ``n_tokens - 1`` (``remove`` mode needs a token to hand the engine).
    """
    n_drop = min(n_tokens if ratio >= 1.0 else n_tokens - 1, max(1, round(ratio * n_tokens)))
    keep = torch.ones(n_masks, n_tokens, dtype=torch.bool)
    for m in range(n_masks):
        keep[m, torch.randperm(n_tokens, generator=generator)[:n_drop]] = False
    return keep


def apply_dropout(visual: torch.Tensor, keep: torch.Tensor, mode: DropoutMode) -> torch.Tensor:
    """Drop visual tokens: ``visual[n_tokens, hidden]``, ``keep[n_tokens]`` -> new tensor.

    ``remove`` returns only the kept rows (``[n_kept, hidden]``); ``zero`` keeps every position and
    zeroes the dropped rows. ``visual`` is not modified.
    """
    if mode == "remove":
        return visual[keep]
    if mode == "zero":
        return visual * keep.unsqueeze(-1).to(visual.dtype)
    raise ValueError(f"unknown dropout mode {mode!r}; use 'remove' or 'zero'")


def mask_generator(seed: int, key: str) -> torch.Generator:
    """A generator seeded by the job's mask seed and a stable hash of the item key."""
    import hashlib

    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:6], "big")
    return torch.Generator().manual_seed(seed * 1_000_003 + digest)
