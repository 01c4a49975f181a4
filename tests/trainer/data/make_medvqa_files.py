"""Write the small hand-made Med-VQA files (VQA-RAD, SLAKE, PathVQA, LLaVA-Med layouts) used by the tests.

Images are fixture images (so the fixture model can answer); questions and answers are written by
hand in each benchmark's own file layout. Run from this folder: ``python make_medvqa_files.py``.
"""

import json
import pickle
from pathlib import Path

from hscr_worker.fixture import synthetic

HERE = Path(__file__).parent
# (question, answer, answer type); the image is the fixture example with the same index.
QA = [
    ("is there an abnormality ?", "yes", "CLOSED"),
    ("what is the imaging modality ?", "ct", "OPEN"),
    ("how many lesions are there ?", "two", "OPEN"),
    ("is there an abnormality ?", "no", "CLOSED"),
]


def examples():
    found, pool = [], synthetic.make_examples(200, 77)
    wants = [lambda e: e.attrs["lesions"], lambda e: e.attrs["modality"] == "ct",
             lambda e: len(e.attrs["lesions"]) == 2, lambda e: not e.attrs["lesions"]]
    for want in wants:
        found.append(next(e for e in pool if want(e) and e not in found))
    return found


def main() -> None:
    images = examples()
    rad = HERE / "vqa-rad"
    (rad / "VQA_RAD Image Folder").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ((q, a, t), e) in enumerate(zip(QA, images, strict=True)):
        name = f"synpic{100 + i}.jpg"
        e.image.convert("RGB").save(rad / "VQA_RAD Image Folder" / name, quality=90)
        rows.append({"qid": i + 1, "image_name": name, "image_organ": "CHEST", "answer": a, "answer_type": t,
                     "question_type": "PRES", "question": q, "phrase_type": "test_freeform" if i < 3 else "freeform"})
    (rad / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows, indent=1))

    slake = HERE / "slake"
    rows = []
    for i, ((q, a, t), e) in enumerate(zip(QA, images, strict=True)):
        folder = slake / "imgs" / f"xmlab{i}"
        folder.mkdir(parents=True, exist_ok=True)
        e.image.convert("RGB").save(folder / "source.jpg", quality=90)
        rows.append({"img_id": i, "img_name": f"xmlab{i}/source.jpg", "question": q, "answer": a, "q_lang": "en",
                     "location": "Lung", "modality": "CT", "answer_type": t, "base_type": "vqa",
                     "content_type": "Abnormality", "triple": ["vhead", "_", "_"], "qid": 1000 + i})
    rows.append({**rows[0], "question": "图片中有异常吗?", "answer": "是", "q_lang": "zh", "qid": 2000})
    (slake / "test.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))

    path = HERE / "pathvqa"
    (path / "images" / "test").mkdir(parents=True, exist_ok=True)
    (path / "qas" / "test").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ((q, a, _), e) in enumerate(zip(QA, images, strict=True)):
        e.image.convert("RGB").save(path / "images" / "test" / f"test_{i:04d}.jpg", quality=90)
        rows.append({"image": f"test_{i:04d}", "question": q, "answer": a})
    (path / "qas" / "test" / "test_qa.pkl").write_bytes(pickle.dumps(rows))

    med = HERE / "llava-med"
    (med / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ((q, a, t), e) in enumerate(zip(QA, images, strict=True)):
        e.image.convert("RGB").save(med / "images" / f"{i}.jpg", quality=90)
        rows.append({"id": i, "image": f"images/{i}.jpg", "answer_type": t,
                     "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
    (med / "test.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
