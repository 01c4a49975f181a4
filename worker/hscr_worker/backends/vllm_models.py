"""Out-of-tree vLLM models for HSCR: Qwen2-VL, Qwen2.5-VL and Gemma 3 fed visual tokens the worker computed.

Gemma 3 (MedGemma; ``HSCRGemma3ForConditionalGeneration``): vLLM 0.32's ``gemma3_mm`` refuses
precomputed embeddings (``assert image_embeds is None``) and expands ``<start_of_image>`` to the
processor's full 256-token sequence. The subclass takes ``image_embeds`` (``float[1, n, hidden]``, any
``n``: a removed image has fewer rows) and expands the prompt's single ``<image_soft_token>`` (which the
worker writes between ``<start_of_image>`` and ``<end_of_image>``, as transformers' processor does) to
exactly ``n`` soft tokens. Pixel input (vLLM's own profiling run) stays the stock model's. Where the
attention backend supports it (vLLM's ``mm_prefix``, GPU) the soft tokens attend to each other
bidirectionally; vLLM 0.32's CPU attention treats them causally.

Qwen:

The worker runs the vision tower itself and hands vLLM post-projector embeddings. After ``remove``-
mode dropout an image has fewer tokens than its grid, and each survivor must keep the M-RoPE
position it has in the full image (``hscr_worker.families.qwen2_vl.mrope_positions``, the rule the
transformers backend uses too). vLLM 0.32's Qwen models size the placeholder range, split the
embeddings and place every token by the grid alone, so these subclasses add one optional field.

``multi_modal_data["image"]`` (``qwen_image_data``)::

    {"image_embeds": float[n, hidden],        # the tokens present, in the image's token order
     "image_grid_thw": long[1, 3],            # (t, h, w) in patches of the FULL image
     "image_token_index": long[1, n]}         # which merged tokens of the full image they are
                                              # (row-major over the merged grid); only when dropped

With ``image_token_index`` the single ``<|image_pad|>`` of the prompt expands to ``n`` positions
(not ``t*h*w/merge**2``), the embeddings split per image by ``n``, and ``get_mrope_input_positions``
places token ``k`` at the full-image position of ``index[k]`` and the text after the image where it is
under the full image. Without it (a full image, or ``zero``-mode dropout) every step is the stock
model's. The index is per image (a ``batched`` field, one row per image, ``keep_on_cpu``): the
positions are computed from the request's CPU-side features, and vLLM strips every field that is not
``keep_on_cpu`` from an image whose placeholder range the prefix cache already covers, while it
still asks the model for the request's positions.

Registration: ``register_models()`` registers both classes with ``vllm.ModelRegistry``; the vLLM
backend calls it and selects the class with ``hf_overrides={"architectures": [...]}``. An engine in a
process of its own (vLLM's default on a GPU; spawned, it starts with a fresh registry) knows them
through the ``vllm.general_plugins`` entry point ``hscr_models`` (``worker/pyproject.toml``), which
vLLM runs in each of its processes.

Caching: the embeddings reach vLLM as pass-through data, which vLLM's multimodal processor cache
never stores; the encoder cache and the prefix cache key an image by its ``multi_modal_uuids``
entry (the family's ``cache_key``: content, grid and index). Without a uuid vLLM hashes the parsed
item, which includes the index here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from hscr_worker._compat import ensure_torchvision_importable

ensure_torchvision_importable()

import torch  # noqa: E402
from vllm.model_executor.models.gemma3_mm import (  # noqa: E402
    Gemma3DummyInputsBuilder,
    Gemma3ForConditionalGeneration,
    Gemma3MultiModalProcessor,
    Gemma3ProcessingInfo,
)
from vllm.model_executor.models.qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (  # noqa: E402
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalDataParser,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
    _create_qwen2vl_field_factory,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.inputs import MultiModalFieldConfig  # noqa: E402
from vllm.multimodal.parse import DictEmbeddingItems, ImageEmbeddingItems  # noqa: E402
from vllm.multimodal.processing.processor import PromptReplacement  # noqa: E402

from hscr_worker.families.qwen2_vl import mrope_positions  # noqa: E402

from .base import VisualTokens  # noqa: E402

INDEX_KEY = "image_token_index"  # long[num_images, n]: the kept merged tokens of each full image


def qwen_image_data(visual: VisualTokens) -> dict[str, torch.Tensor]:
    """``multi_modal_data["image"]`` for one image's visual tokens (the HSCR Qwen classes)."""
    if visual.grid is None:
        raise ValueError("Qwen visual tokens need their image grid (image_grid_thw)")
    data = {"image_embeds": visual.embeds,
            "image_grid_thw": torch.tensor([list(visual.grid)], dtype=torch.long)}
    if visual.index is not None:
        data[INDEX_KEY] = visual.index.to(torch.long).reshape(1, -1)
    return data


