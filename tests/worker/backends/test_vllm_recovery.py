"""An engine call interrupted midway (RQ's job timeout, Ctrl-C, an engine error) leaves the engine usable."""

from __future__ import annotations

import pytest

from hscr_worker.backends.base import GenerateRequest

pytestmark = pytest.mark.vllm


class Interrupted(Exception):
    pass


@pytest.fixture
def requests(vllm_backend, heldout_items):
    items = heldout_items[:4]
    visual = vllm_backend.encode_images([it.image for it in items])
    prompts = [vllm_backend.prompt_ids(it.question) for it in items]
    return lambda n: [GenerateRequest(prompts[k % 4], visual[k % 4], 32) for k in range(n)]


@pytest.mark.parametrize("where", ["step", "add_request"])
def test_an_interrupted_call_leaves_nothing_behind(vllm_backend, requests, monkeypatch, where):
    engine = vllm_backend.llm.llm_engine
    expected = vllm_backend.generate(requests(8))
    original = getattr(engine, where)
    calls = 0

    def interrupted_after_three(*args, **kwargs):  # as a SIGALRM handler raising in the middle of the call
        nonlocal calls
        calls += 1
        if calls > 3:
            raise Interrupted
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, where, interrupted_after_three)
    with pytest.raises(Interrupted):
        vllm_backend.generate(requests(40))
    monkeypatch.setattr(engine, where, original)
    assert engine.get_num_unfinished_requests() == 0
    assert vllm_backend.generate(requests(8)) == expected  # and the next call runs as before


def test_a_dead_engine_is_reported_as_backend_dead(vllm_backend, requests, monkeypatch):
    """On a GPU the engine runs in its own process; a CUDA fault or OOM there ends it, and every later call
    raises vLLM's EngineDeadError. The backend says so in its own terms, so a worker knows to restart."""
    from vllm.v1.engine.exceptions import EngineDeadError

    from hscr_worker.backends.base import BackendDead

    def dead(*args, **kwargs):  # what LLM.generate raises once the engine-core process is gone
        raise EngineDeadError()

    monkeypatch.setattr(vllm_backend.llm, "generate", dead)
    with pytest.raises(BackendDead, match="the vLLM engine died"):
        vllm_backend.generate(requests(2))
