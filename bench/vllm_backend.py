"""The vLLM backend (issue #3): HSCR over plain greedy generation, and vLLM against transformers.

Both backends load the same model in one process (vLLM in-process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
unless set). For each batch size the same held-out fixture items go through plain greedy generation
and through HSCR (own answer, scoring under the full and dropped images, re-decoding every level
with the forcing hook, reranking to 3 levels), alternating chunk by chunk on one backend
(``common.measure``); then the same on the transformers backend. It prints and writes:

- ``vllm.hscr_over_plain_*``: the HSCR/plain time ratio with vLLM (target <= 1.6x);
- ``vllm[*].variants.full_redecode``: HSCR with every level re-decoded from the start of the response
  (``run_hscr(prefix_redecode=False)``, the behaviour before prefix re-decode; same results), timed on
  the same chunks in the same alternation (``--no-full-redecode`` skips it);
- ``engine_steps``: vLLM engine steps (``LLMEngine.step`` calls) per batch size for plain, HSCR and
  HSCR with full re-decode, counted in one untimed pass: deterministic, so machine load cannot move it;
  with the prompt tokens of the (prefix) re-decode requests and how many of them the prefix cache
  served (``--block-size``; the backend's CPU default is 32: vLLM's own 128 exceeds the fixture's prompts);
- ``vllm_over_transformers_items_per_s``: vLLM's items/s over transformers', plain and HSCR.

``--models`` (default both fixtures: ``fixture``, the LLaVA one, and ``fixture-qwen2.5-vl``) measures
each model in a process of its own, one after the other (an engine's memory and threads never
overlap the next one's); the JSON then holds one such report per model under ``models`` and a table
with a row per model, backend and batch size is printed at the end. With one model (``--model`` or
``--models M``) it runs in this process and the JSON is that model's report, as before.

    python bench/vllm_backend.py --out bench/results/vllm_backend.json
    python bench/vllm_backend.py --model fixture --repeats 3 --block-size 32 --out /tmp/vllm_llava.json
"""

from __future__ import annotations  # noqa: I001  (vLLM reads the environment at import)

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from common import (  # noqa: E402
    env_block,
    measure,
    measure_stream,
    model_arguments,
    plain_greedy,
    ratio_table,
    rows_for,
    selected_models,
    write_json,
)

from hscr_client import HSCRParams  # noqa: E402
from hscr_worker.backends.transformers import TransformersBackend  # noqa: E402
from hscr_worker.backends.vllm import VLLMBackend  # noqa: E402
from hscr_worker.fixture.items import write_items  # noqa: E402
from hscr_worker.generate import prepare_all  # noqa: E402
from hscr_worker.pipeline import run_hscr  # noqa: E402
from hscr_worker.similarity import get_similarity  # noqa: E402

HELD_OUT_SEED = 4243  # any seed but the training seed (1234)
TARGET_RATIO = 1.6
full_redecode = functools.partial(run_hscr, prefix_redecode=False)


@contextlib.contextmanager
def step_counter(backend: VLLMBackend):
    """Counts ``LLMEngine.step`` calls while active; yields a function that reads the count."""
    engine = backend.llm.llm_engine
    step = engine.step
    count = 0

    def counted_step(*args, **kwargs):
        nonlocal count
        count += 1
        return step(*args, **kwargs)

    engine.step = counted_step
    try:
        yield lambda: count
    finally:
        engine.step = step


