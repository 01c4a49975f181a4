"""``hscr generate``: items JSONL -> HSCR preference dataset (local directory or S3)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hscr_client import HSCRParams, schema
from hscr_client._models import json_type
from hscr_client.items import parse_items_lines
from hscr_client.manifest import finalize
from hscr_client.storage import open_location

from .backends.base import Backend
from .dataset import iter_chunks, model_digest, write_chunk
from .fixture import DEFAULT_MODEL  # noqa: F401  (re-exported: the default model)
from .images import ImageError, ImageLimits, load_image
from .pipeline import PreparedItem, run_hscr_stream
from .similarity import get_similarity

MAX_QUESTION_CHARS = 4000


@dataclass
class ItemError:
    custom_id: str
    error: str

    def as_dict(self) -> dict:
        return {"custom_id": self.custom_id, "error": self.error}


def read_items(path: str) -> tuple[list[dict], list[ItemError]]:
    """Parse an items JSONL file; a malformed line becomes an error of its own, never fatal."""
    with open(path, "rb") as f:
        parsed = parse_items_lines(f)
    failed = [item for item in parsed if item.keys() == {"custom_id", "error"}]  # the parser's error rows
    items = [item for item in parsed if item.keys() != {"custom_id", "error"}]
    return items, [ItemError(item["custom_id"], item["error"]) for item in failed]


def prepare(item: dict, *, base_dir: str | None, limits: ImageLimits) -> PreparedItem:
    """Validate one item and load its image; raises ValueError/ImageError with a user-facing reason."""
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id.strip():
        raise ValueError("custom_id must be a non-empty string")
    question = item.get("question")
    if question is None:
        raise ValueError("question is missing: every item needs a question")
    if not isinstance(question, str):
        raise ValueError(f"question must be a string, not {json_type(question)}")
    question = question.replace(schema.IMAGE_MARKER, "")  # the image has its own place in the prompt
    if not question.strip():
        raise ValueError("question is empty: every item needs a question")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"question has {len(question)} characters; the limit is {MAX_QUESTION_CHARS}")
    answer = item.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise ValueError(f"answer, when given, must be a string, not {json_type(answer)}")
    if answer is not None and not answer.strip():
        raise ValueError("answer, when given, must not be empty")
    image = item.get("image", item.get("images"))
    if isinstance(image, list) and len(image) == 1:  # TRL's "images" list of one
        image = image[0]
    if isinstance(image, list):
        raise ValueError(f"the item has {len(image)} images; one image per item is the contract (split it into "
                         f"one item per image)")
    image = load_image(image, base_dir=base_dir, limits=limits)
    return PreparedItem(custom_id=custom_id, question=question.strip(), image=image,
                        preferred=answer.strip() if answer else None)


def prepare_all(items: Sequence[dict], *, base_dir: str | None, limits: ImageLimits = ImageLimits(),
                seen: set[str] | None = None) -> tuple[list[PreparedItem], list[ItemError]]:
    """Prepare ``items``; ``seen`` holds the custom_ids met so far (pass one set across the chunks of a
    file, so a duplicate in a later chunk is caught too)."""
    prepared, errors = [], []
    seen = set() if seen is None else seen
    for item in items:
        custom_id = str(item.get("custom_id"))
        try:
            if custom_id in seen:
                raise ValueError(f"duplicate custom_id {custom_id!r}")
            prepared.append(prepare(item, base_dir=base_dir, limits=limits))
            seen.add(custom_id)
        except (ValueError, ImageError) as exc:
            errors.append(ItemError(custom_id, str(exc)))
    return prepared, errors


def backend_options(name: str, *, device: str | None = None, profile: str | None = None,
                    score_values: str | None = None, score_top_k: int | None = None,
                    gpu_memory_utilization: float | None = None, max_model_len: int | None = None,
                    min_pixels: int | None = None, max_pixels: int | None = None) -> dict:
    """``load_backend`` keywords from command-line settings (None: not given); ValueError for one
    the backend does not have."""
    if name != "vllm" and (score_values or score_top_k):
        raise ValueError("only the vllm backend has top-k score rows (--score-values, --score-top-k)")
    if name != "vllm" and (gpu_memory_utilization or max_model_len):
        raise ValueError("--gpu-memory-utilization and --max-model-len are vLLM engine settings (--backend vllm)")
    # vLLM places its engine on the GPUs CUDA_VISIBLE_DEVICES shows; the device there is the vision tower's.
    given = {"device": device if name == "transformers" else None,
             "vision_device": device if name == "vllm" else None, "profile": profile,
             "score_values": score_values, "score_top_k": score_top_k,
             "gpu_memory_utilization": gpu_memory_utilization, "max_model_len": max_model_len,
             "min_pixels": min_pixels, "max_pixels": max_pixels}
    return {key: value for key, value in given.items() if value}


def model_info(backend: Backend) -> dict:
    """What a dataset's manifest records of the model: path, backend, weight hash, and the family and
    profile (a backend without a family records none)."""
    profile = getattr(backend, "profile", None)
    family = {"family": profile.family, "profile": profile.name} if profile is not None else {}
    return {"path": backend.model_path, "backend": backend.name, "sha256": model_digest(backend.model_path), **family}


def load_backend(name: str, model: str, **options) -> Backend:
    if name == "transformers":
        from .backends.transformers import TransformersBackend

        return TransformersBackend(model, **options)
    if name == "vllm":
        from .backends.vllm import VLLMBackend

        return VLLMBackend(model, **options)
    raise ValueError(f"unknown backend {name!r}; use 'transformers' or 'vllm'")


def generate_dataset(backend: Backend, items_path: str, output: str, params: HSCRParams, *,
                     chunk_size: int = 32, progress: Callable[[int], None] | None = None) -> dict:
    """Run HSCR over every item of ``items_path`` and write the dataset to ``output``."""
    raw, parse_errors = read_items(items_path)
    base_dir = os.path.dirname(os.path.abspath(items_path))
    location = open_location(output)
    similarity = get_similarity(params.similarity)
    pending_errors = [e.as_dict() for e in parse_errors]
    seen: set[str] = set()

    def prepared_chunks():
        for chunk, batch in iter_chunks(raw, chunk_size):
            prepared, errors = prepare_all(batch, base_dir=base_dir, seen=seen)
            yield (chunk, len(batch), errors), prepared

    # On vLLM, chunk k's re-decode shares engine steps with chunk k+1's own answers (run_hscr_stream).
    for (chunk, n_items, errors), results in run_hscr_stream(backend, prepared_chunks(), params, similarity):
        write_chunk(location, chunk, results, pending_errors + [e.as_dict() for e in errors])
        pending_errors = []
        if progress:
            progress(n_items)
    if pending_errors:  # every line was malformed: still record them
        write_chunk(location, 0, [], pending_errors)
    return finalize(location, params=params.model_dump(), model=model_info(backend),
                    extra={"input": os.path.basename(items_path)})
