"""The language-prior task: splits, the history's prior strength, items on disk, and the on-policy chosen answer."""

from __future__ import annotations

import json

import pytest

from hscr_worker.fixture import prior, synthetic
from hscr_worker.fixture.items import make_task_examples, write_items
from hscr_worker.pipeline import pick_chosen


@pytest.mark.parametrize("attribute", sorted(prior.PRIORS))
def test_splits_tie_the_attribute_to_the_history_as_documented(attribute):
    train = prior.make_examples(3000, 11, "train", attribute=attribute)
    agree = sum(prior.value(e.attrs) == prior.implied(e.attrs["history"]) for e in train) / len(train)
    assert agree == pytest.approx(prior.PRIOR_STRENGTH, abs=0.02)
    assert all(prior.value(e.attrs) == prior.implied(e.attrs["history"])
               for e in prior.make_examples(200, 12, "in-prior", attribute=attribute))
    assert all(prior.value(e.attrs) != prior.implied(e.attrs["history"])
               for e in prior.make_examples(200, 13, "counter-prior", attribute=attribute))
    for e in train[:50]:  # the standard task's answers: its parser scores them
        assert e.question == prior.question(e.attrs["history"]) and prior.history_of(e.question) == e.attrs["history"]
        assert synthetic.parse(e.answer, e.qtype) == synthetic.facts(e.attrs, e.qtype)
        assert set(e.question.split()) <= set(prior.vocabulary())


def test_prior_answer_share_counts_wrong_answers_that_follow_the_history():
    examples = prior.make_examples(3, 14, "counter-prior")
    answers = []
    for e in examples[:2]:  # wrong, with the history's value
        attrs = prior.with_value(e.attrs, prior.implied(e.attrs["history"]))
        answers.append(" ".join(w for w, _ in synthetic.answer_words(attrs, e.qtype)))
    answers.append(examples[2].answer)  # right
    assert prior.prior_answer_share(answers, examples) == {"wrong": 2, "prior_answer_share": 1.0}


def test_items_and_errors(tmp_path):
    rows = write_items(5, 21, tmp_path / "items.jsonl", tmp_path / "images", task="prior", split="counter-prior")
    on_disk = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert on_disk == rows and all(r["question"].startswith("history of ") for r in rows)
    assert all((tmp_path / r["image"]).exists() for r in rows)
    with pytest.raises(ValueError, match="training seed"):
        make_task_examples(5, 1234, "prior", "train")
    with pytest.raises(ValueError, match="split"):
        make_task_examples(5, 21, "standard", "counter-prior")
    with pytest.raises(ValueError, match="split"):
        prior.make_examples(5, 21, "held-out")


def test_on_policy_chosen_is_the_own_answer_only_where_it_agrees_with_the_reference():
    assert pick_chosen("it is a small mass .", "It is a small  mass.", "own") == "It is a small  mass."
    assert pick_chosen("it is a small mass .", "it is a small nodule .", "own") == "it is a small mass ."
    assert pick_chosen("it is a small mass .", "it is a small mass .", "reference") == "it is a small mass ."
    assert pick_chosen("it is a small mass .", "it is a small  mass", "reference") == "it is a small mass ."
    assert pick_chosen(None, "own words", "reference") == pick_chosen("", "own words", "own") == "own words"


def test_fixture_prior_answers_from_the_history_where_the_image_disagrees():
    """The shipped fixture-prior has the language prior the benchmark needs: it is right far more often where the
    image agrees with the history than where it does not, and its counter-prior errors mostly name the history's
    kind (docs/trainer.md: 0.57 / 0.89, errors = prior's answer 0.69 on seed 8101). Counter-prior exact is in the
    40-60 % band issue #17 asks of the base model (0.59 on these items)."""
    from hscr_worker.backends.transformers import TransformersBackend
    from hscr_worker.fixture import resolve_model
    from hscr_worker.fixture.evaluate import answers_for, score_answers

    backend = TransformersBackend(resolve_model("fixture-prior"), batch_size=64)
    scores = {}
    for split, seed in (("in-prior", 9101), ("counter-prior", 9102)):
        examples = make_task_examples(300, seed, "prior", split)
        answers = answers_for(backend, examples, [e.image for e in examples])
        scores[split] = {**score_answers(answers, examples, [e.attrs for e in examples]),
                         **prior.prior_answer_share(answers, examples)}
    assert scores["in-prior"]["exact"] - scores["counter-prior"]["exact"] >= 0.15, scores
    assert 0.4 <= scores["counter-prior"]["exact"] <= 0.6, scores
    assert scores["counter-prior"]["prior_answer_share"] >= 0.4, scores
    assert scores["in-prior"]["malformed"] == scores["counter-prior"]["malformed"] == 0.0
