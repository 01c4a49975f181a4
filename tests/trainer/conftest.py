"""Shared parts for the trainer tests: one small real HSCR dataset, made once by the fixture model."""

from __future__ import annotations

from pathlib import Path

import pytest
from _s3server import S3Server  # tests/_s3server.py

from hscr_worker._compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before any test module imports transformers' image processors

from hscr_worker.generate import DEFAULT_MODEL as FIXTURE_MODEL  # noqa: E402

S3_KEY, S3_SECRET, BUCKET = "trainer-test-key", "trainer-test-secret", "trainer-test"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads only spin against each other."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def hscr_dataset(tmp_path_factory) -> Path:
    """A real HSCR dataset (``ranked`` + ``pairs``) from ``hscr generate`` on 24 held-out fixture items."""
    from hscr_client import HSCRParams
    from hscr_worker.fixture.items import write_items
    from hscr_worker.generate import generate_dataset, load_backend

    root = tmp_path_factory.mktemp("hscr-data")
    write_items(24, 2025, root / "items.jsonl", root / "images")
    generate_dataset(load_backend("transformers", FIXTURE_MODEL), str(root / "items.jsonl"), str(root / "out"),
                     HSCRParams(), chunk_size=8)
    return root / "out"


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A private SeaweedFS S3 server on 127.0.0.1 (SigV4 enforced); sets the HSCR S3 environment."""
    with S3Server(tmp_path_factory.mktemp("s3"), key=S3_KEY, secret=S3_SECRET, bucket=BUCKET) as s3, \
            pytest.MonkeyPatch.context() as env:
        for name, value in s3.env.items():
            env.setenv(name, value)
        yield f"s3://{BUCKET}"


@pytest.fixture(scope="session")
def qwen_model() -> Path:
    """The bundled Qwen2.5-VL fixture (``fixture-qwen2.5-vl``)."""
    from hscr_worker.fixture import resolve_model

    return Path(resolve_model("fixture-qwen2.5-vl"))


@pytest.fixture
def qwen_fixture_name() -> str:
    """The name commands take for the Qwen fixture (resolved by ``hscr_worker.fixture.resolve_model``)."""
    return "fixture-qwen2.5-vl"


@pytest.fixture(scope="session")
def qwen_dataset(qwen_model, tmp_path_factory) -> Path:
    """An HSCR dataset (``ranked`` + ``pairs``) from ``hscr generate`` with ``qwen_model`` on 8 items."""
    from hscr_client import HSCRParams
    from hscr_worker.fixture.items import write_items
    from hscr_worker.generate import generate_dataset, load_backend

    root = tmp_path_factory.mktemp("qwen-data")
    write_items(8, 2025, root / "items.jsonl", root / "images")
    generate_dataset(load_backend("transformers", str(qwen_model)), str(root / "items.jsonl"), str(root / "out"),
                     HSCRParams(), chunk_size=4)
    return root / "out"
