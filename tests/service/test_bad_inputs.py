"""Bad inputs get a 4xx with a clear message or a per-item error; never a 5xx, and nothing else is lost."""

from __future__ import annotations

import base64
import io
import json

import pytest
from service_helpers import inline_items, wait_for_job


def upload(client, data: bytes, purpose: str = "image", name: str = "x.png"):
    return client.post("/v1/files", data={"purpose": purpose}, files={"file": (name, data)})


def png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_uploads_refuse_unusable_images(alice):
    import pydicom
    from pydicom.data import get_testdata_file

    cases = {
        "corrupt png": png(16, 16)[:40] + b"\x00garbage" * 10,
        "not an image": b"just some text, not pixels\n" * 4,
        "empty": b"",
        "decompression bomb": png(8000, 8000),  # 64 Mpx declared in a ~60 kB file
        "malformed dicom": b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"\x01" * 64,
    }
    for name, data in cases.items():
        response = upload(alice, data)
        assert response.status_code in (413, 422), (name, response.status_code, response.text)
        assert response.json()["error"]["message"], name
    dicom = open(get_testdata_file("CT_small.dcm"), "rb").read()
    assert pydicom.dcmread(io.BytesIO(dicom)).Rows
    assert upload(alice, dicom, name="ct.dcm").status_code == 201
    assert upload(alice, b"", purpose="items", name="e.jsonl").status_code == 422
    assert upload(alice, b"{}", purpose="bogus").status_code == 422


@pytest.mark.parametrize("body, field", [
    ({"items": [{"image": "data:image/png;base64,AA==", "question": ""}]}, "question"),
    ({"items": [{"image": "data:image/png;base64,AA==", "question": "q" * 5000}]}, "question"),
    ({"items": [{"image": "data:image/png;base64,AA==", "question": "q"}], "params": {"dropout_ratio": 1.5}},
     "dropout_ratio"),
    ({"items": [{"image": "data:image/png;base64,AA==", "question": "q"}], "params": {"n_levels": 9, "n_coupled": 4}},
     "n_levels"),
    ({"items": [{"image": "data:image/png;base64,AA==", "question": "q"}], "params": {"dropout_ratio": 1.0}},
     "would remove the whole image"),
    ({"items": [{"image": "data:image/png;base64,AA==", "question": "q"}], "params": {"no_such": 1}}, "no_such"),
    ({"items": []}, "items"),
    ({"input_file_id": "file-x", "items": [{"image": "data:,", "question": "q"}]}, "input_file_id"),
    ({"items": [{"image": "data:image/png;base64,AA==", "question": "q"}], "model": "gpt-9"}, "model"),
])
def test_invalid_job_requests_are_422(alice, body, field):
    response = alice.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert field in response.text


def test_malformed_body_and_too_many_items(alice):
    response = alice.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    many = [{"image": "data:image/png;base64,AA==", "question": "q"}] * 201  # HSCR_MAX_ITEMS_PER_JOB=200
    response = alice.post("/v1/jobs", json={"items": many})
    assert response.status_code == 413 and "limit is 200" in response.text


def test_bad_items_become_per_item_errors(alice, bob, workers, fixture_items):
    good = inline_items(fixture_items, 2, prefix="bad-")
    bob_image = upload(bob, png(64, 64)).json()["id"]
    text_file = upload(alice, b'{"a": 1}\n', purpose="items", name="t.jsonl").json()["id"]
    corrupt = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nnot really").decode()
    lines = [json.dumps(item) for item in good] + [
        "{this is not json",
        json.dumps({"custom_id": "empty-q", "image": good[0]["image"], "question": "   "}),
        json.dumps({"custom_id": "huge-q", "image": good[0]["image"], "question": "why " * 2000}),
        json.dumps({"custom_id": "a-path", "image": "/etc/passwd", "question": "q"}),
        json.dumps({"custom_id": "s3-url", "image": "s3://other-bucket/secret.png", "question": "q"}),
        json.dumps({"custom_id": "bobs-file", "image": bob_image, "question": "q"}),
        json.dumps({"custom_id": "not-an-image-file", "image": text_file, "question": "q"}),
        json.dumps({"custom_id": "corrupt", "image": corrupt, "question": "q"}),
        json.dumps({"custom_id": good[0]["custom_id"], "image": good[0]["image"], "question": "duplicate id"}),
        json.dumps([1, 2, 3]),
    ]
    items_file = upload(alice, ("\n".join(lines) + "\n").encode(), purpose="items", name="bad.jsonl").json()["id"]
    # min_shift 0: the two good items always yield levels, so only the bad lines fail.
    params = {"n_masks": 1, "max_new_tokens": 16, "min_shift": 0.0}
    created = alice.post("/v1/jobs", json={"input_file_id": items_file, "params": params})
    assert created.status_code == 201, created.text
    job = wait_for_job(alice, created.json()["id"])
    assert job["status"] == "completed"
    errors_text = alice.get(f"/v1/jobs/{job['id']}/errors").text
    assert job["request_counts"] == {"total": len(lines), "completed": 2, "failed": len(lines) - 2, "cancelled": 0,
                                     "expired": 0}, errors_text
    errors = {e["custom_id"]: e["error"] for e in map(json.loads, alice.get(f"/v1/jobs/{job['id']}/errors")
                                                       .text.splitlines())}
    assert "malformed JSON" in errors["line-3"]
    assert "question is empty" in errors["empty-q"]
    assert "limit" in errors["huge-q"]
    for custom_id in ("a-path", "s3-url"):
        assert "does not read paths or URLs" in errors[custom_id]
    assert "not found" in errors["bobs-file"]  # another tenant's file does not exist for alice
    assert "purpose" in errors["not-an-image-file"]
    assert "not a readable image" in errors["corrupt"]
    assert "duplicate custom_id" in errors[good[0]["custom_id"]]
    assert len(errors) == len(lines) - 2
