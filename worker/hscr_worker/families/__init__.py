"""Model families: what differs between Med-VLM architectures, one module each (see ``base``).

``resolve_profile`` picks the family for a checkpoint from its ``config.json`` (``model_type``), or
takes the one named with ``--profile``; an architecture no family serves is refused with the list of
those supported. Adding a family (InternVL3, Qwen3-VL) means one module here and its fixture.
"""

from __future__ import annotations

from pathlib import Path

from . import gemma3, llava, qwen2_vl
from .base import ModelFamily, UnsupportedModel

PROFILES: dict[str, ModelFamily] = {**llava.PROFILES, **qwen2_vl.PROFILES, **gemma3.PROFILES}
FAMILY_MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "llava (profiles fixture, llava-1.5, llava-med)": ("llava",),
    "qwen2-vl": ("qwen2_vl",),
    "qwen2.5-vl": ("qwen2_5_vl",),
    "gemma3 (MedGemma)": ("gemma3",),
}
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")

__all__ = ["PROFILES", "ModelFamily", "UnsupportedModel", "check_processor_files", "resolve_profile"]


def resolve_profile(name: str | None, model_path: str, processor=None, *, config=None) -> ModelFamily:
    """The named profile, or the one detected from the checkpoint's config (and, for LLaVA, its path
    and processor); bound to the processor when one is given."""
    model_type = getattr(config, "model_type", None)
    if name is not None:
        try:
            family = PROFILES[name]
        except KeyError:
            raise ValueError(f"unknown model profile {name!r}; use one of {sorted(PROFILES)}") from None
        if model_type is not None and model_type not in family.model_types:
            raise ValueError(f"profile {name!r} serves model_type {'/'.join(family.model_types)}, but "
                             f"{model_path} is {model_type!r}; drop --profile to detect it")
    elif model_type is None or model_type in llava.LlavaFamily.model_types:
        family = llava.detect(model_path, processor)
    else:
        family = next((f for f in PROFILES.values() if model_type in f.model_types), None)
        if family is None:
            raise UnsupportedModel(str(model_path), model_type)
    return family.bind(processor) if processor is not None else family


def check_processor_files(model_path: str, family: ModelFamily) -> None:
    """A local checkpoint must carry its processor and tokenizer: name the missing file, not a traceback."""
    path = Path(model_path)
    if not path.is_dir():
        return  # a hub id: the hub's own errors say what is missing
    for wanted in (PROCESSOR_FILES, TOKENIZER_FILES):
        if not any((path / f).is_file() for f in wanted):
            raise FileNotFoundError(f"{model_path} has no {' or '.join(wanted)}: a {family.family} checkpoint "
                                    f"needs its processor and tokenizer files beside config.json (copy them from "
                                    f"the published model)")