def engine_steps(backend: VLLMBackend, items, batch_sizes, min_rows: int, params, similarity) -> list[dict]:
    """Engine steps (``LLMEngine.step`` calls) of plain, HSCR and HSCR with full re-decode per batch size."""
    run_engine = backend._run
    redecode_prompt_tokens = cached_tokens = 0

    def counted_run(prompts, sampling, *rest):  # rest: the backend's other arguments (visual-token counts)
        nonlocal redecode_prompt_tokens, cached_tokens
        outputs = run_engine(prompts, sampling, *rest)
        for out, params_k in zip(outputs, sampling, strict=True):
            if params_k.extra_args:  # a forced re-decode
                redecode_prompt_tokens += len(out.prompt_token_ids)
                cached_tokens += out.num_cached_tokens or 0
        return outputs

    backend._run = counted_run
    try:
        out = []
        with step_counter(backend) as steps:
            for batch_size in batch_sizes:
                row = {"batch_size": batch_size}
                for name, run in (("plain", lambda chunk: plain_greedy(backend, chunk, params.max_new_tokens)),
                                  ("hscr", lambda chunk: run_hscr(backend, chunk, params, similarity)),
                                  ("hscr_full_redecode",
                                   lambda chunk: full_redecode(backend, chunk, params, similarity))):
                    before = steps()
                    redecode_prompt_tokens = cached_tokens = 0
                    rows = items[:rows_for(batch_size, min_rows)]
                    for start in range(0, len(rows), batch_size):
                        run(rows[start:start + batch_size])
                    row[name] = steps() - before
                    if name == "hscr":
                        row["redecode_prompt_tokens"] = redecode_prompt_tokens
                        row["redecode_prompt_tokens_cached"] = cached_tokens
                out.append(row)
        return out
    finally:
        backend._run = run_engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_arguments(parser)
    parser.add_argument("--profile", default=None, help="model profile (default: detected; one model only)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--min-rows", type=int, default=32, help="rows timed per batch size (whole batches)")
    parser.add_argument("--params", choices=["default", "paper"], default="default")
    parser.add_argument("--skip-transformers", action="store_true", help="measure the vLLM backend only")
    parser.add_argument("--full-redecode", action=argparse.BooleanOptionalAction, default=True,
                        help="also time HSCR with full re-decode (prefix_redecode=False) on the same chunks")
    parser.add_argument("--block-size", type=int, default=None,
                        help="vLLM KV-cache block size (prefix caching works in whole blocks; CPU: a multiple of 32)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="passes over the items per batch size (the ratio is of the totals)")
    parser.add_argument("--stream-chunks", type=int, default=8,
                        help="chunks per batch size in the stream measurement (0: skip it)")
    parser.add_argument("--stream-only", action="store_true",
                        help="only the stream measurement (plain vs HSCR over a stream of chunks)")
    parser.add_argument("--out", default=None, help="write the JSON results here")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.min_rows < 1 or args.repeats < 1:
        parser.error("batch sizes, --min-rows and --repeats must be positive")
    models = selected_models(parser, args)
    if args.profile and len(models) > 1:
        parser.error("--profile names one model's family: give it with one model")
    if len(models) == 1:
        report = measure_model(args, models[0])
        print_table([report])
        return finish(report, args.out)

    params = HSCRParams() if args.params == "default" else HSCRParams.paper()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict = {"benchmark": "vllm_backend", "env": env_block(device), "params_preset": args.params,
                    "params": params.model_dump(), "target_ratio": TARGET_RATIO, "models": []}
    spawn = multiprocessing.get_context("spawn")  # a fresh process per model: no engine state carried over
    with tempfile.TemporaryDirectory() as tmp:
        for index, model in enumerate(models):
            path = Path(tmp) / f"model-{index}.json"
            child = spawn.Process(target=_measure_to_file, args=(args, model, str(path)))
            child.start()
            child.join()
            if child.exitcode != 0 or not path.is_file():
                print(f"{model}: failed (exit code {child.exitcode}); the other models' figures are kept",
                      file=sys.stderr, flush=True)
                report["models"].append({"model": str(model), "failed": f"exit code {child.exitcode}"})
                continue
            entry = json.loads(path.read_text())
            for key in ("benchmark", "env", "params_preset", "params", "target_ratio"):
                entry.pop(key, None)
            report["models"].append(entry)
    print_table(report["models"])
    for entry in report["models"]:
        for row in entry.get("stream", []):
            print(f"{entry['model']}: {stream_line(row)}")
    finish(report, args.out)
    return 1 if any("failed" in entry for entry in report["models"]) else 0


def print_table(reports: list[dict]) -> None:
    """HSCR / plain per model, backend and batch size (the stream-only runs have none)."""
    rows = [(entry["model"], backend, r) for entry in reports
            for backend in ("vllm", "transformers") for r in entry.get(backend, [])]
    if rows:
        print(ratio_table(rows))


def _measure_to_file(args: argparse.Namespace, model: str, path: str) -> None:
    write_json(path, measure_model(args, model))


def measure_model(args: argparse.Namespace, model: str) -> dict:
    """Everything the script measures, on one model (in this process); returns its report."""
    preset = HSCRParams() if args.params == "default" else HSCRParams.paper()
    similarity = get_similarity(preset.similarity)
    n_rows = max(max(rows_for(b, args.min_rows), b * args.stream_chunks) for b in args.batch_sizes)
    with tempfile.TemporaryDirectory() as tmp:
        raw = write_items(n_rows, HELD_OUT_SEED, Path(tmp) / "items.jsonl", Path(tmp) / "images")
        items, errors = prepare_all(raw, base_dir=tmp)
    if errors:
        raise SystemExit(f"fixture items failed to prepare: {errors[:3]}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict = {"benchmark": "vllm_backend", "env": env_block(device), "model": str(model),
                    "params_preset": args.params, "target_ratio": TARGET_RATIO}
    vllm = VLLMBackend(model, profile=args.profile, **({"block_size": args.block_size} if args.block_size else {}))
    # Each engine runs what ships for it: the preset, then the model family's defaults, then the engine's.
    params = vllm.params(preset.model_dump(exclude_unset=True))
    report["params"] = params.model_dump()
    report["profile"] = vllm.profile.name
    print(f"vllm_backend: {model} ({vllm.profile.name}), batch sizes {args.batch_sizes}, {args.params} params",
          flush=True)
    if args.stream_chunks:  # measure_stream warms up each batch size itself
        report["stream"] = []
        with step_counter(vllm) as steps:
            for batch_size in args.batch_sizes:
                row = measure_stream(vllm, items[:batch_size * args.stream_chunks], batch_size, params, similarity,
                                     device, repeats=args.repeats, count_steps=steps)
                report["stream"].append(row)
                print(stream_line(row), flush=True)
    if args.stream_only:
        return report
    variants = {"full_redecode": full_redecode} if args.full_redecode else None
    report["vllm"] = measure(vllm, items, args.batch_sizes, params, similarity, device, min_rows=args.min_rows,
                             repeats=args.repeats, variants=variants)
    report["engine_steps"] = engine_steps(vllm, items, args.batch_sizes, args.min_rows, params, similarity)
    if not args.skip_transformers:
        hf = TransformersBackend(model, batch_size=max(args.batch_sizes), profile=args.profile)
        hf_params = hf.params(preset.model_dump(exclude_unset=True))
        report["transformers_params"] = hf_params.model_dump()
        report["transformers"] = measure(hf, items, args.batch_sizes, hf_params, similarity, hf.device,
                                         min_rows=args.min_rows, repeats=args.repeats, variants=variants)
        report["vllm_over_transformers_items_per_s"] = [
            {"batch_size": v["batch_size"],
             "plain": v["plain"]["rows_per_s"] / t["plain"]["rows_per_s"],
             "hscr": v["hscr"]["rows_per_s"] / t["hscr"]["rows_per_s"]}
            for v, t in zip(report["vllm"], report["transformers"], strict=True)]
    for row in report["vllm"]:
        verdict = "meets" if row["hscr_over_plain_time"] <= TARGET_RATIO else "misses"
        print(f"vLLM batch {row['batch_size']:>3}: HSCR/plain {row['hscr_over_plain_time']:.2f}x wall, "
              f"{row['hscr_over_plain_cpu_time']:.2f}x CPU, {row['hscr_over_plain_time_best_of_passes']:.2f}x "
              f"best of passes ({verdict} the {TARGET_RATIO}x target)")
        if "variants" in row:
            full = row["variants"]["full_redecode"]
            print(f"{'':>14} with full re-decode: {full['hscr_over_plain_time']:.2f}x wall, "
                  f"{full['hscr_over_plain_cpu_time']:.2f}x CPU, {full['hscr_over_plain_time_best_of_passes']:.2f}x "
                  "best of passes")
    for row in report["engine_steps"]:
        print(f"vLLM batch {row['batch_size']:>3}: engine steps plain {row['plain']}, HSCR {row['hscr']} "
              f"({row['hscr'] / row['plain']:.2f}x), full re-decode {row['hscr_full_redecode']} "
              f"({row['hscr_full_redecode'] / row['plain']:.2f}x); re-decode prompt tokens from the prefix cache "
              f"{row['redecode_prompt_tokens_cached']}/{row['redecode_prompt_tokens']}")
    for row in report.get("vllm_over_transformers_items_per_s", []):
        print(f"batch {row['batch_size']:>3}: vLLM/transformers items/s plain {row['plain']:.2f}x, "
              f"HSCR {row['hscr']:.2f}x")
    for row in report.get("stream", []):
        print(stream_line(row))
    return report


def stream_line(row: dict) -> str:
    steps = row["engine_steps"]
    overlapped = row["hscr_overlapped_over_plain_time"]
    return (f"stream of {row['chunks']} chunks of {row['batch_size']:>2}: HSCR/plain overlapped {overlapped:.2f}x wall "
            f"({row['hscr_overlapped_over_plain_cpu_time']:.2f}x CPU, "
            f"{row['hscr_overlapped_over_plain_time_best_of_passes']:.2f}x best of passes, "
            f"{row['hscr_overlapped_over_plain_steps']:.2f}x "
            f"engine steps), batch by batch {row['hscr_batch_by_batch_over_plain_time']:.2f}x wall "
            f"({row['hscr_batch_by_batch_over_plain_steps']:.2f}x steps); steps plain {steps['plain']}, "
            f"overlapped {steps['hscr_overlapped']}, batch by batch {steps['hscr_batch_by_batch']} "
            f"({'meets' if overlapped <= TARGET_RATIO else 'misses'} the {TARGET_RATIO}x target)")


def finish(report: dict, out: str | None) -> int:
    if out:
        write_json(out, report)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
