import pytest

from hscr_worker.generate import DEFAULT_MODEL


@pytest.fixture(scope="session")
def fixture_backend():
    """The bundled fixture Med-VLM on the transformers backend, loaded once per session."""
    from hscr_worker.backends.transformers import TransformersBackend

    return TransformersBackend(DEFAULT_MODEL)
