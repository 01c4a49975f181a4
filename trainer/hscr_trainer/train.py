"""``hscr train`` / ``python -m hscr_trainer.train``: train a model on an HSCR dataset.

Every :class:`HSCRConfig` field is a command-line flag (``--help`` lists them with their help text).
A run whose ``--output_dir`` already holds a checkpoint resumes from the latest one.

A checkpoint may carry its own training defaults in ``hscr_training.json`` (flag -> value): the optimisation settings
that suit its scale, measured (the fixtures': a 0.7 M-parameter model does not move at the paper's LoRA lr 5e-7).
They fill only the flags the command line does not give; ``HSCRConfig``'s defaults (the paper's) apply to the rest.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from .hscr_config import HSCRConfig


@dataclass
class ScriptArguments:
    dataset: str = field(metadata={"help": "HSCR dataset: a directory, file:// or s3://bucket/prefix URI."})
    model: str = field(default="fixture", metadata={
        "help": "Model directory, hub id or fixture name: fixture (= fixture-llava), fixture-qwen2.5-vl, "
                "fixture-gemma3."})
    final_dir: str | None = field(
        default=None, metadata={"help": "Where the final standalone model goes (default: <output_dir>/final)."})
    threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads (1 is fastest on a busy shared machine)."})
    resume: bool = field(default=True, metadata={"help": "Resume from the latest checkpoint in output_dir."})


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The latest checkpoint whose trainer state reads back: a process killed while the Trainer wrote a checkpoint
    (it writes file by file) leaves a partial one, and resuming from it would fail; the one before it is whole."""
    from pathlib import Path

    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    def step(path: Path) -> int:
        return int(path.name.rsplit("-", 1)[1]) if path.name.rsplit("-", 1)[1].isdigit() else -1

    for checkpoint in sorted(Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"), key=step, reverse=True):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, ValueError):
            print(f"skipping incomplete checkpoint {checkpoint}", flush=True)
            continue
        return str(checkpoint)
    return None


def run(script: ScriptArguments, config: HSCRConfig) -> dict:
    import torch

    from .hscr_trainer import HSCRTrainer

    if script.threads:
        torch.set_num_threads(script.threads)
    trainer = HSCRTrainer(script.model, config, script.dataset)
    checkpoint = last_complete_checkpoint(config.output_dir) if script.resume else None
    if checkpoint:
        print(f"resuming from {checkpoint}", flush=True)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_state()
    final_dir = script.final_dir or f"{config.output_dir}/final"
    trainer.save_final(final_dir)
    summary = {"final_model": final_dir, "global_step": trainer.state.global_step,
               "resumed_from": checkpoint, **result.metrics}
    print(json.dumps(summary), flush=True)
    return summary


MODEL_DEFAULTS_FILE = "hscr_training.json"


def model_defaults(argv: list[str]) -> list[str]:
    """The flags of the ``--model``'s ``hscr_training.json`` that ``argv`` does not set (its defaults)."""
    from pathlib import Path

    from hscr_worker.fixture import resolve_model

    model = "fixture"
    for i, arg in enumerate(argv):
        if arg == "--model" and i + 1 < len(argv):
            model = argv[i + 1]
        elif arg.startswith("--model="):
            model = arg.split("=", 1)[1]
    path = Path(resolve_model(model)) / MODEL_DEFAULTS_FILE
    if not path.is_file():
        return []
    given = {arg.split("=", 1)[0].lstrip("-") for arg in argv if arg.startswith("--")}
    flags = []
    for name, value in json.loads(path.read_text()).items():
        if name not in given:
            values = value if isinstance(value, list) else [value]
            flags += [f"--{name}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return flags


def main(argv: list[str] | None = None) -> dict:
    from transformers import HfArgumentParser

    argv = list(argv if argv is not None else sys.argv[1:])
    defaults = model_defaults(argv)
    if defaults:
        print(f"the model's training defaults ({MODEL_DEFAULTS_FILE}): {' '.join(defaults)}", flush=True)
    parser = HfArgumentParser((ScriptArguments, HSCRConfig), prog="hscr train", description=__doc__.splitlines()[0])
    script, config = parser.parse_args_into_dataclasses(args=defaults + argv)
    return run(script, config)


if __name__ == "__main__":
    main()
