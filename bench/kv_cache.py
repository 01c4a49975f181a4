"""The transformers backend's KV cache layer side by side with transformers' own (docs/bench.md, "The KV cache grows in
place"): plain greedy on the compute-bound model (``compute_bound.py``'s 130 M LLaVA-shaped model, random weights)
with ``_GrowingLayer`` (a step writes its own columns) and with ``DynamicCache``'s ``DynamicLayer`` (a step copies the
whole layer), taking turns in one process, the same tokens asserted. Prefill is priced by a one-token decode, so
the decode cost per step is the rest.

python bench/kv_cache.py --batch-sizes 8 32 --out bench/results/kv_cache.json   # about 5 min on 2 cores
python bench/kv_cache.py --tiny --batch-sizes 2 --out /tmp/kv.json               # seconds (the tests)
"""

from __future__ import annotations  # noqa: I001  (the torchvision shim must import first)

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hscr_worker.backends.transformers import TransformersBackend  # first: makes torchvision importable
import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402
from common import env_block, plain_greedy, write_json  # noqa: E402
from compute_bound import compute_bound_config  # noqa: E402
from gpu_scale import ARCHS, build_processor, synthetic_items, write_random_checkpoint  # noqa: E402


def timed(run) -> tuple[float, list]:
    began = time.perf_counter()
    out = run()
    return time.perf_counter() - began, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same shape (for the tests)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2, help="turns per cache layer (the median is reported)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    config = compute_bound_config(args.tiny)
    processor = build_processor(config)
    items = synthetic_items(max(args.batch_sizes), config, 24, 0)
    report: dict = {"benchmark": "kv_cache", "env": env_block(torch.device("cpu")), "tiny": args.tiny,
                    "max_new_tokens": args.max_new_tokens, "results": []}
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = Path(workdir) / "random-compute-bound"
        write_random_checkpoint(config, processor, model_dir, device=torch.device("cpu"), dtype=torch.float32,
                                portable=False)
        backend = TransformersBackend(str(model_dir), device="cpu", batch_size=max(args.batch_sizes),
                                      ignore_eos=True, profile=ARCHS["llava-1.5-7b"].profile)
        layers = {"growing": backend._new_cache, "dynamic": lambda: DynamicCache(config=backend.model.config)}
        plain_greedy(backend, items[:1], 2)  # warm-up, untimed
        for batch_size in args.batch_sizes:
            rows = items[:batch_size]
            step_ms: dict[str, list[float]] = {name: [] for name in layers}
            tokens: dict[str, list] = {}
            for _ in range(args.repeats):
                for name, new_cache in layers.items():
                    backend._new_cache = new_cache  # instance attribute: shadows the method
                    prefill, _ = timed(lambda rows=rows: plain_greedy(backend, rows, 1))
                    total, tokens[name] = timed(lambda rows=rows: plain_greedy(backend, rows, args.max_new_tokens))
                    step_ms[name].append(1000 * (total - prefill) / (args.max_new_tokens - 1))
            del backend._new_cache
            if tokens["growing"] != tokens["dynamic"]:
                raise AssertionError("the two cache layers decoded different tokens")
            median = {name: statistics.median(ms) for name, ms in step_ms.items()}
            result = {"batch_size": batch_size, "decode_ms_per_step": step_ms, "median_ms_per_step": median,
                      "growing_over_dynamic": median["growing"] / median["dynamic"]}
            report["results"].append(result)
            print(f"batch {batch_size:>3}: decode step {median['growing']:.0f} ms growing, "
                  f"{median['dynamic']:.0f} ms dynamic ({result['growing_over_dynamic']:.2f}x)", flush=True)
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
