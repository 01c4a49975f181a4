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
        chosen.append(name)
        return vllm_backend

    monkeypatch.setattr(generate_module, "load_backend", load_backend)
    items = heldout_dir / "items-cli.jsonl"  # beside the images the item lines refer to
    items.write_text("".join((heldout_dir / "items.jsonl").read_text().splitlines(keepends=True)[:8]))
    out = tmp_path / "dataset"
    result = CliRunner().invoke(generate, ["--backend", "vllm", "--input", str(items), "--output", str(out),
                                           "--paper", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert chosen == ["vllm"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["backend"] == "vllm"
    assert manifest["request_counts"]["total"] == 8
    assert manifest["configs"]["pairs"]["rows"] > 0
