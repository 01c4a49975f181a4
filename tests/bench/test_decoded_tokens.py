"""``bench/decoded_tokens.py``: on a trained fixture, levels that share their decoding (the default) decode fewer
tokens than every level in one call, and the report says how many items keep the same levels (issue #18)."""

import json

import decoded_tokens

N = 16


def test_shared_levels_decode_fewer_tokens_than_one_call(tmp_path):
    out = tmp_path / "decoded_tokens.json"
    assert decoded_tokens.main(["--models", "fixture", "--n", str(N), "--seed", "97", "--out", str(out)]) == 0
    entry = json.loads(out.read_text())["models"]["fixture"]
    one_call, shared = entry["candidates_per_round_0"], entry["candidates_per_round_1"]
    assert entry["plain_decoded_tokens"] > 0
    # every level re-decodes at least part of an answer on top of the own answer
    assert 1 < shared["generated_tokens_ratio"] < one_call["generated_tokens_ratio"]
    assert shared["decoded_tokens"] < one_call["decoded_tokens"]
    assert 0.8 * N <= entry["items_with_the_same_levels"] <= N
