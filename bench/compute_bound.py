"""HSCR where compute dominates (issue #18): what HSCR computes against plain greedy, and against its floor.

A LLaVA-architecture model with random float32 weights, large enough that the model's arithmetic, not Python,
sets the pace on a CPU: Llama text side hidden 1024, 8 layers, 16 heads, vocabulary 8,192; CLIP hidden 384,
6 layers, 224 px -> 256 image tokens; MLP widths at Llama's and CLIP's ratios (2,752 and 1,536): 130 M
parameters. Every response is forced to ``--max-new-tokens`` (random weights would stop at a random EOS);
``min_shift`` 0, so every response position can be coupled.
Per backend (transformers, the vLLM CPU build) and batch size, plain greedy generation and HSCR
(``run_hscr``, the shipped defaults otherwise) run on the same items side by side, chunk by chunk, and report:

- ``hscr_over_plain``: wall time, HSCR / plain;
- ``generated_tokens_ratio``: tokens decoded, HSCR / plain (own answer + re-decodes against one answer);
- ``prefill_tokens_ratio``: tokens run through the model in prefill or teacher forcing, not served from a cache,
  HSCR / plain;
- ``hscr_over_floor``: HSCR's time over its floor, HSCR's own prefill and decode tokens at plain's measured cost
  per token at the same batch size (plain's prefill cost from a one-token decode of the same chunk, its decode
  cost from the rest): how much HSCR loses to anything but the tokens it computes;
- peak memory of both (CPU: the process's peak resident set per phase), and the prefix-cache hit rate.

    python bench/compute_bound.py --out bench/results/compute_bound.json             # both backends, 1 / 8 / 32
    python bench/compute_bound.py --backends transformers --batch-sizes 1 8 --out /tmp/cb.json
    python bench/compute_bound.py --tiny --batch-sizes 1 2 --min-rows 2 --out /tmp/cb.json    # seconds (CI)
"""

from __future__ import annotations  # noqa: I001  (the torchvision shim must import first)

import argparse
import gc
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

from hscr_worker.backends.transformers import TransformersBackend  # first: makes torchvision importable

import torch  # noqa: E402
from common import PeakMemory, env_block, plain_greedy, rows_for, write_json  # noqa: E402
from gpu_scale import ARCHS, build_processor, synthetic_items, vllm_backend, write_random_checkpoint  # noqa: E402
from hscr_client import HSCRParams  # noqa: E402
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: E402,F401

from hscr_worker.backends.base import Backend, BackendStats  # noqa: E402
from hscr_worker.pipeline import PreparedItem, run_hscr, run_hscr_stream  # noqa: E402
from hscr_worker.similarity import get_similarity  # noqa: E402

BOS, EOS = 1, 2
STREAM_CHUNKS = 4  # --stream: chunks per stream (its first and last chunks fill and drain the overlap)


