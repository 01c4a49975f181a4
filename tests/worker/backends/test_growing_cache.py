"""The transformers backend's KV cache layer (``_GrowingLayer``): a step writes its own columns into spare ones instead
of copying the whole layer, and everything downstream sees the tensors transformers' ``DynamicLayer`` would give."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from hscr_client import HSCRParams
from hscr_worker.backends.transformers import _GrowingLayer
from hscr_worker.pipeline import run_hscr
from hscr_worker.similarity import get_similarity


def _states(rows: int, columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 2, columns, 4, generator=generator),
            torch.randn(rows, 2, columns, 4, generator=generator))


def test_growing_layer_returns_what_a_dynamic_layer_returns_through_what_the_chain_does_to_it():
    growing, dynamic = _GrowingLayer(), DynamicLayer()
    steps = [_states(3, 7, 0)] + [_states(3, 1, seed) for seed in range(1, 2 * _GrowingLayer.SPARE + 5)]
    for keys, values in steps:  # a prefill, then more steps than one buffer's spare columns
        got, want = growing.update(keys, values), dynamic.update(keys, values)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert growing.get_seq_length() == dynamic.get_seq_length() == 7 + 2 * _GrowingLayer.SPARE + 4
    for layer in (growing, dynamic):  # what the chain does: select rows, write a row, compact (keys, then values)
        layer.batch_select_indices(torch.tensor([2, 0]))
        layer.keys[1, :, 3:] = layer.keys[0, :, 3:]
        columns = torch.arange(layer.get_seq_length() - 5, layer.get_seq_length())
        index = columns[None, None, :, None].expand(2, 2, -1, 4)
        layer.keys = layer.keys.gather(2, index)
        layer.values = layer.values.gather(2, index)
    keys, values = _states(2, 1, 99)
    got, want = growing.update(keys, values), dynamic.update(keys, values)
    assert got[0].shape == (2, 2, 6, 4)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_growing_layer_writes_a_decode_step_in_place():
    layer = _GrowingLayer()
    layer.update(*_states(2, 5, 0))
    first = layer.keys.data_ptr()
    for seed in range(1, _GrowingLayer.SPARE + 1):  # the spare columns take SPARE steps without a copy
        layer.update(*_states(2, 1, seed))
        assert layer.keys.data_ptr() == first
    layer.update(*_states(2, 1, 0))
    assert layer.keys.data_ptr() != first  # full: one copy into a larger buffer


def test_the_backend_gives_the_same_hscr_results_as_with_transformers_own_cache(hf_backend, heldout_items,
                                                                              monkeypatch):
    items = heldout_items[:8]
    params = hf_backend.params(HSCRParams().model_dump(exclude_unset=True))
    similarity = get_similarity("lexical")
    assert all(isinstance(layer, _GrowingLayer) for layer in hf_backend._new_cache().layers)
    growing = run_hscr(hf_backend, items, params, similarity)
    monkeypatch.setattr(hf_backend, "_new_cache", lambda: DynamicCache(config=hf_backend.model.config))
    dynamic = run_hscr(hf_backend, items, params, similarity)
    assert sum(len(r.levels) for r in growing) >= 8  # the comparison covers re-decodes
    for g, d in zip(growing, dynamic, strict=True):
        assert (g.own_answer, g.coupled, g.shortfall) == (d.own_answer, d.coupled, d.shortfall)
        assert [level.text for level in g.levels] == [level.text for level in d.levels]
        assert [level.replacements for level in g.levels] == [level.replacements for level in d.levels]
