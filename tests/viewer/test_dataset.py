"""View rows, filters and pages of a real fixture dataset, the static file, and ``hscr view``."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from click.testing import CliRunner
from PIL import Image

from hscr_client.viewer import Filters, ViewerDataset, render_static, script_json, thumbnail_png
from hscr_client.viewer._cli import view


@pytest.fixture(scope="module")
def dataset(fixture_dataset) -> ViewerDataset:
    return ViewerDataset.open(str(fixture_dataset))


def test_rows_keep_the_dataset_text_and_place_marks_on_their_tokens(dataset, ranked_rows):
    assert [r["id"] for r in dataset.rows] == [r["custom_id"] for r in ranked_rows]
    placed = 0
    for view_row, row in zip(dataset.rows, ranked_rows, strict=True):
        assert (view_row["question"], view_row["chosen"], view_row["own"]) == (
            row["question"], row["chosen"], row["own_answer"])
        for view_level, level in zip(view_row["levels"], sorted(row["levels"], key=lambda lv: lv["level"]),
                                     strict=True):
            assert view_level["text"] == level["text"]
            for mark, replacement in zip(view_level["marks"], level["replacements"], strict=True):
                assert (mark["original"], mark["replacement"]) == (replacement["original"], replacement["replacement"])
                assert mark["reward"] == pytest.approx(replacement["reward"], rel=1e-3)
                if mark["how"] == "position":
                    # The fixture tokenizer is word-level: the marked word is the word at that index.
                    assert level["text"].split()[replacement["position"]] == replacement["replacement"]
                    assert level["text"][mark["start"]:mark["end"]] == replacement["replacement"]
                    placed += 1
        basis = row["corrupted"]
        for c in view_row["coupled"]:
            if c["how"] == "position":
                assert basis[c["start"]:c["end"]] == c["token"] == basis.split()[c["position"]]
    assert placed > 0


def test_filters_select_what_they_say(dataset, fixture_dataset):
    errors = [json.loads(line) for line in (fixture_dataset / "errors.jsonl").read_text().splitlines() if line]
    assert [e["id"] for e in dataset.select(Filters(status="errors"))] == [e["custom_id"] for e in errors]
    assert len(dataset.select(Filters(status="all"))) == len(dataset.rows) + len(errors)
    for level in (1, 2, 3):
        chosen = dataset.select(Filters(level=level))
        assert chosen and all(any(lv["level"] == level for lv in r["levels"]) for r in chosen)
        assert len(chosen) == sum(any(lv["level"] == level for lv in r["levels"]) for r in dataset.rows)
    word = dataset.rows[0]["levels"][0]["marks"][0]["replacement"]
    hits = dataset.select(Filters(q=word.upper()))
    assert hits and all(word in "\n".join([r["question"], r["chosen"], r["own"]] + [lv["text"] for lv in r["levels"]])
                        for r in hits)
    assert dataset.select(Filters(q=f"{dataset.rows[0]['id']} no-such-word")) == []
    for name, count in dataset.summary()["modalities"].items():
        assert len(dataset.select(Filters(modality=name))) == count
    with pytest.raises(ValueError, match="status"):
        Filters(status="bogus")


def test_a_page_carries_thumbnails_only_for_its_rows(dataset, ranked_rows):
    page = dataset.page(Filters(), offset=10, limit=5)
    assert page["total"] == len(dataset.rows)
    assert [item["i"] for item in page["items"]] == list(range(10, min(15, len(dataset.rows))))
    for item in page["items"]:
        image = Image.open(io.BytesIO(base64.b64decode(item["image"])))
        original = Image.open(io.BytesIO(ranked_rows[item["i"]]["image"]["bytes"]))
        assert image.format == "PNG" and image.size == original.size
        assert list(image.convert("RGB").getdata()) == list(original.convert("RGB").getdata())
    assert "image" not in dataset.rows[10]
    with pytest.raises(ValueError):
        dataset.page(limit=0)


def test_thumbnails_shrink_large_images_and_survive_garbage():
    large = Image.new("RGB", (600, 300), (40, 40, 40))
    buffer = io.BytesIO()
    large.save(buffer, format="JPEG")
    thumb = Image.open(io.BytesIO(thumbnail_png(buffer.getvalue(), 64)))
    assert (thumb.format, thumb.size, thumb.mode) == ("PNG", (64, 32), "L")
    assert thumbnail_png(b"not an image") is None


def test_script_json_cannot_close_its_script_element():
    text = script_json({"q": "</script><script>alert(1)</script> & <!--"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"q": "</script><script>alert(1)</script> & <!--"}


def test_static_page_embeds_rows_per_chunk(dataset):
    page = render_static(dataset, title="T <b>", chunk_rows=5)
    chunks = (len(dataset.rows) + 4) // 5
    assert len(re.findall(r'<script type="application/json" id="hscr-rows-\d+">', page)) == chunks
    assert len(re.findall(r'<script type="application/json" id="hscr-img-\d+">', page)) == chunks
    assert "<title>T &lt;b&gt;</title>" in page and "__HSCR_" not in page


def test_cli_writes_the_page_and_refuses_a_missing_dataset(fixture_dataset, tmp_path):
    out = tmp_path / "view.html"
    result = CliRunner().invoke(view, [str(fixture_dataset), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0 and f"{out}:" in result.output
    result = CliRunner().invoke(view, [str(tmp_path / "nothing"), "--out", str(tmp_path / "x.html")])
    assert result.exit_code != 0 and "no HSCR dataset here" in result.output
    assert not (tmp_path / "x.html").exists()
