"""The dataset contract: the two configs HSCR writes, as ``datasets`` features.

Layout of a dataset (a local directory or an S3 prefix)::

    pairs/part-*.parquet    TRL DPOTrainer's vision format, one row per preference pair
    ranked/part-*.parquet   one row per item: chosen answer plus ranked dispreferred levels
    manifest.json           shards, row counts, sha256, parameters, model, versions (written last)
    README.md               dataset card
    errors.jsonl            items that failed, with their custom_id and a reason
    skipped.jsonl           items never run, with their custom_id and why ("cancelled" or "expired")

Shards carry the ``datasets`` schema metadata, so ``load_dataset("parquet", ...)`` decodes images
and TRL trains on ``pairs`` with no conversion code. Needs the ``data`` extra (pyarrow, datasets).
"""

from __future__ import annotations

from functools import cache

PAIRS = "pairs"
RANKED = "ranked"
CONFIGS = (PAIRS, RANKED)
MANIFEST = "manifest.json"
CARD = "README.md"
ERRORS = "errors.jsonl"
SKIPPED = "skipped.jsonl"
# LLaVA-format data writes the image into the question ("<image>\nWhat is ..."). Rows carry the question
# without it: the prompt's image entry (``user_turn``) stands for the image, and a second one would not train.
IMAGE_MARKER = "<image>"


@cache
def features(config: str):
    """The ``datasets.Features`` of ``config`` (``pairs`` or ``ranked``)."""
    from datasets import Features, Image, List, Value

    message = {"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}
    if config == PAIRS:
        return Features({
            "custom_id": Value("string"),
            "prompt": List(message),
            "chosen": List(message),
            "rejected": List(message),
            "images": List(Image()),
            "pair_type": Value("string"),  # explicit: preferred vs a level; implicit: level j vs level m > j
            "chosen_level": Value("int32"),  # 0 = the preferred answer
            "rejected_level": Value("int32"),
            "chosen_similarity": Value("float32"),
            "rejected_similarity": Value("float32"),
            "rejected_reward": Value("float32"),  # sum of the contrastive rewards of its replacements
        })
    if config == RANKED:
        replacement = {"position": Value("int32"), "original": Value("string"), "replacement": Value("string"),
                       "reward": Value("float32"), "shift": Value("float32")}
        return Features({
            "custom_id": Value("string"),
            "question": Value("string"),
            "image": Image(),
            "chosen": Value("string"),
            "own_answer": Value("string"),
            "corrupted": Value("string"),
            "coupled": List({"position": Value("int32"), "token": Value("string"), "shift": Value("float32")}),
            "levels": List({
                "level": Value("int32"), "text": Value("string"), "n_replacements": Value("int32"),
                "similarity": Value("float32"), "unfired": Value("int32"), "replacements": List(replacement),
            }),
            "n_candidates": Value("int32"),
            "shortfall": Value("bool"),
        })
    raise ValueError(f"unknown config {config!r}; expected one of {CONFIGS}")


def user_turn(question: str) -> list[dict]:
    """The conversational prompt of one image-question item (TRL's vision format)."""
    return [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": question}]}]


def assistant_turn(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def pair_rows(ranked: dict) -> list[dict]:
    """Expand one ``ranked`` row into its ``pairs`` rows.

    Explicit pairs: the preferred answer vs each level. Implicit pairs: level j vs level m, j < m
    (the milder error is preferred). With 3 levels: 3 explicit + 3 implicit pairs.
    """
    levels = sorted(ranked["levels"], key=lambda lv: lv["level"])
    image = ranked["image"]
    preferred = {"level": 0, "text": ranked["chosen"], "similarity": 1.0, "replacements": []}
    pairs = [("explicit", preferred, lv) for lv in levels]
    pairs += [("implicit", a, b) for i, a in enumerate(levels) for b in levels[i + 1:]]
    return [{
        "custom_id": ranked["custom_id"],
        "prompt": user_turn(ranked["question"]),
        "chosen": assistant_turn(win["text"]),
        "rejected": assistant_turn(lose["text"]),
        "images": [image],
        "pair_type": kind,
        "chosen_level": win["level"],
        "rejected_level": lose["level"],
        "chosen_similarity": win["similarity"],
        "rejected_similarity": lose["similarity"],
        "rejected_reward": float(sum(r["reward"] for r in lose["replacements"])),
    } for kind, win, lose in pairs]
