"""The Qwen2-VL / Qwen2.5-VL family on the transformers backend (the Qwen fixture; no engine needed).

The reference for a whole image is transformers' own path (``input_ids`` + ``pixel_values`` +
``image_grid_thw``, positions from ``get_rope_index``): the backend, which feeds embeddings with
explicit M-RoPE positions, must give exactly its logits and answers. Dropout by removal keeps the
survivors' full-image positions (``families.qwen2_vl.mrope_positions``).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from hscr_worker.backends.base import GenerateRequest, ScoreRequest
from hscr_worker.families import UnsupportedModel, resolve_profile
from hscr_worker.families.qwen2_vl import mrope_positions
from hscr_worker.fixture import resolve_model, synthetic

QWEN_FIXTURE = "fixture-qwen2.5-vl"


@pytest.fixture(scope="module")
def qwen_hf():
    from hscr_worker.backends.transformers import TransformersBackend

    return TransformersBackend(QWEN_FIXTURE, device="cpu")


@pytest.fixture(scope="module")
def examples():
    return synthetic.make_examples(6, 4243)


def _reference_inputs(backend, example, response: list[int] | None = None) -> dict:
    """transformers' own inputs for one item (its processor expands the image placeholder)."""
    text = backend.profile.prompt_text(backend.processor, example.question)
    inputs = backend.processor(text=[text], images=[example.image.convert("RGB")], return_tensors="pt")
    if response:
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([response])], 1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros(1, len(response), dtype=inputs["mm_token_type_ids"].dtype)], 1)
    return inputs


def test_detected_from_config_with_every_end_of_turn(qwen_hf):
    assert qwen_hf.profile.name == "qwen2.5-vl"
    tokens = {qwen_hf.tokenizer.convert_ids_to_tokens(i) for i in qwen_hf.stop_token_ids}
    assert tokens == {"<|im_end|>", "<|endoftext|>"}
    assert qwen_hf.tokenizer.convert_ids_to_tokens(qwen_hf.image_token_id) == "<|image_pad|>"
    prompt = qwen_hf.tokenizer.decode(qwen_hf.prompt_ids("<image>\nis there a mass ?"))
    assert "<|vision_start|><|image_pad|><|vision_end|>is there a mass ?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_scores_and_answers_equal_transformers_own_path(qwen_hf, examples):
    visual = qwen_hf.encode_images([e.image for e in examples])
    prompts = [qwen_hf.prompt_ids(e.question) for e in examples]
    answers = qwen_hf.generate([GenerateRequest(p, v, 24) for p, v in zip(prompts, visual, strict=True)])
    assert all(answers)
    rows = qwen_hf.score([ScoreRequest(p, v, a) for p, v, a in zip(prompts, visual, answers, strict=True)])
    with torch.inference_mode():
        for example, answer, row in zip(examples, answers, rows, strict=True):
            inputs = _reference_inputs(qwen_hf, example)
            own = qwen_hf.model.generate(**inputs, max_new_tokens=24, do_sample=False)[0, inputs["input_ids"].shape[1]:]
            assert qwen_hf._cut_at_stop(own.tolist()) == answer
            logits = qwen_hf.model(**_reference_inputs(qwen_hf, example, answer)).logits[0]
            torch.testing.assert_close(row, logits[-len(answer) - 1:-1], atol=1e-4, rtol=0)


def test_embeddings_alone_would_misplace_the_image(qwen_hf, examples):
    """Why the backend passes positions: the model given only embeddings counts the image as text."""
    visual = qwen_hf.encode_images([examples[0].image])[0]
    prompt = qwen_hf.prompt_ids(examples[0].question)
    answer = qwen_hf.encode_text(examples[0].answer)
    row = qwen_hf.score([ScoreRequest(prompt, visual, answer)])[0]
    embeds, _ = qwen_hf._inputs([*prompt, *answer], visual)
    with torch.inference_mode():
        qwen_hf.model.model.rope_deltas = None
        blind = qwen_hf.model(inputs_embeds=embeds[None]).logits[0, -len(answer) - 1:-1]
    assert (blind - row).abs().max() > 1e-3


