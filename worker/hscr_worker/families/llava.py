"""LLaVA (``LlavaForConditionalGeneration``): the fixture, LLaVA-1.5, LLaVA-Med v1.5 in the HF format.

One image is a flat sequence of visual tokens (CLIP patches through the projector), placed with
plain 1-D positions; dropout needs nothing more. Three prompt variants (profiles):

- ``fixture``: the checkpoint's own chat template (the bundled fixture Med-VLM ships one) and the
  processor's image preprocessing, unchanged.
- ``llava-1.5``: ``USER: <image>\\n{question} ASSISTANT:`` and the processor's preprocessing.
- ``llava-med``: LLaVA-Med v1.5 (Mistral-7B) converted to the HF LLaVA format, with the
  ``mistral_instruct`` conversation ``[INST] <image>\\n{question} [/INST]`` and LLaVA's
  pad-to-square preprocessing (``image_aspect_ratio="pad"``: the image is centred on a square
  filled with the processor's mean colour before resizing, so nothing is cropped away).

Detection (``detect``): ``llava-med`` when the model path mentions llava-med, else ``fixture`` when
the checkpoint has a chat template, else ``llava-1.5``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image

from ..backends.base import VisualTokens
from .base import ModelFamily

Preprocess = Literal["processor", "pad_to_square"]


@dataclass(frozen=True)
class LlavaFamily(ModelFamily):
    name: str
    template: str | None  # "{question}" is replaced; None = the processor's chat template
    preprocess: Preprocess = "processor"
    family = "llava"
    model_types = ("llava",)

    def prompt_text(self, processor, question: str) -> str:
        if self.template is None:
            return super().prompt_text(processor, question)
        return self.template.replace("<image>", processor.image_token).replace("{question}", question)

    def prepare_images(self, processor, images: Sequence[Image.Image]) -> list[Image.Image]:
        rgb = super().prepare_images(processor, images)
        if self.preprocess == "pad_to_square":
            mean = getattr(processor.image_processor, "image_mean", None) or (0.0, 0.0, 0.0)
            background = tuple(int(c * 255) for c in mean)  # LLaVA truncates: int(x*255), not round
            rgb = [pad_to_square(im, background) for im in rgb]
        return rgb

    @torch.inference_mode()
    def encode_images(self, model, processor, images: Sequence[Image.Image], *, device: torch.device,
                      batch_size: int) -> list[VisualTokens]:
        out: list[VisualTokens] = []
        config = model.config
        for start in range(0, len(images), batch_size):
            chunk = self.prepare_images(processor, images[start:start + batch_size])
            pixels = processor.image_processor(chunk, return_tensors="pt")["pixel_values"]
            features = model.get_image_features(
                pixel_values=pixels.to(device, model.dtype),
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            ).pooler_output
            out += [VisualTokens(f.float().cpu()) for f in features]
        return out


def pad_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's ``expand2square``: centre the image on a square canvas of ``background`` colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


PROFILES: dict[str, LlavaFamily] = {
    "fixture": LlavaFamily("fixture", template=None),
    "llava-1.5": LlavaFamily("llava-1.5", template="USER: <image>\n{question} ASSISTANT:"),
    "llava-med": LlavaFamily("llava-med", template="[INST] <image>\n{question} [/INST]", preprocess="pad_to_square"),
}


def detect(model_path: str, processor=None) -> LlavaFamily:
    if "llava-med" in str(model_path).lower().replace("_", "-"):
        return PROFILES["llava-med"]
    if processor is not None and getattr(processor, "chat_template", None):
        return PROFILES["fixture"]
    return PROFILES["llava-1.5"]
