"""Model profiles: prompt templates, pad-to-square preprocessing, detection (no engine needed)."""

from __future__ import annotations

import pytest
from PIL import Image

from hscr_worker.families import PROFILES, resolve_profile
from hscr_worker.families.llava import PROFILES as LLAVA_PROFILES
from hscr_worker.families.llava import pad_to_square


@pytest.fixture(scope="module")
def processor(fixture_model):
    from hscr_worker._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(fixture_model)


def test_fixture_profile_is_the_checkpoints_chat_template(processor, fixture_model):
    profile = resolve_profile(None, fixture_model, processor)
    assert profile.name == "fixture"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is shown ?"}]}]
    expected = processor.tokenizer(processor.apply_chat_template(messages, add_generation_prompt=True))["input_ids"]
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert profile.prompt_ids(processor, "what is shown ?", image_token_id) == list(expected)


def test_llava_templates(processor):
    assert PROFILES["llava-1.5"].prompt_text(processor, "Is there a mass?") == \
        "USER: <image>\nIs there a mass? ASSISTANT:"
    assert PROFILES["llava-med"].prompt_text(processor, "Is there a mass?") == \
        "[INST] <image>\nIs there a mass? [/INST]"


@pytest.mark.parametrize("profile", sorted(LLAVA_PROFILES))
def test_a_llava_image_marker_in_the_question_is_dropped(processor, profile):
    """LLaVA-format questions carry "<image>\n"; the profile places the one image itself."""
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    plain = PROFILES[profile].prompt_ids(processor, "is there a mass ?", image_token_id)
    for marked in ("<image>\nis there a mass ?", "is there a mass ? <image>", "<image><image> is there a mass ?"):
        assert PROFILES[profile].prompt_ids(processor, marked, image_token_id) == plain
    assert plain.count(image_token_id) == 1


def test_pad_to_square_centres_on_the_mean_colour(processor):
    tall = Image.new("RGB", (20, 60), (255, 0, 0))
    square = pad_to_square(tall, (1, 2, 3))
    assert square.size == (60, 60)
    assert square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((30, 30)) == (255, 0, 0)
    assert square.getpixel((20, 30)) == (255, 0, 0) and square.getpixel((19, 30)) == (1, 2, 3)
    prepared = PROFILES["llava-med"].prepare_images(processor, [tall])[0]
    assert prepared.size == (60, 60) and prepared.getpixel((0, 0)) == (127, 127, 127)  # mean 0.5: LLaVA truncates
    assert PROFILES["fixture"].prepare_images(processor, [tall])[0].size == (20, 60)  # unchanged


def test_detection_and_names(processor):
    assert resolve_profile(None, "/models/llava-med-v1.5-mistral-7b-hf").name == "llava-med"
    assert resolve_profile(None, "/models/LLaVA_Med_v1.5").name == "llava-med"
    assert resolve_profile(None, "/models/llava-1.5-7b-hf").name == "llava-1.5"  # no processor: no chat template
    assert resolve_profile("llava-1.5", "/models/llava-med").name == "llava-1.5"  # an explicit name wins
    with pytest.raises(ValueError, match="unknown model profile 'qwen'"):
        resolve_profile("qwen", "/x")
