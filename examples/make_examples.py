"""Rebuild the bundled example items: ``python examples/make_examples.py`` (deterministic).

Twelve held-out fixture items (seed 7), one more as a 16-bit DICOM, and two deliberately bad items
(an empty question, a file that is not an image) that show how failures land in errors.jsonl.
"""

import json
from pathlib import Path

from hscr_worker.fixture import synthetic
from hscr_worker.fixture.dicom import write_dicom
from hscr_worker.fixture.items import write_items

HERE = Path(__file__).parent

rows = write_items(12, 7, HERE / "items.jsonl", HERE / "images")
extra = synthetic.make_examples(13, 7)[12]
write_dicom(extra.image, HERE / "images" / "fx-7-ct-dicom.dcm")
(HERE / "images" / "not-an-image.png").write_bytes(b"this is not a PNG file\n")
rows += [
    {"custom_id": "fx-7-dicom", "image": "images/fx-7-ct-dicom.dcm", "question": extra.question,
     "answer": extra.answer},
    {"custom_id": "bad-empty-question", "image": rows[0]["image"], "question": "   "},
    {"custom_id": "bad-not-an-image", "image": "images/not-an-image.png", "question": "describe the findings ."},
]
with open(HERE / "items.jsonl", "w", encoding="utf-8") as f:
    for row in rows:
        f.write(json.dumps(row) + "\n")
print(f"wrote {len(rows)} items to {HERE / 'items.jsonl'}")