# ---- fields: how an item's tensors split and batch ----
def _kept_index_fields(hf_inputs: Mapping[str, torch.Tensor], merge: int) -> dict[str, MultiModalFieldConfig]:
    """The field configs that differ from the stock ones (the index's, and with an index the
    embeddings' sizes), after checking the index against the grid and the embeddings."""
    fields = {INDEX_KEY: MultiModalFieldConfig.batched("image", keep_on_cpu=True)}
    index = hf_inputs.get(INDEX_KEY)
    if index is None:
        return fields
    grid = hf_inputs.get("image_grid_thw")
    if "image_embeds" not in hf_inputs or grid is None:
        raise ValueError(f"{INDEX_KEY} goes with image_embeds and image_grid_thw (precomputed visual tokens)")
    if not isinstance(index, torch.Tensor) or index.ndim != 2 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{INDEX_KEY} must be an integer tensor [num_images, n], got "
                         f"{getattr(index, 'shape', type(index).__name__)}")
    grid = torch.as_tensor(grid).reshape(-1, 3)
    if index.shape[0] != grid.shape[0]:
        raise ValueError(f"{INDEX_KEY} has {index.shape[0]} rows for {grid.shape[0]} images")
    for row, (t, h, w) in zip(index, grid.tolist(), strict=True):
        full = t * h * w // (merge * merge)
        if t != 1 or row.numel() == 0 or int(row.min()) < 0 or int(row.max()) >= full \
                or row.unique().numel() != row.numel():
            raise ValueError(f"{INDEX_KEY} must hold distinct merged-token indices in [0, {full}) of a "
                             f"one-frame image grid {(t, h, w)}, at least one")
    sizes = torch.full((index.shape[0],), index.shape[1], dtype=torch.long)
    if int(sizes.sum()) != len(hf_inputs["image_embeds"]):
        raise ValueError(f"image_embeds has {len(hf_inputs['image_embeds'])} rows, {INDEX_KEY} names "
                         f"{int(sizes.sum())}")
    fields["image_embeds"] = MultiModalFieldConfig.flat_from_sizes("image", sizes)
    return fields


class HSCRQwenDataParser(Qwen2VLMultiModalDataParser):
    """Accepts ``image_token_index`` beside Qwen's ``image_embeds``/``image_grid_thw``."""

    def _parse_image_data(self, data):
        if isinstance(data, dict):
            merge = self._spatial_merge_size
            required, optional = self.embedding_field_sets("image")
            return DictEmbeddingItems(
                data, modality="image", required_fields=required, optional_fields={*optional, INDEX_KEY},
                fields_factory=lambda d: {**_create_qwen2vl_field_factory(merge)(d), **_kept_index_fields(d, merge)},
            )
        return super()._parse_image_data(data)


class HSCRQwen2VLProcessingInfo(Qwen2VLProcessingInfo):
    def get_data_parser(self):  # Qwen2VLProcessingInfo's, with the parser above
        return HSCRQwenDataParser(
            self.get_hf_config().vision_config.spatial_merge_size,
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )


class HSCRQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    def get_data_parser(self):  # Qwen2_5_VLProcessingInfo's, with the parser above
        return HSCRQwenDataParser(
            self.get_hf_config().vision_config.spatial_merge_size,
            video_needs_metadata=True,
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )


