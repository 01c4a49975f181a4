"""``hscr generate`` straight to S3 (real SeaweedFS), with an item whose image is an s3:// URI."""

import io
import json
import os

from service_helpers import BUCKET

from hscr_client import HSCRParams
from hscr_client.storage import open_location
from hscr_worker.dataset import read_rows
from hscr_worker.fixture import synthetic
from hscr_worker.generate import generate_dataset


def test_generate_reads_s3_images_and_writes_an_s3_dataset(stack_env, tmp_path):
    import torch

    from hscr_worker.backends.transformers import TransformersBackend
    from hscr_worker.generate import DEFAULT_MODEL

    torch.set_num_threads(1)  # see tests/worker/conftest.py
    examples = synthetic.make_examples(3, 41)
    bucket = open_location(f"s3://{BUCKET}")
    items = []
    for i, example in enumerate(examples):
        buffer = io.BytesIO()
        example.image.save(buffer, format="PNG")
        bucket.write_bytes(f"inputs-{os.getpid()}/img{i}.png", buffer.getvalue())
        items.append({"custom_id": f"s3-{i}", "image": f"s3://{BUCKET}/inputs-{os.getpid()}/img{i}.png",
                      "question": example.question, "answer": example.answer})
    items.append({"custom_id": "s3-missing", "image": f"s3://{BUCKET}/nope/missing.png", "question": "describe ."})
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))

    out = f"s3://{BUCKET}/generate-{os.getpid()}"
    manifest = generate_dataset(TransformersBackend(DEFAULT_MODEL), str(tmp_path / "items.jsonl"), out,
                                HSCRParams(), chunk_size=2)
    location = open_location(out)
    assert json.loads(location.read_bytes("manifest.json")) == manifest
    assert manifest["request_counts"]["total"] == 4
    errors = [json.loads(line) for line in location.read_bytes("errors.jsonl").decode().splitlines()]
    assert any(e["custom_id"] == "s3-missing" and "cannot read" in e["error"] for e in errors)
    ranked = read_rows(out, "ranked")
    assert {r["custom_id"] for r in ranked} | {e["custom_id"] for e in errors} == {it["custom_id"] for it in items}
    assert len(read_rows(out, "pairs")) == manifest["configs"]["pairs"]["rows"]
