"""``hscr train`` / ``python -m hscr_trainer.train``: train a model on an HSCR dataset.

Every :class:`HSCRConfig` field is a command-line flag (``--help`` lists them with their help text).
A run whose ``--output_dir`` already holds a checkpoint resumes from the latest one.
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


def run(script: ScriptArguments, config: HSCRConfig) -> dict:
    import torch
    from transformers.trainer_utils import get_last_checkpoint

    from .hscr_trainer import HSCRTrainer

    if script.threads:
        torch.set_num_threads(script.threads)
    trainer = HSCRTrainer(script.model, config, script.dataset)
    checkpoint = get_last_checkpoint(config.output_dir) if script.resume else None
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


def main(argv: list[str] | None = None) -> dict:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ScriptArguments, HSCRConfig), prog="hscr train", description=__doc__.splitlines()[0])
    script, config = parser.parse_args_into_dataclasses(args=argv if argv is not None else sys.argv[1:])
    return run(script, config)


if __name__ == "__main__":
    main()