def compute_bound_config(tiny: bool = False) -> LlavaConfig:
    """The issue's configuration (132 M parameters), or a tiny one of the same shape for the tests."""
    if tiny:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=56, patch_size=14, projection_dim=32, hidden_act="quick_gelu")
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, vocab_size=576, max_position_embeddings=512)
        image_token = 512
    else:
        vision = CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                                  image_size=224, patch_size=14, projection_dim=384, hidden_act="quick_gelu")
        text = LlamaConfig(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=16,
                           num_key_value_heads=16, vocab_size=8192, max_position_embeddings=2048)
        image_token = 8000
    text.bos_token_id, text.eos_token_id, text.pad_token_id = BOS, EOS, image_token + 1
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", bos_token_id=BOS, eos_token_id=EOS, pad_token_id=image_token + 1,
                       image_seq_length=(vision.image_size // vision.patch_size) ** 2, tie_word_embeddings=False)


def _stats(backend: Backend) -> BackendStats:
    return BackendStats(**vars(backend.stats))


def _spent(backend: Backend, before: BackendStats) -> dict:
    now = backend.stats
    return {"prefill_tokens": now.prefill_tokens - before.prefill_tokens + now.scored_tokens - before.scored_tokens,
            "cached_tokens": now.reused_prefill_tokens - before.reused_prefill_tokens,
            "decoded_tokens": now.decoded_tokens - before.decoded_tokens,
            # of those, decoded for speculative levels the reranker did not need (TransformersBackend)
            "withdrawn_tokens": now.withdrawn_tokens - before.withdrawn_tokens}


def _phase(backend: Backend, device: torch.device, run) -> dict:
    """Time, tokens and peak memory of one ``run()``, from a cold prefix cache (vLLM): each mode pays for its own
    prompts, not for those an earlier mode left in the cache."""
    engine = getattr(backend, "llm", None)
    if engine is not None:
        engine.reset_prefix_cache()
    before = _stats(backend)
    with PeakMemory(device) as memory:
        began = time.perf_counter()
        out = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - began
    return {"seconds": seconds, "peak_memory_bytes": memory.peak_bytes, **_spent(backend, before), "out": out}


def _add(total: dict, phase: dict) -> None:
    for key in ("seconds", "prefill_tokens", "cached_tokens", "decoded_tokens", "withdrawn_tokens"):
        total[key] = total.get(key, 0) + phase[key]
    total["peak_memory_bytes"] = max(total.get("peak_memory_bytes", 0), phase["peak_memory_bytes"])


def measure_batch_size(backend: Backend, items: list[PreparedItem], batch_size: int, params: HSCRParams,
                       device: torch.device, repeats: int, *, stream: bool = False,
                       row_budget: int | None = None) -> dict:
    """Plain (one-token and full decodes) and HSCR on ``items`` in chunks of ``batch_size``, taking turns per chunk
    (which goes first rotates between passes).

    ``stream``: each mode takes every chunk in turn, and HSCR runs as the worker and ``hscr generate`` do
    (``run_hscr_stream``: a chunk's re-decode rounds ride the engine calls of the chunks after it on vLLM; on
    transformers, where the backend chains it (``chains_stream``, or ``--stream-chain``), the whole stream is one
    chained decode batch of the backend's rows), and once more batch by batch (``overlap=False``, mode
    ``hscr_by_batch``), side by side.

    ``row_budget``: the transformers backend's rows (default ``batch_size``): the worker and ``hscr generate`` keep
    32 rows whatever the items per chunk."""
    similarity = get_similarity(params.similarity)
    if isinstance(backend, TransformersBackend):  # its row budget: no decode (a chained one too) holds more rows
        backend.batch_size = row_budget or batch_size
    totals: dict[str, dict] = {"prefill_only": {}, "plain": {}, "hscr": {}, "hscr_by_batch": {}}
    levels: list[int] = []

    def chunked(run):
        return lambda rows: [out for start in range(0, len(rows), batch_size)
                             for out in run(rows[start:start + batch_size])]

    def hscr_stream(rows, overlap=None):
        chunks = ((start, rows[start:start + batch_size]) for start in range(0, len(rows), batch_size))
        return [r for _, results in run_hscr_stream(backend, chunks, params, similarity, overlap=overlap)
                for r in results]

    modes = {"prefill_only": lambda chunk: plain_greedy(backend, chunk, 1),
             "plain": lambda chunk: plain_greedy(backend, chunk, params.max_new_tokens),
             "hscr": lambda chunk: run_hscr(backend, chunk, params, similarity)}
    if stream:
        modes = {"prefill_only": chunked(modes["prefill_only"]), "plain": chunked(modes["plain"]), "hscr": hscr_stream,
                 "hscr_by_batch": lambda rows: hscr_stream(rows, overlap=False)}
    order = list(modes)
    # Streams of STREAM_CHUNKS chunks, the modes in turn per stream: load that comes and goes hits them all
    step = batch_size * (STREAM_CHUNKS if stream else 1)
    for repeat in range(repeats):
        for group, start in enumerate(range(0, len(items), step)):
            chunk = items[start:start + step]
            first = (repeat + (group if stream else 0)) % len(order)
            turn = order[first:] + order[:first]
            for mode in turn:
                phase = _phase(backend, device, lambda mode=mode, chunk=chunk: modes[mode](chunk))
                _add(totals[mode], phase)
                if mode == "hscr" and repeat == 0:
                    levels += [len(r.levels) for r in phase["out"]]
    one, plain, hscr = totals["prefill_only"], totals["plain"], totals["hscr"]
    # plain's cost per token at this batch size: prefill from the one-token decodes, decode from the rest
    prefill_cost = one["seconds"] / one["prefill_tokens"]
    decode_cost = max(plain["seconds"] - one["seconds"], 0.0) / max(plain["decoded_tokens"] - one["decoded_tokens"], 1)
    floor = hscr["prefill_tokens"] * prefill_cost + hscr["decoded_tokens"] * decode_cost
    rows = len(items) * repeats
    return {
        "batch_size": batch_size, "row_budget": row_budget or batch_size, "rows": len(items), "repeats": repeats,
        "plain": {**plain, "rows_per_s": rows / plain["seconds"],
                  "tokens_per_s": plain["decoded_tokens"] / plain["seconds"]},
        "prefill_only": one,
        "hscr": {**hscr, "rows_per_s": rows / hscr["seconds"],
                 "tokens_per_s": hscr["decoded_tokens"] / hscr["seconds"],
                 "mean_levels_per_row": sum(levels) / len(levels),
                 "prefix_hit_rate": hscr["cached_tokens"] / max(hscr["cached_tokens"] + hscr["prefill_tokens"], 1)},
        "hscr_over_plain": hscr["seconds"] / plain["seconds"],
        "generated_tokens_ratio": hscr["decoded_tokens"] / plain["decoded_tokens"],
        "prefill_tokens_ratio": hscr["prefill_tokens"] / plain["prefill_tokens"],
        "hscr_over_floor": hscr["seconds"] / floor,
        "floor_seconds": floor,
        "plain_prefill_seconds_per_token": prefill_cost, "plain_decode_seconds_per_token": decode_cost,
        "peak_memory_ratio": hscr["peak_memory_bytes"] / plain["peak_memory_bytes"],
        **({"hscr_by_batch": totals["hscr_by_batch"],
            "hscr_by_batch_over_plain": totals["hscr_by_batch"]["seconds"] / plain["seconds"],
            "hscr_over_hscr_by_batch": hscr["seconds"] / totals["hscr_by_batch"]["seconds"]} if stream else {}),
    }


def line(backend: str, r: dict) -> str:
    return (f"{backend:>12} batch {r['batch_size']:>3}: HSCR/plain {r['hscr_over_plain']:5.2f}x, "
            f"generated {r['generated_tokens_ratio']:4.2f}x, prefill {r['prefill_tokens_ratio']:4.2f}x, "
            f"HSCR/floor {r['hscr_over_floor']:4.2f}x, peak memory {r['peak_memory_ratio']:4.2f}x, "
            f"prefix hits {r['hscr']['prefix_hit_rate']:.2f}, levels/row {r['hscr']['mean_levels_per_row']:.2f}"
            + (f"; batch by batch HSCR/plain {r['hscr_by_batch_over_plain']:5.2f}x" if "hscr_by_batch" in r else ""))


def table(report: dict) -> str:
    rows = ["| backend | batch | HSCR / plain (time) | generated tokens | prefill tokens | HSCR / floor | "
            "peak memory HSCR / plain | prefix-cache hits | levels/row |", "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in report["backends"].items():
        for r in entry.get("results", []):
            rows.append(f"| {name} | {r['batch_size']} | {r['hscr_over_plain']:.2f}x "
                        f"| {r['generated_tokens_ratio']:.2f}x | {r['prefill_tokens_ratio']:.2f}x "
                        f"| {r['hscr_over_floor']:.2f}x | {r['peak_memory_ratio']:.2f}x "
                        f"| {r['hscr']['prefix_hit_rate']:.2f} | {r['hscr']['mean_levels_per_row']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same shape (for the tests)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--min-rows", type=int, default=8, help="rows per batch size, in whole batches")
    parser.add_argument("--rows", type=int, default=None,
                        help="transformers: the backend's row budget (batch_size) [default: the batch size; the "
                             "worker and hscr generate keep 32]")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--question-words", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=1, help="passes over the items per batch size")
    parser.add_argument("--backends", nargs="+", choices=["transformers", "vllm"], default=["transformers", "vllm"])
    parser.add_argument("--params", choices=["shipped", "paper"], default="shipped",
                        help="HSCRParams() or HSCRParams.paper() (min_shift 0 and max_new_tokens either way)")
    parser.add_argument("--no-savings", action="store_true",
                        help="HSCR as before issue #18: every level re-decoded (candidates_per_round 0) and, on "
                             "transformers, every re-decode prefilled again (no kept KV cache)")
    parser.add_argument("--no-chain", action="store_true",
                        help="transformers: re-decodes in rounds, a decode call per round, instead of one chained "
                             "decode batch (TransformersBackend(chain_redecodes=False))")
    parser.add_argument("--no-speculative-levels", action="store_true",
                        help="transformers: an item's level past n_levels waits for the reranker instead of decoding "
                             "ahead in a spare row (TransformersBackend(speculative_levels=False))")
    parser.add_argument("--candidates-per-round", type=int, default=None,
                        help="HSCRParams.candidates_per_round (default: the shipped value)")
    parser.add_argument("--stream-chain", action=argparse.BooleanOptionalAction, default=None,
                        help="transformers, with --stream: a stream in one chained decode batch, or "
                             "(--no-stream-chain) batch by batch [default: the backend's: chained up to 16 rows, "
                             "or where a batch fills at most half the rows]")
    parser.add_argument("--stream", action="store_true",
                        help="HSCR as the worker runs it (run_hscr_stream over the chunks; see measure_batch_size)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="vLLM: KV-cache block size, the unit of its prefix cache [default: the backend's]")
    parser.add_argument("--out", default=None, help="write the JSON results here (rewritten after each backend)")
    args = parser.parse_args(argv)
    if min(*args.batch_sizes, args.min_rows, args.max_new_tokens, args.question_words, args.repeats) < 1:
        parser.error("batch sizes, --min-rows, --max-new-tokens, --question-words and --repeats must be positive")
    device = torch.device("cpu")
    make = HSCRParams.paper if args.params == "paper" else HSCRParams
    params = make(max_new_tokens=args.max_new_tokens, min_shift=0.0,
                  **({"candidates_per_round": 0} if args.no_savings else {}),
                  **({} if args.candidates_per_round is None else {"candidates_per_round": args.candidates_per_round}))
    config = compute_bound_config(args.tiny)
    processor = build_processor(config)
    n_items = max(rows_for(b, args.min_rows) for b in args.batch_sizes)
    items = synthetic_items(n_items, config, args.question_words, 0)
    report: dict = {"benchmark": "compute_bound", "env": env_block(device), "tiny": args.tiny,
                    "max_new_tokens": args.max_new_tokens, "question_words": args.question_words,
                    "visual_tokens": config.image_seq_length, "params": params.model_dump(),
                    "no_savings": args.no_savings, "no_chain": args.no_chain, "stream": args.stream,
                    "speculative_levels": not args.no_speculative_levels,
                    "stream_chain": args.stream_chain, "row_budget": args.rows,
                    "block_size": args.block_size,
                    "backends": {}}
    began_all = time.perf_counter()

    def save() -> None:
        report["seconds"] = time.perf_counter() - began_all
        if args.out:
            write_json(args.out, report)

    with tempfile.TemporaryDirectory() as workdir:
        model_dir = Path(workdir) / "random-compute-bound"
        portable = "vllm" in args.backends and importlib.util.find_spec("vllm") is not None
        report["parameters"] = write_random_checkpoint(config, processor, model_dir, device=device,
                                                       dtype=torch.float32, portable=portable)
        print(f"compute_bound: random LLaVA-shaped checkpoint, {report['parameters'] / 1e6:,.1f} M params, "
              f"{config.image_seq_length} visual tokens, {args.max_new_tokens} new tokens", flush=True)
        for name in args.backends:
            if name == "transformers":
                backend, why_not = TransformersBackend(str(model_dir), device="cpu", batch_size=max(args.batch_sizes),
                                                       ignore_eos=True, profile=ARCHS["llava-1.5-7b"].profile,
                                                       reuse_prompt_cache=not args.no_savings,
                                                       chain_redecodes=not args.no_chain,
                                                       stream_chain=args.stream_chain,
                                                       speculative_levels=not args.no_speculative_levels), ""
            else:
                backend, why_not = vllm_backend(model_dir, max(args.batch_sizes), device,
                                                **({} if args.block_size is None else {"block_size": args.block_size}))
            if backend is None:
                report["backends"][name] = {"skipped": why_not}
                print(f"{name:>12} skipped: {why_not}", flush=True)
                continue
            shipped = backend.params(params.model_dump(exclude_unset=True))  # with the engine's defaults
            plain_greedy(backend, items[:1], 2)  # warm-up, untimed
            run_hscr(backend, items[:1], shipped.model_copy(update={"max_new_tokens": 4}), get_similarity("lexical"))
            results = []
            for batch_size in args.batch_sizes:
                rows = items[:rows_for(batch_size, args.min_rows)]
                results.append(measure_batch_size(backend, rows, batch_size, shipped, device, args.repeats,
                                                  stream=args.stream, row_budget=args.rows))
                print(line(name, results[-1]), flush=True)
                report["backends"][name] = {"params": shipped.model_dump(), "results": results}
                save()
            del backend
            gc.collect()
    save()
    print(table(report))
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
