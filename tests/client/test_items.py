"""``hscr_client.items.parse_items_lines``: the one items-JSONL parser (service uploads, ``hscr generate``)."""

from __future__ import annotations

import json

import pytest

from hscr_client.items import parse_items_lines

GOOD = {"custom_id": "a", "question": "Q?", "image": "img/a.png"}


def test_bytes_and_text_lines_parse_the_same(tmp_path):
    data = (json.dumps(GOOD) + "\n\n" + json.dumps({"question": "no id"}) + "\r\n").encode()
    path = tmp_path / "items.jsonl"
    path.write_bytes(data)
    expected = [GOOD, {"question": "no id", "custom_id": "line-3"}]  # the blank line 2 still counts
    assert parse_items_lines(data.splitlines()) == expected
    with open(path, "rb") as f:
        assert parse_items_lines(f) == expected
    with open(path, encoding="utf-8") as f:
        assert parse_items_lines(f) == expected


@pytest.mark.parametrize(("line", "reason"), [
    (b"{not json", "Expecting property name enclosed in double quotes"),
    (b"[1, 2]", "each line must be a JSON object"),
    (b'"a string"', "each line must be a JSON object"),
    (b'{"custom_id": "\xff"}', "can't decode byte 0xff"),  # bad UTF-8 costs its own line only
])
def test_a_malformed_line_becomes_an_error_item_and_the_rest_still_parse(line, reason):
    items = parse_items_lines([json.dumps(GOOD).encode(), line, b'{"custom_id": "c"}'])
    assert items[0] == GOOD and items[2] == {"custom_id": "c"}
    assert set(items[1]) == {"custom_id", "error"} and items[1]["custom_id"] == "line-2"
    assert items[1]["error"].startswith("malformed JSON on line 2: ") and reason in items[1]["error"]


def test_a_raw_line_separator_inside_a_string_is_one_line():
    text = json.dumps({"custom_id": "x", "question": "a\u2028b"}, ensure_ascii=False)
    assert parse_items_lines(text.encode().splitlines()) == [{"custom_id": "x", "question": "a\u2028b"}]