class _KeptTokensProcessor:
    """Multimodal-processor mixin: the index's field config, and ``n`` placeholder positions for an
    image carrying an index (the stock replacement cut to ``n``; videos and full images untouched)."""

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        return {**super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
                **_kept_index_fields(hf_inputs, merge)}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        return [dataclasses.replace(u, replacement=_kept_replacement(u.replacement, out_mm_kwargs))
                if u.modality == "image" else u for u in updates]


def _kept_replacement(stock, out_mm_kwargs):
    def replacement(item_idx: int):
        tokens = stock(item_idx)  # the full image's placeholder run
        item = out_mm_kwargs["image"][item_idx]
        if INDEX_KEY not in item:
            return tokens
        return list(tokens)[: item[INDEX_KEY].data.numel()]

    return replacement


class HSCRQwen2VLMultiModalProcessor(_KeptTokensProcessor, Qwen2VLMultiModalProcessor):
    pass


class HSCRQwen2_5_VLMultiModalProcessor(_KeptTokensProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


# ---- the models ----
def _kept_index(feature) -> torch.Tensor | None:
    data = feature.data
    elem = data.get(INDEX_KEY) if data is not None else None
    return None if elem is None else elem.data.reshape(-1)


class _KeptTokensModel:
    """Model mixin: embeddings split by the kept counts, and M-RoPE positions by ``mrope_positions``."""

    def _parse_and_validate_image_input(self, **kwargs: object):
        image_input = super()._parse_and_validate_image_input(**kwargs)
        index = kwargs.get(INDEX_KEY)
        if image_input is not None and index is not None and image_input["type"] == "image_embeds":
            # one row per image (stacked [k, n], or a list of [n_i] when the counts differ)
            image_input.hscr_sizes = [int(row.numel()) for row in index]
        return image_input

    def _process_image_input(self, image_input) -> tuple[torch.Tensor, ...]:
        sizes = image_input.get("hscr_sizes")
        if sizes is None:
            return super()._process_image_input(image_input)
        if getattr(self, "is_multimodal_pruning_enabled", False):
            raise ValueError(f"{INDEX_KEY} cannot be combined with multimodal pruning (video_pruning_rate)")
        embeds = image_input["image_embeds"].type(self.visual.dtype)
        if sum(sizes) != embeds.shape[0]:
            raise ValueError(f"{embeds.shape[0]} image_embeds rows for kept-token counts {sizes}")
        return embeds.split(sizes)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        if any(f.modality != "image" for f in features):
            if any(_kept_index(f) is not None for f in features):
                raise NotImplementedError(f"{INDEX_KEY} beside a video in one prompt")
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size
        pieces, cursor, start = [], 0, 0  # cursor: next token; start: the position text resumes at
        for k, feature in enumerate(features):
            offset, length = feature.mm_position.offset, feature.mm_position.length
            until = features[k + 1].mm_position.offset if k + 1 < len(features) else len(input_tokens)
            grid = feature.data["image_grid_thw"].data.tolist()
            n_before, n_after = offset - cursor, until - offset - length
            if n_before < 0 or n_after < 0:
                raise ValueError(f"image placeholder ranges overlap or overrun the {len(input_tokens)} tokens")
            # the text up to the next image, plus one token more: where text resumes after that
            positions = mrope_positions(n_before, n_after + 1, grid, merge, _kept_index(feature)) + start
            n_visual = positions.shape[1] - n_before - n_after - 1
            if n_visual != length:
                raise ValueError(f"the image at token {offset} has {length} placeholder positions, but its grid "
                                 f"{tuple(grid)} and {INDEX_KEY} give {n_visual} tokens")
            pieces.append(positions[:, :-1])
            cursor, start = until, int(positions[0, -1])
        if not features:
            pieces.append(torch.arange(len(input_tokens)).expand(3, -1))
            start = len(input_tokens)
        # positions past the prompt (decoding) are sequence index + delta
        return torch.cat(pieces, dim=1), start - len(input_tokens)


@MULTIMODAL_REGISTRY.register_processor(HSCRQwen2VLMultiModalProcessor, info=HSCRQwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class HSCRQwen2VLForConditionalGeneration(_KeptTokensModel, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL, taking kept visual tokens (``image_token_index``) at their full-image positions."""


@MULTIMODAL_REGISTRY.register_processor(HSCRQwen2_5_VLMultiModalProcessor, info=HSCRQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class HSCRQwen2_5_VLForConditionalGeneration(_KeptTokensModel, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL, taking kept visual tokens (``image_token_index``) at their full-image positions."""


# ---- Gemma 3 ----
class HSCRGemma3MultiModalProcessor(Gemma3MultiModalProcessor):
    """Gemma 3's processor, taking ``image_embeds``: the prompt's one ``<image_soft_token>`` becomes ``n`` of
    them (the stock processor would put a full ``\n\n<start_of_image>`` + 256 soft tokens +
    ``<end_of_image>\n\n`` sequence at ``<start_of_image>``, and only for pixels)."""

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        return {**super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
                "image_embeds": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        images = mm_items.get("image") if "image" in mm_items else None
        if not isinstance(images, ImageEmbeddingItems):
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        soft_token = int(self.info.get_hf_config().image_token_index)
        return [PromptReplacement(modality="image", target=[soft_token],
                                  replacement=lambda item_idx: [soft_token] * images.get_feature_size(item_idx))]


@MULTIMODAL_REGISTRY.register_processor(HSCRGemma3MultiModalProcessor, info=Gemma3ProcessingInfo,
                                        dummy_inputs=Gemma3DummyInputsBuilder)
class HSCRGemma3ForConditionalGeneration(Gemma3ForConditionalGeneration):
    """vLLM's Gemma 3, taking post-projector ``image_embeds`` (one ``[n, hidden]`` tensor per image)."""

    def _parse_and_validate_image_input(self, **kwargs: object):
        embeds = kwargs.pop("image_embeds", None)
        if embeds is None:
            return super()._parse_and_validate_image_input(**kwargs)
        if kwargs.get("pixel_values") is not None:
            raise ValueError("one request carries pixel_values and image_embeds")
        rows = list(embeds) if isinstance(embeds, (list, tuple)) else list(embeds.unbind(0))
        hidden = self.config.text_config.hidden_size
        if any(r.ndim != 2 or r.shape[-1] != hidden for r in rows):
            raise ValueError(f"Gemma 3 image_embeds must be [n, {hidden}] per image, got "
                             f"{[tuple(r.shape) for r in rows]}")
        return {"type": "image_embeds", "data": rows}

    def _process_image_input(self, image_input) -> list[torch.Tensor]:
        if isinstance(image_input, dict) and image_input.get("type") == "image_embeds":
            return [r.to(self.dtype) for r in image_input["data"]]
        return super()._process_image_input(image_input)


ARCHITECTURES: dict[str, type] = {cls.__name__: cls for cls in (HSCRQwen2VLForConditionalGeneration,
                                                                 HSCRQwen2_5_VLForConditionalGeneration,
                                                                 HSCRGemma3ForConditionalGeneration)}


def register_models() -> None:
    """Register the HSCR architectures with vLLM (idempotent; also the ``vllm.general_plugins`` hook).

    By class, not by ``"module:class"`` name: this module is imported by then anyway, and a class is
    inspected in-process, where a name costs a fresh interpreter importing vLLM (tens of seconds on a
    CPU machine) whenever this file changes (vLLM caches the inspection by the module's hash).
    """
    from vllm import ModelRegistry

    for arch, cls in ARCHITECTURES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, cls)


__all__ = ["ARCHITECTURES", "INDEX_KEY", "HSCRGemma3ForConditionalGeneration", "HSCRQwen2VLForConditionalGeneration",
           "HSCRQwen2_5_VLForConditionalGeneration", "qwen_image_data", "register_models"]
