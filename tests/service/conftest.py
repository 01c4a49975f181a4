"""Real parts for the service tests: a private redis-server (AOF on), a SeaweedFS S3 server, the API under
uvicorn and `hscr worker` processes with the fixture model, all on 127.0.0.1 and free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from _s3server import S3Server  # tests/_s3server.py
from service_helpers import BUCKET, CHUNK_SIZE, KEYS, S3_KEY, S3_SECRET, RedisServer, start_api, stop

from hscr_service.core.security import hash_key


def pytest_collection_modifyitems(config, items):
    """Tests that need no worker run first, while the session's worker starts (torch and the model load in
    ~10-20 s); the schemathesis fuzz runs last, so the jobs it makes never queue ahead of a test's."""
    def group(item) -> int:
        if item.path.name == "test_zz_fuzz.py":
            return 2
        return 1 if "workers" in item.fixturenames else 0

    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if here in item.path.parents]  # this directory's tests only
    ours = sorted((items[i] for i in slots), key=group)  # stable: file and definition order within a group
    for slot, item in zip(slots, ours, strict=True):
        items[slot] = item
    config.stash[WANTS_WORKER] = any(group(item) == 1 for item in ours)


WANTS_WORKER = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def stack_env(tmp_path_factory):
    """The environment every process of the stack shares (also set in this process, to read S3)."""
    root = tmp_path_factory.mktemp("stack")
    redis_server = RedisServer(root / "redis")
    (root / "redis").mkdir()
    redis_server.start()
    (root / "s3").mkdir()
    s3 = S3Server(root / "s3", key=S3_KEY, secret=S3_SECRET, bucket=BUCKET)
    s3.start()
    env = {
        "HSCR_REDIS_URL": redis_server.url, "HSCR_STORAGE_URI": f"s3://{BUCKET}/run-{uuid.uuid4().hex[:8]}",
        **s3.env, "HSCR_API_KEYS": ",".join(f"{t}:{hash_key(k)}" for t, k in KEYS.items()),
        # Retries every <= 4 s, 15 of them: a chunk outlasts the 20 s S3 outage (plus SeaweedFS's restart) and
        # runs again within 4 s of its return.
        "HSCR_CHUNK_SIZE": str(CHUNK_SIZE), "HSCR_CHUNK_RETRIES": "15", "HSCR_RETRY_INTERVALS": "1,2,4",
        "HSCR_MAX_ITEMS_PER_JOB": "200", "HSCR_QUEUE": "hscr-test",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield {"env": env, "redis": redis_server, "s3": s3, "root": root}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3.stop()
    redis_server.stop()


@pytest.fixture(scope="session")
def api(stack_env, session_workers, pytestconfig):
    """The API the workers serve; yields its base URL. Starts the session's worker first, when a selected test
    needs one, so that its start-up overlaps the tests that need none."""
    if pytestconfig.stash.get(WANTS_WORKER, False):
        session_workers.ensure()
    process, url = start_api(stack_env, "api")
    yield url
    stop(process)


@pytest.fixture(scope="session")
def idle_api(stack_env):
    """A second API on the same Redis and S3 whose queue no worker listens on: jobs never get a worker."""
    process, url = start_api(stack_env, "idle-api", HSCR_QUEUE="hscr-idle")
    yield url
    stop(process)


@pytest.fixture
def idle_alice(idle_api):
    with httpx.Client(base_url=idle_api, headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=60) as client:
        yield client


class Workers:
    """`hscr worker` processes shared by the session (each start loads torch and the model: ~10-20 s)."""

    def __init__(self, root: Path):
        self.root, self.processes = root, []

    def start(self) -> subprocess.Popen:
        log = open(self.root / f"worker-{len(self.processes)}.log", "ab")
        # One torch thread: the fixture model is tiny, and on a loaded 2-core machine two OpenMP threads spin
        # against other processes and run it 10-30x slower (bench/service_overhead.py --torch-threads).
        process = subprocess.Popen(
            [sys.executable, "-c", "from hscr_client._cli import main; main()", "worker", "--queue", "hscr-test",
             "--worker-ttl", "10", "--maintenance-interval", "3", "--heartbeat-interval", "1", "--micro-batch", "2",
             "--torch-threads", "1"],
            env={**os.environ}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def ensure(self) -> subprocess.Popen:
        """One live worker: the running one, or a new one."""
        alive = [p for p in self.processes if p.poll() is None]
        return alive[0] if alive else self.start()

    def stop_all(self) -> None:
        """SIGTERM every worker's process group at once, then wait (each finishes its chunk or stops idle)."""
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            stop(process)


@pytest.fixture(scope="session")
def session_workers(stack_env):
    manager = Workers(stack_env["root"])
    yield manager
    manager.stop_all()


@pytest.fixture
def workers(session_workers):
    session_workers.ensure()
    return session_workers


@pytest.fixture
def alice(api):
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=60) as client:
        yield client


@pytest.fixture
def bob(api):
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {KEYS['bob']}"}, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def fixture_items(tmp_path_factory):
    """40 held-out fixture items (seed 77, not the training seed) with their PNG images."""
    from hscr_worker.fixture.items import write_items

    root = tmp_path_factory.mktemp("items")
    write_items(40, 77, root / "items.jsonl", root / "img")
    return root
