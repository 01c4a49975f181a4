"""What HSCR costs over plain greedy generation, on the bundled fixture Med-VLMs (issue #2, section 7).

For each model (``--models``, default both fixtures: ``fixture``, the LLaVA one, and
``fixture-qwen2.5-vl``) and each batch size, the same held-out fixture items go through plain greedy
generation (encode the image, one greedy decode) and through HSCR (``run_hscr``: own answer, scoring
under the full and the dropped images, re-decoding every level, reranking to 3 levels), alternating
chunk by chunk on the same backend in the same run. It prints time per item of each, their ratio and
peak memory, then a table with a row per model and batch size, and writes JSON with an env block and
an entry per model under ``models``. ``--baseline`` compares each model's ratio against a committed
JSON (a model the baseline does not cover is reported, not failed).

    python bench/hscr_overhead.py --out /tmp/hscr_overhead.json
    python bench/hscr_overhead.py --models fixture --baseline bench/baselines/hscr_overhead.json
"""

from __future__ import annotations  # noqa: I001  (the torchvision shim must import first)

import argparse
import functools
import gc
import json
import sys
import tempfile
from pathlib import Path

from hscr_worker.backends.transformers import TransformersBackend  # first: makes torchvision importable

import torch  # noqa: E402
from common import (  # noqa: E402
    compare_to_baseline,
    env_block,
    measure,
    model_arguments,
    model_key,
    ratio_key,
    ratio_table,
    rows_for,
    selected_models,
    write_json,
)
from hscr_client import HSCRParams  # noqa: E402

from hscr_worker.fixture.items import write_items  # noqa: E402
from hscr_worker.generate import prepare_all  # noqa: E402
from hscr_worker.pipeline import run_hscr  # noqa: E402
from hscr_worker.similarity import get_similarity  # noqa: E402

HELD_OUT_SEED = 7  # any seed but the training seed (1234)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_arguments(parser)
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
    parser.add_argument("--baseline", default=None,
                        help="compare each model's HSCR/plain ratio with this JSON (a one-model JSON without "
                             "``models``: the model it names)")
    parser.add_argument("--tolerance", type=float, default=0.5, help="allowed relative rise of the ratio")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.min_rows < 1 or args.repeats < 1:
        parser.error("batch sizes, --min-rows and --repeats must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)

    models = selected_models(parser, args)
    # default: what ships for each model (HSCRParams', with the model family's own defaults); paper: the paper's
    # reading on every model. Both: 3 levels, 64 new tokens.
    preset = HSCRParams() if args.params == "default" else HSCRParams.paper()
    n_rows = max(rows_for(b, args.min_rows) for b in args.batch_sizes)
    with tempfile.TemporaryDirectory() as tmp:
        items_path = Path(tmp) / "items.jsonl"
        raw = write_items(n_rows, HELD_OUT_SEED, items_path, Path(tmp) / "images")
        items, errors = prepare_all(raw, base_dir=tmp)
    if errors:
        raise SystemExit(f"fixture items failed to prepare: {errors[:3]}")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variants = {"full_redecode": functools.partial(run_hscr, prefix_redecode=False)} if args.full_redecode else None
    report = {"benchmark": "hscr_overhead", "env": env_block(device), "params_preset": args.params,
              "params": preset.model_dump(), "models": []}
    for model in models:
        backend = TransformersBackend(model, device=str(device), batch_size=max(args.batch_sizes))
        params = backend.params(preset.model_dump(exclude_unset=True))
        n_parameters = sum(p.numel() for p in backend.model.parameters())
        print(f"hscr_overhead: {model} ({backend.profile.name}, {n_parameters / 1e6:.2f} M params) on "
              f"{backend.device}, {torch.get_num_threads()} threads, batch sizes {args.batch_sizes}, "
              f"{args.params} params", flush=True)
        results = measure(backend, items, args.batch_sizes, params, get_similarity(params.similarity), backend.device,
                          min_rows=args.min_rows, warmup=args.warmup, repeats=args.repeats, variants=variants,
                          log=lambda line, model=model: print(f"{model}: {line.strip()}", flush=True))
        report["models"].append({"model": model, "model_path": backend.model_path, "profile": backend.profile.name,
                                 "params": params.model_dump(),
                                 "parameters": n_parameters, "backend": backend.name,
                                 "backend_batch_size": backend.batch_size, "results": results})
        del backend
        gc.collect()
    print(ratio_table([(entry["model"], entry["backend"], r) for entry in report["models"] for r in entry["results"]]))
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    if args.baseline:
        return check_baseline(report, json.loads(Path(args.baseline).read_text()), args.baseline, args.tolerance,
                              ratio_key(device.type))
    return 0


def check_baseline(report: dict, baseline: dict, path: str, tolerance: float, key: str) -> int:
    """Each measured model against the baseline's entry for it; 1 when any ratio regressed."""
    if "models" in baseline:
        expected = {model_key(entry["model"]): entry for entry in baseline["models"]}
    else:  # one model's JSON (the format before --models): the model it names, else the first one measured
        expected = {model_key(baseline.get("model") or report["models"][0]["model"]): baseline}
    failed = False
    for entry in report["models"]:
        reference = expected.get(model_key(entry["model"]))
        if reference is None:
            print(f"{entry['model']}: no baseline in {path}, not compared")
            continue
        problems = compare_to_baseline(entry["results"], reference, tolerance, key=key)
        for problem in problems:
            print(f"REGRESSION {entry['model']}: {problem}", file=sys.stderr)
        if problems:
            failed = True
        else:
            print(f"{entry['model']}: {key} within {tolerance:.0%} of the baseline {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
