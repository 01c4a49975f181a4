"""Session-scoped backends on the bundled fixture model, and held-out fixture items.

The vLLM engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: seconds to start instead of
tens), with a 1 GiB KV cache; both must be set before vLLM is first imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402

HELDOUT_SEED = 4242  # never the training seed (1234)
N_PARITY_ITEMS = 52


@pytest.fixture(scope="session")
def fixture_model() -> str:
    from hscr_worker.generate import DEFAULT_MODEL

    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def vllm_backend(fixture_model):
    pytest.importorskip("vllm")
    from hscr_worker.backends.vllm import VLLMBackend

    return VLLMBackend(fixture_model)


@pytest.fixture(scope="session")
def vllm_engine():
    """Further in-process engines (another model or other options), each built once and kept for the session.

    Shutting an in-process engine down tears down vLLM's process-wide parallel state, which every
    other engine in the process still uses: so none is released before the session ends. (On a GPU
    each engine would claim ``gpu_memory_utilization`` of the device again: pass a smaller one.)
    """
    pytest.importorskip("vllm")
    from hscr_worker.backends.vllm import VLLMBackend

    engines: dict[tuple, VLLMBackend] = {}

    def get(model: str, **options) -> VLLMBackend:
        key = (str(model), tuple(sorted(options.items())))
        if key not in engines:
            engines[key] = VLLMBackend(model, **options)
        return engines[key]

    return get


@pytest.fixture(scope="session")
def hf_backend(fixture_model):
    from hscr_worker.backends.transformers import TransformersBackend

    return TransformersBackend(fixture_model, device="cpu")


@pytest.fixture(scope="session")
def heldout_dir(tmp_path_factory):
    from hscr_worker.fixture.items import write_items

    root = tmp_path_factory.mktemp("heldout")
    write_items(N_PARITY_ITEMS, HELDOUT_SEED, root / "items.jsonl", root / "img")
    return root


@pytest.fixture(scope="session")
def heldout_items(heldout_dir):
    from hscr_worker.generate import prepare_all, read_items

    raw, errors = read_items(str(heldout_dir / "items.jsonl"))
    items, bad = prepare_all(raw, base_dir=str(heldout_dir))
    assert not errors and not bad
    return items
