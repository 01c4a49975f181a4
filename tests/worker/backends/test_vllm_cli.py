"""``hscr generate --backend vllm`` end to end on the session's engine: a dataset comes out."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.vllm


def test_hscr_generate_with_the_vllm_backend(vllm_backend, heldout_dir, tmp_path, monkeypatch):
    import hscr_worker.generate as generate_module
    from hscr_worker.cli import generate

    chosen = []

    def load_backend(name, model, **options):  # the session engine stands in for a second, identical one
        chosen.append((name, options))
        return vllm_backend

    monkeypatch.setattr(generate_module, "load_backend", load_backend)
    items = heldout_dir / "items-cli.jsonl"  # beside the images the item lines refer to
    items.write_text("".join((heldout_dir / "items.jsonl").read_text().splitlines(keepends=True)[:8]))
    out = tmp_path / "dataset"
    result = CliRunner().invoke(generate, ["--backend", "vllm", "--input", str(items), "--output", str(out),
                                           "--paper", "--batch-size", "4", "--max-model-len", "256",
                                           "--gpu-memory-utilization", "0.5"])
    assert result.exit_code == 0, result.output
    # the engine settings reach VLLMBackend (and from there vllm.LLM); --paper's raw-logit shift asks for logits
    assert chosen == [("vllm", {"score_values": "logits", "gpu_memory_utilization": 0.5, "max_model_len": 256})]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["backend"] == "vllm"
    assert manifest["request_counts"]["total"] == 8
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
