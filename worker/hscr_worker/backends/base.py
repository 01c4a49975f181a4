"""The backend contract: what HSCR needs from a model server, and nothing more.

A backend encodes images into post-projector visual tokens, generates greedily (optionally with a
``ForcedDecoder`` per request), and scores a given response under given visual tokens. The HSCR
pipeline (``hscr_worker.pipeline``) and the pure core never touch a model directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, Protocol

import torch
from PIL import Image

from hscr_client import HSCRParams
from hscr_worker.core.dropout import DropoutMode, apply_dropout
from hscr_worker.core.replace import ForcedDecoder

# What score rows (``score``, and the decode rows of ``GenerateRequest.return_logits``) hold: raw
# ``logits``, or ``logprobs`` normalised over the whole vocabulary (exact even where a row carries
# only the top-k tokens and -inf elsewhere, which raw logits cannot be normalised from).
ScoreValues = Literal["logits", "logprobs"]


class BackendDead(RuntimeError):
    """The model server behind a backend has died (vLLM's ``EngineDeadError``: a CUDA fault or OOM in the
    engine process). Every later call would fail too: the process must restart to serve again."""


@dataclass(frozen=True)
class VisualTokens:
    """One image as the language model receives it: post-projector visual tokens in the image's
    token order, with what the model's positional encoding needs to place them.

    ``grid`` is the family's layout of the full image's tokens (Qwen: ``image_grid_thw`` in patches);
    None for a flat sequence (LLaVA). ``index`` says which of the full image's tokens the rows are
    (remove-mode dropout keeps a subset; each keeps its place in the image); None: all, in order.
    """

    embeds: torch.Tensor  # float[n, hidden]
    grid: tuple[int, int, int] | None = None
    index: torch.Tensor | None = None  # long[n]

    @property
    def n_tokens(self) -> int:
        return int(self.embeds.shape[0])

    def dropped(self, keep: torch.Tensor, mode: DropoutMode) -> VisualTokens:
        """These tokens after dropout (``keep``: bool[n], True = keep), positions kept."""
        embeds = apply_dropout(self.embeds, keep, mode)
        if mode != "remove":
            return VisualTokens(embeds, self.grid, self.index)
        index = torch.arange(self.n_tokens) if self.index is None else self.index
        return VisualTokens(embeds, self.grid, index[keep])


def as_visual(visual: VisualTokens | torch.Tensor) -> VisualTokens:
    """A bare ``float[n, hidden]`` tensor is a flat sequence of visual tokens."""
    return visual if isinstance(visual, VisualTokens) else VisualTokens(visual)


@dataclass
class GenerateRequest:
    """One greedy decode. With ``response_prefix`` the response is taken to start with those tokens:
    they are fed after the prompt (no decode step), decoding continues from there for up to
    ``max_new_tokens`` more, and the result includes the prefix. A ``forced`` decoder must carry
    the same ``response_prefix`` (it counts steps from the start of the response)."""

    prompt_ids: list[int]  # holds exactly one image placeholder token
    visual: VisualTokens  # the placeholder expands to these rows (a bare tensor: a flat sequence)
    max_new_tokens: int
    forced: ForcedDecoder | None = None
    response_prefix: list[int] = field(default_factory=list)
    # With ``return_logits`` the backend also fills ``logits``: the score rows ``float[T, V]`` (raw
    # logits, or log-probabilities: ``Backend.score_values``) of the T decode steps that produced the
    # response, row t predicting response token t. That is what ``Backend.score`` would return for
    # the response under the same image, without a second pass.
    return_logits: bool = False
    logits: torch.Tensor | None = None
    # A request a ``DecodeWatch`` hands out before its caller knows it will want it: decoded only in a row no other
    # request waits for. Its caller clears the flag once it wants it, or sets ``withdrawn`` once it does not: the
    # backend stops decoding it then and does not ``follow`` it.
    speculative: bool = False
    withdrawn: bool = False

    def __post_init__(self) -> None:
        self.visual = as_visual(self.visual)
        if self.forced is not None and list(self.forced.response_prefix) != list(self.response_prefix):
            raise ValueError("the forced decoder's response_prefix differs from the request's")
        if self.return_logits and (self.forced is not None or self.response_prefix):
            raise ValueError("return_logits is for plain greedy decodes (no forcing, no response prefix)")


@dataclass
class ScoreRequest:
    prompt_ids: list[int]
    visual: VisualTokens
    response_ids: list[int]

    def __post_init__(self) -> None:
        self.visual = as_visual(self.visual)


@dataclass
class BackendStats:
    """What a backend's engine computed, in tokens: for benchmarks and the prefix-cache hit rate."""

    prefill_tokens: int = 0  # prompt, image and response-prefix tokens run through the model (not from a cache)
    reused_prefill_tokens: int = 0  # such tokens taken from a cache instead (a prefix cache hit)
    decoded_tokens: int = 0  # decode steps, one token each
    withdrawn_tokens: int = 0  # of those, decoded for speculative requests withdrawn before they finished
    scored_tokens: int = 0  # tokens run through the model by ``score`` (teacher forcing)

    @property
    def prefix_hit_rate(self) -> float:
        total = self.prefill_tokens + self.reused_prefill_tokens
        return self.reused_prefill_tokens / total if total else 0.0


class DecodeWatch(Protocol):
    """Watches one request's decode (``Backend.generate_chained``'s ``successor``)."""

    request: GenerateRequest | None  # set once it has handed out its request

    def step(self, token: int, greedy: int) -> GenerateRequest | None:
        """The request emitted ``token`` (the model's greedy choice: ``greedy``); a new request to decode, or None."""


