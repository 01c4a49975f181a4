"""The backend contract: what HSCR needs from a model server, and nothing more.

A backend encodes images into post-projector visual tokens, generates greedily (optionally with a
``ForcedDecoder`` per request), and scores a given response under given visual tokens. The HSCR
pipeline (``hscr_worker.pipeline``) and the pure core never touch a model directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from PIL import Image

from hscr_worker.core.replace import ForcedDecoder

# What score rows (``score``, and the decode rows of ``GenerateRequest.return_logits``) hold: raw
# ``logits``, or ``logprobs`` normalised over the whole vocabulary (exact even where a row carries
# only the top-k tokens and -inf elsewhere, which raw logits cannot be normalised from).
ScoreValues = Literal["logits", "logprobs"]


class BackendDead(RuntimeError):
    """The model server behind a backend has died (vLLM's ``EngineDeadError``: a CUDA fault or OOM in the
    engine process). Every later call would fail too: the process must restart to serve again."""


@dataclass
class GenerateRequest:
    """One greedy decode. With ``response_prefix`` the response is taken to start with those tokens:
    they are fed after the prompt (no decode step), decoding continues from there for up to
    ``max_new_tokens`` more, and the result includes the prefix. A ``forced`` decoder must carry
    the same ``response_prefix`` (it counts steps from the start of the response)."""

    prompt_ids: list[int]  # holds exactly one image placeholder token
    visual: torch.Tensor  # [n_visual, hidden]: the placeholder expands to these rows
    max_new_tokens: int
    forced: ForcedDecoder | None = None
    response_prefix: list[int] = field(default_factory=list)
    # With ``return_logits`` the backend also fills ``logits``: the score rows ``float[T, V]`` (raw
    # logits, or log-probabilities: ``Backend.score_values``) of the T decode steps that produced the
    # response, row t predicting response token t. That is what ``Backend.score`` would return for
    # the response under the same image, without a second pass.
    return_logits: bool = False
    logits: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.forced is not None and list(self.forced.response_prefix) != list(self.response_prefix):
            raise ValueError("the forced decoder's response_prefix differs from the request's")
        if self.return_logits and (self.forced is not None or self.response_prefix):
            raise ValueError("return_logits is for plain greedy decodes (no forcing, no response prefix)")


@dataclass
class ScoreRequest:
    prompt_ids: list[int]
    visual: torch.Tensor
    response_ids: list[int]


class Backend(ABC):
    """A Med-VLM as HSCR sees it. Implementations: ``transformers`` (reference), ``vllm``."""

    name: str
    model_path: str
    eos_token_id: int
    special_token_ids: frozenset[int]
    # True when requests of any length share engine steps without padding (vLLM's scheduler):
    # then ``run_hscr_stream`` overlaps one batch's re-decode with the next batch's own answers.
    continuous_batching: bool = False
    # Prompt (visual tokens expanded) plus response must fit in this many tokens; None: no limit known.
    max_context_tokens: int | None = None
    score_values: ScoreValues = "logits"
    # Tokens per score row when rows hold only the top-k of the vocabulary (-inf elsewhere); None: dense.
    score_top_k: int | None = None
    # The prompt's image placeholder: a response holding it cannot be scored (the prompt + response would
    # hold two images).
    image_token_id: int | None = None

    @abstractmethod
    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the chat prompt for ``question`` with one image placeholder."""

    @abstractmethod
    def encode_images(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """Post-projector visual tokens per image, each ``float[n_visual, hidden]`` on the CPU."""

    @abstractmethod
    def generate(self, requests: Sequence[GenerateRequest]) -> list[list[int]]:
        """Greedy responses (without the end-of-sequence token, each starting with its request's
        ``response_prefix``), batched; fills ``request.logits`` where ``return_logits`` is set."""

    @abstractmethod
    def score(self, requests: Sequence[ScoreRequest]) -> list[torch.Tensor]:
        """Teacher-forced logits ``float[T, V]`` per request: row t predicts response token t."""

    @abstractmethod
    def encode_text(self, text: str) -> list[int]:
        """Token ids of a response text (no special tokens)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of response token ids (special tokens skipped)."""


class ProcessorBackend(Backend):
    """A backend whose text side is a Hugging Face processor plus a model profile (both backends)."""

    processor: object
    tokenizer: object
    profile: object
    image_token_id: int

    def prompt_ids(self, question: str) -> list[int]:
        return self.profile.prompt_ids(self.processor, question, self.image_token_id)

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()
