"""Issue #2's quality targets, measured on 200 held-out fixture items with the shipped defaults."""

from hscr_client import HSCRParams
from hscr_worker.fixture.quality import measure
from hscr_worker.generate import DEFAULT_MODEL


def test_shipped_defaults_meet_the_quality_targets(fixture_backend):
    report = measure(DEFAULT_MODEL, HSCRParams(), n=200, seed=4242, backend=fixture_backend)
    assert report["grounded_r_precision"] >= 0.95
    assert report["level1_factually_wrong"] >= 0.97
    assert report["level1_malformed"] <= 0.02
    assert report["errors_non_decreasing"] >= 0.98
    assert report["items_without_levels"] <= 0.15 * 200
