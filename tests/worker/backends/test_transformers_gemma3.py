"""The Gemma 3 family (MedGemma) on the transformers backend, on a tiny random-weight checkpoint in the
published MedGemma layout (``fixture.gemma3.build_random_checkpoint``; no engine needed).

The reference is transformers' own path: the checkpoint's processor (chat template, ``<start_of_image>``
expanded to the soft tokens, ``token_type_ids``) and the model's own forward and ``generate``, which merge
the image and build Gemma 3's bidirectional image attention themselves. The backend feeds embeddings with
its own token types and must give exactly their logits and answers, for a full image and for dropped ones.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from hscr_worker.backends.base import GenerateRequest, ScoreRequest
from hscr_worker.core.replace import ForcedDecoder, Replacement
from hscr_worker.families import resolve_profile

SCORE_ATOL = 1e-4
QUESTION = "is there an abnormality ?"


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory) -> str:
    from hscr_worker.fixture.gemma3 import build_random_checkpoint

    return str(build_random_checkpoint(tmp_path_factory.mktemp("tiny-medgemma")))


@pytest.fixture(scope="module")
def gemma_hf(tiny_gemma3_dir):
    from hscr_worker.backends.transformers import TransformersBackend

    return TransformersBackend(tiny_gemma3_dir, device="cpu")


def _images() -> list[Image.Image]:
    """Two square images and two non-square ones (the processor resizes every image to its square size)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
            ((64, 64), (64, 64), (48, 80), (96, 40))]


def _own_inputs(backend, question: str, image: Image.Image) -> dict:
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    return backend.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True, return_tensors="pt")


