"""End to end through the real API, real Redis, a real worker process and real SeaweedFS."""

from __future__ import annotations

import json

from service_helpers import inline_items, wait_for_job


def upload_items_file(client, root, n: int, prefix: str) -> tuple[str, list[str]]:
    """Upload n fixture images, then an items JSONL that references them by file id: its id and the custom_ids."""
    lines = []
    for row in [json.loads(line) for line in (root / "items.jsonl").read_text().splitlines()[:n]]:
        with open(root / row["image"], "rb") as f:
            image = client.post("/v1/files", data={"purpose": "image"}, files={"file": (row["image"], f)})
        assert image.status_code == 201, image.text
        lines.append(json.dumps({"custom_id": prefix + row["custom_id"], "image": image.json()["id"],
                                 "question": row["question"], "answer": row["answer"]}))
    items = client.post("/v1/files", data={"purpose": "items"},
                        files={"file": ("items.jsonl", ("\n".join(lines) + "\n").encode())})
    assert items.status_code == 201, items.text
    return items.json()["id"], [json.loads(line)["custom_id"] for line in lines]


def test_job_end_to_end_dataset_in_s3_loads_with_datasets(alice, workers, fixture_items, stack_env):
    from datasets import load_dataset

    from hscr_client import DatasetInfo, Job, schema

    file_id, submitted = upload_items_file(alice, fixture_items, 10, "e2e-")
    assert len(set(submitted)) == 10
    created = alice.post("/v1/jobs", json={"input_file_id": file_id, "metadata": {"run": "e2e"},
                                           "params": {"n_masks": 2, "max_new_tokens": 24}})
    assert created.status_code == 201, created.text
    job = Job.model_validate(created.json())
    assert job.status == "in_progress" and job.request_counts.total == 10 and job.chunk_counts.total == 3

    finished = Job.model_validate(wait_for_job(alice, job.id))
    assert finished.status == "completed", finished
    assert finished.request_counts.completed + finished.request_counts.failed == 10
    assert finished.completed_at and finished.finalizing_at and finished.in_progress_at
    assert finished.metadata == {"run": "e2e"}

    info = DatasetInfo.model_validate(alice.get(f"/v1/jobs/{job.id}/dataset").json())
    assert info.complete and info.manifest["request_counts"]["total"] == 10
    assert info.manifest["parameters"]["n_masks"] == 2
    assert sorted({s.chunk for s in info.shards}) == [0, 1, 2]
    assert info.uri.startswith("s3://") and all(s.url.startswith("http") for s in info.shards)

    # The layout of #2, read straight from S3 by `datasets` (presigned URLs: no credentials needed).
    pair_urls = [s.url for s in info.shards if s.config == schema.PAIRS]
    pairs = load_dataset("parquet", data_files={"train": pair_urls}, split="train")
    assert pairs.features == schema.features(schema.PAIRS)
    assert len(pairs) == info.manifest["configs"]["pairs"]["rows"] > 0
    ranked = load_dataset("parquet", data_files={"train": [s.url for s in info.shards if s.config == "ranked"]},
                          split="train")
    # Every submitted item comes out exactly once: a ranked row, or a line of the error file (an item
    # HSCR found no level for); the ids in both are the submitted ones, none lost, none added.
    errors = [json.loads(line) for line in alice.get(f"/v1/jobs/{job.id}/errors").text.splitlines()]
    error_ids = [e["custom_id"] for e in errors]
    assert len(ranked) == len(set(ranked["custom_id"])) == finished.request_counts.completed > 0
    assert len(error_ids) == finished.request_counts.failed
    assert sorted([*ranked["custom_id"], *error_ids]) == sorted(submitted)

    # Progress events: the stream replays from the start and ends on the terminal status.
    with alice.stream("GET", f"/v1/jobs/{job.id}/events") as stream:
        events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    assert [e["chunk"] for e in events if e["type"] == "job.shard"] != []
    assert events[-1]["status"] == "completed"
    assert len({e["chunk"] for e in events if e["type"] == "job.shard"}) == 3

    listed = alice.get("/v1/jobs", params={"limit": 100}).json()
    assert job.id in [j["id"] for j in listed["data"]]


def test_inline_items_and_idempotent_create(alice, workers, fixture_items):
    body = {"items": inline_items(fixture_items, 5, prefix="idem-"), "params": {"n_masks": 1, "max_new_tokens": 16}}
    headers = {"Idempotency-Key": "create-once-" + fixture_items.name}
    first = alice.post("/v1/jobs", json=body, headers=headers)
    again = alice.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    changed = alice.post("/v1/jobs", json={**body, "metadata": {"x": "y"}}, headers=headers)
    assert changed.status_code == 409
    job = wait_for_job(alice, first.json()["id"])
    assert job["status"] == "completed"
    assert job["request_counts"]["total"] == 5
