"""``hscr generate`` end to end on the bundled fixture model: layout, schema, errors, TRL format."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_dataset
from PIL import Image

from hscr_client import HSCRParams, schema
from hscr_worker.fixture.dicom import write_dicom
from hscr_worker.fixture.items import write_items
from hscr_worker.generate import generate_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, fixture_backend):
    root = tmp_path_factory.mktemp("gen")
    rows = write_items(10, 31, root / "items.jsonl", root / "images")
    write_dicom(Image.open(root / rows[0]["image"]), root / "images" / "one.dcm")
    extra = [
        {"custom_id": "dicom-item", "image": "images/one.dcm", "question": rows[0]["question"]},
        {"custom_id": "empty-question", "image": rows[1]["image"], "question": ""},
        {"custom_id": "no-such-file", "image": "images/missing.png", "question": "describe the findings ."},
    ]
    with open(root / "items.jsonl", "a") as f:
        for item in extra:
            f.write(json.dumps(item) + "\n")
        f.write("{not json\n")
    out = root / "out"
    manifest = generate_dataset(fixture_backend, str(root / "items.jsonl"), str(out), HSCRParams(), chunk_size=4)
    return out, manifest


def test_layout_and_manifest(dataset):
    out, manifest = dataset
    assert (out / "manifest.json").exists() and (out / "README.md").exists() and (out / "errors.jsonl").exists()
    # Chunk 3 holds only failed items: it writes an error file but no (empty) shard.
    assert sorted(p.name for p in (out / "pairs").iterdir()) == [f"part-0000{i}.parquet" for i in range(3)]
    assert "no-such-file" in (out / "_errors" / "part-00003.jsonl").read_text()
    counts = manifest["request_counts"]
    assert counts["total"] == 14
    assert counts["completed"] + counts["failed"] == 14
    assert manifest["parameters"] == HSCRParams().model_dump()
    assert manifest["model"]["backend"] == "transformers" and len(manifest["model"]["sha256"]) == 64
    assert manifest["model"]["family"] == "llava" and manifest["model"]["profile"] == "fixture"
    assert "torch" in manifest["versions"]
    on_disk = json.loads((out / "manifest.json").read_text())

    for shard in on_disk["configs"]["pairs"]["shards"]:
        assert hashlib.sha256((out / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]
    assert "@inproceedings{jiang2025hscr" in (out / "README.md").read_text()


def test_bad_items_fail_alone_with_reasons(dataset):
    out, _ = dataset
    errors = {e["custom_id"]: e["error"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert "question is empty" in errors["empty-question"]
    assert "cannot read image file" in errors["no-such-file"]
    assert any(k.startswith("line-") and "malformed JSON" in v for k, v in errors.items())
    ranked = load_dataset("parquet", data_files=str(out / "ranked" / "*.parquet"), split="train")
    assert not set(ranked["custom_id"]) & set(errors)  # each item exactly once
    # The DICOM item (the first item's picture as a 16-bit CT, windowed back to 8 bits) is no bad item: it loads
    # and goes through HSCR as a PNG does, and the fixture reads the picture right (its ground-truth modality).
    assert "dicom-item" not in errors
    first = json.loads((out.parent / "items.jsonl").read_text().splitlines()[0])
    dicom = ranked.filter(lambda row: row["custom_id"] == "dicom-item")
    assert len(dicom) == 1 and dicom[0]["question"] == first["question"] == "what is the imaging modality ?"
    assert dicom[0]["own_answer"] == first["answer"] and dicom[0]["levels"]


def test_pairs_load_in_trl_vision_format(dataset):
    out, _ = dataset
    pairs = load_dataset("parquet", data_files=str(out / "pairs" / "*.parquet"), split="train")
    assert pairs.features == schema.features("pairs")
    row = pairs[0]
    assert row["prompt"][0]["role"] == "user"
    assert [c["type"] for c in row["prompt"][0]["content"]] == ["image", "text"]
    assert row["chosen"][0]["role"] == "assistant" and row["rejected"][0]["role"] == "assistant"
    assert row["images"][0].size == (64, 64)  # decoded to PIL on load
    ranked = load_dataset("parquet", data_files=str(out / "ranked" / "*.parquet"), split="train")
    for item in ranked:
        n = len(item["levels"])
        mine = [p for p in pairs if p["custom_id"] == item["custom_id"]]
        assert sum(p["pair_type"] == "explicit" for p in mine) == n
        assert sum(p["pair_type"] == "implicit" for p in mine) == n * (n - 1) // 2
        for p in mine:
            assert p["chosen_level"] < p["rejected_level"]
            assert p["chosen"][0]["content"][0]["text"] != p["rejected"][0]["content"][0]["text"]


def test_ranked_rows_record_coupling_and_replacements(dataset):
    out, _ = dataset
    ranked = load_dataset("parquet", data_files=str(out / "ranked" / "*.parquet"), split="train")
    assert len(ranked) > 0
    for item in ranked:
        shifts = [c["shift"] for c in item["coupled"]]
        assert shifts == sorted(shifts, reverse=True)
        sims = [lv["similarity"] for lv in item["levels"]]
        assert sims == sorted(sims, reverse=True)
        assert [lv["level"] for lv in item["levels"]] == list(range(1, len(sims) + 1))
        for lv in item["levels"]:
            assert lv["n_replacements"] == len(lv["replacements"]) >= 1
            words = lv["text"].split()
            for rep in lv["replacements"]:  # word-level tokenizer: positions index words
                assert words[rep["position"]] == rep["replacement"] != rep["original"]


def _hscr_generate(tmp_path, *options: str) -> subprocess.CompletedProcess:
    """`hscr generate` in a fresh process on tmp_path/items.jsonl, writing tmp_path/out."""
    return subprocess.run(
        [sys.executable, "-c", "from hscr_client._cli import main; main()", "generate", "--input",
         str(tmp_path / "items.jsonl"), "--output", str(tmp_path / "out"), *options],
        capture_output=True, text=True, timeout=600)


def test_cli_generate_prints_summary(tmp_path):
    write_items(3, 32, tmp_path / "items.jsonl", tmp_path / "img")
    result = _hscr_generate(tmp_path, "--n-masks", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "items: 3 total" in result.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["parameters"]["n_masks"] == 2


def test_cli_rejects_out_of_range_parameters(tmp_path):
    write_items(1, 33, tmp_path / "items.jsonl", tmp_path / "img")
    result = _hscr_generate(tmp_path, "--dropout-ratio", "1.5")
    assert result.returncode == 2 and "dropout_ratio" in result.stderr


def test_backend_options_route_each_setting_to_the_backend_that_has_it():
    from hscr_worker.generate import backend_options

    assert backend_options("transformers", device="cpu", profile="fixture") == {"device": "cpu", "profile": "fixture"}
    # vLLM's engine takes the GPUs CUDA_VISIBLE_DEVICES shows; --device places its vision tower
    assert backend_options("vllm", device="cpu", score_top_k=5) == {"vision_device": "cpu", "score_top_k": 5}
    with pytest.raises(ValueError, match="only the vllm backend"):
        backend_options("transformers", score_top_k=5)
    assert backend_options("vllm", max_model_len=4096, gpu_memory_utilization=0.8) == \
        {"max_model_len": 4096, "gpu_memory_utilization": 0.8}
    with pytest.raises(ValueError, match="vLLM engine settings"):
        backend_options("transformers", max_model_len=4096)


def test_a_llava_image_marker_is_dropped_from_the_question(tmp_path):
    """LLaVA-format data carries "<image>\\n" in the question; rows store it without (a second image entry
    in the training prompt would not train), and a question of nothing else is empty."""
    from hscr_worker.generate import prepare_all

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    items = [{"custom_id": "a", "image": "a.png", "question": "<image>\nis there a mass ?"},
             {"custom_id": "b", "image": "a.png", "question": "<image>\n"}]
    prepared, errors = prepare_all(items, base_dir=str(tmp_path))
    assert [p.question for p in prepared] == ["is there a mass ?"]
    assert [e.custom_id for e in errors] == ["b"] and "question is empty" in errors[0].error


def test_one_image_per_item(tmp_path):
    """The contract: an item with several images fails alone; TRL's one-entry "images" list is one image."""
    from hscr_worker.generate import prepare_all

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    items = [{"custom_id": "two", "images": ["a.png", "a.png"], "question": "is there a mass ?"},
             {"custom_id": "list-of-one", "images": ["a.png"], "question": "is there a mass ?"},
             {"custom_id": "plain", "image": "a.png", "question": "is there a mass ?"}]
    prepared, errors = prepare_all(items, base_dir=str(tmp_path))
    assert [p.custom_id for p in prepared] == ["list-of-one", "plain"]
    assert [e.custom_id for e in errors] == ["two"] and "one image per item" in errors[0].error
