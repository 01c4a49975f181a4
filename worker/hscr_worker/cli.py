"""Worker-side ``hscr`` commands: generate, fixture, quality, convert-llava."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from hscr_client import HSCRParams
from hscr_client._cli import LazyCommand


def library_progress_at_debug() -> None:
    """The libraries' own progress bars (transformers' "Loading weights", hub downloads, datasets' "Generating
    train split") show only at ``HSCR_LOG_LEVEL=debug``: a command shows its own progress, not theirs.

    By the libraries' variables, so child processes and a user's explicit setting (``=0``) are honoured."""
    if os.environ.get("HSCR_LOG_LEVEL", "").strip().lower() == "debug":
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # they read the variables when first imported: one already imported is told directly
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        if "transformers" in sys.modules:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
    if os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1" and "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


class ProfileChoice(click.Choice):
    """``--profile``: the model profiles' names, read when a command parses or shows the option. The families
    import torch, which building the ``hscr`` command group must not (``tests/test_cli_imports.py``)."""

    def __init__(self) -> None:  # click.Choice's would read the names now
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        from .families import PROFILES

        return tuple(sorted(PROFILES))


def _param_options(func):
    """One ``--flag`` per HSCR parameter, its help text taken from the parameter's description."""
    for name, field in reversed(list(HSCRParams.model_fields.items())):
        flag = "--" + name.replace("_", "-")
        kind = {int: int, float: float, bool: click.BOOL}.get(field.annotation, str)  # BOOL: true/false, 1/0, yes/no
        func = click.option(flag, name, default=None, type=kind,
                            help=f"{field.description} [default: {field.default}]")(func)
    return func


def vllm_engine_options(envvar_prefix: str | None = None):
    """The vLLM engine settings a GPU operator tunes, as flags (and ``<prefix>_...`` variables for the worker)."""
    def env(name: str) -> str | None:
        return f"{envvar_prefix}_{name}" if envvar_prefix else None

    def decorate(func):
        func = click.option("--gpu-memory-utilization", envvar=env("GPU_MEMORY_UTILIZATION"), default=None,
                            type=click.FloatRange(0, 1, min_open=True),
                            help="vLLM: fraction of the GPU's memory the engine may take [default: vLLM's 0.9]; "
                                 "the vision tower runs beside it on the same GPU.")(func)
        return click.option("--max-model-len", envvar=env("MAX_MODEL_LEN"), default=None, type=click.IntRange(min=1),
                            help="vLLM: the context the engine reserves KV cache for [default: the model's; "
                                 "LLaVA-Med's 32k may not fit a smaller GPU, and HSCR needs 576 image tokens + "
                                 "question + max_new_tokens].")(func)
    return decorate


def image_size_options(envvar_prefix: str | None = None):
    """``--min-pixels``/``--max-pixels``: the image size range of a dynamic-resolution family (Qwen2-VL, Qwen2.5-VL)."""
    bounds = (("min", "least", "3,136"), ("max", "most", "12,845,056"))

    def decorate(func):
        for bound, word, published in bounds:
            envvar = f"{envvar_prefix}_{bound.upper()}_PIXELS" if envvar_prefix else None
            func = click.option(
                f"--{bound}-pixels", envvar=envvar, default=None, type=click.IntRange(min=1),
                help=f"Qwen: resize each image (aspect ratio kept) to at {word} this many pixels [default: the "
                     f"checkpoint's; {published} in the published models]; image tokens = pixels / "
                     f"(patch * merge)**2, i.e. / 28**2 there.")(func)
        return func
    return decorate


def backend_options_or_usage_error(backend: str, **settings) -> dict:
    """``generate.backend_options`` for a command: a setting the backend does not have is a usage error."""
    from .generate import backend_options

    try:
        return backend_options(backend, **settings)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def params_from_options(options: dict, paper: bool) -> HSCRParams:
    given = {k: v for k, v in options.items() if v is not None and k in HSCRParams.model_fields}
    return HSCRParams.paper(**given) if paper else HSCRParams(**given)


