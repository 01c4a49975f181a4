"""Fixtures of the viewer tests: a generated fixture dataset, a 10,000-row replica, a headless Chromium.

The browser is Debian's ``chromium`` driven by ``chromium-driver`` through selenium, launched with
no network side traffic and a fresh profile. ``scripts/setup.sh`` installs both; the browser tests
skip (saying why) only when they are not installed.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--window-size=1280,1600")
LARGE_ROWS = 10_000


@pytest.fixture(scope="session")
def fixture_dataset(tmp_path_factory) -> Path:
    """A real dataset: fixture items (seed 11) through ``generate_dataset`` with the trained fixture model."""
    from hscr_client import HSCRParams
    from hscr_worker.fixture.items import write_items
    from hscr_worker.generate import DEFAULT_MODEL, generate_dataset, load_backend

    root = tmp_path_factory.mktemp("viewer-fixture")
    write_items(40, 11, root / "items.jsonl", root / "img")
    backend = load_backend("transformers", DEFAULT_MODEL)
    generate_dataset(backend, str(root / "items.jsonl"), str(root / "ds"), HSCRParams())
    return root / "ds"


@pytest.fixture(scope="session")
def ranked_rows(fixture_dataset) -> list[dict]:
    """The fixture dataset's ``ranked`` rows as stored (images included), in shard order."""
    import pyarrow.parquet as pq

    manifest = json.loads((fixture_dataset / "manifest.json").read_text())
    rows = []
    for shard in manifest["configs"]["ranked"]["shards"]:
        rows += pq.read_table(fixture_dataset / shard["path"]).to_pylist()
    assert len(rows) >= 12, "the fixture dataset should have enough rows for two pages of 10"
    return rows


@pytest.fixture(scope="session")
def large_dataset(ranked_rows, tmp_path_factory) -> Path:
    """10,000 ``ranked`` rows made by replicating the fixture rows (ids made unique), in 10 shards.

    No manifest: the viewer must also read a dataset that is still being written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hscr_client import schema

    root = tmp_path_factory.mktemp("viewer-large")
    (root / "ranked").mkdir()
    arrow_schema = schema.features("ranked").arrow_schema
    per_shard = LARGE_ROWS // 10
    for shard in range(10):
        rows = []
        for k in range(shard * per_shard, (shard + 1) * per_shard):
            row = dict(ranked_rows[k % len(ranked_rows)])
            row["custom_id"] = f"big-{k:05d}"
            rows.append(row)
        pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema), root / "ranked" / f"part-{shard:05d}.parquet",
                       compression="zstd")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """A headless Chromium (selenium WebDriver) with a fresh profile; skipped only if not installed."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Debian's chromium and chromium-driver are not installed and could not be by scripts/setup.sh "
                    "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    # An explicit driver path: selenium never runs its driver manager (which would try to download one).
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def shots_dir(tmp_path_factory) -> Path:
    """Where the browser tests write their screenshots (the path is printed in the test output)."""
    return tmp_path_factory.mktemp("viewer-screenshots")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A private redis-server on a free loopback port, for the service's job store."""
    server = shutil.which("redis-server")
    if not server:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def free_port() -> int:
    return _free_port()


def pytest_report_header(config) -> list[str]:
    return [f"viewer: chromium={shutil.which('chromium')}, chromedriver={shutil.which('chromedriver')}"]
