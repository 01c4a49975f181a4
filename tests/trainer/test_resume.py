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

STEPS = 12


def command(dataset: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "hscr_trainer.train", "--dataset", str(dataset), "--output_dir", str(output),
            "--max_steps", str(STEPS), "--save_steps", "2", "--save_total_limit", "3",
            "--per_device_train_batch_size", "2", "--use_peft", "false", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--threads", "1", "--use_cpu", "true", "--disable_tqdm", "true",
            "--shuffle_buffer", "4", "--seed", "5"]


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def losses(output: Path) -> dict[int, float]:
    state = json.loads((output / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def test_resume_after_kill(hscr_dataset, tmp_path):
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(hscr_dataset, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not (killed / "checkpoint-2" / "trainer_state.json").exists():
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

    out = run(command(hscr_dataset, killed))
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["resumed_from"].endswith(f"checkpoint-{checkpoints[-1]}")
    assert summary["global_step"] == STEPS
    assert (killed / "final" / "model.safetensors").exists()

    unbroken = tmp_path / "unbroken"
    run(command(hscr_dataset, unbroken))
    resumed, reference = losses(killed), losses(unbroken)
    after = [s for s in reference if s > checkpoints[-1]]
    assert after and all(s in resumed for s in after)
    # Same data order and optimizer state after the resume: the same losses as the unbroken run.
    assert [round(resumed[s], 4) for s in after] == [round(reference[s], 4) for s in after]
