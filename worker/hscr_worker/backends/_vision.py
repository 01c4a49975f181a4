"""Images -> post-projector visual tokens with the checkpoint's own vision tower and projector.

Shared by both backends so that they feed the language model identical visual tokens: the
transformers backend calls it on its full model, the vLLM backend on a copy whose language model
was dropped after loading (vLLM hosts the language model; the worker keeps the vision side to
apply visual-token dropout itself).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from .profiles import ModelProfile


@torch.inference_mode()
def encode_images(model, processor, profile: ModelProfile, images: Sequence[Image.Image], *,
                  device: torch.device, batch_size: int) -> list[torch.Tensor]:
    """``float[n_visual, hidden]`` on the CPU per image (``model``: a transformers LLaVA model)."""
    out: list[torch.Tensor] = []
    config = model.config
    for start in range(0, len(images), batch_size):
        chunk = profile.prepare_images(processor, images[start:start + batch_size])
        pixels = processor.image_processor(chunk, return_tensors="pt")["pixel_values"]
        features = model.get_image_features(
            pixel_values=pixels.to(device, model.dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output
        out += [f.float().cpu() for f in features]
    return out