def test_removal_keeps_the_survivors_full_image_positions(qwen_hf, examples):
    visual = qwen_hf.encode_images([examples[0].image])[0]
    prompt = qwen_hf.prompt_ids(examples[0].question)
    full = qwen_hf.profile.position_ids(prompt, qwen_hf.image_token_id, visual)
    # the rule equals transformers' own get_rope_index for the whole image
    inputs = _reference_inputs(qwen_hf, examples[0])
    reference, _ = qwen_hf.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                       image_grid_thw=inputs["image_grid_thw"])
    assert torch.equal(full, reference[:, 0])
    keep = torch.zeros(visual.n_tokens, dtype=torch.bool)
    keep[[3, 17, 40]] = True
    dropped = visual.dropped(keep, "remove")
    assert dropped.n_tokens == 3 and dropped.index.tolist() == [3, 17, 40] and dropped.grid == visual.grid
    positions = qwen_hf.profile.position_ids(prompt, qwen_hf.image_token_id, dropped)
    at = prompt.index(qwen_hf.image_token_id)
    assert torch.equal(positions[:, :at], full[:, :at])
    assert torch.equal(positions[:, at:at + 3], full[:, at + torch.tensor([3, 17, 40])])
    assert torch.equal(positions[:, at + 3:], full[:, at + visual.n_tokens:])
    zeroed = visual.dropped(keep, "zero")
    assert torch.equal(qwen_hf.profile.position_ids(prompt, qwen_hf.image_token_id, zeroed), full)
    # both modes score (the removal under its own positions), and differently from the full image
    answer = qwen_hf.encode_text(examples[0].answer)
    rows = qwen_hf.score([ScoreRequest(prompt, v, answer) for v in (visual, dropped, zeroed)])
    assert (rows[0] - rows[1]).abs().max() > 1e-3 and (rows[0] - rows[2]).abs().max() > 1e-3


def test_mrope_positions_of_a_wide_image():
    positions = mrope_positions(2, 2, (1, 4, 8), 2)  # 2 x 4 merged tokens
    assert positions[:, :2].tolist() == [[0, 1]] * 3
    assert positions[1, 2:10].tolist() == [2, 2, 2, 2, 3, 3, 3, 3]
    assert positions[2, 2:10].tolist() == [2, 3, 4, 5, 2, 3, 4, 5]
    assert positions[:, 10:].tolist() == [[6, 7]] * 3  # text resumes at 2 + max(2, 4)


def test_any_image_size_is_resized_not_refused(qwen_hf):
    """Dynamic resolution: small, wide and large images are resized per the processor's pixel range."""
    images = [Image.new("RGB", size, (90, 90, 90)) for size in ((8, 8), (300, 40), (640, 640))]
    visual = qwen_hf.encode_images(images)
    merge = qwen_hf.processor.image_processor.merge_size
    processor = qwen_hf.processor.image_processor
    for v in visual:
        t, h, w = v.grid
        assert t == 1 and v.n_tokens == h * w // merge**2
        assert v.embeds.shape[1] == qwen_hf.model.config.text_config.hidden_size
        pixels = h * w * processor.patch_size**2
        assert processor.size["shortest_edge"] <= pixels <= processor.size["longest_edge"]
    assert visual[1].grid[2] > visual[1].grid[1]  # the aspect ratio survives


def test_max_pixels_is_settable(examples):
    from hscr_worker.backends.transformers import TransformersBackend

    small = TransformersBackend(QWEN_FIXTURE, device="cpu", max_pixels=32 * 32)
    visual = small.encode_images([examples[0].image])[0]
    assert visual.n_tokens < 64 and visual.grid[1] * visual.grid[2] * 4**2 <= 32 * 32
    assert small.generate([GenerateRequest(small.prompt_ids(examples[0].question), visual, 8)])[0]
    with pytest.raises(ValueError, match="dynamic-resolution"):
        TransformersBackend("fixture", device="cpu", max_pixels=32 * 32)


def test_unsupported_and_incomplete_checkpoints_are_explained(tmp_path):
    from transformers import AutoConfig

    from hscr_worker.backends.transformers import TransformersBackend

    config = AutoConfig.for_model("gpt2")
    with pytest.raises(UnsupportedModel, match="model_type 'gpt2' is not a supported model family; supported: llava"):
        resolve_profile(None, "/m", config=config)
    with pytest.raises(ValueError, match="profile 'qwen2.5-vl' serves model_type qwen2_5_vl"):
        resolve_profile("qwen2.5-vl", "/m", config=AutoConfig.from_pretrained(resolve_model("fixture")))
    incomplete = tmp_path / "no-processor"
    shutil.copytree(resolve_model(QWEN_FIXTURE), incomplete)
    for name in ("processor_config.json", "preprocessor_config.json"):
        (incomplete / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json or processor_config.json"):
        TransformersBackend(str(incomplete), device="cpu")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModel, match="qwen2.5-vl"):
        TransformersBackend(str(other), device="cpu")
