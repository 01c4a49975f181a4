"""Med-VQA evaluation in the LLaVA-Med protocol for VQA-RAD, SLAKE and PathVQA file layouts.

Metrics (LLaVA-Med, Li et al. 2023, ``llava/eval/run_eval.py``): closed questions score accuracy
(the normalized ground truth appears in the normalized answer), open questions score the recall of
ground-truth tokens in the answer. Normalization lowercases, turns punctuation into spaces, drops
periods that are not decimal points and the articles a/an/the, and maps number words to digits.

Two deliberate fixes to LLaVA-Med's script, both of which inflate its numbers: its closed branch
drops (instead of counting as wrong) answers that say yes/no but not the ground truth, and its
recall counts a repeated answer word once per repetition. Here every closed question counts and
recall uses clipped token counts.

Layouts (``root`` is the dataset folder as distributed):

- ``vqa-rad``: ``VQA_RAD Dataset Public.json`` (list of ``qid, image_name, question, answer,
  answer_type, phrase_type``; test rows have ``phrase_type`` test_freeform/test_para), images in
  ``VQA_RAD Image Folder/``.
- ``slake``: ``<split>.json`` (list of ``qid, img_name, question, answer, answer_type, q_lang``;
  English rows only), images in ``imgs/``.
- ``pathvqa``: ``qas/<split>/<split>_qa.pkl`` (list of ``image, question, answer``; closed = yes/no
  answers), images in ``images/<split>/<image>.jpg``. Pickles are read with an unpickler that only
  builds plain containers, so a tampered file cannot run code.
- ``llava-med``: LLaVA-Med's converted ``<split>.json`` (``id, image, conversations, answer_type``).
"""

from __future__ import annotations

import io
import json
import pickle
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LAYOUTS = ("vqa-rad", "slake", "pathvqa", "llava-med")
CLOSED, OPEN = "closed", "open"
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!:']")
_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")


@dataclass(frozen=True)
class VQAItem:
    qid: str
    image: Path
    question: str
    answer: str
    answer_type: str  # closed | open


def normalize(text: str) -> list[str]:
    """LLaVA-Med's answer normalization, as a token list."""
    text = _PERIOD.sub(" ", _PUNCTUATION.sub(" ", str(text).lower()))
    return [_NUMBERS.get(word, word) for word in text.split() if word not in _ARTICLES]


def closed_hit(prediction: str, answer: str) -> float:
    """1.0 when the normalized ground truth appears, as whole words, in the normalized prediction."""
    truth, predicted = " ".join(normalize(answer)), " ".join(normalize(prediction))
    return float(bool(truth) and f" {truth} " in f" {predicted} ")


def open_recall(prediction: str, answer: str) -> float:
    """Share of ground-truth tokens present in the prediction (clipped counts)."""
    truth, predicted = Counter(normalize(answer)), Counter(normalize(prediction))
    total = sum(truth.values())
    return sum(min(n, predicted[w]) for w, n in truth.items()) / total if total else 0.0


def score(items: list[VQAItem], predictions: list[str]) -> dict:
    if len(items) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items")
    closed = [closed_hit(p, i.answer) for i, p in zip(items, predictions, strict=True) if i.answer_type == CLOSED]
    opened = [open_recall(p, i.answer) for i, p in zip(items, predictions, strict=True) if i.answer_type == OPEN]
    return {"closed_accuracy": round(100 * sum(closed) / len(closed), 2) if closed else None,
            "open_recall": round(100 * sum(opened) / len(opened), 2) if opened else None,
            "closed_items": len(closed), "open_items": len(opened)}


# ---- layouts ----

def _answer_type(value) -> str:
    kind = str(value).strip().lower()
    if kind not in (CLOSED, OPEN):
        raise ValueError(f"answer_type {value!r} is neither CLOSED nor OPEN")
    return kind


