import pytest

from hscr_worker.generate import DEFAULT_MODEL


@pytest.fixture(scope="session")
def fixture_backend():
    """The bundled fixture Med-VLM on the transformers backend, loaded once per session."""
    import torch

    from hscr_worker.backends.transformers import TransformersBackend

    # One thread: the model is tiny, and two OpenMP threads contending with the suite's other processes
    # on a 2-core machine run it many times slower (docs/service.md, "torch threads").
    torch.set_num_threads(1)
    return TransformersBackend(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def qwen_backend():
    """The bundled Qwen2.5-VL fixture on the transformers backend, loaded once per session."""
    import torch

    from hscr_worker.backends.transformers import TransformersBackend

    torch.set_num_threads(1)
    return TransformersBackend("fixture-qwen2.5-vl")


@pytest.fixture(scope="session")
def gemma_backend():
    """The bundled Gemma 3 fixture (MedGemma's architecture) on the transformers backend, loaded once per session."""
    import torch

    from hscr_worker.backends.transformers import TransformersBackend

    torch.set_num_threads(1)
    return TransformersBackend("fixture-gemma3")
