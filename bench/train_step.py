"""Train-step time and peak memory of the HSCR trainer on the fixture model, at several batch sizes.

    python bench/train_step.py [--batch-sizes 8 16] [--steps 8] [--device cpu|cuda] [--out FILE]

Each batch size runs in its own process (so peak memory is its own): the real ``HSCRTrainer`` loop
(collation, policy forward/backward with the reference forward, optimizer step) on a real HSCR
dataset made by ``hscr generate`` (``--dataset``, or 96 held-out fixture items generated first).
Prints JSON with an ``env`` block; times are medians over ``--steps`` steps after ``--warmup``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path


def make_dataset(root: Path) -> Path:
    from hscr_client import HSCRParams
    from hscr_worker.fixture.items import write_items
    from hscr_worker.generate import DEFAULT_MODEL, generate_dataset, load_backend

    write_items(96, 515, root / "items.jsonl", root / "images")
    generate_dataset(load_backend("transformers", DEFAULT_MODEL), str(root / "items.jsonl"), str(root / "data"),
                     HSCRParams())
    return root / "data"


def measure(dataset: str, batch_size: int, steps: int, warmup: int, device: str, threads: int) -> dict:
    """One configuration, in this process."""
    from hscr_worker._compat import ensure_torchvision_importable

    ensure_torchvision_importable()  # before transformers' trainer pulls in image utilities
    import torch
    from transformers import TrainerCallback

    from hscr_trainer import HSCRConfig, HSCRTrainer
    from hscr_worker.generate import DEFAULT_MODEL

    torch.set_num_threads(threads)
    times: list[float] = []
    sequences: list[int] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        config = HSCRConfig(output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=batch_size,
                            use_peft=False, learning_rate=1e-5, save_strategy="no", logging_steps=10_000,
                            disable_tqdm=True, use_cpu=device == "cpu", bf16=device == "cuda", shuffle_buffer=1)
        trainer = HSCRTrainer(DEFAULT_MODEL, config, dataset, callbacks=[Clock()])
        collate = trainer.data_collator
        trainer.data_collator = lambda items: (sequences.append(len(items) and sum(len(i["responses"]) for i in items))
                                               or collate(items))
        baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    timed = times[warmup:]
    result = {"batch_size": batch_size, "steps_timed": len(timed),
              "step_seconds_median": round(statistics.median(timed), 4),
              "step_seconds_min": round(min(timed), 4),
              "sequences_per_step_mean": round(statistics.fmean(sequences[warmup:warmup + len(timed)] or [0]), 2),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "rss_growth_during_training_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                                                     - baseline_rss, 1)}
    result["items_per_second"] = round(batch_size / result["step_seconds_median"], 2)
    if device == "cuda":
        result["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def env_block(device: str, threads: int) -> dict:
    versions = {}
    for name in ("torch", "transformers", "accelerate", "peft", "hscr-trainer"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "load_average_1m": round(os.getloadavg()[0], 2), "device": device, "torch_threads": threads, **versions}
    if device == "cuda":
        import torch

        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dataset", default=None, help="HSCR dataset (default: generate 96 fixture items)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child process: one batch size
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.dataset, args.one, args.steps, args.warmup, args.device, args.threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset or str(make_dataset(Path(tmp)))
        runs = []
        for batch_size in args.batch_sizes:
            child = subprocess.run(
                [sys.executable, __file__, "--one", str(batch_size), "--dataset", dataset, "--steps", str(args.steps),
                 "--warmup", str(args.warmup), "--device", args.device, "--threads", str(args.threads)],
                capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if child.returncode:
                raise SystemExit(f"batch size {batch_size} failed:\n{child.stderr[-3000:]}")
            runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
    base = runs[0]
    for run in runs:  # side by side in one invocation: per-item cost relative to the first batch size
        run["per_item_time_vs_first"] = round((run["step_seconds_median"] / run["batch_size"])
                                              / (base["step_seconds_median"] / base["batch_size"]), 3)
    report = {"benchmark": "hscr-trainer train step (fixture model, full fine-tuning, explicit+implicit loss)",
              "env": env_block(args.device, args.threads), "runs": runs}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
