"""The vLLM backend (issue #3): HSCR over plain greedy generation, and vLLM against transformers.

Both backends load the same model in one process (vLLM in-process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
unless set). For each batch size the same held-out fixture items go through plain greedy generation
and through HSCR (own answer, scoring under the full and dropped images, re-decoding every level
with the forcing hook, reranking to 3 levels), alternating chunk by chunk on one backend
(``common.measure``); then the same on the transformers backend. It prints and writes:

- ``vllm.hscr_over_plain_*``: the HSCR/plain time ratio with vLLM (target <= 1.6x);
- ``vllm_over_transformers_items_per_s``: vLLM's items/s over transformers', plain and HSCR.

    python bench/vllm_backend.py --out bench/results/vllm_backend.json
"""

from __future__ import annotations  # noqa: I001  (vLLM reads the environment at import)

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from common import env_block, measure, rows_for, write_json  # noqa: E402

from hscr_client import HSCRParams  # noqa: E402
from hscr_worker.backends.transformers import TransformersBackend  # noqa: E402
from hscr_worker.backends.vllm import VLLMBackend  # noqa: E402
from hscr_worker.fixture.items import write_items  # noqa: E402
from hscr_worker.generate import DEFAULT_MODEL, prepare_all  # noqa: E402
from hscr_worker.similarity import get_similarity  # noqa: E402

HELD_OUT_SEED = 4243  # any seed but the training seed (1234)
TARGET_RATIO = 1.6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model directory (default: the fixture Med-VLM)")
    parser.add_argument("--profile", default=None, help="model profile (default: detected)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--min-rows", type=int, default=32, help="rows timed per batch size (whole batches)")
    parser.add_argument("--params", choices=["default", "paper"], default="default")
    parser.add_argument("--skip-transformers", action="store_true", help="measure the vLLM backend only")
    parser.add_argument("--out", default=None, help="write the JSON results here")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.min_rows < 1:
        parser.error("batch sizes and --min-rows must be positive")

    params = HSCRParams() if args.params == "default" else HSCRParams.paper()
    similarity = get_similarity(params.similarity)
    n_rows = max(rows_for(b, args.min_rows) for b in args.batch_sizes)
    with tempfile.TemporaryDirectory() as tmp:
        raw = write_items(n_rows, HELD_OUT_SEED, Path(tmp) / "items.jsonl", Path(tmp) / "images")
        items, errors = prepare_all(raw, base_dir=tmp)
    if errors:
        raise SystemExit(f"fixture items failed to prepare: {errors[:3]}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict = {"benchmark": "vllm_backend", "env": env_block(device), "model": str(args.model),
                    "params_preset": args.params, "params": params.model_dump(), "target_ratio": TARGET_RATIO}
    vllm = VLLMBackend(args.model, profile=args.profile)
    print(f"vllm_backend: {args.model}, batch sizes {args.batch_sizes}, {args.params} params", flush=True)
    report["vllm"] = measure(vllm, items, args.batch_sizes, params, similarity, device, min_rows=args.min_rows)
    if not args.skip_transformers:
        hf = TransformersBackend(args.model, batch_size=max(args.batch_sizes), profile=args.profile)
        report["transformers"] = measure(hf, items, args.batch_sizes, params, similarity, hf.device,
                                         min_rows=args.min_rows)
        report["vllm_over_transformers_items_per_s"] = [
            {"batch_size": v["batch_size"],
             "plain": v["plain"]["rows_per_s"] / t["plain"]["rows_per_s"],
             "hscr": v["hscr"]["rows_per_s"] / t["hscr"]["rows_per_s"]}
            for v, t in zip(report["vllm"], report["transformers"], strict=True)]
    for row in report["vllm"]:
        verdict = "meets" if row["hscr_over_plain_time"] <= TARGET_RATIO else "misses"
        print(f"vLLM batch {row['batch_size']:>3}: HSCR/plain {row['hscr_over_plain_time']:.2f}x wall, "
              f"{row['hscr_over_plain_cpu_time']:.2f}x CPU ({verdict} the {TARGET_RATIO}x target)")
    for row in report.get("vllm_over_transformers_items_per_s", []):
        print(f"batch {row['batch_size']:>3}: vLLM/transformers items/s plain {row['plain']:.2f}x, "
              f"HSCR {row['hscr']:.2f}x")
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
