"""Kill a training process mid-run; the rerun resumes from its checkpoint and ends where an unbroken run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hscr_trainer.train import main as train_main

STEPS = 12


def flags(dataset: Path, output: Path) -> list[str]:
    return ["--dataset", str(dataset), "--output_dir", str(output), "--max_steps", str(STEPS),
            "--save_steps", "2", "--save_total_limit", "3",
            "--per_device_train_batch_size", "2", "--use_peft", "false", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--threads", "1", "--use_cpu", "true", "--disable_tqdm", "true",
            "--shuffle_buffer", "4", "--seed", "5"]


def losses(output: Path) -> dict[int, float]:
    state = json.loads((output / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def _whole(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def test_resume_after_kill(hscr_dataset, tmp_path):
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "hscr_trainer.train", *flags(hscr_dataset, killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not _whole(killed / "checkpoint-2"):  # its state file written in full, not just begun
            assert process.poll() is None, "training exited before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    checkpoints = sorted(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))
    if checkpoints[-1] >= STEPS:
        pytest.fail("the run finished before the kill; raise STEPS")
    assert not (killed / "final").exists()

    # The rerun and the unbroken reference run in this process (same entry point, no second start-up cost).
    # The latest checkpoint, unless the kill landed while it was being written (then the one before it).
    latest_whole = max(c for c in checkpoints if _whole(killed / f"checkpoint-{c}"))
    summary = train_main(flags(hscr_dataset, killed))
    assert summary["resumed_from"].endswith(f"checkpoint-{latest_whole}")
    assert summary["global_step"] == STEPS
    assert (killed / "final" / "model.safetensors").exists()

    unbroken = tmp_path / "unbroken"
    train_main(flags(hscr_dataset, unbroken))
    resumed, reference = losses(killed), losses(unbroken)
    after = [s for s in reference if s > latest_whole]
    assert after and all(s in resumed for s in after)
    # Same data order and optimizer state after the resume: the same losses as the unbroken run.
    assert [round(resumed[s], 4) for s in after] == [round(reference[s], 4) for s in after]