def for_family(engine, params: HSCRParams) -> HSCRParams:
    """``params`` with the fields nobody set (neither a flag nor ``--paper``) at the model family's defaults, else
    the engine's."""
    return engine.params(params.model_dump(exclude_unset=True))


@click.command()
@click.option("--model", default=None, help="Model directory or hub id [default: the bundled fixture Med-VLM].")
@click.option("--input", "input_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Items JSONL: custom_id, image (path, data: URI or s3:// URI), question, optional answer.")
@click.option("--output", required=True, help="Output directory or s3://bucket/prefix.")
@click.option("--backend", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True)
@click.option("--device", default=None, help="torch device of the transformers backend, or of the vLLM backend's "
              "vision tower (its engine uses the GPUs CUDA_VISIBLE_DEVICES shows) [default: cuda if present].")
@click.option("--profile", type=ProfileChoice(), default=None,
              help="Model family: prompt template and image preprocessing [default: detected from the model].")
@click.option("--batch-size", default=32, show_default=True, help="Items per chunk (one shard per chunk).")
@click.option("--score-top-k", type=click.IntRange(min=1), default=None,
              help="vLLM: tokens per score row [default: 20 for vocabularies over 4,096 tokens, whole rows "
                   "below]; needs >= top_k_candidates.")
@click.option("--paper", is_flag=True, help="Start from the paper's setting (one mask removing 70 %, raw-logit "
              "shift, no shift floor) instead of the shipped defaults.")
@vllm_engine_options()
@image_size_options()
@_param_options
def generate(model, input_path, output, backend, device, profile, batch_size, score_top_k, gpu_memory_utilization,
             max_model_len, min_pixels, max_pixels, paper, **options):
    """Generate an HSCR preference dataset from an items JSONL file."""
    library_progress_at_debug()
    from tqdm import tqdm

    from .generate import DEFAULT_MODEL, generate_dataset, load_backend, read_items

    try:
        params = params_from_options(options, paper)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    model = model or DEFAULT_MODEL
    # The raw-logit shift needs raw logits in vLLM's top-k rows too.
    score_values = "logits" if backend == "vllm" and params.shift == "logit" else None
    engine_options = backend_options_or_usage_error(
        backend, device=device, profile=profile, score_values=score_values, score_top_k=score_top_k,
        gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, min_pixels=min_pixels,
        max_pixels=max_pixels)
    engine = load_backend(backend, model, **engine_options)
    params = for_family(engine, params)
    total = len(read_items(input_path)[0])
    with tqdm(total=total, unit="item", desc="hscr generate") as bar:
        manifest = generate_dataset(engine, input_path, output, params, chunk_size=batch_size, progress=bar.update)
    counts = manifest["request_counts"]
    click.echo(f"dataset: {output}")
    click.echo(f"items: {counts['total']} total, {counts['completed']} completed, {counts['failed']} failed "
               f"(errors.jsonl)")
    configs = manifest["configs"]
    click.echo(f"pairs: {configs['pairs']['rows']} rows; ranked: {configs['ranked']['rows']} rows")


@click.group()
def fixture():
    """The fixture Med-VLM: synthetic items, training recipe."""


@fixture.command("items")
@click.option("--n", default=200, show_default=True)
@click.option("--seed", default=7, show_default=True, help="Any seed but the training seed (1234).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--images", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--task", type=click.Choice(["standard", "prior"]), default="standard", show_default=True,
              help="prior: the language-prior task (a clinical history that implies the lesion kind).")
@click.option("--split", type=click.Choice(["train", "in-prior", "counter-prior", "balanced"]), default="train",
              show_default=True, help="The prior task's split: train (the history implies the attribute's value, "
                                      "at the shipped strength), in-prior (the image agrees with the history), "
                                      "counter-prior (it does not), balanced (the history says nothing of the image).")
def fixture_items(n, seed, out, images, task, split):
    """Write held-out synthetic items with their ground truth."""
    from .fixture.items import write_items

    try:
        rows = write_items(n, seed, out, images, task=task, split=split)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    click.echo(f"wrote {len(rows)} items to {out} (images in {images})")


