"""Issue #2's quality targets, measured on 200 held-out items of each family's fixture with the shipped defaults
(HSCRParams', and where a family carries its own defaults, those: Gemma's three 97 % masks with no replacement
after a re-decode diverged, Qwen's five 97 % masks with coupling by |shift| and no replacement after a re-decode
diverged)."""

from collections import Counter

import pytest

from hscr_client import HSCRParams
from hscr_worker.fixture import synthetic
from hscr_worker.fixture.quality import measure

# Each family's fixture, by the name commands use, and its session backend (tests/worker/conftest.py).
FAMILY_FIXTURES = {"fixture": "fixture_backend", "fixture-qwen2.5-vl": "qwen_backend",
                   "fixture-gemma3": "gemma_backend"}


# Issue #2's targets: grounded R-precision, level-1 factually wrong (at least), level-1 malformed (at most), errors
# non-decreasing over levels (at least); every family's fixture is held to them (docs/models.md, "HSCR defaults
# per family": the figures per seed).
TARGETS = {"fixture": (0.95, 0.97, 0.02, 0.98), "fixture-qwen2.5-vl": (0.95, 0.97, 0.02, 0.98),
           "fixture-gemma3": (0.95, 0.97, 0.02, 0.98)}


@pytest.mark.parametrize("model", sorted(FAMILY_FIXTURES))
def test_shipped_defaults_meet_the_quality_targets(model, request):
    backend = request.getfixturevalue(FAMILY_FIXTURES[model])
    report = measure(model, backend.profile.params(), n=200, seed=4242, backend=backend)  # the family's defaults
    # What the rates are over: every item came back, R-precision ranks the coupled tokens of (nearly) all of
    # them, the level metrics cover the items with levels; a short or empty run cannot pass on its rates.
    assert report["items"] == report["items_with_levels"] + report["items_without_levels"] == 200
    assert report["items_with_levels"] >= 0.85 * 200
    assert report["r_precision_items"] >= 0.95 * 200
    assert report["coupled_tokens"] >= 2 * 200
    r_precision, wrong, malformed, monotone = TARGETS[model]
    assert report["grounded_r_precision"] >= r_precision
    assert report["level1_factually_wrong"] >= wrong
    assert report["level1_malformed"] <= malformed
    assert report["errors_non_decreasing"] >= monotone
    assert_yield_by_answer_type(report, seed=4242)


def assert_yield_by_answer_type(report: dict, *, seed: int) -> None:
    """The per-question-type yield and its reasons add up to the items with and without levels (#17 item 6)."""
    per_type = Counter(example.qtype for example in synthetic.make_examples(report["items"], seed))
    yields, reasons = report["yield_by_answer_type"], report["no_levels_by_answer_type"]
    assert set(yields) == set(per_type) and set(reasons) <= set(per_type)
    assert sum(round(yields[qtype] * per_type[qtype]) for qtype in per_type) == report["items_with_levels"]
    for qtype in per_type:  # each type's items without levels are its reasons' counts
        assert round((1 - yields[qtype]) * per_type[qtype]) == sum(reasons.get(qtype, {}).values())
    assert sum(sum(counts.values()) for counts in reasons.values()) == report["items_without_levels"]


def test_family_defaults_fill_only_what_nobody_set():
    from hscr_worker.families import PROFILES

    qwen, llava, gemma = PROFILES["qwen2.5-vl"], PROFILES["fixture"], PROFILES["gemma3"]
    assert llava.params() == HSCRParams()
    defaults = qwen.params()
    assert (defaults.n_masks, defaults.dropout_ratio, defaults.coupling, defaults.min_shift) == (5, 0.97, "move", 0.032)
    assert defaults.fire_after_divergence is False
    assert (gemma.params().n_masks, gemma.params().dropout_ratio) == (3, 0.97)
    assert gemma.params().fire_after_divergence is False and gemma.params().coupling == "raise"
    assert gemma.params(HSCRParams.paper().model_dump(exclude_unset=True)) == HSCRParams.paper()
    assert qwen.params({"n_masks": 1}).n_masks == 1 and qwen.params({"n_masks": 1}).dropout_ratio == 0.97
    paper = HSCRParams.paper().model_dump(exclude_unset=True)
    assert qwen.params(paper) == HSCRParams.paper()  # the paper's setting is the paper's on every family
