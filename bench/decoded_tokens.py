"""Decoded tokens, HSCR / plain greedy, on the trained fixture Med-VLMs (issue #18): every level in one call
(``candidates_per_round`` 0, the paper's way) against levels that share their decoding (1, the default).

Trained models answer at their own length and a replacement mostly fires at its place, so this is the work HSCR
adds on a model that answers from the image (``bench/compute_bound.py`` measures time on a random-weight one).
Both settings run on the same held-out items; the script also counts the items whose kept levels are the same
either way (rounds stop an item once it keeps its levels with the gap, so a level decoded later in one call,
more similar to the preferred answer than a kept one, can change what the reranker keeps).

    python bench/decoded_tokens.py --out bench/results/decoded_tokens.json
"""

from __future__ import annotations  # noqa: I001  (the torchvision shim must import first)

import argparse
import sys

from hscr_worker.backends.transformers import TransformersBackend  # first: makes torchvision importable

import torch  # noqa: E402
from common import env_block, plain_greedy, write_json  # noqa: E402
from hscr_client import HSCRParams  # noqa: E402

from hscr_worker.fixture import FIXTURE_MODELS, resolve_model, synthetic  # noqa: E402
from hscr_worker.pipeline import PreparedItem, run_hscr  # noqa: E402
from hscr_worker.similarity import get_similarity  # noqa: E402


def _levels(results) -> list:
    return [[(lv.text, lv.n_replacements) for lv in r.levels] for r in results]


def measure_model(model: str, n: int, seed: int) -> dict:
    backend = TransformersBackend(resolve_model(model), device="cpu")
    examples = synthetic.make_examples(n, seed)
    items = [PreparedItem(f"q-{i}", e.question, e.image.convert("RGB"), e.answer) for i, e in enumerate(examples)]
    before = backend.stats.decoded_tokens
    plain_greedy(backend, items, HSCRParams().max_new_tokens)
    plain = backend.stats.decoded_tokens - before
    entry: dict = {"plain_decoded_tokens": plain}
    levels = {}
    for per_round in (0, 1):
        params = backend.params({"candidates_per_round": per_round})  # the family's shipped defaults
        before = backend.stats.decoded_tokens
        results = run_hscr(backend, items, params, get_similarity(params.similarity))
        decoded = backend.stats.decoded_tokens - before
        entry[f"candidates_per_round_{per_round}"] = {"decoded_tokens": decoded,
                                                      "generated_tokens_ratio": round(decoded / plain, 3)}
        levels[per_round] = _levels(results)
    entry["items_with_the_same_levels"] = sum(a == b for a, b in zip(levels[0], levels[1], strict=True))
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["fixture", "fixture-qwen2.5-vl", "fixture-gemma3"],
                        choices=sorted(FIXTURE_MODELS))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2468)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    report = {"benchmark": "decoded_tokens", "env": env_block(torch.device("cpu")), "n": args.n, "seed": args.seed,
              "models": {}}
    for model in args.models:
        entry = report["models"][model] = measure_model(model, args.n, args.seed)
        one_call = entry["candidates_per_round_0"]["generated_tokens_ratio"]
        shared = entry["candidates_per_round_1"]["generated_tokens_ratio"]
        print(f"{model:>20}: HSCR / plain decoded tokens {one_call:.2f}x in one call, {shared:.2f}x shared; "
              f"the same levels on {entry['items_with_the_same_levels']} of {args.n} items", flush=True)
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