def _with_response(inputs: dict, response: list[int], *, token_types: bool = True) -> dict:
    full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], torch.tensor([response])], 1)}
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    full["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.zeros(1, len(response), dtype=torch.long)], 1)
    if not token_types:
        del full["token_type_ids"]
    return full


def test_detected_from_config_with_both_stop_tokens(gemma_hf):
    assert (gemma_hf.profile.family, gemma_hf.profile.name) == ("gemma3", "gemma3")
    tokens = {gemma_hf.tokenizer.convert_ids_to_tokens(i) for i in gemma_hf.stop_token_ids}
    assert tokens == {"<end_of_turn>", "<eos>"}
    assert gemma_hf.tokenizer.convert_ids_to_tokens(gemma_hf.image_token_id) == "<image_soft_token>"
    prompt = gemma_hf.prompt_ids("<image>\n" + QUESTION)
    text = gemma_hf.tokenizer.decode(prompt)
    assert text == ("<bos><start_of_turn>user\n\n\n<start_of_image><image_soft_token><end_of_image>\n\n"
                    f"{QUESTION}<end_of_turn>\n<start_of_turn>model\n")
    assert prompt.count(gemma_hf.tokenizer.bos_token_id) == 1  # the template writes it; the tokenizer adds none
    for marked in (f"<start_of_image>{QUESTION}", f"{QUESTION} <image_soft_token>", f"<image>\n{QUESTION}"):
        assert gemma_hf.prompt_ids(marked) == prompt


def test_prompts_answers_and_scores_equal_transformers_own_path(gemma_hf):
    images = _images()
    visual = gemma_hf.encode_images(images)
    prompt = gemma_hf.prompt_ids(QUESTION)
    answers = gemma_hf.generate([GenerateRequest(prompt, v, 12) for v in visual])
    rows = gemma_hf.score([ScoreRequest(prompt, v, a) for v, a in zip(visual, answers, strict=True)])
    model = gemma_hf.model
    with torch.inference_mode():
        for image, v, answer, row in zip(images, visual, answers, rows, strict=True):
            inputs = _own_inputs(gemma_hf, QUESTION, image)
            ids = inputs["input_ids"][0].tolist()
            run = [k for k, t in enumerate(ids) if t == gemma_hf.image_token_id]
            assert inputs["token_type_ids"][0].nonzero().flatten().tolist() == run  # the processor's image tokens
            assert len(run) == v.n_tokens == 64 and prompt == ids[:run[0] + 1] + ids[run[-1] + 1:]
            own = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
            assert gemma_hf._cut_at_stop(own) == answer and answer
            logits = model(**_with_response(inputs, answer)).logits[0, len(ids) - 1:-1]
            torch.testing.assert_close(row, logits, atol=SCORE_ATOL, rtol=0)
            # Without token types the image would attend causally: the logits move, so the above checks them.
            causal = model(**_with_response(inputs, answer, token_types=False)).logits[0, len(ids) - 1:-1]
            assert float((causal - logits).abs().max()) > 1e-2


def _own_logits_for(gemma_hf, prompt: list[int], embeds: torch.Tensor, response: list[int]) -> torch.Tensor:
    """The model's own forward over ``prompt`` with its placeholder expanded to ``embeds`` rows (soft tokens,
    token type 1): transformers merges the rows and builds the bidirectional mask itself."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    at = prompt.index(gemma_hf.image_token_id)
    ids = prompt[:at] + [gemma_hf.image_token_id] * embeds.shape[0] + prompt[at + 1:] + response
    input_ids = torch.tensor([ids])
    image = BaseModelOutputWithPooling(pooler_output=embeds[None])
    with torch.inference_mode():
        logits = gemma_hf.model(input_ids=input_ids, token_type_ids=(input_ids == gemma_hf.image_token_id).long(),
                                mm_encoder_outputs={"image": image}).logits[0]
    return logits[len(ids) - len(response) - 1:-1]


def test_dropped_images_keep_their_tokens_marked_as_image(gemma_hf):
    """Removal keeps the survivors' rows marked as image tokens (bidirectional among themselves), zeroing
    keeps every row marked; both score as the model's own forward over the same rows and token types."""
    visual = gemma_hf.encode_images(_images()[:1])[0]
    prompt = gemma_hf.prompt_ids(QUESTION)
    keep = torch.rand(visual.n_tokens, generator=torch.Generator().manual_seed(0)) < 0.3
    removed, zeroed = visual.dropped(keep, "remove"), visual.dropped(keep, "zero")
    assert 0 < removed.n_tokens < visual.n_tokens and zeroed.n_tokens == visual.n_tokens
    answer = gemma_hf.generate([GenerateRequest(prompt, visual, 10)])[0]
    at = prompt.index(gemma_hf.image_token_id)
    # the token types the backend builds: exactly the visual rows, in a batch padded on either side
    requests = [ScoreRequest(prompt, v, answer) for v in (visual, removed, zeroed)]
    inputs = [gemma_hf._inputs([*r.prompt_ids, *r.response_ids], r.visual) for r in requests]
    spans = [gemma_hf._image_span(r.prompt_ids, r.visual) for r in requests]
    for left in (True, False):
        _, _, mask, types = gemma_hf._pad(inputs, left=left, images=spans)
        for row, r in enumerate(requests):
            offset = int((mask[row] == 0).sum()) if left else 0
            assert types[row].nonzero().flatten().tolist() == list(range(offset + at, offset + at + r.visual.n_tokens))
    rows = gemma_hf.score(requests)
    for r, row in zip(requests, rows, strict=True):
        torch.testing.assert_close(row, _own_logits_for(gemma_hf, prompt, r.visual.embeds, answer),
                                   atol=SCORE_ATOL, rtol=0)
    assert float((rows[0] - rows[1]).abs().max()) > 1e-3 and float((rows[0] - rows[2]).abs().max()) > 1e-3
    # decoding over the KV cache of a bidirectional prefill: every step's logits are the model's own
    for v in (removed, zeroed):
        request = GenerateRequest(prompt, v, 10, return_logits=True)
        response = gemma_hf.generate([request])[0]
        torch.testing.assert_close(request.logits, _own_logits_for(gemma_hf, prompt, v.embeds, response),
                                   atol=SCORE_ATOL, rtol=0)


@pytest.mark.parametrize("stop", ["<end_of_turn>", "<eos>"])
def test_a_response_ends_at_either_stop_token(gemma_hf, stop):
    visual = gemma_hf.encode_images(_images()[:1])[0]
    prompt = gemma_hf.prompt_ids(QUESTION)
    own = gemma_hf.generate([GenerateRequest(prompt, visual, 8)])[0]
    assert len(own) >= 4 and not set(own) & set(gemma_hf.stop_token_ids)
    stop_id = gemma_hf.tokenizer.convert_tokens_to_ids(stop)
    forced = ForcedDecoder(own, [Replacement(3, own[3], stop_id, 0.0, 1.0)])  # the model emits the stop token at step 3
    assert gemma_hf.generate([GenerateRequest(prompt, visual, 8, forced=forced)])[0] == own[:3]


def test_the_published_and_the_transformers_layouts_load_the_same_weights(tiny_gemma3_dir, tmp_path, gemma_hf):
    """MedGemma's files name the SigLIP weights ``vision_tower.vision_model.*`` (and the language model
    ``language_model.model.*``); transformers 5.19 saves ``vision_tower.*``. Both load, with nothing missing
    or left over, to the same weights: the same visual tokens and scores."""
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from hscr_worker.backends.transformers import TransformersBackend
    from hscr_worker.fixture.gemma3 import build_random_checkpoint

    with safe_open(f"{tiny_gemma3_dir}/model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {k.split(".")[0] for k in keys} == {"language_model", "vision_tower", "multi_modal_projector"}
    assert all(k.startswith("vision_tower.vision_model.") for k in keys if k.startswith("vision_tower."))
    assert all(k.startswith("language_model.model.") for k in keys if k.startswith("language_model."))
    with open(f"{tiny_gemma3_dir}/processor_config.json") as f:  # the image processor in preprocessor_config.json
        assert json.load(f) == {"image_seq_length": 64, "processor_class": "Gemma3Processor"}
    _, info = AutoModelForImageTextToText.from_pretrained(tiny_gemma3_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))

    native = build_random_checkpoint(tmp_path / "native", portable=False)  # the same seed, transformers' own names
    with safe_open(f"{native}/model.safetensors", "pt") as f:
        assert any(k.startswith("vision_tower.encoder.") for k in f.keys())
    other = TransformersBackend(str(native), device="cpu")
    images = _images()[:2]
    prompt = gemma_hf.prompt_ids(QUESTION)
    for a, b in zip(gemma_hf.encode_images(images), other.encode_images(images), strict=True):
        assert torch.equal(a.embeds, b.embeds)
        assert torch.equal(gemma_hf.score([ScoreRequest(prompt, a, [20, 30])])[0],
                           other.score([ScoreRequest(prompt, b, [20, 30])])[0])


def test_missing_processor_files_are_named(tiny_gemma3_dir, tmp_path):
    from hscr_worker.backends.transformers import TransformersBackend

    for missing, message in ((("preprocessor_config.json", "processor_config.json"), "preprocessor_config.json or"),
                             (("tokenizer.json",), "tokenizer.json or tokenizer.model")):
        incomplete = tmp_path / missing[0]
        shutil.copytree(tiny_gemma3_dir, incomplete)
        for name in missing:
            (incomplete / name).unlink()
        with pytest.raises(FileNotFoundError, match=message):
            TransformersBackend(str(incomplete), device="cpu")


def test_profile_and_detection():
    from transformers import AutoConfig

    config = AutoConfig.for_model("gemma3")
    assert resolve_profile(None, "/models/medgemma-4b-it", config=config).name == "gemma3"
    assert resolve_profile("gemma3", "/models/medgemma-27b-it", config=config).family == "gemma3"
    with pytest.raises(ValueError, match="profile 'gemma3' serves model_type gemma3"):
        resolve_profile("gemma3", "/m", config=AutoConfig.for_model("qwen2_5_vl"))
    with pytest.raises(ValueError, match="dynamic-resolution"):
        resolve_profile("gemma3", "/m").with_pixels(None, 200_000)