def _read_json(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is the dataset root and layout right?")
    return json.loads(path.read_text(encoding="utf-8"))


def load_vqa_rad(root: Path, split: str = "test") -> list[VQAItem]:
    rows = _read_json(root / "VQA_RAD Dataset Public.json")
    keep = (lambda r: str(r.get("phrase_type", "")).startswith("test")) if split == "test" else \
        (lambda r: not str(r.get("phrase_type", "")).startswith("test"))
    return [VQAItem(str(r["qid"]), root / "VQA_RAD Image Folder" / r["image_name"], r["question"], str(r["answer"]),
                    _answer_type(r["answer_type"])) for r in rows if keep(r)]


def load_slake(root: Path, split: str = "test") -> list[VQAItem]:
    rows = _read_json(root / f"{split}.json")
    return [VQAItem(str(r["qid"]), root / "imgs" / r["img_name"], r["question"], str(r["answer"]),
                    _answer_type(r["answer_type"])) for r in rows if r.get("q_lang", "en") == "en"]


class _PlainUnpickler(pickle.Unpickler):
    """Builds only dicts, lists, strings and numbers: refuses every class a pickle could name."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is accepted")


def load_pathvqa(root: Path, split: str = "test") -> list[VQAItem]:
    path = root / "qas" / split / f"{split}_qa.pkl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is the dataset root and layout right?")
    rows = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    items = []
    for index, r in enumerate(rows):
        answer = str(r["answer"])
        kind = CLOSED if answer.strip().lower() in ("yes", "no") else OPEN
        items.append(VQAItem(str(r.get("qid", f"{split}-{index}")), root / "images" / split / f"{r['image']}.jpg",
                             r["question"], answer, kind))
    return items


def load_llava_med(root: Path, split: str = "test") -> list[VQAItem]:
    rows = _read_json(root / f"{split}.json")
    items = []
    for r in rows:
        turns = r["conversations"]
        question = turns[0]["value"].replace("<image>", "").strip()
        items.append(VQAItem(str(r["id"]), root / r["image"], question, str(turns[1]["value"]),
                             _answer_type(r["answer_type"])))
    return items


LOADERS: dict[str, Callable[[Path, str], list[VQAItem]]] = {
    "vqa-rad": load_vqa_rad, "slake": load_slake, "pathvqa": load_pathvqa, "llava-med": load_llava_med}


def load_items(layout: str, root: str | Path, split: str = "test") -> list[VQAItem]:
    if layout not in LOADERS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return LOADERS[layout](Path(root), split)


def predict(model: str, items: list[VQAItem], *, max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """Greedy answers of ``model`` (a directory, hub id or fixture name of any family ``hscr_worker``
    serves: LLaVA, Qwen2-VL, Qwen2.5-VL), through ``hscr_worker``'s transformers backend and the
    family's prompt format."""
    from hscr_worker.backends.base import GenerateRequest
    from hscr_worker.backends.transformers import TransformersBackend
    from hscr_worker.fixture import resolve_model
    from hscr_worker.images import load_image

    backend = TransformersBackend(resolve_model(model), batch_size=batch_size)
    answers: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        visual = backend.encode_images([load_image(str(i.image)) for i in chunk])
        requests = [GenerateRequest(backend.prompt_ids(i.question), v, max_new_tokens)
                    for i, v in zip(chunk, visual, strict=True)]
        answers += [backend.decode(ids) for ids in backend.generate(requests)]
    return answers


def evaluate(model: str, layout: str, root: str | Path, *, split: str = "test", limit: int | None = None,
             predictions_path: str | Path | None = None) -> dict:
    """Answer every item of a Med-VQA split with ``model`` and score it; optionally save the answers (JSONL)."""
    items = load_items(layout, root, split)[:limit]
    if not items:
        raise ValueError(f"no {split} items found for layout {layout!r} under {root}")
    predictions = predict(model, items)
    if predictions_path:
        with open(predictions_path, "w", encoding="utf-8") as f:
            for item, text in zip(items, predictions, strict=True):
                f.write(json.dumps({"question_id": item.qid, "answer_type": item.answer_type,
                                    "answer": item.answer, "text": text}) + "\n")
    return {"layout": layout, "split": split, **score(items, predictions)}
