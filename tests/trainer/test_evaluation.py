"""Fixture evaluation (hallucination rate) and the Med-VQA evaluator on hand-made files in each layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from hscr_trainer import medvqa
from hscr_trainer.evaluation import evaluate_fixture, hallucinated_findings, score_fixture_answers
from hscr_worker.fixture import synthetic
from hscr_worker.generate import DEFAULT_MODEL

DATA = Path(__file__).parent / "data"
NORMAL = {"modality": "ct", "lesions": []}
ONE = {"modality": "xray", "lesions": [{"side": "left", "level": "upper", "kind": "mass", "size": "large"}]}


@pytest.mark.parametrize(("text", "qtype", "attrs", "expected"), [
    ("yes , there is an abnormality .", "abnormal", NORMAL, 1),  # asserts a lesion in a normal image
    ("no , the image is normal .", "abnormal", ONE, 0),  # a miss, not a hallucination
    ("the number of lesions is two .", "count", ONE, 1),
    ("the number of lesions is zero .", "count", ONE, 0),
    ("the lesion is in the left upper region .", "where", ONE, 0),
    ("the lesion is in the right upper region .", "where", ONE, 1),
    ("it is a large nodule .", "kind", ONE, 1),
    ("the xray shows a large mass in the left upper region .", "describe", ONE, 0),
    ("the ct shows a large mass in the left upper region .", "describe", ONE, 0),  # wrong modality: no finding
    ("the xray shows a small opacity in the right lower zone .", "describe", ONE, 1),
    ("the the the", "describe", ONE, None),
])
def test_hallucinated_findings(text, qtype, attrs, expected):
    assert hallucinated_findings(text, qtype, attrs) == expected


def test_truth_has_no_hallucination_and_scores_perfectly():
    examples = synthetic.make_examples(60, 31)
    scores = score_fixture_answers([e.answer for e in examples], examples)
    assert scores["hallucination"] == 0.0 and scores["exact"] == 1.0 and scores["items"] == 60


def test_evaluate_fixture_model():
    result = evaluate_fixture(DEFAULT_MODEL, n=24, seed=31)
    # The fixture is good but not perfect on held-out items (docs/trainer.md: base 82 % exact, 17 % hallucinating):
    # the evaluation finds both its right answers and the lesions it makes up, a whole number of the 24 items each.
    assert result["items"] == 24 and 0.5 <= result["exact"] < 1.0
    assert 0.0 < result["hallucination"] <= 0.5 and "kind" in result["per_attribute"]
    for rate in ("exact", "hallucination"):
        assert result[rate] * 24 == pytest.approx(round(result[rate] * 24), abs=0.01)
    with pytest.raises(ValueError, match="training seed"):
        evaluate_fixture(DEFAULT_MODEL, n=4, seed=1234)


# ---- Med-VQA: the LLaVA-Med protocol ----

def test_normalization():
    assert medvqa.normalize("The Left Lung, two nodules.") == ["left", "lung", "2", "nodules"]
    assert medvqa.normalize("3.5 cm") == ["3.5", "cm"]


@pytest.mark.parametrize(("prediction", "answer", "hit"), [
    ("Yes, there is an abnormality.", "yes", 1.0),
    ("no", "Yes", 0.0),
    ("there is a nodule", "no", 0.0),  # 'no' inside 'nodule' is not an answer
    ("The left lung.", "left", 1.0),
    ("", "yes", 0.0),
])
def test_closed_accuracy(prediction, answer, hit):
    assert medvqa.closed_hit(prediction, answer) == hit


@pytest.mark.parametrize(("prediction", "answer", "recall"), [
    ("this is a ct image .", "CT", 1.0),
    ("right lower lobe", "left lower lobe", 2 / 3),
    ("lobe lobe lobe", "left lower lobe", 1 / 3),  # clipped counts: repeating a word earns it once
    ("two lesions", "2", 1.0),
    ("nothing", "", 0.0),
])
def test_open_recall(prediction, answer, recall):
    assert medvqa.open_recall(prediction, answer) == pytest.approx(recall)


EXPECTED = {  # layout -> (qid, answer, answer type) in file order (VQA-RAD: test rows only; SLAKE: English only)
    "vqa-rad": [("1", "yes", "closed"), ("2", "ct", "open"), ("3", "two", "open")],
    "slake": [("1000", "yes", "closed"), ("1001", "ct", "open"), ("1002", "two", "open"), ("1003", "no", "closed")],
    "pathvqa": [("test-0", "yes", "closed"), ("test-1", "ct", "open"), ("test-2", "two", "open"),
                ("test-3", "no", "closed")],
    "llava-med": [("0", "yes", "closed"), ("1", "ct", "open"), ("2", "two", "open"), ("3", "no", "closed")],
}


@pytest.mark.parametrize("layout", medvqa.LAYOUTS)
def test_layouts(layout):
    items = medvqa.load_items(layout, DATA / layout)
    assert [(i.qid, i.answer, i.answer_type) for i in items] == EXPECTED[layout]
    assert all(i.image.is_file() for i in items)
    assert items[0].question == "is there an abnormality ?"


def test_scores_follow_the_protocol():
    items = medvqa.load_items("slake", DATA / "slake")
    result = medvqa.score(items, ["Yes.", "it is an MRI", "two lesions", "yes"])
    assert result == {"closed_accuracy": 50.0, "open_recall": 50.0, "closed_items": 2, "open_items": 2}


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="layout"):
        medvqa.load_items("slake", tmp_path)
    with pytest.raises(ValueError, match="unknown layout"):
        medvqa.load_items("mimic", tmp_path)
    evil = tmp_path / "qas" / "test"
    evil.mkdir(parents=True)

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    (evil / "test_qa.pkl").write_bytes(pickle.dumps([Exploit()]))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        medvqa.load_items("pathvqa", tmp_path)


def test_fixture_model_end_to_end(tmp_path):
    answers = tmp_path / "answers.jsonl"
    result = medvqa.evaluate(DEFAULT_MODEL, "vqa-rad", DATA / "vqa-rad", predictions_path=answers)
    assert (result["closed_items"], result["open_items"]) == (1, 2)
    lines = answers.read_text().splitlines()
    assert len(lines) == 3
    # The fixture reads these images: it finds the abnormality and names the modality.
    assert result["closed_accuracy"] == 100.0 and result["open_recall"] >= 50.0
