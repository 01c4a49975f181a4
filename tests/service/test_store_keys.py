"""Redis keys cannot be reached through a user's string: every id segment is escaped, so a ``:`` in a job or file
id names nothing but itself (ids are also validated at the API's edge; this is the second line)."""

from __future__ import annotations

import uuid

import pytest
from redis import Redis

from hscr_jobs.store import FileRecord, JobRecord, Store, key_part


@pytest.fixture
def store(stack_env):
    return Store(Redis.from_url(stack_env["env"]["HSCR_REDIS_URL"]), prefix=f"hscr-keys-{uuid.uuid4().hex[:8]}")


def _record(job_id: str, tenant: str = "alice") -> JobRecord:
    return JobRecord(id=job_id, tenant=tenant, model="fixture", params={}, created_at=0, total=4, n_chunks=1,
                     chunk_size=4, input_uri="/tmp/in", dataset_uri="/tmp/out")


def test_key_part_escapes_the_separator_and_the_escape():
    assert key_part("job-1") == "job-1"
    assert key_part("a:b") == "a%3Ab" and key_part("a%3Ab") == "a%253Ab"  # distinct inputs stay distinct
    assert ":" not in key_part("t:job:x:chunks")


@pytest.mark.parametrize("hostile", ["job-x:chunks", "job-x:events", "job-x:", ":job-x"])
def test_an_id_with_a_colon_reaches_no_other_key(store, hostile):
    store.create_job(_record("job-x"))
    store.settle_chunk("alice", "job-x", 0, completed=4)
    assert store.get_job("alice", hostile) is None  # before: the chunks hash of job-x, read as a job (KeyError)
    assert store.get_record("alice", hostile) is None
    store.create_job(_record(hostile))
    assert store.get_job("alice", hostile).id == hostile
    assert store.get_job("alice", "job-x").request_counts.completed == 4  # untouched
    assert store.chunk_outcomes("alice", "job-x")[0]["completed"] == 4


def test_a_tenant_with_a_colon_cannot_reach_another_tenants_keys(store):
    store.create_job(_record("job-1", tenant="bob"))
    store.add_file(FileRecord(id="file-1", tenant="bob", filename="a.png", purpose="image", bytes=1, created_at=0,
                              uri="/tmp/a"))
    # "alice:job:..." would have built bob-like paths by concatenation; escaped, it is one segment of its own.
    assert store.get_job("bob:t:bob", "job-1") is None and store.get_job("bob", "job-1") is not None
    assert store.get_file("x:t:bob", "file-1") is None and store.get_file("bob", "file-1") is not None
