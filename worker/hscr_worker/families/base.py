"""What a model family is to HSCR: the one place that knows a checkpoint architecture's edges.

A family (one module per architecture: ``llava``, ``qwen2_vl``, ``gemma3``) knows its chat template and stop
tokens, its image preprocessing, how an image becomes post-projector visual tokens and how many
placeholder positions they take, where those tokens sit in the model's positional encoding (so
visual-token dropout keeps the surviving tokens where they were), and what a cache keyed on an
image must include. Backends ask it; ``core/`` and the pipeline never see a family.

A *profile* is one named family instance (``--profile``): LLaVA has three prompt variants
(``fixture``, ``llava-1.5``, ``llava-med``), Qwen two versions (``qwen2-vl``, ``qwen2.5-vl``), Gemma 3 one
(``gemma3``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch
from PIL import Image

from hscr_client import HSCRParams

from ..backends.base import VisualTokens


class ModelFamily:
    """Defaults shared by the families; a family overrides what differs."""

    name: str  # the profile name
    family: str  # the architecture family, recorded in a dataset's manifest and card
    model_types: tuple[str, ...]  # config.json ``model_type`` values this family serves
    # Linear layers of the language model a LoRA adapter targets (the trainer matches them inside the
    # language model only, so a vision tower's layers of the same names are never adapted): attention
    # and MLP, every linear layer of a Llama/Mistral/Qwen2 decoder.
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def with_pixels(self, min_pixels: int | None, max_pixels: int | None) -> ModelFamily:
        """This family resizing images to between ``min_pixels`` and ``max_pixels`` (dynamic resolution)."""
        if min_pixels is None and max_pixels is None:
            return self
        raise ValueError(f"--min-pixels/--max-pixels apply to dynamic-resolution families (qwen2-vl, qwen2.5-vl); "
                         f"the {self.family} processor resizes every image to its fixed input size")

    def bind(self, processor) -> ModelFamily:
        """This family with what it needs from the checkpoint's processor (default: nothing)."""
        return self

    # HSCR parameters where this family's default differs from HSCRParams' (docs/models.md has both figures).
    param_defaults: Mapping[str, object] = MappingProxyType({})

    def params(self, given: Mapping[str, object] | None = None) -> HSCRParams:
        """HSCR parameters for this family: ``given`` (what a user set), else the family's default, else
        HSCRParams'. The paper's setting (``HSCRParams.paper``) sets its fields, so they stay as given."""
        return HSCRParams(**{**self.param_defaults, **(given or {})})

    # ---- text ----
    def prompt_text(self, processor, question: str) -> str:
        """The chat prompt for ``question`` holding one image (the processor's chat template)."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)

    def clean_question(self, processor, question: str) -> str:
        """The question without image markers: the prompt places the one image itself."""
        for marker in self.image_markers(processor):
            question = question.replace(marker, "")
        return question.strip()

    def image_markers(self, processor) -> tuple[str, ...]:
        return (processor.image_token,)

    def prompt_ids(self, processor, question: str, image_token_id: int) -> list[int]:
        """Token ids of the prompt (special tokens such as BOS included), with exactly one placeholder."""
        text = self.prompt_text(processor, self.clean_question(processor, question))
        ids = list(processor.tokenizer(text, add_special_tokens=True)["input_ids"])
        if ids.count(image_token_id) != 1:
            raise ValueError(f"the {self.name} prompt must hold exactly one image placeholder; "
                             f"found {ids.count(image_token_id)} (does the question contain the image token?)")
        return ids

    def processor_prompt(self, processor, question: str) -> str:
        """The prompt as the checkpoint's own processor takes it, its image marker unexpanded (training
        renders prompts through the processor); the same text as ``prompt_text`` unless a family's
        placeholder differs from the processor's marker (Gemma 3)."""
        return self.prompt_text(processor, question)

    def processor_inputs(self, processor, text: str, image: Image.Image) -> dict[str, torch.Tensor]:
        """The processor's model inputs for ``processor_prompt`` text and one prepared image: ids with the
        image expanded, its pixels and per-token types; they hold the ids ``prompt_ids`` gives, expanded."""
        return dict(processor(text=[text], images=[image], return_tensors="pt"))

    def stop_token_ids(self, tokenizer, generation_config=None) -> list[int]:
        """Every id that ends the assistant's turn: the tokenizer's EOS and the generation config's
        list (chat models end a turn with a token of their own, e.g. ``<|im_end|>``); first = primary."""
        ids = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
        configured = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
        for token in [configured] if isinstance(configured, int) else (configured or []):
            if int(token) not in ids:
                ids.append(int(token))
        if not ids:
            raise ValueError("the tokenizer and generation config name no end-of-sequence token")
        return ids

    # ---- images ----
    def prepare_images(self, processor, images: Sequence[Image.Image]) -> list[Image.Image]:
        """RGB images ready for the processor's image processor."""
        return [im.convert("RGB") for im in images]

    def encode_images(self, model, processor, images: Sequence[Image.Image], *, device: torch.device,
                      batch_size: int) -> list[VisualTokens]:
        """Post-projector visual tokens per image, on the CPU (``model``: the transformers model)."""
        raise NotImplementedError

    def vision_only_config(self, config):
        """``config`` with a zero-layer language model: loading it reads the vision side only."""
        config.get_text_config().num_hidden_layers = 0
        return config

    # ---- attention ----
    # How an image's tokens attend to each other: "causal" like text (LLaVA, Qwen), or "bidirectional"
    # among the tokens of one image (Gemma 3: the transformers backend then passes token_type_ids, the
    # image's rows marked 1, whole or dropped).
    image_attention: Literal["causal", "bidirectional"] = "causal"

    # ---- positions ----
    def position_ids(self, ids: Sequence[int], image_token_id: int, visual: VisualTokens) -> torch.Tensor | None:
        """``long[P, L]`` positions of the prompt ``ids`` with the placeholder expanded to ``visual``
        (P = 3 for M-RoPE), or None for plain positions ``0..L-1``. The token after them takes
        ``max + 1``."""
        return None

    # ---- vLLM ----
    vllm_architecture: str | None = None  # an out-of-tree model class to serve this family (hf_overrides)

    def vllm_image(self, visual: VisualTokens):
        """What ``multi_modal_data["image"]`` carries for ``visual``."""
        return visual.embeds.unsqueeze(0)

    def cache_key(self, visual: VisualTokens) -> str:
        """A key that differs whenever the engine would see other image input (content, layout, positions)."""
        digest = hashlib.blake2b(visual.embeds.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(),
                                 digest_size=16)
        if visual.index is not None:
            digest.update(visual.index.to(torch.int64).numpy().tobytes())
        return f"{digest.hexdigest()}-{tuple(visual.embeds.shape)}-{visual.grid}"


@dataclass(frozen=True)
class UnsupportedModel(ValueError):
    """A checkpoint whose architecture no family serves."""

    model_path: str
    model_type: str | None

    def __str__(self) -> str:
        from . import FAMILY_MODEL_TYPES

        supported = ", ".join(f"{family} ({', '.join(types)})" for family, types in FAMILY_MODEL_TYPES.items())
        return (f"{self.model_path}: model_type {self.model_type!r} is not a supported model family; "
                f"supported: {supported}")
