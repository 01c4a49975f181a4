"""The prior benchmark's statistics: the paired bootstrap CI."""

from __future__ import annotations

import numpy as np
import pytest

from hscr_trainer.reproduce_prior import METHODS, paired_bootstrap, summarize


def test_paired_bootstrap_centres_on_the_paired_difference_and_covers_it():
    rng = np.random.default_rng(0)
    a, b = {}, {}
    for seed in ("1", "2", "3"):
        base = rng.random(300) < 0.5
        better = base | (rng.random(300) < 0.2)  # the same items, some flipped to right
        a[seed], b[seed] = better.astype(int).tolist(), base.astype(int).tolist()
    point, low, high = paired_bootstrap(a, b)
    expected = np.mean([np.mean(np.subtract(a[s], b[s])) for s in a])
    assert point == pytest.approx(expected)
    assert 0 < low < point < high
    # Pairing: a constant per-item gain has no spread; an unpaired bootstrap of the same data would.
    same = {s: v for s, v in b.items()}
    assert paired_bootstrap(same, b) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap({"1": [1]}, {"2": [0]})


def test_table_has_a_row_per_run_method_with_the_controls():
    item = {"exact": 0.5, "malformed": 0.0, "prior_answer_share": 0.8, "correct": [1, 0, 1, 0]}
    better = {**item, "exact": 0.75, "correct": [1, 1, 1, 0]}
    runs = {"base": {"1": {"counter-prior": item, "in-prior": item}},
            "sft": {"1": {"counter-prior": item, "in-prior": item}},
            "explicit+implicit": {"1": {"counter-prior": better, "in-prior": item}}}
    table = summarize({"runs": runs})
    lines = table.splitlines()
    assert len(lines) == 2 + 3 and "explicit+implicit" in lines[-1]
    assert "+25.0 [" in lines[-1]  # the paired difference to base and to SFT
    assert set(METHODS) >= {"sft", "dpo-random", "dpo-hscr", "explicit", "implicit", "explicit+implicit"}


def test_a_checkpoints_training_defaults_fill_only_the_flags_not_given(tmp_path):
    """hscr train reads <model>/hscr_training.json: its values stand in for the flags the command line leaves out."""
    import json

    from hscr_trainer.train import MODEL_DEFAULTS_FILE, model_defaults

    (tmp_path / MODEL_DEFAULTS_FILE).write_text(json.dumps({"learning_rate": 5e-5, "use_peft": False,
                                                            "loss_type": ["explicit", "implicit"]}))
    argv = ["--model", str(tmp_path), "--dataset", "d", "--learning_rate", "1e-3"]
    assert model_defaults(argv) == ["--use_peft", "false", "--loss_type", "explicit", "implicit"]
    assert model_defaults([f"--model={tmp_path}", "--use_peft=true"]) == \
        ["--learning_rate", "5e-05", "--loss_type", "explicit", "implicit"]
    assert model_defaults(["--model", str(tmp_path / "elsewhere")]) == []  # no file: HSCRConfig's defaults
