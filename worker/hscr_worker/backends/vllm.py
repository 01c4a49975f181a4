"""The vLLM backend: the language model in a vLLM engine, the vision side in the worker.

- ``encode_images``: the checkpoint's own vision tower and projector, loaded once with
  transformers (with a zero-layer language model: the checkpoint's layers are never read), so
  the worker applies visual-token dropout itself and hands vLLM ``image_embeds`` of shape
  ``(1, n, hidden)`` (``enable_mm_embeds``).
  The prompt carries exactly one image placeholder; vLLM expands it to ``n`` positions. Each
  visual tensor gets a content-hash ``multi_modal_uuids`` entry, so the prefix cache never mixes
  the full image with a dropped one.
- ``generate``: greedy. A request with a ``ForcedDecoder`` travels with ``force_args(decoder)``
  in ``SamplingParams.extra_args``; the engine-side hook (``vllm_hook``) forces the replacements
  with the same decision function. The engine returns the pre-processor top-2 tokens of every step
  (``logprobs=2`` of the raw logits or log-probabilities: the greedy choice, an exact tie included),
  and the backend replays the caller's decoder over the output with those greedy choices: the
  caller's ``decoder.fired`` ends up exactly as the engine decided, and any disagreement raises.
- ``score``: ``prompt_logprobs`` over prompt + response. Rows are dense ``[T, V]`` raw logits over
  the whole vocabulary when ``score_top_k`` is None (the default for vocabularies up to
  ``FULL_VOCAB_LIMIT`` tokens, e.g. the fixture). For large vocabularies (``score_top_k``, default
  20) each row holds the top-k tokens plus the response token and -inf elsewhere, and by default
  (``score_values="logprobs"``, vLLM's ``raw_logprobs`` mode) their exact log-probabilities: the
  ``logprob`` shift stays exact, which raw top-k logits could not give (the mass outside the top-k
  is unknown). The ``logit`` shift needs ``score_values="logits"``. Either way hallucination
  candidates come from the top-k of each distribution (keep ``top_k_candidates <= k``), and a
  candidate outside the other image's top-k gets that row's smallest returned score in the reward.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Sequence
from types import MappingProxyType

from hscr_worker._compat import ensure_torchvision_importable

ensure_torchvision_importable()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402

from .base import (  # noqa: E402
    BackendDead,
    BackendStats,
    GenerateRequest,
    ProcessorBackend,
    ScoreRequest,
    ScoreValues,
    VisualTokens,
)

FULL_VOCAB_LIMIT = 4096  # dense score rows up to this vocabulary size; top-k rows above
DEFAULT_SCORE_TOP_K = 20  # vLLM's default max_logprobs
CPU_BLOCK_SIZE = 32  # KV-cache block (the prefix cache's unit) of the CPU engine, unless engine_options set one
REPLAY_TOP = 2  # logprobs per step of a forced request: two, so an exact tie at the top is seen whole


class VLLMBackend(ProcessorBackend):
    name = "vllm"
    continuous_batching = True
    # Every level of an item in one engine call: the scheduler decodes them as extra concurrent sequences, which
    # cost less than the sequential rounds that decode a third fewer tokens (docs/bench.md, issue #18).
    param_defaults = MappingProxyType({"candidates_per_round": 0})

    def __init__(self, model_path: str, *, profile: str | None = None, dtype: str | None = None,
                 vision_device: str | None = None, score_top_k: int | None = None,
                 score_values: ScoreValues | None = None, batch_size: int = 32,
                 enforce_eager: bool | None = None, ignore_eos: bool = False, seed: int = 0,
                 min_pixels: int | None = None, max_pixels: int | None = None, **engine_options):
        """``engine_options`` go to ``vllm.LLM`` as they are (e.g. ``gpu_memory_utilization``,
        ``max_model_len``, ``tensor_parallel_size``). ``ignore_eos``: benchmarks only, as in the
        transformers backend (random weights would stop at a random EOS): every response decodes
        exactly its ``max_new_tokens``, an EOS the model emits staying in it as an ordinary token."""
        from vllm import LLM
        from vllm.platforms import current_platform

        from .vllm_hook import FORCING_FQCN

        _shim_registry_subprocess()
        on_cpu = current_platform.is_cpu()
        if on_cpu:
            # A spawned engine-core process would import the CUDA torchvision without the shim, and
            # in-process start-up is seconds instead of tens: keep the engine in this process.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            # Without it the CPU engine reserves 92 % of the machine's memory for its KV cache.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
            _quiet_cpu_thread_warning()
        config = self._load_text_side(model_path, profile, min_pixels=min_pixels, max_pixels=max_pixels)
        self.batch_size = batch_size
        self.ignore_eos = ignore_eos
        self.stats = BackendStats()

        # The vision side, in the worker: the transformers model with a zero-layer language model, so
        # the checkpoint's language-model layers (a 7B's 14 GB, materialised in RAM whenever the
        # checkpoint's dtype differs from the vision dtype) are never read; get_image_features only
        # needs the vision tower and the projector.
        self.vision_device = torch.device(vision_device or ("cuda" if torch.cuda.is_available() else "cpu"))
        vision_dtype = torch.float32 if self.vision_device.type == "cpu" else torch.bfloat16
        vision_config = self.profile.vision_only_config(copy.deepcopy(config))
        with _transformers_quiet():  # the layers it leaves out would be listed as "unexpected" weights
            vision, loading = AutoModelForImageTextToText.from_pretrained(
                self.model_path, config=vision_config, dtype=vision_dtype, output_loading_info=True)
        # ... so check here what the quiet load would not say: a vision weight missing from the
        # checkpoint would silently be random, and so would every image's features.
        problems = [*loading["missing_keys"], *loading["mismatched_keys"],
                    *(k for k in loading["unexpected_keys"] if ".language_model.layers." not in k)]
        if problems:
            raise ValueError(f"{self.model_path}: the vision tower and projector do not load cleanly (missing, "
                             f"mismatched or unexpected weights, e.g. {sorted(map(str, problems))[:3]})")
        vision.model.language_model = torch.nn.Identity()
        vision.lm_head = torch.nn.Identity()
        self.vision = vision.to(self.vision_device).eval()

        self.vocab_size = int(config.get_text_config().vocab_size)
        if score_top_k is None and self.vocab_size > FULL_VOCAB_LIMIT:
            score_top_k = DEFAULT_SCORE_TOP_K
        if score_top_k is not None and score_top_k < 1:
            raise ValueError(f"score_top_k must be >= 1 (or None for full-vocabulary rows), got {score_top_k}")
        self.score_top_k = score_top_k
        if score_values is None:  # dense rows normalise exactly either way; top-k rows only as log-probabilities
            score_values = "logits" if score_top_k is None else "logprobs"
        if score_values not in ("logits", "logprobs"):
            raise ValueError(f"score_values must be 'logits' or 'logprobs', got {score_values!r}")
        self.score_values = score_values

        options = dict(
            model=self.model_path, tokenizer=self.model_path, seed=seed,
            dtype=dtype or ("float32" if on_cpu else "auto"),
            enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
            enable_mm_embeds=True, limit_mm_per_prompt={"image": 1},
            # scores and the returned greedy choices come from the raw, pre-processor logits
            logprobs_mode="raw_logits" if score_values == "logits" else "raw_logprobs",
            max_logprobs=-1 if score_top_k is None else max(score_top_k, DEFAULT_SCORE_TOP_K),
        )
        if self.profile.vllm_architecture is not None:  # an out-of-tree model class (vllm_models)
            from .vllm_models import register_models

            register_models()
            options["hf_overrides"] = {"architectures": [self.profile.vllm_architecture]}
        if on_cpu:
            # The prefix cache reuses whole KV blocks only, and the CPU build's default block is 128 tokens: a
            # re-decode then prefills again up to 127 tokens of its prompt and response prefix. 32 (the CPU
            # kernels' preferred multiple) cut HSCR's prefilled tokens by 37 % at the same plain speed
            # (docs/bench.md); on a GPU vLLM's default is already 16.
            options["block_size"] = CPU_BLOCK_SIZE
        options.update(engine_options)
        options["logits_processors"] = [FORCING_FQCN]
        self.llm = LLM(**options)
        # A score request is prompt + response with one output token on top, and vLLM refuses a prompt
        # that leaves no room for it: prompt + response must stay below max_model_len.
        self.max_context_tokens = int(self.llm.llm_engine.model_config.max_model_len) - 1

    # ---- images (text: ProcessorBackend) ----
    def encode_images(self, images: Sequence[Image.Image]) -> list[VisualTokens]:
        return self.profile.encode_images(self.vision, self.processor, images, device=self.vision_device,
                                          batch_size=self.batch_size)

    def _prompt(self, ids: Sequence[int], visual: VisualTokens) -> dict:
        if list(ids).count(self.image_token_id) != 1:
            raise ValueError("a vLLM prompt must hold exactly one image placeholder (pass unexpanded ids)")
        visual = VisualTokens(visual.embeds.detach().to("cpu", torch.float32).contiguous(), visual.grid, visual.index)
        # The family's cache key (content, grid, kept positions): the prefix cache never mixes the full
        # image with a dropped one.
        return {"prompt_token_ids": list(ids), "multi_modal_data": {"image": self.profile.vllm_image(visual)},
                "multi_modal_uuids": {"image": [self.profile.cache_key(visual)]}}

    def _run(self, prompts: list[dict], params: list, sizes: list[int]) -> list:
        """``LLM.generate`` once per visual-token count, outputs in request order.

        vLLM's LLaVA batches the image embeddings of one engine step into a single tensor and
        refuses mixed sizes ("data contains inconsistent shapes"), which ``remove``-mode dropout
        produces next to full images; requests of one size never conflict.
        """
        groups: dict[int, list[int]] = {}
        for k, n_visual in enumerate(sizes):  # each prompt's visual-token count
            groups.setdefault(n_visual, []).append(k)
        outputs: list = [None] * len(prompts)
        try:
            for indices in groups.values():
                done = self.llm.generate([prompts[k] for k in indices], [params[k] for k in indices], use_tqdm=False)
                for k, out in zip(indices, done, strict=True):
                    outputs[k] = out
        except BaseException as exc:
            from vllm.v1.engine.exceptions import EngineDeadError

            if isinstance(exc, EngineDeadError):  # the engine process is gone: nothing left to abort
                raise BackendDead(f"the vLLM engine died: {exc}") from exc
            # Interrupted mid-call (RQ's job timeout raises from SIGALRM; Ctrl-C; an engine error): the
            # requests it added would stay in the engine, and the next call would schedule them forever.
            self._abort_unfinished()
            raise
        return outputs

    def _abort_unfinished(self) -> None:
        engine = self.llm.llm_engine
        unfinished = list(engine.output_processor.request_states)  # internal request ids
        if unfinished:
            engine.abort_request(unfinished, internal=True)

    # ---- generation and scoring ----
    def generate(self, requests: Sequence[GenerateRequest]) -> list[list[int]]:
        from vllm import SamplingParams

        from .vllm_hook import force_args, parse_force_args

        if not requests:
            return []
        prompts, params = [], []
        for k, r in enumerate(requests):
            extra = None
            if r.forced is not None:
                if any(rep.token >= self.vocab_size for rep in r.forced.plan):
                    raise ValueError(f"request {k}: a forced replacement token is outside the model's vocabulary")
                extra = force_args(r.forced)
            # Forced: the top tokens of every step, for the replay. Logits wanted: the score rows.
            # skip_clone: each request gets fresh params that nothing touches after submission, so the
            # engine's deep copy of them (and of the plan in extra_args) is pure cost, as in vLLM's server.
            logprobs = REPLAY_TOP if r.forced is not None else (self._row_width if r.return_logits else None)
            sampling = SamplingParams(temperature=0.0, max_tokens=r.max_new_tokens, detokenize=False,
                                      logprobs=logprobs, flat_logprobs=True, extra_args=extra, skip_clone=True,
                                      ignore_eos=self.ignore_eos,
                                      stop_token_ids=None if self.ignore_eos else list(self.stop_token_ids))
            try:
                parse_force_args(sampling)  # the hook's own admission check, before anything is submitted
            except ValueError as exc:
                raise ValueError(f"request {k}: {exc}") from None
            # A response prefix goes in the prompt: the prefix cache serves the prompt, image and
            # prefix KV that an earlier request (the own answer, another level) already computed.
            prompts.append(self._prompt([*r.prompt_ids, *r.response_prefix], r.visual))
            params.append(sampling)
        outputs = self._run(prompts, params, [r.visual.n_tokens for r in requests])
        for out in outputs:
            cached = out.num_cached_tokens or 0  # prompt tokens the prefix cache served
            self.stats.prefill_tokens += len(out.prompt_token_ids) - cached
            self.stats.reused_prefill_tokens += cached
            self.stats.decoded_tokens += len(out.outputs[0].token_ids)
        responses = []
        for r, out in zip(requests, outputs, strict=True):
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            if r.forced is not None:
                _replay(r, ids, completion.logprobs)
            if not self.ignore_eos:
                ids = self._cut_at_stop(ids)
            ids = ids[: r.max_new_tokens]
            if r.return_logits:  # step t's row predicts response token t, as a score row does
                r.logits = self._rows(completion.logprobs[: len(ids)])
            responses.append([*r.response_prefix, *ids])
        return responses

    def score(self, requests: Sequence[ScoreRequest]) -> list[torch.Tensor]:
        from vllm import SamplingParams

        if not requests:
            return []
        prompts, params = [], []
        for r in requests:
            if not r.response_ids:
                raise ValueError("cannot score an empty response")
            prompts.append(self._prompt(list(r.prompt_ids) + list(r.response_ids), r.visual))
            # Flat logprobs: a few flat lists per request instead of one dict of Logprob objects per
            # prompt position (visual tokens included), which was a tenth of HSCR's time at batch 32.
            params.append(SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=self._row_width,
                                         detokenize=False, flat_logprobs=True, skip_clone=True))
        outputs = self._run(prompts, params, [r.visual.n_tokens for r in requests])
        self.stats.scored_tokens += sum(len(out.prompt_token_ids) for out in outputs)
        rows = []
        for r, out in zip(requests, outputs, strict=True):
            n = len(r.response_ids)
            # prompt_logprobs follows the expanded prompt (image placeholder -> n_visual positions):
            # the response is its last n positions, entry j scoring token j given everything before it.
            expanded = out.prompt_token_ids
            if list(expanded[-n:]) != list(r.response_ids):
                raise RuntimeError("vLLM's expanded prompt does not end with the scored response")
            rows.append(self._rows(out.prompt_logprobs[-n:]))
        return rows

    @property
    def _row_width(self) -> int:
        """``logprobs``/``prompt_logprobs`` per score row: the whole vocabulary (-1) or the top k."""
        return -1 if self.score_top_k is None else self.score_top_k

    def _rows(self, entries) -> torch.Tensor:
        """``float[n, V]`` score rows (``score_values``) from a ``FlatLogprobs`` slice of n positions
        (-inf where not returned).

        A slice's indices start at 0, and each position's (token, logit) pairs lie in one run.
        """
        n = len(entries)
        per_row = np.asarray(entries.end_indices, dtype=np.int64) - np.asarray(entries.start_indices, dtype=np.int64)
        logits = torch.full((n, self.vocab_size), float("-inf"))
        logits[torch.from_numpy(np.repeat(np.arange(n), per_row)), torch.tensor(entries.token_ids, dtype=torch.long)] \
            = torch.tensor(entries.logprobs, dtype=torch.float32)
        return logits


@contextlib.contextmanager
def _transformers_quiet():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _replay(request: GenerateRequest, ids: Sequence[int], logprobs) -> None:
    """Re-run the caller's decoder over the engine's output with the engine's greedy choices.

    ``logprobs[step]`` holds the sampled token and the top ``REPLAY_TOP`` tokens of the raw
    (pre-processor) scores. The engine-side decision saw ``argmax``, the first (lowest) token id among
    the best scores, while the returned ranks come from a top-k that may order an exact tie either
    way (bf16 logits tie often on a GPU): so the greedy choice is the lowest id among the returned
    tokens with the best score.
    """
    decoder = request.forced
    for step, token in enumerate(ids):
        entry = logprobs[step]
        best = max(lp.logprob for lp in entry.values())
        greedy = min(t for t, lp in entry.items() if lp.logprob == best)
        expected = decoder.next_token(ids[:step], greedy)
        if token != (greedy if expected is None else expected):
            raise RuntimeError(f"the vLLM forcing hook disagreed with the decision function at step {step}: "
                               f"engine emitted {token}, expected {greedy if expected is None else expected}")


class _DropThreadWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "torch.set_num_threads" not in record.getMessage()


def _quiet_cpu_thread_warning() -> None:
    """Drop the CPU engine's "doesn't allow torch.set_num_threads" warning.

    With the engine in this process, vLLM's CPU worker replaces ``torch.set_num_threads`` with a
    function that logs that warning, and vLLM's own renderer calls it twice per multimodal request:
    two log lines per request (ten per HSCR item) flooding a worker's log and costing ~3 % of HSCR's
    time on the fixture. It reports nothing the user can act on; other warnings stay.
    """
    worker_logger = logging.getLogger("vllm.v1.worker.cpu_worker")
    if not any(isinstance(f, _DropThreadWarning) for f in worker_logger.filters):
        worker_logger.addFilter(_DropThreadWarning())


def _shim_registry_subprocess() -> None:
    """Give vLLM's model-inspection subprocess the torchvision shim too.

    vLLM inspects model classes in a fresh ``python -m vllm.model_executor.models.registry``, which
    imports torchvision (through transformers) before any plugin could run; vLLM documents
    ``_SUBPROCESS_COMMAND`` as the knob to alter that command.
    """
    import sys

    from vllm.model_executor.models import registry

    shim = ("from hscr_worker._compat import ensure_torchvision_importable; ensure_torchvision_importable(); "
            "import runpy; runpy.run_module('vllm.model_executor.models.registry', run_name='__main__')")
    registry._SUBPROCESS_COMMAND = [sys.executable, "-c", shim]
