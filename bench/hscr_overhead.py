"""What HSCR costs over plain greedy generation, on the bundled fixture Med-VLM (issue #2, section 7).

For each batch size, the same held-out fixture items go through plain greedy generation (encode the
image, one greedy decode) and through HSCR (``run_hscr``: own answer, scoring under the full and the
dropped images, re-decoding every level, reranking to 3 levels), alternating chunk by chunk on the
same backend in the same run. It prints time per item of each, their ratio and peak memory, and
writes JSON with an env block. ``--baseline`` compares the ratio against a committed JSON.

    python bench/hscr_overhead.py --out /tmp/hscr_overhead.json
    python bench/hscr_overhead.py --baseline bench/baselines/hscr_overhead.json
"""

from __future__ import annotations  # noqa: I001  (the torchvision shim must import first)

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

from hscr_worker.backends.transformers import TransformersBackend  # first: makes torchvision importable

import torch  # noqa: E402
from common import compare_to_baseline, env_block, measure, ratio_key, rows_for, write_json  # noqa: E402
from hscr_client import HSCRParams  # noqa: E402

from hscr_worker.fixture.items import write_items  # noqa: E402
from hscr_worker.generate import DEFAULT_MODEL, prepare_all  # noqa: E402
from hscr_worker.pipeline import run_hscr  # noqa: E402
from hscr_worker.similarity import get_similarity  # noqa: E402

HELD_OUT_SEED = 7  # any seed but the training seed (1234)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model directory (default: the fixture Med-VLM)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--min-rows", type=int, default=32, help="rows timed per batch size (whole batches)")
    parser.add_argument("--params", choices=["default", "paper"], default="default",
                        help="HSCRParams() (the service defaults) or HSCRParams.paper()")
    parser.add_argument("--repeats", type=int, default=1,
                        help="passes over the items per batch size (the ratio is of the totals)")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="one untimed plain + HSCR pass first")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--full-redecode", action="store_true",
                        help="also time HSCR with full re-decode (prefix_redecode=False, the behaviour before "
                             "prefix re-decode; same results) on the same chunks")
    parser.add_argument("--out", default=None, help="write the JSON results here")
    parser.add_argument("--baseline", default=None, help="compare the HSCR/plain ratio with this JSON")
    parser.add_argument("--tolerance", type=float, default=0.5, help="allowed relative rise of the ratio")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.min_rows < 1 or args.repeats < 1:
        parser.error("batch sizes, --min-rows and --repeats must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)

    params = HSCRParams() if args.params == "default" else HSCRParams.paper()  # both: 3 levels, 64 new tokens
    n_rows = max(rows_for(b, args.min_rows) for b in args.batch_sizes)
    with tempfile.TemporaryDirectory() as tmp:
        items_path = Path(tmp) / "items.jsonl"
        raw = write_items(n_rows, HELD_OUT_SEED, items_path, Path(tmp) / "images")
        items, errors = prepare_all(raw, base_dir=tmp)
    if errors:
        raise SystemExit(f"fixture items failed to prepare: {errors[:3]}")

    backend = TransformersBackend(args.model, device=args.device, batch_size=max(args.batch_sizes))
    print(f"hscr_overhead: {args.model} on {backend.device}, {torch.get_num_threads()} threads, "
          f"batch sizes {args.batch_sizes}, {args.params} params", flush=True)
    results = measure(backend, items, args.batch_sizes, params, get_similarity(params.similarity), backend.device,
                      min_rows=args.min_rows, warmup=args.warmup, repeats=args.repeats,
                      variants={"full_redecode": functools.partial(run_hscr, prefix_redecode=False)}
                      if args.full_redecode else None)
    report = {"benchmark": "hscr_overhead", "env": env_block(backend.device),
              "model": str(args.model), "backend": backend.name, "backend_batch_size": backend.batch_size,
              "params_preset": args.params, "params": params.model_dump(), "results": results}
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    if args.baseline:
        key = ratio_key(backend.device.type)
        problems = compare_to_baseline(results, json.loads(Path(args.baseline).read_text()), args.tolerance, key=key)
        for problem in problems:
            print(f"REGRESSION {problem}", file=sys.stderr)
        if problems:
            return 1
        print(f"{key} within {args.tolerance:.0%} of the baseline {args.baseline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
