"""Gemma 3 (``Gemma3ForConditionalGeneration``): MedGemma 4B / 27B multimodal, MedGemma 1.5, the Gemma fixture.

An image goes through SigLIP at the processor's fixed size (MedGemma: 896², 14-px patches, 64x64
patches) and is average-pooled to ``mm_tokens_per_image`` soft tokens (MedGemma: 256). In the prompt
the chat template writes ``<start_of_image>``; the processor expands it to
``\\n\\n<start_of_image>`` + ``<image_soft_token>`` x 256 + ``<end_of_image>\\n\\n``. Here the expansion
keeps ONE ``<image_soft_token>`` (the placeholder both backends expand to the visual rows), so a
prompt's text tokens are exactly the processor's. A turn ends with ``<end_of_turn>``; ``<eos>`` ends
the text.

Attention among one image's tokens is bidirectional (the rest is causal): transformers needs
``token_type_ids`` with the image's tokens marked 1, which the transformers backend passes for this
family (``image_attention``), for a full image and for a dropped one alike (the surviving or zeroed
rows stay marked as image). vLLM does this on GPU backends that support it; its CPU attention is
causal for every token (docs/models.md, "Gemma 3": the measured difference).

Positions are plain 1-D, as for LLaVA: SigLIP gives each soft token its place in the image (absolute
position embeddings inside the tower), and a removed token takes no position.

Pan-and-scan (the processor's optional extra crops of a non-square image) is off and not offered:
every image is one block of soft tokens, resized (aspect ratio not kept) to the processor's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
from PIL import Image

from ..backends.base import VisualTokens
from .base import ModelFamily

TURN_END = "<end_of_turn>"


@dataclass(frozen=True)
class Gemma3Family(ModelFamily):
    name: str = "gemma3"
    family = "gemma3"
    # Three masks of 97 %, as Qwen: a SigLIP soft token is pooled from patches that attended to the whole image,
    # so the few tokens one 95 % mask keeps still show much of it (docs/models.md, "HSCR defaults per family":
    # both settings measured on held-out items). No planned replacement fires once the re-decode has diverged
    # (fire_after_divergence false, issue #15): with it on, the fixture's malformed level 1s were a later "." -> "and"
    # firing after "a" -> "no" had ended the sentence ("... no abnormality and a small nodule ..."). On the tuning
    # seeds it alone took malformed to 0 and monotone to 1.0 at unchanged R-precision; Qwen's coupling move with a
    # 0.01 floor changed R-precision by -0.006 to +0.010 (not carried). docs/models.md, "The Gemma fixture".
    param_defaults = MappingProxyType({"n_masks": 3, "dropout_ratio": 0.97, "fire_after_divergence": False})
    model_types = ("gemma3",)
    vllm_architecture = "HSCRGemma3ForConditionalGeneration"
    image_attention = "bidirectional"

    def image_markers(self, processor) -> tuple[str, ...]:
        from hscr_client.schema import IMAGE_MARKER  # LLaVA-format data writes "<image>" into the question

        tok = processor.tokenizer
        return (tok.boi_token, tok.eoi_token, tok.image_token, IMAGE_MARKER)

    def prompt_text(self, processor, question: str) -> str:
        """The chat template's prompt with its ``<start_of_image>`` expanded as the processor does, but to
        one soft token (the placeholder)."""
        tok = processor.tokenizer
        text = super().prompt_text(processor, question)
        if text.count(tok.boi_token) != 1:
            raise ValueError(f"the chat template placed {text.count(tok.boi_token)} images; Gemma 3's writes "
                             f"{tok.boi_token} for an image entry")
        return text.replace(tok.boi_token, f"\n\n{tok.boi_token}{tok.image_token}{tok.eoi_token}\n\n")

    def prompt_ids(self, processor, question: str, image_token_id: int) -> list[int]:
        # The template writes <bos> itself: the tokenizer must not add a second one.
        text = self.prompt_text(processor, self.clean_question(processor, question))
        ids = list(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = processor.tokenizer.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)  # a template without {{ bos_token }}: Gemma is trained with it
        if ids.count(image_token_id) != 1:
            raise ValueError(f"the {self.name} prompt must hold exactly one image placeholder; "
                             f"found {ids.count(image_token_id)}")
        return ids

    def processor_prompt(self, processor, question: str) -> str:
        return ModelFamily.prompt_text(self, processor, question)  # <start_of_image>: the processor expands it

    def processor_inputs(self, processor, text: str, image: Image.Image) -> dict[str, torch.Tensor]:
        # the template writes <bos>; token_type_ids mark the soft tokens (bidirectional attention)
        return dict(processor(text=[text], images=[image], return_tensors="pt", add_special_tokens=False))

    def stop_token_ids(self, tokenizer, generation_config=None) -> list[int]:
        ids = super().stop_token_ids(tokenizer, generation_config)
        for token in (TURN_END, "<eos>"):  # the turn's end, and the end of text
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
                ids.append(token_id)
        return ids

    @torch.inference_mode()
    def encode_images(self, model, processor, images: Sequence[Image.Image], *, device: torch.device,
                      batch_size: int) -> list[VisualTokens]:
        out: list[VisualTokens] = []
        for start in range(0, len(images), batch_size):
            chunk = self.prepare_images(processor, images[start:start + batch_size])
            pixels = processor.image_processor(chunk, return_tensors="pt", do_pan_and_scan=False)["pixel_values"]
            features = model.get_image_features(pixel_values=pixels.to(device, model.dtype)).pooler_output
            out += [VisualTokens(f.float().cpu()) for f in features]
        return out

    def vision_only_config(self, config):
        text = config.get_text_config()
        text.num_hidden_layers = 0
        text.layer_types = []  # one type per layer: none
        return config


PROFILES: dict[str, Gemma3Family] = {"gemma3": Gemma3Family()}
