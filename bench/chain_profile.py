"""Where a transformers decode batch spends its steps (docs/bench.md, "A whole stream in one chained batch"): plain
greedy and HSCR on one batch of the compute-bound model (``compute_bound.py``'s 130 M LLaVA-shaped model, random
weights, 48 forced tokens), every forward timed; decode steps grouped by how many rows they ran, with the rows
that fed or decided a token (active) against the idle ones, and the tokens HSCR decided.

python bench/chain_profile.py --batch-size 8            # 4 batches one by one (run_hscr each), about 3 min
python bench/chain_profile.py --batch-size 8 --stream   # the same 4 batches as one chained stream (stream_chain)
python bench/chain_profile.py --batch-size 32 --chunks 1 --no-speculative-levels   # levels past n_levels wait
"""

from __future__ import annotations  # noqa: I001  (the torchvision shim must import first)

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from hscr_worker.backends.transformers import TransformersBackend  # first: makes torchvision importable
import torch  # noqa: E402
from common import plain_greedy  # noqa: E402
from compute_bound import compute_bound_config  # noqa: E402
from gpu_scale import ARCHS, build_processor, synthetic_items, write_random_checkpoint  # noqa: E402
from hscr_client import HSCRParams  # noqa: E402
from hscr_worker.pipeline import run_hscr, run_hscr_stream  # noqa: E402
from hscr_worker.similarity import get_similarity  # noqa: E402


def profile(backend: TransformersBackend, run) -> dict:
    calls: list[tuple[int, int, int, float]] = []  # (rows, new tokens per row, active rows, seconds)
    forward = backend._forward

    def timed(embeds, positions, mask, types=None, cache=None):
        began = time.perf_counter()
        out = forward(embeds, positions, mask, types, cache)
        calls.append((embeds.shape[0], embeds.shape[1], int(mask[:, -1].sum()), time.perf_counter() - began))
        return out

    backend._forward = timed  # instance attribute: shadows the method for this run
    decoded = backend.stats.decoded_tokens
    began = time.perf_counter()
    try:
        run()
    finally:
        del backend._forward
    steps = [c for c in calls if c[1] == 1]
    by_rows: dict[int, list] = defaultdict(lambda: [0, 0.0, 0])
    for rows, _, active, seconds in steps:
        by_rows[rows][0] += 1
        by_rows[rows][1] += seconds
        by_rows[rows][2] += active
    return {"seconds": time.perf_counter() - began, "prefill_seconds": sum(c[3] for c in calls if c[1] > 1),
            "decode_steps": len(steps), "decode_seconds": sum(c[3] for c in steps),
            "row_steps": sum(c[0] for c in steps), "active_row_steps": sum(c[2] for c in steps),
            "decoded_tokens": backend.stats.decoded_tokens - decoded,
            "steps_by_rows": {rows: {"steps": n, "ms_per_step": 1000 * s / n, "active_share": a / (n * rows)}
                              for rows, (n, s, a) in sorted(by_rows.items())}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--chunks", type=int, default=4, help="batches (run one by one, or as one stream)")
    parser.add_argument("--no-speculative-levels", action="store_true",
                        help="levels past n_levels wait for the reranker (speculative_levels=False)")
    args = parser.parse_args(argv)
    config = compute_bound_config()
    processor = build_processor(config)
    n = args.batch_size * args.chunks
    items = synthetic_items(n, config, 24, 0)
    similarity = get_similarity("lexical")
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = Path(workdir) / "random-compute-bound"
        write_random_checkpoint(config, processor, model_dir, device=torch.device("cpu"), dtype=torch.float32,
                                portable=False)
        backend = TransformersBackend(str(model_dir), device="cpu", batch_size=args.batch_size, ignore_eos=True,
                                      profile=ARCHS["llava-1.5-7b"].profile, stream_chain=args.stream,
                                      speculative_levels=not args.no_speculative_levels)
        params = backend.params(HSCRParams(max_new_tokens=48, min_shift=0.0).model_dump(exclude_unset=True))
        plain_greedy(backend, items[:1], 2)  # warm-up, untimed
        run_hscr(backend, items[:1], params.model_copy(update={"max_new_tokens": 4}), similarity)
        chunks = [(k, items[k:k + args.batch_size]) for k in range(0, n, args.batch_size)]
        report = {
            "batch_size": args.batch_size, "rows": n, "stream": args.stream,
            "speculative_levels": not args.no_speculative_levels,
            "plain": profile(backend, lambda: [plain_greedy(backend, chunk, 48) for _, chunk in chunks]),
            "hscr": profile(backend, lambda: list(run_hscr_stream(backend, iter(chunks), params, similarity))
                            if args.stream else [run_hscr(backend, chunk, params, similarity) for _, chunk in chunks]),
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