class Backend(ABC):
    """A Med-VLM as HSCR sees it. Implementations: ``transformers`` (reference), ``vllm``."""

    name: str
    model_path: str
    eos_token_id: int  # the primary end of a response
    # Every id that ends a response (a chat model's end of turn and its EOS, e.g. <|im_end|> and
    # <|endoftext|>); a response is cut at the first of them.
    stop_token_ids: tuple[int, ...] = ()
    special_token_ids: frozenset[int]
    # True when requests of any length share engine steps without padding (vLLM's scheduler):
    # then ``run_hscr_stream`` overlaps one batch's re-decode with the next batch's own answers.
    continuous_batching: bool = False
    # True when one chained decode batch can take a whole stream (``stream_chained``): then
    # ``run_hscr_stream`` hands it each batch's own answers as rows free up where ``chains_stream`` says so (the
    # transformers backend).
    streams_chained: bool = False
    # True when ``generate_chained`` decodes the speculative requests a ``successor`` hands out (an item's next level
    # before its last one is in, which the reranker may not need): in rows nothing else wants, stopped once withdrawn.
    speculative_levels: bool = False
    # HSCR parameters this engine runs fastest with where nobody set them (below a model family's defaults):
    # speed only, never what the data is.
    param_defaults: Mapping[str, object] = MappingProxyType({})
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
    def encode_images(self, images: Sequence[Image.Image]) -> list[VisualTokens]:
        """Post-projector visual tokens per image (embeddings ``float[n_visual, hidden]`` on the CPU)."""

    @abstractmethod
    def generate(self, requests: Sequence[GenerateRequest]) -> list[list[int]]:
        """Greedy responses (without the end-of-sequence token, each starting with its request's
        ``response_prefix``), batched; fills ``request.logits`` where ``return_logits`` is set."""

    def chains_stream(self, chunk: int) -> bool:
        """Whether ``run_hscr_stream`` runs a stream of ``chunk``-item batches in one chained decode batch."""
        return self.streams_chained

    def generate_chained(self, requests: Sequence[GenerateRequest],
                         follow: Callable[[GenerateRequest, list[int]], Sequence[GenerateRequest]],
                         successor: Callable[[GenerateRequest], DecodeWatch | None] | None = None) -> None:
        """Decode ``requests`` and, for each that finishes, what ``follow(request, response)`` returns, until
        nothing is left. Here in rounds, one ``generate`` call each; a backend that can take new requests
        while others decode overrides it, so one item's next request need not wait for a whole round.

        ``successor(request)``, where given, may return what watches a request's decode (``step(token,
        greedy)`` per decoded token) and hands out a new request mid-decode, which such a backend decodes too
        (its output goes to ``follow`` like any other's). A backend may ignore it: nothing is requested then.
        Where ``speculative_levels`` is set, a watch may also hand out ``GenerateRequest.speculative`` requests."""
        while requests:
            requests = [new for request, ids in zip(requests, self.generate(requests), strict=True)
                        for new in follow(request, ids)]

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
    """A backend whose text side is a Hugging Face processor plus a model family (both backends)."""

    processor: object
    tokenizer: object
    profile: object  # the model family serving this checkpoint (``hscr_worker.families``)
    image_token_id: int

    def params(self, given: Mapping[str, object] | None = None) -> HSCRParams:
        """HSCR parameters for this backend's model: ``given`` (what a user or job set), else the model family's
        defaults, else this engine's (``param_defaults``), else HSCRParams'."""
        engine = {k: v for k, v in self.param_defaults.items() if k not in self.profile.param_defaults}
        return self.profile.params({**engine, **(given or {})})

    def _load_text_side(self, model_path: str, profile: str | None, *, min_pixels: int | None = None,
                        max_pixels: int | None = None):
        """Processor, config, family, placeholder and stop tokens of ``model_path``; returns the config.
        ``min_pixels``/``max_pixels``: the image size range of a dynamic-resolution family (Qwen)."""
        from transformers import AutoConfig, AutoProcessor, GenerationConfig

        from ..families import check_processor_files, resolve_profile
        from ..fixture import resolve_model

        self.model_path = resolve_model(model_path)
        config = AutoConfig.from_pretrained(self.model_path)
        # The family first (an unsupported architecture is refused before anything else loads), then its
        # processor files; LLaVA's prompt variant is told apart by the processor, so resolve again with it.
        check_processor_files(self.model_path, resolve_profile(profile, self.model_path, config=config))
        self.processor = AutoProcessor.from_pretrained(self.model_path)
        self.tokenizer = self.processor.tokenizer
        self.profile = resolve_profile(profile, self.model_path, self.processor, config=config).with_pixels(
            min_pixels, max_pixels)
        self.image_token_id = int(config.image_token_id)
        try:
            generation = GenerationConfig.from_pretrained(self.model_path)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            generation = None
        self.stop_token_ids = tuple(self.profile.stop_token_ids(self.tokenizer, generation))
        self.eos_token_id = self.stop_token_ids[0]
        self.special_token_ids = (frozenset(int(i) for i in self.tokenizer.all_special_ids)
                                  | {self.image_token_id, *self.stop_token_ids})
        return config

    def _cut_at_stop(self, ids: list[int]) -> list[int]:
        """``ids`` up to (without) the first stop token."""
        for k, token in enumerate(ids):
            if token in self.stop_token_ids:
                return ids[:k]
        return ids

    def prompt_ids(self, question: str) -> list[int]:
        return self.profile.prompt_ids(self.processor, question, self.image_token_id)

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()
