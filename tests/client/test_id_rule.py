"""One id rule (``hscr_client._models.ID_RULE``) for inline items and items-file lines alike (issue #16, item 2)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from hscr_client import ItemInput
from hscr_client._models import ID_MAX_CHARS, ID_RULE, id_problem, is_valid_id
from hscr_client.items import parse_items_lines

GOOD_IDS = ["a", "fx-77-00001", "Study_3.image-2", "0" * ID_MAX_CHARS, "hscr-6f1c", "..", "-"]
BAD_IDS = ["", "a:b", "job-1:chunks", "a b", "a/b", "über", "x\n", "a%3A", "t\x00", "0" * (ID_MAX_CHARS + 1)]


@pytest.mark.parametrize("value", GOOD_IDS)
def test_good_ids_pass_inline_and_in_files(value):
    assert is_valid_id(value) and id_problem(value, "custom_id") is None
    assert ItemInput(custom_id=value, image="data:,", question="q").custom_id == value
    line = json.dumps({"custom_id": value, "image": "data:,", "question": "q"}).encode()
    assert parse_items_lines([line]) == [{"custom_id": value, "image": "data:,", "question": "q"}]


@pytest.mark.parametrize("value", BAD_IDS)
def test_bad_ids_fail_inline_and_in_files_alike(value):
    assert not is_valid_id(value)
    with pytest.raises(ValidationError, match="custom_id"):
        ItemInput(custom_id=value, image="data:,", question="q")
    lines = [json.dumps({"custom_id": "ok", "question": "q"}).encode(),
             json.dumps({"custom_id": value, "image": "data:,", "question": "q"}).encode()]
    good, bad = parse_items_lines(lines)
    assert good == {"custom_id": "ok", "question": "q"}  # a bad line fails alone
    assert bad["custom_id"] == "line-2", bad  # never the hostile id itself
    assert bad["error"].startswith("line 2: custom_id ") and ID_RULE in bad["error"], bad


@pytest.mark.parametrize("value, said", [(12, "not a number"), (["a"], "not an array"), (True, "not a boolean")])
def test_a_non_string_custom_id_in_a_file_says_it_must_be_a_string(value, said):
    (bad,) = parse_items_lines([json.dumps({"custom_id": value, "question": "q"})])
    assert bad["custom_id"] == "line-1"
    assert "custom_id must be a string" in bad["error"] and said in bad["error"]


def test_null_custom_id_gets_the_line_number():
    assert parse_items_lines([b'{"custom_id": null, "question": "q"}']) == [{"custom_id": "line-1", "question": "q"}]
