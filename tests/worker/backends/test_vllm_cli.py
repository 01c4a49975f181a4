"""``hscr generate --backend vllm`` end to end on the session's engine: a dataset comes out."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.vllm


def test_hscr_generate_with_the_vllm_backend(vllm_engine, fixture_model, heldout_dir, tmp_path, monkeypatch):
    """The CLI's engine settings reach ``vllm.LLM``: the engine ``hscr generate`` builds has them in its config."""
    import hscr_worker.generate as generate_module
    from hscr_worker.cli import generate

    built = []

    def load_backend(name, model, **options):
        # VLLMBackend(model, **options) as load_backend builds it, but kept for the session (closing an
        # in-process engine tears down the parallel state the session's other engines use)
        assert name == "vllm"
        built.append((model, options, vllm_engine(model, **options)))
        return built[-1][2]

    monkeypatch.setattr(generate_module, "load_backend", load_backend)
    items = heldout_dir / "items-cli.jsonl"  # beside the images the item lines refer to
    items.write_text("".join((heldout_dir / "items.jsonl").read_text().splitlines(keepends=True)[:8]))
    out = tmp_path / "dataset"
    # 200 and 0.5: not the engine's defaults (the fixture's 256-token context, 0.9)
    result = CliRunner().invoke(generate, ["--backend", "vllm", "--input", str(items), "--output", str(out),
                                           "--paper", "--batch-size", "4", "--max-model-len", "200",
                                           "--gpu-memory-utilization", "0.5"])
    assert result.exit_code == 0, result.output
    # --paper's raw-logit shift asks for logits
    [(model, options, engine)] = built
    assert model == fixture_model
    assert options == {"score_values": "logits", "gpu_memory_utilization": 0.5, "max_model_len": 200}
    config = engine.llm.llm_engine.vllm_config
    assert config.model_config.max_model_len == 200 and engine.max_context_tokens == 199
    assert config.cache_config.gpu_memory_utilization == 0.5
    assert config.model_config.logprobs_mode == "raw_logits" and engine.score_values == "logits"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["backend"] == "vllm"
    counts = manifest["request_counts"]
    assert counts["total"] == counts["completed"] + counts["failed"] == 8 and counts["completed"] > 0
    assert manifest["configs"]["pairs"]["rows"] > 0


def test_the_cpu_engine_does_not_log_a_thread_warning_per_request(vllm_backend, heldout_items):
    """vLLM's CPU worker logs "doesn't allow torch.set_num_threads" twice per image request in-process."""
    import logging

    from hscr_worker.backends.base import GenerateRequest

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    cpu_worker = logging.getLogger("vllm.v1.worker.cpu_worker")
    cpu_worker.addHandler(handler)
    try:
        items = heldout_items[:2]
        visual = vllm_backend.encode_images([it.image for it in items])
        answers = vllm_backend.generate([GenerateRequest(vllm_backend.prompt_ids(it.question), v, 8)
                                         for it, v in zip(items, visual, strict=True)])
    finally:
        cpu_worker.removeHandler(handler)
    assert all(answers)
    assert not [r for r in records if "set_num_threads" in r.getMessage()]
