"""HSCR parameters: one validated model shared by the core, the CLI, the API and the SDK.

Every choice that ``docs/method.md`` marks [choice] is a field here. Each field's description says
its default and, where the paper gives one, the paper's setting.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class HSCRParams(BaseModel):
    """Parameters of hierarchical self-contrastive rewarding (Jiang et al., ACL 2025)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dropout_ratio: float = Field(
        0.95, gt=0.0, le=1.0,
        description="Fraction of visual tokens dropped. Default 0.95: measured best on the fixture, whose "
                    "64-token images still show their modality in any 30 percent of tokens. "
                    "Paper: 0.7 (ablated 0.3-0.9).")
    dropout_mode: Literal["remove", "zero"] = Field(
        "remove",
        description="[choice] 'remove' deletes the dropped visual tokens (measured stronger on the fixture), "
                    "'zero' zeroes their embeddings and keeps their positions. Paper: token dropout, mode unstated.")
    n_masks: int = Field(
        1, ge=1, le=32,
        description="[choice] Independent dropout masks; the shift is averaged over them (their scores "
                    "too, for the candidates and the reward). Paper: 1.")
    mask_seed: int = Field(0, ge=0, description="[choice] Seed of the dropout masks (per item: seed + item hash).")
    contrast_beta: float = Field(
        0.9, ge=0.0, le=10.0,
        description="b in P_diff = softmax((1+b) logit_full - b logit_drop). Paper: 0.9.")
    shift: Literal["logit", "logprob"] = Field(
        "logprob",
        description="[choice] Coupling score at a response position: raw-logit or log-prob difference "
                    "between the full and the dropped image.")
    coupling: Literal["raise", "move"] = Field(
        "raise",
        description="[choice] Which tokens are modality-coupled: those the image raises most ('raise': the "
                    "largest shift, the paper's reading) or moves most either way ('move': the largest |shift|, "
                    "so a word the image lowers counts too, e.g. the answer's word that is also what the model "
                    "says when it sees poorly). Paper: raise.")
    n_coupled: int = Field(10, ge=1, le=64, description="Top-n modality-coupled tokens. Paper: 10.")
    min_shift: float = Field(
        0.0, ge=0.0,
        description="[choice] A coupled token needs at least this shift; tokens the image does not move "
                    "are never replaced. Paper: none (top-n only).")
    top_k_candidates: int = Field(
        10, ge=1, le=256,
        description="[choice] Hallucinated candidates: the top-K tokens of the candidate_pool distribution "
                    "(minus the original, above the plausibility floor); the lowest reward wins.")
    candidate_pool: Literal["dropped", "full"] = Field(
        "dropped",
        description="[choice] Distribution whose top-K tokens are the hallucination candidates: the "
                    "dropped-image one (what the model says when it sees poorly; default) or the full-image one.")
    plausibility: float = Field(
        0.1, ge=0.0, le=1.0,
        description="[choice] Adaptive plausibility (as in Visual Contrastive Decoding): a candidate needs "
                    "p(v) >= plausibility * max p in the candidate distribution.")
    replace_mode: Literal["redecode", "splice"] = Field(
        "redecode",
        description="[choice] After a replacement, re-decode the rest under the full image (default) or "
                    "keep the rest of the response (splice).")
    fire_after_divergence: bool = Field(
        True,
        description="[choice] Re-decoding a level: once a replacement has changed the continuation, a later planned "
                    "replacement still fires where the model next wants its original token (true), or is left "
                    "unfired (false; the level keeps the replacements that fired at their planned steps).")
    drop_corrections: bool = Field(
        True,
        description="[choice] Drop a candidate more similar to the preferred answer than the response it corrupts "
                    "(by the reranking similarity): where the model's answer is wrong, such a re-decode corrected "
                    "one of its errors instead of adding one, and would give a level less wrong than the model "
                    "itself and levels out of order. Paper: no such check (false).")
    n_levels: int = Field(3, ge=1, le=16, description="j: dispreferred levels kept after reranking. Paper: 3.")
    min_similarity_gap: float = Field(
        0.1, ge=0.0, le=1.0,
        description="Minimum similarity gap between adjacent kept levels. Paper: 0.1.")
    severity_order: bool = Field(
        True,
        description="[choice] Reranking also requires each kept level to replace at least as many tokens as "
                    "the milder one before it, so similarity and error degree agree. Paper: similarity only.")
    keep_tied_levels: bool = Field(
        True,
        description="[choice] Where fewer than n_levels candidates meet the gap (a shortfall), keep the widest-spread "
                    "set even when two adjacent levels are equally similar to the preferred answer (true; the "
                    "reranker cannot order such a pair, so its order is a guess), or keep the largest set without "
                    "such a tie (false: fewer levels, every implicit pair ordered by similarity). Paper: the "
                    "widest-spread set.")
    candidates_per_round: int = Field(
        1, ge=0, le=64,
        description="[choice] Levels each item re-decodes per engine call, mildest first; after each call the "
                    "reranker runs and an item stops once it keeps n_levels levels with the gap, and a level "
                    "continues the decode of the levels before it up to where its own new replacement fires "
                    "(exact: the same text as decoding it anew). 1 (default; the transformers backend): 20-40 % "
                    "fewer decoded tokens than every level at once, the same quality figures and the same levels on "
                    "99-100 % of fixture items; 0 (the vLLM backend's default where unset): every level in one "
                    "call, then rerank, as the paper generates all n_coupled levels (fewer engine calls: faster "
                    "where extra concurrent sequences are nearly free, as in vLLM's continuous batching; "
                    "docs/bench.md).")
    similarity: str = Field(
        "lexical",
        description="[choice] Similarity for reranking: 'lexical' (token F1, no model) or a "
                    "sentence-transformers model name or local path.")
    corrupt: Literal["own", "preferred"] = Field(
        "own",
        description="[choice] Which response is corrupted: the model's own greedy answer (default) or the "
                    "preferred answer by teacher forcing.")
    chosen: Literal["reference", "own"] = Field(
        "reference",
        description="[choice] The preferred answer of each pair: 'reference' (the item's answer; the model's own "
                    "where an item has none) or 'own' (on-policy: the model's own answer where it agrees with the "
                    "reference up to case, spacing and final punctuation, else the reference). Paper: the "
                    "reference (the dataset's answer).")
    own_rejected: bool = Field(
        False,
        description="[choice] The model's own answer, where it disagrees with the preferred answer, is a "
                    "dispreferred candidate too (an on-policy negative: the error the model makes), reranked with "
                    "the corruptions as a response with 0 replacements; an item whose answer no image token moves "
                    "keeps it as its one level instead of failing. For short closed-form references only: against a "
                    "free-worded one nearly every own answer disagrees. Paper: no (levels are corruptions only).")
    max_new_tokens: int = Field(64, ge=1, le=2048, description="Generation budget for every decode.")

    @model_validator(mode="before")
    @classmethod
    def _json_types(cls, data: object) -> object:
        """A value of the wrong JSON type is refused, as the schema says, instead of coerced: a boolean or a
        string for a number, anything but a boolean for a boolean (schemathesis found ``false`` and ``0``
        accepted). 49.0 stays a valid integer, as in JSON Schema; pydantic refuses 49.5."""
        if not isinstance(data, dict):
            return data
        for name, value in data.items():
            kind = cls.model_fields[name].annotation if name in cls.model_fields else None
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, not {value!r}")
            if kind in (int, float) and isinstance(value, bool | str):
                raise ValueError(f"{name} must be a number, not {value!r}")
        return data

    @model_validator(mode="after")
    def _check(self) -> HSCRParams:
        if self.n_levels > self.n_coupled:
            raise ValueError(f"n_levels ({self.n_levels}) cannot exceed n_coupled ({self.n_coupled}): "
                             "each level replaces one more coupled token")
        if self.dropout_mode == "remove" and self.dropout_ratio >= 1.0:
            raise ValueError("dropout_ratio=1.0 with dropout_mode='remove' would remove the whole image; use "
                             "dropout_mode='zero' to blank every visual token, or a dropout_ratio below 1")
        return self

    @classmethod
    def paper(cls, **overrides) -> HSCRParams:
        """The paper's reading: one mask removing 70 % of the visual tokens, raw-logit shift, the tokens it raises
        most (top-n only), every level decoded in one call, reranking by similarity alone; a family's defaults
        change none of it."""
        setting = {"dropout_ratio": 0.7, "dropout_mode": "remove", "n_masks": 1, "shift": "logit", "coupling": "raise",
                   "min_shift": 0.0, "fire_after_divergence": True, "severity_order": False, "candidates_per_round": 0,
                   "drop_corrections": False, "keep_tied_levels": True}
        return cls(**{**setting, **overrides})