@fixture.command("train")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--family", type=click.Choice(["llava", "qwen2.5-vl", "gemma3"]), default="llava", show_default=True,
              help="llava rebuilds fixture/model, qwen2.5-vl fixture/model-qwen2.5-vl, gemma3 fixture/model-gemma3.")
@click.option("--steps", type=int, default=None, help="[default: 1500; gemma3 3000]")
@click.option("--task", type=click.Choice(["standard", "prior"]), default="standard", show_default=True,
              help="prior rebuilds fixture/model-prior (LLaVA): half the items are the language-prior task.")
def fixture_train(out_dir, family, steps, task):
    """Retrain a fixture model with the seeded recipe (LLaVA about 4-8 minutes on 2 cores, Qwen2.5-VL, Gemma 3
    12-25)."""
    from .fixture.train import train

    try:
        info = train(out_dir, family=family, steps=steps, task=task)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    click.echo(json.dumps(info, indent=2))


@fixture.command("evaluate")
@click.option("--model", default=None, help="[default: the bundled fixture model]")
@click.option("--n", default=600, show_default=True)
@click.option("--seed", default=999, show_default=True)
def fixture_evaluate(model, n, seed):
    """Held-out accuracy of the fixture model with the image, a blank image and another item's image."""
    library_progress_at_debug()
    from .fixture.evaluate import evaluate_model
    from .generate import DEFAULT_MODEL

    click.echo(json.dumps(evaluate_model(model or DEFAULT_MODEL, n=n, seed=seed), indent=2))


@click.command()
@click.option("--model", default=None, help="[default: the bundled fixture model]")
@click.option("--n", default=200, show_default=True)
@click.option("--seed", "seeds", multiple=True, type=int, default=[4242], show_default=True,
              help="Item seed; give it several times to measure each seed and pool them (95 % intervals).")
@click.option("--paper", is_flag=True, help="Measure the paper's setting instead of the shipped defaults.")
@_param_options
def quality(model, n, seeds, paper, **options):
    """HSCR quality on held-out fixture items: R-precision of coupled tokens, level error rates."""
    library_progress_at_debug()
    from .backends.transformers import TransformersBackend
    from .fixture.quality import measure, pool
    from .generate import DEFAULT_MODEL

    params = params_from_options(options, paper)
    backend = TransformersBackend(model or DEFAULT_MODEL)
    params = for_family(backend, params)
    reports = [measure(model or DEFAULT_MODEL, params, n=n, seed=seed, backend=backend) for seed in seeds]
    click.echo(json.dumps(reports[0] if len(reports) == 1 else {"per_seed": reports, "pooled": pool(reports)},
                          indent=2))


@click.command("convert-llava")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--vision-tower", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Local CLIP checkpoint directory [default: the config's mm_vision_tower, if a local directory].")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Cast the weights [default: keep the checkpoint's].")
def convert_llava(source, out_dir, vision_tower, dtype):
    """Convert an original LLaVA / LLaVA-Med v1.5 checkpoint to the HF LLaVA format, offline."""
    import torch

    from .convert import ConversionError, convert_llava_checkpoint

    try:
        report = convert_llava_checkpoint(source, out_dir, vision_tower=vision_tower,
                                          dtype=getattr(torch, dtype) if dtype else None, progress=True)
    except ConversionError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(report.summary())
    # LLaVA-Med v1.5 is the Mistral one; Llama-based checkpoints are LLaVA-1.5's (USER: ... ASSISTANT:)
    profile = "llava-med" if report.text_model_type == "mistral" else "llava-1.5"
    click.echo(f"run it with: hscr generate --backend vllm --model {out_dir} --profile {profile} ...")


# rq_worker imports torch (the families, the backends): `hscr worker` loads it only when it runs.
worker = LazyCommand("worker", "hscr_worker.rq_worker:worker",
                     short_help="Run one HSCR worker (one per GPU: set CUDA_VISIBLE_DEVICES).")


def commands() -> list[click.Command]:
    return [generate, fixture, quality, worker, convert_llava]
