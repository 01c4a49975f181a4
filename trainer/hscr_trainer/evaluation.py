"""Fixture evaluation: held-out accuracy (per attribute and exact) and the hallucination rate.

A *hallucinated finding* is a lesion the answer asserts that the image does not contain: an
abnormality or a lesion count above the truth, or an asserted lesion (its location, kind and size,
whichever the answer states) that matches no lesion in the image. Wrong modality or a missed lesion
is an error, not a hallucination. Malformed answers are counted apart (they assert nothing).
"""

from __future__ import annotations

import re

from hscr_worker.fixture import prior, synthetic
from hscr_worker.fixture.evaluate import answers_for, score_answers
from hscr_worker.fixture.items import make_task_examples

_LESION_SLOT = re.compile(r"^(side|level|kind|size)(\d)$")
_LESION_ATTRIBUTES = ("side", "level", "kind", "size")


def hallucinated_findings(text: str, qtype: str, attrs: dict) -> int | None:
    """Number of findings ``text`` asserts that the image (``attrs``) lacks; None when malformed."""
    got = synthetic.parse(text, qtype)
    if got is None:
        return None
    truth = attrs["lesions"]
    count = 0
    if got.get("present") in ("yes", "a") and not truth:
        count += 1
    if "count" in got and synthetic.COUNTS.index(got["count"]) > len(truth):
        count += 1
    asserted: dict[str, dict[str, str]] = {}
    for slot, word in got.items():
        match = _LESION_SLOT.match(slot)
        if match:
            asserted.setdefault(match.group(2), {})[match.group(1)] = word
    for lesion in asserted.values():
        if not any(all(real[k] == v for k, v in lesion.items()) for real in truth):
            count += 1
    return count


def score_fixture_answers(answers: list[str], examples: list[synthetic.Example]) -> dict:
    """Exact and per-attribute accuracy (``hscr_worker``'s scorer) plus the hallucination rate."""
    scores = score_answers(answers, examples, [e.attrs for e in examples])
    counts = [hallucinated_findings(a, e.qtype, e.attrs) for a, e in zip(answers, examples, strict=True)]
    scores["hallucination"] = round(sum(1 for c in counts if c) / len(counts), 4)
    scores["hallucinated_findings_per_item"] = round(sum(c or 0 for c in counts) / len(counts), 4)
    scores["items"] = len(answers)
    return scores


def evaluate_fixture(model: str, *, n: int = 500, seed: int = 999, batch_size: int = 64, task: str = "standard",
                     split: str = "train", per_item: bool = False) -> dict:
    """Greedy answers of ``model`` (a directory, hub id or fixture name) on ``n`` held-out fixture items
    of ``task`` (and the prior task's ``split``) from ``seed``, scored. The prior task adds
    ``prior_answer_share``: of the wrong well-formed answers, the share that name the kind the history implies.
    ``per_item`` adds ``correct``: 1 where an answer is exact, per item (for paired comparisons)."""
    from hscr_worker.backends.transformers import TransformersBackend
    from hscr_worker.fixture import resolve_model

    examples = make_task_examples(n, seed, task, split)
    backend = TransformersBackend(resolve_model(model), batch_size=batch_size)
    answers = answers_for(backend, examples, [e.image for e in examples])
    scores = {"seed": seed, **score_fixture_answers(answers, examples)}
    if task == "prior":
        scores = {"task": task, "split": split, **scores, **prior.prior_answer_share(answers, examples)}
    if per_item:
        scores["correct"] = [int(synthetic.parse(a, e.qtype) == synthetic.facts(e.attrs, e.qtype))
                             for a, e in zip(answers, examples, strict=True)]
    return scores
