"""Convert an original LLaVA-repo checkpoint (LLaVA-Med v1.5, LLaVA-1.5) to the Hugging Face LLaVA format, offline.

The LLaVA code base (and LLaVA-Med's fork of it) saves ``LlavaMistralForCausalLM`` /
``LlavaLlamaForCausalLM``: the language model under ``model.*``, the projector as
``model.mm_projector.{0,2}``, and a config that only *names* the CLIP vision tower
(``mm_vision_tower``), which LLaVA loads separately at run time. Both backends here read the HF
``LlavaForConditionalGeneration`` format instead. transformers' own conversion script downloads
the text and vision models from the hub and pushes the result back there; this one reads local
directories only, so it runs on an air-gapped GPU host.

What it does, and why each step matches the original model's behaviour:

- text config: the original config minus LLaVA's ``mm_*`` and training keys, as a ``mistral`` or
  ``llama`` config;
- vision: the CLIP checkpoint that ``mm_vision_tower`` names, given as a local directory (its
  ``vision_model.*`` weights, config and image processor), which is what LLaVA loads at run time;
- ``mm_vision_select_layer`` -> ``vision_feature_layer``; ``mm_vision_select_feature`` ``patch``
  -> ``default`` (drop CLS), ``cls_patch`` -> ``full``; ``mlp2x_gelu`` -> the HF two-layer GELU
  projector;
- tokenizer: ``<image>`` (and ``<pad>`` when there is none) appended as special tokens. Their new
  embedding and output rows are the mean of the existing rows (deterministic; transformers' script
  samples around the same mean). ``<image>`` positions are replaced by image features, so its
  input row is never used; both new tokens are special, so HSCR never picks them as candidates;
- weights: streamed one source shard at a time (a 7B fp16 checkpoint needs about one shard of
  memory, not 14 GB), written as safetensors with an index, in the key layout of the
  ``llava-hf`` checkpoints (``language_model.model.*``, ``vision_tower.vision_model.*``,
  ``multi_modal_projector.linear_{1,2}``), which transformers 5 and vLLM 0.32 both load.

Image preprocessing is not part of the HF format: LLaVA-Med's ``image_aspect_ratio="pad"`` is the
``llava-med`` model profile (``--profile llava-med``, or a model path that mentions llava-med).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hscr_worker._compat import ensure_torchvision_importable

EMBEDDINGS, LM_HEAD = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
TEXT_MODEL_TYPES = {"llava_mistral": "mistral", "llava_llama": "llama", "llava": "llama"}
# Keys of a LLaVA config that describe the vision side or training, not the language model.
LLAVA_ONLY_KEYS = {
    "architectures", "model_type", "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length",
    "tokenizer_padding_side", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "use_mm_proj",
    "unfreeze_mm_vision_tower", "_name_or_path", "transformers_version", "image_crop_resolution",
    "image_split_resolution", "mm_patch_merge_type",
}
CLIP_TOWER_PARTS = {"embeddings", "encoder", "pre_layrnorm", "post_layernorm"}
CLIP_TEXT_SIDE = {"text_model", "text_projection", "visual_projection", "logit_scale"}
SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}


class ConversionError(ValueError):
    """The source checkpoint cannot be converted; the message says what to supply or change."""


@dataclass(frozen=True)
class ConversionReport:
    out_dir: Path
    text_model_type: str
    vocab_size: int
    image_token_id: int
    n_tensors: int
    skipped: dict[str, int]  # reason -> number of source tensors left out

    def summary(self) -> str:
        skipped = ", ".join(f"{n} tensors ({reason})" for reason, n in self.skipped.items() if n) or "nothing"
        return (f"wrote {self.out_dir}: {self.text_model_type} language model, vocabulary {self.vocab_size} "
                f"(<image> = {self.image_token_id}), {self.n_tensors} tensors; left out: {skipped}")


def map_language_key(key: str) -> str | None:
    """The HF LLaVA name of an original LLaVA tensor; None for tensors the HF model does not hold."""
    if key.endswith(".rotary_emb.inv_freq") or key == "model.image_newline":
        return None
    if key.startswith("model.vision_tower."):  # LLaVA reloads the tower from mm_vision_tower; so do we
        return None
    if match := re.fullmatch(r"model\.mm_projector\.([02])\.(weight|bias)", key):
        return f"multi_modal_projector.linear_{1 if match[1] == '0' else 2}.{match[2]}"
    if key == "lm_head.weight":
        return LM_HEAD
    if key.startswith("model."):
        return "language_model." + key
    raise ConversionError(f"unexpected tensor {key!r} in the LLaVA checkpoint (expected model.*, lm_head.weight)")


def map_vision_key(key: str) -> str | None:
    """The HF LLaVA name of a CLIP checkpoint tensor; None for the text side of a full CLIPModel.

    The hub's CLIP checkpoints hold ``vision_model.*`` (and ``text_model.*``); a CLIPVisionModel saved
    by transformers 5 holds the tower's keys bare (``embeddings.*``, ``encoder.*``, ...).
    """
    if key.endswith(".position_ids"):  # a buffer older CLIP checkpoints store; vLLM's loader rejects it
        return None
    if key.startswith("vision_model."):
        return "vision_tower." + key
    if key.split(".")[0] in CLIP_TOWER_PARTS:
        return "vision_tower.vision_model." + key
    if key.split(".")[0] in CLIP_TEXT_SIDE:
        return None
    raise ConversionError(f"unexpected tensor {key!r} in the CLIP checkpoint")


def _tensor_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"{directory} holds no *.safetensors or pytorch_model*.bin weights")
    return files


def _read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield key, f.get_tensor(key)
    else:  # weights_only: a pickled checkpoint never runs code here
        yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing") from None


def _vision_dir(source_config: dict, vision_tower: str | Path | None) -> Path:
    named = source_config.get("mm_vision_tower")
    candidate = Path(vision_tower) if vision_tower is not None else Path(named) if named else None
    if candidate is None or not candidate.is_dir():
        hint = f"its config names mm_vision_tower={named!r}; " if named else ""
        raise ConversionError(f"the LLaVA checkpoint needs its CLIP vision tower as a local directory: {hint}"
                              "download that model (config.json, preprocessor_config.json, weights) and pass "
                              "--vision-tower DIR")
    return candidate


def _check_supported(config: dict) -> None:
    if config.get("model_type") not in TEXT_MODEL_TYPES:
        raise ConversionError(f"model_type {config.get('model_type')!r} is not an original LLaVA checkpoint "
                              f"({', '.join(TEXT_MODEL_TYPES)}); an HF-format LLaVA directory needs no conversion")
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ConversionError(f"mm_projector_type {projector!r}: the HF LLaVA format holds the two-layer GELU "
                              "projector (mlp2x_gelu) only")
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise ConversionError("mm_use_im_start_end / mm_use_im_patch_token checkpoints wrap images in extra tokens, "
                              "which the HF LLaVA format cannot express")
    if str(config.get("image_aspect_ratio", "")).startswith("anyres") or \
            config.get("mm_patch_merge_type", "flat") != "flat":
        raise ConversionError("anyres / spatial patch merging (LLaVA-NeXT, v1.6) is a different architecture "
                              "(LlavaNext); this converter handles LLaVA-1.5-style checkpoints such as LLaVA-Med v1.5")
    if config.get("unfreeze_mm_vision_tower"):
        raise ConversionError("unfreeze_mm_vision_tower: the checkpoint fine-tuned its own vision tower, which "
                              "this converter does not take yet (it takes the CLIP directory's)")
    if config.get("mm_vision_select_feature", "patch") not in SELECT_STRATEGY:
        raise ConversionError(f"mm_vision_select_feature {config['mm_vision_select_feature']!r}: expected one of "
                              f"{sorted(SELECT_STRATEGY)}")


def convert_llava_checkpoint(source: str | Path, out_dir: str | Path, *, vision_tower: str | Path | None = None,
                             dtype: torch.dtype | None = None, shard_bytes: int = 5 << 30,
                             progress: bool = False) -> ConversionReport:
    """Convert ``source`` (an original LLaVA / LLaVA-Med directory) into ``out_dir`` (HF LLaVA format).

    ``vision_tower``: a local CLIP checkpoint directory; by default the config's ``mm_vision_tower``
    when that is a local directory. ``dtype``: cast floating-point weights (default: keep theirs).
    ``progress``: a progress bar over the weight files (a 7B takes minutes).
    """
    ensure_torchvision_importable()
    from transformers import AddedToken, AutoConfig, AutoTokenizer, CLIPVisionConfig, LlavaConfig

    source, out_dir = Path(source), Path(out_dir)
    config = _read_json(source / "config.json")
    _check_supported(config)
    vision_dir = _vision_dir(config, vision_tower)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConversionError(f"{out_dir} is not empty; choose a new output directory")

    # Tokenizer: <image> (and <pad>) as special tokens at the end of the vocabulary.
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    vision_config = CLIPVisionConfig.from_pretrained(vision_dir)
    text_type = TEXT_MODEL_TYPES[config["model_type"]]
    text_fields = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in LLAVA_ONLY_KEYS}
    if "torch_dtype" in text_fields:  # transformers 5's name
        text_fields["dtype"] = text_fields.pop("torch_dtype")
    vocab_size = max(int(config["vocab_size"]), len(tokenizer))
    text_fields["vocab_size"] = vocab_size
    text_fields["pad_token_id"] = tokenizer.pad_token_id
    text_config = AutoConfig.for_model(text_type, **text_fields)
    strategy = SELECT_STRATEGY[config.get("mm_vision_select_feature", "patch")]
    n_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    llava_config = LlavaConfig(
        text_config=text_config, vision_config=vision_config, image_token_index=image_token_id,
        vision_feature_layer=int(config.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=strategy, projector_hidden_act="gelu", multimodal_projector_bias=True,
        image_seq_length=n_patches + (strategy == "full"), tie_word_embeddings=bool(config.get("tie_word_embeddings")),
    )
    llava_config.pad_token_id = tokenizer.pad_token_id
    llava_config.architectures = ["LlavaForConditionalGeneration"]

    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _write(source, out_dir, vision_dir, tokenizer, llava_config, text_type, dtype, shard_bytes,
                      progress)
    except BaseException:  # nothing half-written that looks like a checkpoint
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        else:  # the user's (empty) directory stays
            for child in out_dir.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise


def _write(source: Path, out_dir: Path, vision_dir: Path, tokenizer, llava_config, text_type: str,
           dtype: torch.dtype | None, shard_bytes: int, progress: bool) -> ConversionReport:
    """Write the weights, the config and the processor (``convert_llava_checkpoint`` has checked the inputs)."""
    from tqdm import tqdm
    from transformers import CLIPImageProcessor, LlavaProcessor

    language_files, vision_files = _tensor_files(source), _tensor_files(vision_dir)
    bar = tqdm(total=len(language_files) + len(vision_files), unit="file", desc="convert-llava", disable=not progress)

    vocab_size = llava_config.text_config.vocab_size
    writer = _ShardWriter(out_dir, shard_bytes)
    # what was left out, by reason: LLaVA reloads the tower from the CLIP directory, so do we
    skipped = {"vision tower in the LLaVA checkpoint": 0, "unused": 0, "CLIP text side": 0}
    first_dtype = embeddings = None
    for path in language_files:
        for key, tensor in _read_tensors(path):
            name = map_language_key(key)
            if name is None:
                in_tower = key.startswith("model.vision_tower.")
                skipped["vision tower in the LLaVA checkpoint" if in_tower else "unused"] += 1
                continue
            if name in (EMBEDDINGS, LM_HEAD):
                tensor = _grow_rows(tensor, vocab_size)
                embeddings = tensor if name == EMBEDDINGS else embeddings
            first_dtype = first_dtype or tensor.dtype
            writer.add(name, _cast(tensor, dtype))
        bar.update(1)
    if LM_HEAD not in writer.names:
        if not llava_config.tie_word_embeddings or embeddings is None:
            raise ConversionError("the checkpoint has no lm_head.weight and its config does not tie it to the "
                                  "embeddings: is a weight shard missing?")
        writer.add(LM_HEAD, _cast(embeddings.clone(), dtype))  # tied: the HF checkpoint stores the head too
    for path in vision_files:
        for key, tensor in _read_tensors(path):
            name = map_vision_key(key)
            if name is None:
                skipped["unused" if key.endswith(".position_ids") else "CLIP text side"] += 1
                continue
            writer.add(name, _cast(tensor, dtype or first_dtype))
        bar.update(1)
    bar.close()
    writer.close()
    _check_complete(writer.names, llava_config)

    llava_config.dtype = dtype or first_dtype
    llava_config.save_pretrained(out_dir)
    image_processor = CLIPImageProcessor.from_pretrained(vision_dir)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=llava_config.vision_config.patch_size,
                               vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    processor.save_pretrained(out_dir)
    if (source / "generation_config.json").exists():
        shutil.copy(source / "generation_config.json", out_dir / "generation_config.json")
    return ConversionReport(out_dir, text_type, vocab_size, llava_config.image_token_index, len(writer.names),
                            skipped)


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` with rows appended up to ``rows``, each the mean of the existing rows."""
    if weight.shape[0] >= rows:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)], dim=0)


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _check_complete(names: set[str], config) -> None:
    """Every tensor the HF model needs is there (a wrong vision directory or a truncated checkpoint)."""
    text_layers, vision_layers = config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers
    required = [EMBEDDINGS, "language_model.model.norm.weight", LM_HEAD, "multi_modal_projector.linear_1.weight",
                "multi_modal_projector.linear_2.weight", "vision_tower.vision_model.embeddings.patch_embedding.weight"]
    required += [f"language_model.model.layers.{i}.self_attn.q_proj.weight" for i in range(text_layers)]
    required += [f"vision_tower.vision_model.encoder.layers.{i}.self_attn.q_proj.weight" for i in range(vision_layers)]
    missing = [name for name in required if name not in names]
    if missing:
        raise ConversionError(f"the converted checkpoint would lack {len(missing)} required tensors, "
                              f"e.g. {missing[:3]}")


class _ShardWriter:
    """Safetensors shards of at most ``shard_bytes`` each, plus ``model.safetensors.index.json``."""

    def __init__(self, out_dir: Path, shard_bytes: int):
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.names: set[str] = set()
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ConversionError(f"tensor {name!r} appears twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self._total_bytes += size
        self.names.add(name)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        index = len(self._shards)
        save_file(self._pending, self.out_dir / f"part-{index:05d}.safetensors", metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for index, names in enumerate(self._shards):  # the usual model-0000k-of-0000n names, now that n is known
            final = f"model-{index + 1:05d}-of-{n:05d}.safetensors"
            (self.out_dir / f"part-{index:05d}.safetensors").rename(self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index_json = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
