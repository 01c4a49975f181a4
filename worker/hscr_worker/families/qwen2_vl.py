"""Qwen2-VL and Qwen2.5-VL (Lingshu, HuatuoGPT-Vision-Qwen2.5VL, QoQ-Med, MedVLM-R1).

Images are taken at their own resolution (within the processor's ``min_pixels``/``max_pixels``,
resized to a multiple of ``patch_size * merge_size``); the vision tower's output is merged 2x2, so an
image of ``grid = (t, h, w)`` patches (``image_grid_thw``) takes ``t * h * w / merge**2`` placeholder
positions between ``<|vision_start|>`` and ``<|vision_end|>``. The prompt is ChatML and a turn ends
with ``<|im_end|>`` (the generation config also lists ``<|endoftext|>``).

Positions are M-RoPE: three components (temporal, height, width) per token. Text before the image
counts 0..s-1 in all three; the visual token in row ``i``, column ``j`` of the merged grid sits at
``(s, s + i, s + j)``; text after the image continues at ``s + max(h, w) / merge``. HF's
``get_rope_index`` and vLLM's ``get_mrope_input_positions`` both compute this for a whole image.

Dropout by removal (HSCR step 1) keeps each surviving visual token at the position it has in the
full image and the text after the image where it is under the full image: the dropped image differs
from the full one only by the missing tokens, never by where the rest of the prompt and the response
sit. (Re-packing the survivors into a smaller made-up grid would move every token, the response
included, and the logit shift would measure the move as well as the missing evidence.)
``mrope_positions`` is that rule, the one function both backends use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
from PIL import Image

from ..backends.base import VisualTokens
from .base import ModelFamily

VISION_MARKERS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")


def mrope_positions(n_before: int, n_after: int, grid: Sequence[int], merge: int,
                    index: torch.Tensor | None = None) -> torch.Tensor:
    """``long[3, n_before + n_visual + n_after]``: M-RoPE positions of a prompt holding one image.

    ``grid``: the full image's ``(t, h, w)`` in patches; ``index``: which of its merged tokens are
    present (None: all). Each present token keeps its full-image position; the text after the image
    starts where it does under the full image.
    """
    t, h, w = (int(g) for g in grid)
    if t != 1:
        raise ValueError(f"an image has one temporal patch, got grid {tuple(grid)}")
    rows, cols = h // merge, w // merge
    index = torch.arange(rows * cols) if index is None else index.to(torch.long)
    before = torch.arange(n_before).expand(3, -1)
    visual = torch.stack([torch.zeros_like(index), index // cols, index % cols]) + n_before
    after = torch.arange(n_after).expand(3, -1) + n_before + max(rows, cols)
    return torch.cat([before, visual, after], dim=1)


@dataclass(frozen=True)
class QwenVLFamily(ModelFamily):
    name: str
    model_types: tuple[str, ...]
    vllm_architecture: str | None = None
    # The image processor's pixel range (None: the checkpoint's preprocessor_config.json): an image is
    # resized, keeping its aspect ratio, to a multiple of patch_size * merge_size with a pixel count
    # within [min_pixels, max_pixels]; tokens = pixels / (patch_size * merge_size)**2.
    min_pixels: int | None = None
    max_pixels: int | None = None
    family = "qwen2-vl"
    # Five masks of 97 %: one 95 % mask of a Qwen image (merged tokens that each see 2x2 patches, and
    # no absolute position inside the vision tower) finds the grounded words less reliably. Coupling by
    # |shift| ('move'): the Qwen fixture says its most common values (mri, opacity, small) when it sees poorly,
    # so the image lowers them and 'raise' never ranks them. The |shift| floor 0.032 is the 99.5th percentile of
    # the non-grounded (wording and template) words' |shift| on the tuning seeds (grounded median 0.73): with
    # 0.01 (their 90th percentile) wording swaps such as "mri study" -> "mri image" became level 1 where no
    # image token moves the answer (issue #14). Later replacements do not fire once a re-decode has diverged
    # (they fired into the continuation: "... region . and mri reveals").
    # docs/models.md, "HSCR defaults per family": every setting measured on held-out items.
    param_defaults = MappingProxyType({"n_masks": 5, "dropout_ratio": 0.97, "coupling": "move", "min_shift": 0.032,
                                       "fire_after_divergence": False})

    def image_markers(self, processor) -> tuple[str, ...]:
        from hscr_client.schema import IMAGE_MARKER  # LLaVA-format data writes "<image>" into the question

        return (*VISION_MARKERS, processor.image_token, IMAGE_MARKER)

    def prompt_text(self, processor, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        if processor.image_token not in text:
            raise ValueError("the chat template placed no image: it needs Qwen's "
                             "<|vision_start|><|image_pad|><|vision_end|> for an image entry")
        return text

    def stop_token_ids(self, tokenizer, generation_config=None) -> list[int]:
        ids = super().stop_token_ids(tokenizer, generation_config)
        for token in ("<|im_end|>", "<|endoftext|>"):  # a turn's end, and the end of text
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
                ids.append(token_id)
        return ids

    def with_pixels(self, min_pixels: int | None, max_pixels: int | None) -> QwenVLFamily:
        from dataclasses import replace

        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            raise ValueError(f"min_pixels {min_pixels} exceeds max_pixels {max_pixels}")
        return replace(self, min_pixels=min_pixels, max_pixels=max_pixels)

    def _size(self, processor) -> dict | None:
        if self.min_pixels is None and self.max_pixels is None:
            return None
        size = dict(processor.image_processor.size)
        if self.min_pixels is not None:
            size["shortest_edge"] = self.min_pixels
        if self.max_pixels is not None:
            size["longest_edge"] = self.max_pixels
        return size

    def merge_size(self, processor) -> int:
        return int(processor.image_processor.merge_size)

    @torch.inference_mode()
    def encode_images(self, model, processor, images: Sequence[Image.Image], *, device: torch.device,
                      batch_size: int) -> list[VisualTokens]:
        out: list[VisualTokens] = []
        for start in range(0, len(images), batch_size):
            chunk = self.prepare_images(processor, images[start:start + batch_size])
            size = self._size(processor)
            inputs = processor.image_processor(images=chunk, return_tensors="pt", **({"size": size} if size else {}))
            grids = inputs["image_grid_thw"]
            features = model.get_image_features(pixel_values=inputs["pixel_values"].to(device, model.dtype),
                                                image_grid_thw=grids.to(device)).pooler_output
            out += [VisualTokens(f.float().cpu(), tuple(int(g) for g in grid))
                    for f, grid in zip(features, grids, strict=True)]
        return out

    def position_ids(self, ids: Sequence[int], image_token_id: int, visual: VisualTokens) -> torch.Tensor:
        if visual.grid is None:
            raise ValueError("Qwen visual tokens need their image grid (image_grid_thw)")
        at = list(ids).index(image_token_id)
        merge = self._merge
        return mrope_positions(at, len(ids) - at - 1, visual.grid, merge, visual.index)

    # The merge size travels with the processor; the backend binds it once (``bind``).
    _merge: int = 2

    def bind(self, processor) -> QwenVLFamily:
        """This family with the checkpoint's merge size."""
        from dataclasses import replace

        return replace(self, _merge=self.merge_size(processor))

    def vllm_image(self, visual: VisualTokens):
        from ..backends.vllm_models import qwen_image_data

        return qwen_image_data(visual)


PROFILES: dict[str, QwenVLFamily] = {
    "qwen2-vl": QwenVLFamily("qwen2-vl", ("qwen2_vl",), "HSCRQwen2VLForConditionalGeneration"),
    "qwen2.5-vl": QwenVLFamily("qwen2.5-vl", ("qwen2_5_vl",), "HSCRQwen2_5_VLForConditionalGeneration"),
}
