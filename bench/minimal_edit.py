"""Why ``chosen`` has no 'minimal_edit' mode (issue #17, docs/trainer.md "The minimal edit"): what "the rejected string
with only its replaced tokens restored" is on HSCR's levels, measured on fixture items.

With ``replace_mode`` 'redecode' (the default, the paper's) a level re-decodes after each replacement, so its
continuation follows the hallucinated token. Restoring only the replaced tokens keeps that continuation: the result
is the own answer where the continuation did not move, and otherwise a string that is neither (e.g. own answer
"no , the image is normal ." -> level "yes , there is an abnormality ." -> restored "no , there is an abnormality .").
With ``replace_mode`` 'splice' the continuation never moves, so the restored level is always the own answer: the
minimal pair is ``--chosen own --replace-mode splice``. The fixture's tokenizer is word-level, so a level's words
are its tokens.

python bench/minimal_edit.py --n 200 --seed 8675      # about 20 s
"""

from __future__ import annotations

import argparse
import json
import sys

from hscr_client import HSCRParams
from hscr_worker.backends.transformers import TransformersBackend
from hscr_worker.fixture import resolve_model, synthetic
from hscr_worker.pipeline import PreparedItem, run_hscr
from hscr_worker.similarity import lexical


def restored(level) -> str:
    words = level.text.split()
    for r in level.replacements:
        words[r["position"]] = r["original"]
    return " ".join(words)


def measure(backend, items: list[PreparedItem], replace_mode: str) -> dict:
    results = run_hscr(backend, items, HSCRParams(chosen="own", replace_mode=replace_mode), lexical)
    counts = {"levels": 0, "restored_is_the_own_answer": 0, "restored_is_another_correct_answer": 0}
    for item, result in zip(items, results, strict=True):
        if result.error or result.own_answer != item.preferred:  # an edit restores the own answer: it must be right
            continue
        for level in result.levels:
            counts["levels"] += 1
            text = restored(level)
            counts["restored_is_the_own_answer"] += text == result.own_answer
            counts["restored_is_another_correct_answer"] += text != result.own_answer and text == item.preferred
    counts["share_restored_is_the_own_answer"] = counts["restored_is_the_own_answer"] / max(counts["levels"], 1)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fixture")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=8675)
    args = parser.parse_args(argv)
    backend = TransformersBackend(str(resolve_model(args.model)), device="cpu")
    items = [PreparedItem(f"me-{k}", e.question, e.image.convert("RGB"), e.answer)
             for k, e in enumerate(synthetic.make_examples(args.n, args.seed))]
    report = {mode: measure(backend, items, mode) for mode in ("redecode", "splice")}
    print(json.dumps({"model": args.model, "n": args.n, "seed": args.seed, **report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
