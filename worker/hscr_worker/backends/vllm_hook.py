"""The HSCR forcing hook for vLLM: one decision function, two thin logits-processor adapters.

A re-decode request carries its instructions in ``SamplingParams.extra_args`` (``vllm_xargs``
over HTTP)::

    {"hscr_force": {"original": [17, 9, 23, ...],                # the response being corrupted
                    "plan": [[position, original, token, reward, shift], ...],
                    "prefix": [17, 9],                           # optional, see below
                    "fired": [],                                 # optional, see below
                    "after_divergence": false}}                  # optional (default true)

``plan`` lists the replacements in response order (strictly increasing positions). ``prefix``
(default empty) holds the response tokens that the request's prompt already ends with: the
re-decode starts after them, and steps and positions still count from the start of the response.
``fired`` (default empty) gives the prefix steps at which the first ``len(fired)`` replacements
already fired (a prefix copied from an earlier level's decode, ``core.replace.divergence``).
``after_divergence`` false: once the decode has left the original, no later replacement fires
(``HSCRParams.fire_after_divergence``).
A replacement not fired in the prefix must lie at or after ``len(prefix)`` while the prefix follows
the original (after a divergence it fires wherever the model next wants its token). At each
decoding step the hook asks the request's ``ForcedDecoder`` (``core.replace``, the same decision
function the transformers backend calls) for the token to force given the tokens generated so
far and the model's own greedy choice; a forced step gets all logits -inf except the forced token.

Adapters (``HSCRForcingAuto``, the class an engine registers, becomes the one its runner needs):

- ``HSCRForcing`` for the V1 model runner (the CPU build, and GPU with
  ``VLLM_USE_V2_MODEL_RUNNER=0``): ``update_state(BatchUpdate)`` tracks each batch index's request
  and its live output-token list; ``apply(logits)`` rows are batch indices.
- ``HSCRForcingV2`` for Model Runner V2 (the GPU default in vLLM 0.32): ``add_request(slot,
  params)``; ``apply(logits, ctx)`` maps rows to slots through ``ctx.idx_mapping_np`` and reads
  the generated tokens from the runner's ``all_token_ids[slot, prompt_len:total_len]``.

``validate_params`` (shared) rejects a malformed request at admission with a ``ValueError``
naming the problem, so it never reaches the sampler and never disturbs the other requests of the
batch. Requests without ``hscr_force`` pass through untouched. Speculative decoding is refused
at start-up: forcing needs one logits row per request.

Steps are decided idempotently: a sampler call whose output is discarded (a chunked-prefill
partial step) and the real step that follows see the same prefix, so the decoder state is
rewound to before the earlier call. A request resumed after preemption arrives with output
already generated; the decoder is caught up on it from the emitted tokens (see ``_RequestForcing``).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from numbers import Real
from typing import TYPE_CHECKING, Any

import torch

from hscr_worker._compat import ensure_torchvision_importable

ensure_torchvision_importable()

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor  # noqa: E402

from hscr_worker.core.replace import ForcedDecoder, Replacement  # noqa: E402

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

FORCE_KEY = "hscr_force"
# What an engine registers (``logits_processors=[FORCING_FQCN]``): either model runner builds its adapter.
FORCING_FQCN = "hscr_worker.backends.vllm_hook:HSCRForcingAuto"

logger = logging.getLogger(__name__)


# ---- the contract: ForcedDecoder <-> extra_args ----
def force_args(decoder: ForcedDecoder) -> dict[str, Any]:
    """``extra_args`` that make the hook re-decode like ``decoder`` (before its first decoded step)."""
    spec = {
        "original": [int(t) for t in decoder.original],
        "plan": [[r.position, r.original, r.token, float(r.reward), float(r.shift)] for r in decoder.plan],
        "prefix": [int(t) for t in decoder.response_prefix],
        "fired": [int(step) for step, _ in decoder.fired],
    }
    if not decoder.after_divergence:  # sent only when off: the default keeps the contract as it was
        spec["after_divergence"] = False
    return {FORCE_KEY: spec}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_force_args(params: SamplingParams) -> ForcedDecoder | None:
    """A fresh ``ForcedDecoder`` from ``params.extra_args``; None without ``hscr_force``.

    Raises ValueError with the reason for anything malformed.
    """
    extra = params.extra_args or {}
    if FORCE_KEY not in extra:
        return None
    spec = extra[FORCE_KEY]
    where = f"extra_args[{FORCE_KEY!r}]"
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be an object with 'original' and 'plan', got {type(spec).__name__}")
    missing = {"original", "plan"} - spec.keys()
    if missing:
        raise ValueError(f"{where} is missing {sorted(missing)}")
    unknown = spec.keys() - {"original", "plan", "prefix", "fired", "after_divergence"}
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)}; expected 'original', 'plan' and "
                         "optionally 'prefix', 'fired' and 'after_divergence'")
    original, plan, prefix = spec["original"], spec["plan"], spec.get("prefix", [])
    fired = spec.get("fired", [])
    after_divergence = spec.get("after_divergence", True)
    if not isinstance(after_divergence, bool):
        raise ValueError(f"{where}['after_divergence'] must be true or false, got {after_divergence!r}")
    if not isinstance(original, (list, tuple)) or not original or not all(
            _is_int(t) and t >= 0 for t in original):
        raise ValueError(f"{where}['original'] must be a non-empty list of token ids (integers >= 0)")
    if not isinstance(prefix, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in prefix):
        raise ValueError(f"{where}['prefix'] must be a list of token ids (integers >= 0)")
    if (not isinstance(fired, (list, tuple)) or not all(_is_int(t) and 0 <= t < len(prefix) for t in fired)
            or any(b <= a for a, b in zip(fired, fired[1:], strict=False))):
        raise ValueError(f"{where}['fired'] must list strictly increasing steps inside the prefix "
                         f"({len(prefix)} tokens)")
    if not isinstance(plan, (list, tuple)) or not plan:
        raise ValueError(f"{where}['plan'] must be a non-empty list of [position, original, token, reward, shift]")
    replacements: list[Replacement] = []
    for k, entry in enumerate(plan):
        if (not isinstance(entry, (list, tuple)) or len(entry) != 5
                or not all(_is_int(v) and v >= 0 for v in entry[:3])
                or not all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in entry[3:])):
            raise ValueError(f"{where}['plan'][{k}] must be [position, original, token, reward, shift] with "
                             f"integers >= 0 and finite numbers, got {entry!r}")
        position, token_original, token = (int(v) for v in entry[:3])
        if replacements and position <= replacements[-1].position:
            raise ValueError(f"{where}['plan'] positions must be strictly increasing (entry {k}: {position})")
        if position >= len(original):
            raise ValueError(f"{where}['plan'][{k}] position {position} is beyond the original response "
                             f"({len(original)} tokens)")
        if original[position] != token_original:
            raise ValueError(f"{where}['plan'][{k}] says token {token_original} at position {position}, "
                             f"but 'original' has {original[position]} there")
        if token == token_original:
            raise ValueError(f"{where}['plan'][{k}] replaces token {token} by itself")
        replacements.append(Replacement(position, token_original, token, float(entry[3]), float(entry[4])))
    if len(fired) > len(replacements):
        raise ValueError(f"{where}['fired'] lists {len(fired)} steps for a plan of {len(replacements)}")
    decoder = ForcedDecoder(list(original), replacements, response_prefix=list(prefix),
                            fired=list(zip(fired, replacements, strict=False)), after_divergence=after_divergence)
    for k, (step, r) in enumerate(decoder.fired):
        if prefix[step] != r.token:
            raise ValueError(f"{where}['fired'][{k}]: the prefix has token {prefix[step]} at step {step}, "
                             f"not the replacement {r.token}")
    # While the prefix follows the original, a pending replacement fires at its position, which must lie ahead;
    # once it has left the original, a replacement fires wherever the model next wants its token.
    if decoder.follows_original():
        for k, r in enumerate(decoder.unfired, start=len(decoder.fired)):
            if r.position < len(prefix):
                raise ValueError(f"{where}['plan'][{k}] position {r.position} lies inside the prefix "
                                 f"({len(prefix)} tokens): it can never be decoded")
            if params.max_tokens is not None and r.position - len(prefix) >= params.max_tokens:
                after = f" after the {len(prefix)}-token prefix" if prefix else ""
                raise ValueError(f"{where}['plan'][{k}] forces step {r.position}, beyond max_tokens "
                                 f"({params.max_tokens}){after}")
    if params.temperature != 0.0:
        raise ValueError(f"{where} needs greedy decoding (temperature=0), got temperature={params.temperature}")
    if params.n != 1:
        raise ValueError(f"{where} needs n=1, got n={params.n}")
    return decoder



def _validate(params: SamplingParams) -> None:
    parse_force_args(params)


def _admit(params: SamplingParams, vocab_size: int) -> _RequestForcing | None:
    """Per-request state for a request entering the batch; never raises inside the engine loop."""
    try:
        decoder = parse_force_args(params)
    except ValueError as exc:  # validate_params rejects these at admission; keep the batch alive regardless
        logger.error("HSCR forcing ignored for a request: %s", exc)
        return None
    if decoder is None:
        return None
    if any(r.token >= vocab_size for r in decoder.plan):
        logger.error("HSCR forcing ignored for a request: a plan token is outside the vocabulary (%d)", vocab_size)
        return None
    return _RequestForcing(decoder)


class _RequestForcing:
    """The decoder of one request plus what makes its steps idempotent."""

    def __init__(self, decoder: ForcedDecoder):
        self.decoder = decoder
        self._step = -1  # last step decided
        self._before: ForcedDecoder | None = None  # the decoder as it was before that step

    def decide(self, prefix: Sequence[int], greedy: int) -> int | None:
        """The token to force at step ``len(prefix)`` (None: keep the model's choice)."""
        step = len(prefix)
        if step <= self._step and self._before is not None:  # the same step again: undo the earlier call
            self.decoder = self._before
        elif step > self._step + 1:  # resumed with output already generated: replay it
            self._catch_up(prefix, from_step=self._step + 1)
        self._before = copy.copy(self.decoder)
        self._before.fired = list(self.decoder.fired)
        self._step = step
        return self.decoder.next_token(prefix, greedy)

    def _catch_up(self, prefix: Sequence[int], from_step: int) -> None:
        # The model's greedy choice at past steps is gone; a step whose emitted token is the pending
        # replacement is taken as forced (its greedy was the original), any other emitted token as
        # the model's own choice.
        for step in range(from_step, len(prefix)):
            pending = self.decoder.plan[len(self.decoder.fired)] if self.decoder.unfired else None
            emitted = prefix[step]
            greedy = pending.original if pending is not None and emitted == pending.token else emitted
            self.decoder.next_token(prefix[:step], greedy)


def _force_rows(logits: torch.Tensor, rows: Sequence[int], tokens: Sequence[int | None]) -> None:
    """In place: each row with a token gets -inf everywhere except that token (0)."""
    for row, token in zip(rows, tokens, strict=True):
        if token is not None:
            logits[row].fill_(float("-inf"))
            logits[row, token] = 0.0


def _refuse_speculative(vllm_config: VllmConfig) -> None:
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise ValueError("the HSCR forcing hook needs one logits row per request: disable speculative decoding")


# ---- adapter 1: the V1 model runner ----
class HSCRForcing(V1LogitsProcessor):
    """V1-runner adapter: rows are persistent-batch indices."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        _validate(sampling_params)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        _refuse_speculative(vllm_config)
        self.vocab_size = vllm_config.model_config.get_vocab_size()
        self.requests: dict[int, tuple[_RequestForcing, list[int]]] = {}  # batch index -> (state, output ids)

    def is_argmax_invariant(self) -> bool:
        return False  # forcing changes the greedy token

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.requests.pop(index, None)
        for index, params, _prompt_ids, output_ids in batch_update.added:
            state = _admit(params, self.vocab_size)
            if state is None:
                self.requests.pop(index, None)
            else:
                self.requests[index] = (state, output_ids)  # output_ids: the live list, updated by the runner
        for a, b, direction in batch_update.moved:
            moved_a, moved_b = self.requests.pop(a, None), self.requests.pop(b, None)
            if moved_a is not None:
                self.requests[b] = moved_a
            if moved_b is not None and direction == MoveDirectionality.SWAP:
                self.requests[a] = moved_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.requests:
            return logits
        rows = sorted(i for i in self.requests if i < logits.shape[0])
        greedy = logits[rows].argmax(-1).tolist()
        tokens = []
        for row, choice in zip(rows, greedy, strict=True):
            state, output_ids = self.requests[row]
            tokens.append(state.decide(list(output_ids), choice))
        _force_rows(logits, rows, tokens)
        return logits


# ---- adapter 2: Model Runner V2 ----
class HSCRForcingV2(V2LogitsProcessor):
    """Model Runner V2 adapter: state per request slot, rows mapped through ``ctx.idx_mapping_np``."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        _validate(sampling_params)

    def __init__(self, vllm_config: VllmConfig, req_states: LogitsProcRequestState):
        _refuse_speculative(vllm_config)
        self.req_states = req_states
        self.slots: dict[int, _RequestForcing] = {}

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        state = _admit(sampling_params, self.req_states.vocab_size)
        if state is None:
            self.slots.pop(req_idx, None)  # the slot may hold a previous occupant's state
            return False
        self.slots[req_idx] = state
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if not self.slots:
            return logits
        # One logits row per request (speculative decoding is refused), so row == batch position.
        tracked = [(row, int(slot)) for row, slot in enumerate(ctx.idx_mapping_np.tolist()) if int(slot) in self.slots]
        if not tracked:
            return logits
        rows = [row for row, _ in tracked]
        slots = [slot for _, slot in tracked]
        greedy = logits[rows].argmax(-1).tolist()
        tokens = [self.slots[slot].decide(output, greedy[k]) for k, (slot, output) in
                  enumerate(zip(slots, self._outputs(slots), strict=True))]
        _force_rows(logits, rows, tokens)
        return logits

    def _outputs(self, slots: list[int]) -> list[list[int]]:
        """Each slot's generated tokens: ``all_token_ids[slot, prompt_len:total_len]``, gathered on the
        device so only the outputs (not the prompts with their hundreds of image positions) are copied
        to the host."""
        all_ids = self.req_states.all_token_ids.gpu
        total = self.req_states.total_len.gpu[slots].tolist()
        starts = [int(self.req_states.prompt_len.np[slot]) for slot in slots]
        width = max(t - p for t, p in zip(total, starts, strict=True))
        if width <= 0:
            return [[] for _ in slots]
        offsets = torch.arange(width, device=all_ids.device)
        index = (torch.tensor(starts, device=all_ids.device)[:, None] + offsets).clamp(max=all_ids.shape[1] - 1)
        gathered = all_ids[slots].gather(1, index).tolist()
        return [row[: max(t - p, 0)] for row, t, p in zip(gathered, total, starts, strict=True)]


# ---- the entry point: the runner vLLM chose builds its own adapter ----
class HSCRForcingAuto(V1LogitsProcessor, V2LogitsProcessor):
    """The class an engine registers. It passes both runners' subclass checks, and constructing it
    returns the adapter of the runner that constructs it, told apart by the runner's constructor
    arguments (V1: ``vllm_config, device, is_pin_memory``; V2: ``vllm_config, req_states``). So vLLM's
    own choice of model runner, which depends on the platform, the environment and the engine's
    features, picks the adapter: nothing has to predict it from the engine options."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        _validate(sampling_params)

    def __new__(cls, vllm_config: VllmConfig, *args):
        if len(args) == 1:
            return HSCRForcingV2(vllm_config, *args)
        return HSCRForcing(vllm_config, *args)
