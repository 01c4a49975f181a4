"""The SDK and the CLI against the real service: the API under uvicorn, a private redis-server,
SeaweedFS, and (last test) a real ``hscr worker`` with the fixture model. The stack is the
service tests' own (``tests/service/conftest.py``), imported by ``conftest.py``.
"""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from hscr_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    HSCRParams,
    Job,
    NotFoundError,
    UnprocessableEntityError,
    schema,
)
from hscr_client._cli import cli

# Registered by conftest.py when hscr-service is installed.
service_stack = sys.modules.get("hscr_tests_service_stack")
if service_stack is None:
    pytest.skip("hscr-service is not installed: no real service to test against", allow_module_level=True)

KEYS = service_stack.KEYS
SMALL = HSCRParams(n_masks=1, max_new_tokens=12)


def _items_file(fixture_items: Path, target: Path, n: int, prefix: str) -> Path:
    """n fixture items in a JSONL of their own, images next to it under img/ (relative refs, as users write)."""
    target.mkdir(parents=True, exist_ok=True)
    lines = []
    for line in (fixture_items / "items.jsonl").read_text().splitlines()[:n]:
        row = json.loads(line)
        image = target / "img" / Path(row["image"]).name
        image.parent.mkdir(exist_ok=True)
        shutil.copyfile(fixture_items / row["image"], image)
        lines.append(json.dumps({**row, "custom_id": prefix + row["custom_id"],
                                 "image": f"img/{image.name}"}))
    path = target / "items.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sdk_drives_upload_create_get_list_cancel(api, fixture_items, tmp_path):
    items = _items_file(fixture_items, tmp_path, 3, "sdk-")
    with Client(base_url=api, api_key=KEYS["alice"]) as client:
        uploaded = client.files.upload_items(items)
        assert uploaded.purpose == "items" and client.files.retrieve(uploaded.id).id == uploaded.id

        key = f"sdk-{uuid.uuid4()}"
        job = client.jobs.create(input_file_id=uploaded.id, params=SMALL, metadata={"by": "sdk"},
                                 idempotency_key=key)
        assert job.request_counts.total == 3 and job.metadata == {"by": "sdk"}
        assert job.params.n_masks == 1 and not job.is_terminal
        again = client.jobs.create(input_file_id=uploaded.id, params=SMALL, metadata={"by": "sdk"},
                                   idempotency_key=key)
        assert again.id == job.id  # the replayed key made no second job

        assert client.jobs.retrieve(job.id).id == job.id
        assert job.id in [listed.id for listed in client.jobs.list(limit=100).data]

        # No worker runs here, so the job stays "cancelling" until one settles its queued chunks.
        assert client.jobs.cancel(job.id).status in ("cancelling", "cancelled")
        assert client.jobs.retrieve(job.id).cancelling_at is not None

        with pytest.raises(UnprocessableEntityError) as caught:
            client.jobs.create(input_file_id=uploaded.id, params={"n_levels": 99})
        assert caught.value.status_code == 422 and "n_levels" in str(caught.value)
        with pytest.raises(NotFoundError):
            client.jobs.retrieve("job-does-not-exist")

    # Another tenant's id is "not found", never "forbidden"; a wrong key is 401.
    with Client(base_url=api, api_key=KEYS["bob"]) as bob, pytest.raises(NotFoundError):
        bob.jobs.retrieve(job.id)
    with Client(base_url=api, api_key="not-a-key") as stranger, pytest.raises(AuthenticationError):
        stranger.jobs.list()


@pytest.mark.anyio
async def test_async_sdk_drives_upload_create_get_list_cancel_and_events(api, fixture_items):
    row = json.loads((fixture_items / "items.jsonl").read_text().splitlines()[0])
    async with AsyncClient(base_url=api, api_key=KEYS["alice"]) as client:
        image = await client.files.upload(fixture_items / row["image"], purpose="image")
        assert image.purpose == "image"
        job = await client.jobs.create(items=[{"custom_id": "async-1", "image": image.id,
                                               "question": row["question"]}], params=SMALL)
        assert (await client.jobs.retrieve(job.id)).request_counts.total == 1
        assert job.id in [listed.id for listed in (await client.jobs.list(limit=100)).data]
        assert (await client.jobs.cancel(job.id)).status in ("cancelling", "cancelled")
        seen = []
        async for event in client.jobs.iter_events(job.id):  # replays from the start, then follows
            seen.append(event.status)
            if event.status in ("cancelling", "cancelled"):
                break
        assert seen[0] == "in_progress" and seen[-1] in ("cancelling", "cancelled")
    async with AsyncClient(base_url=api, api_key=KEYS["bob"]) as bob:
        with pytest.raises(NotFoundError):
            await bob.jobs.cancel(job.id)


def test_cli_submit_wait_download_and_sdk_load(api, workers, fixture_items, tmp_path, monkeypatch):
    """``hscr submit --wait``, ``hscr jobs``, ``hscr download`` and ``datasets.load`` with a real worker."""
    workers.start()
    items = _items_file(fixture_items, tmp_path / "in", 4, "cli-")
    env = {"HSCR_BASE_URL": api, "HSCR_API_KEY": KEYS["alice"]}
    runner = CliRunner()

    submitted = runner.invoke(cli, ["submit", str(items), "--wait", "--param", "n_masks=1",
                                    "--param", "max_new_tokens=12", "--metadata", "via=cli"], env=env)
    assert submitted.exit_code == 0, submitted.output
    job = Job.model_validate_json(submitted.stdout)
    assert job.status == "completed" and job.metadata == {"via": "cli"}
    assert job.request_counts.completed + job.request_counts.failed == 4

    listed = runner.invoke(cli, ["jobs", "list", "--limit", "100"], env=env)
    assert listed.exit_code == 0 and job.id in listed.stdout
    got = runner.invoke(cli, ["jobs", "get", job.id], env=env)
    assert Job.model_validate_json(got.stdout).id == job.id
    refused = runner.invoke(cli, ["submit", str(items), "--param", "n_levels=99"], env=env)
    assert refused.exit_code == 2 and "n_levels" in refused.output  # checked before anything is uploaded

    downloaded = runner.invoke(cli, ["download", job.id, str(tmp_path / "out")], env=env)
    assert downloaded.exit_code == 0, downloaded.output
    manifest = json.loads((tmp_path / "out" / schema.MANIFEST).read_text())
    assert manifest["request_counts"]["total"] == 4
    assert sorted(p.name for p in (tmp_path / "out" / "pairs").glob("*.parquet"))

    with Client(base_url=api, api_key=KEYS["alice"]) as client:
        pairs = client.datasets.load(job.id, config="pairs", cache_dir=tmp_path / "cache")
        assert pairs.features == schema.features("pairs")
        assert len(pairs) == manifest["configs"]["pairs"]["rows"] > 0
        assert {custom_id.removeprefix("cli-")[:3] for custom_id in pairs["custom_id"]} == {"fx-"}
        events = list(client.jobs.iter_events(job.id))
        assert events[-1].status == "completed"
        assert {event.chunk for event in events if event.type == "job.shard"} == {0}
