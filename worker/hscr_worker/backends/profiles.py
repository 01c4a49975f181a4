"""Model profiles: the prompt template and image preprocessing of each LLaVA-family checkpoint.

A profile is what differs between model families at the edges of a backend (the model itself is
the same ``LlavaForConditionalGeneration`` architecture):

- ``fixture``: the checkpoint's own chat template (the bundled fixture Med-VLM ships one) and the
  processor's image preprocessing, unchanged.
- ``llava-1.5``: ``USER: <image>\\n{question} ASSISTANT:`` and the processor's preprocessing.
- ``llava-med``: LLaVA-Med v1.5 (Mistral-7B) converted to the HF LLaVA format, with the
  ``mistral_instruct`` conversation ``[INST] <image>\\n{question} [/INST]`` and LLaVA's
  pad-to-square preprocessing (``image_aspect_ratio="pad"``: the image is centred on a square
  filled with the processor's mean colour before resizing, so nothing is cropped away).

``resolve_profile(name, model_path)`` picks one: the given name, else ``llava-med`` when the
model path mentions llava-med, else ``fixture`` when the checkpoint has a chat template, else
``llava-1.5``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from PIL import Image

Preprocess = Literal["processor", "pad_to_square"]


@dataclass(frozen=True)
class ModelProfile:
    name: str
    template: str | None  # "{question}" is replaced; None = the processor's chat template
    preprocess: Preprocess = "processor"

    def prompt_text(self, processor, question: str) -> str:
        """The chat prompt for ``question`` holding one image placeholder.

        LLaVA-format data writes the image into the question (``"<image>\\nWhat is ..."``): the
        profile places the image itself, so that marker is dropped from the question.
        """
        question = question.replace(processor.image_token, "").strip()
        if self.template is None:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return processor.apply_chat_template(messages, add_generation_prompt=True)
        return self.template.replace("<image>", processor.image_token).replace("{question}", question)

    def prompt_ids(self, processor, question: str, image_token_id: int) -> list[int]:
        """Token ids of the prompt (special tokens such as BOS included), with exactly one placeholder."""
        ids = list(processor.tokenizer(self.prompt_text(processor, question), add_special_tokens=True)["input_ids"])
        if ids.count(image_token_id) != 1:
            raise ValueError(f"the {self.name} prompt must hold exactly one image placeholder; "
                             f"found {ids.count(image_token_id)} (does the question contain the image token?)")
        return ids

    def prepare_images(self, processor, images: Sequence[Image.Image]) -> list[Image.Image]:
        """RGB images ready for the processor's image processor."""
        rgb = [im.convert("RGB") for im in images]
        if self.preprocess == "pad_to_square":
            mean = getattr(processor.image_processor, "image_mean", None) or (0.0, 0.0, 0.0)
            background = tuple(int(round(c * 255)) for c in mean)
            rgb = [pad_to_square(im, background) for im in rgb]
        return rgb


def pad_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's ``expand2square``: centre the image on a square canvas of ``background`` colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


PROFILES: dict[str, ModelProfile] = {
    "fixture": ModelProfile("fixture", template=None),
    "llava-1.5": ModelProfile("llava-1.5", template="USER: <image>\n{question} ASSISTANT:"),
    "llava-med": ModelProfile("llava-med", template="[INST] <image>\n{question} [/INST]",
                              preprocess="pad_to_square"),
}


def resolve_profile(name: str | None, model_path: str, processor=None) -> ModelProfile:
    """The named profile, or the one detected from the model path and its processor."""
    if name is not None:
        try:
            return PROFILES[name]
        except KeyError:
            raise ValueError(f"unknown model profile {name!r}; use one of {sorted(PROFILES)}") from None
    if "llava-med" in str(model_path).lower().replace("_", "-"):
        return PROFILES["llava-med"]
    if processor is not None and getattr(processor, "chat_template", None):
        return PROFILES["fixture"]
    return PROFILES["llava-1.5"]
