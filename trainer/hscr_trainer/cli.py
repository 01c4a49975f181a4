"""Trainer-side ``hscr`` commands: ``train``, ``evaluate`` and ``reproduce``."""

from __future__ import annotations

import json

import click


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                 "help_option_names": []}, add_help_option=False)
@click.pass_context
def train(ctx: click.Context) -> None:
    """Train on an HSCR dataset (multi-level preference optimization). `hscr train --help` lists every flag."""
    from .train import main

    main(list(ctx.args))


@click.group()
def evaluate() -> None:
    """Evaluate a model: the fixture's held-out items, or a Med-VQA benchmark (LLaVA-Med protocol)."""


@evaluate.command("fixture")
@click.option("--model", default="fixture", show_default=True,
              help="Model directory, hub id or fixture name (fixture = fixture-llava, fixture-qwen2.5-vl, "
                   "fixture-gemma3, fixture-prior).")
@click.option("--n", default=500, show_default=True, help="Held-out items.")
@click.option("--seed", default=999, show_default=True, help="Item seed (never the training seed 1234).")
@click.option("--task", type=click.Choice(["standard", "prior"]), default="standard", show_default=True,
              help="prior: the language-prior task (fixture-prior's); its JSON adds prior_answer_share.")
@click.option("--split", type=click.Choice(["train", "in-prior", "counter-prior", "balanced"]), default="train",
              show_default=True, help="The prior task's split.")
def evaluate_fixture(model, n, seed, task, split):
    """Accuracy per attribute and exact, and the hallucination rate, on held-out fixture items."""
    from .evaluation import evaluate_fixture as run

    try:
        click.echo(json.dumps(run(model, n=n, seed=seed, task=task, split=split), indent=2))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@evaluate.command("medvqa")
@click.option("--model", required=True,
              help="Model directory, hub id or fixture name, of a supported family (LLaVA, Qwen2-VL, Qwen2.5-VL, "
                   "Gemma 3).")
@click.option("--layout", type=click.Choice(["vqa-rad", "slake", "pathvqa", "llava-med"]), required=True)
@click.option("--root", required=True, type=click.Path(exists=True, file_okay=False), help="Dataset folder.")
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=int, default=None, help="Only the first N items.")
@click.option("--predictions", type=click.Path(dir_okay=False), default=None, help="Also write answers (JSONL).")
def evaluate_medvqa(model, layout, root, split, limit, predictions):
    """Closed accuracy and open recall in the LLaVA-Med protocol."""
    from .medvqa import evaluate as run

    try:
        result = run(model, layout, root, split=split, limit=limit, predictions_path=predictions)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(result, indent=2))


@click.group()
def reproduce() -> None:
    """Rebuild a benchmark table end to end (items, data, training, evaluation) on CPU."""


@reproduce.command("prior", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                              "help_option_names": []}, add_help_option=False)
@click.pass_context
def reproduce_prior(ctx: click.Context) -> None:
    """The language-prior benchmark: base, SFT, DPO on random negatives and HSCR's recipes on fixture-prior,
    with paired bootstrap CIs. `hscr reproduce prior --help` lists every flag."""
    from .reproduce_prior import main

    main(list(ctx.args))


@reproduce.command("fixture", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                                "help_option_names": []}, add_help_option=False)
@click.pass_context
def reproduce_fixture(ctx: click.Context) -> None:
    """The fixture's table (docs/trainer.md): base, DPO on random negatives and HSCR's losses.
    `hscr reproduce fixture --help` lists every flag."""
    from .reproduce import main

    main(list(ctx.args))


def commands() -> list[click.Command]:
    return [train, evaluate, reproduce]
