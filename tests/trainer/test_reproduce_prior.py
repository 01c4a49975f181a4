"""The prior benchmark's statistics: the paired bootstrap CI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hscr_trainer.reproduce_prior import METHODS, SETTINGS, paired_bootstrap, summarize


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


def test_every_method_names_a_dataset_and_valid_trainer_settings():
    import dataclasses

    from hscr_trainer.hscr_config import HSCRConfig
    from hscr_trainer.reproduce_prior import DATASETS

    fields = {f.name for f in dataclasses.fields(HSCRConfig)}
    for name, (dataset, loss_type, extra) in METHODS.items():
        assert dataset in DATASETS or dataset == "random", name
        assert set(extra) <= fields, name
        assert loss_type


def test_the_harness_trains_the_default_row_as_hscr_train_does_with_no_flag():
    """Table 5's `hscr-train-default` row is `hscr train --model fixture-prior` with no flag: HSCRConfig's default
    loss with the model's hscr_training.json, where that differs from the harness's own settings."""
    import json

    from hscr_trainer.hscr_config import HSCRConfig
    from hscr_trainer.train import MODEL_DEFAULTS_FILE
    from hscr_worker.fixture import resolve_model

    shipped = json.loads((Path(resolve_model("fixture-prior")) / MODEL_DEFAULTS_FILE).read_text())
    dataset, loss_type, extra = METHODS["hscr-train-default"]
    assert dataset == "hscr" and loss_type.split(",") == HSCRConfig(output_dir="unused", nll_weight=0.0).loss_type
    expected = {k: v for k, v in shipped.items() if k in SETTINGS and SETTINGS[k] != v}
    assert extra == expected, (extra, shipped)


def test_mixed_items_hold_the_train_share_from_their_own_seed(tmp_path):
    import json

    from hscr_trainer.reproduce_prior import write_mixed_items

    write_mixed_items(tmp_path / "items", 8, 2026, "balanced", 0.25)
    rows = [json.loads(line) for line in (tmp_path / "items" / "items.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and len({r["custom_id"] for r in rows}) == 8
    assert sum(r["custom_id"].startswith("fx-2027-") for r in rows) == 2  # the train split, seed + 1
    assert all((tmp_path / "items" / r["image"]).exists() for r in rows)


def test_negative_prior_share_counts_the_levels_that_name_the_historys_value():
    from hscr_trainer.reproduce_prior import negative_prior_share

    lesion = {"side": "left", "level": "upper", "size": "small"}
    attrs = {"a": {"history": "cancer", "lesions": [{**lesion, "kind": "nodule"}]},  # counter-prior: implies mass
             "b": {"history": "smoking", "lesions": [{**lesion, "kind": "nodule"}]}}  # in-prior
    rows = [{"custom_id": "a", "levels": [{"text": "it is a small mass ."}, {"text": "it is a large opacity ."}]},
            {"custom_id": "b", "levels": [{"text": "it is a small opacity ."}, {"text": "it is a large nodule ."},
                                          {"text": "it is a"}]}]  # a size-only level and a malformed one: not counted
    assert negative_prior_share(rows, attrs) == {"levels_naming_a_wrong_value": 3,
                                                 "share_naming_the_history_value": round(1 / 3, 4),
                                                 # a: each of its 2 levels names mass with 1/2; b's cannot
                                                 "share_if_independent_of_the_history": round(1 / 3, 4)}
