"""The HSCR forcing hook: its extra_args contract, both adapters, and bad requests inside the engine.

The Model Runner V2 adapter cannot run on the CPU build (it runs the V1 runner), so it is driven
here on hand-built ``LogitsContext`` objects and request-state buffers of the runner's shape;
the V1 adapter is driven both on hand-built ``BatchUpdate`` objects and inside the real engine.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hscr_worker.backends.base import GenerateRequest
from hscr_worker.core.replace import ForcedDecoder, Replacement

pytestmark = pytest.mark.vllm

vllm = pytest.importorskip("vllm")
hook = pytest.importorskip("hscr_worker.backends.vllm_hook")
from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext  # noqa: E402

VOCAB = 12
EOS = 11
ORIGINAL = [1, 2, 3, 4, 5, 6]


def _plan() -> list[Replacement]:
    return [Replacement(1, 2, 9, -1.0, 2.0), Replacement(4, 5, 8, -0.5, 1.0)]


def _params(spec=None, **kw) -> SamplingParams:
    extra = {hook.FORCE_KEY: spec} if spec is not None else None
    return SamplingParams(temperature=kw.pop("temperature", 0.0), max_tokens=kw.pop("max_tokens", 16),
                          extra_args=extra, **kw)


def _good_spec() -> dict:
    return hook.force_args(ForcedDecoder(ORIGINAL, _plan()))[hook.FORCE_KEY]


# ---- the contract ----
def test_force_args_round_trip():
    decoder = hook.parse_force_args(_params(_good_spec()))
    assert list(decoder.original) == ORIGINAL and list(decoder.plan) == _plan() and decoder.fired == []
    assert hook.parse_force_args(_params()) is None  # no hscr_force: the hook leaves the request alone



def test_force_args_carry_after_divergence_only_when_off():
    assert "after_divergence" not in _good_spec()  # the default keeps the contract as it was
    spec = hook.force_args(ForcedDecoder(ORIGINAL, _plan(), after_divergence=False))[hook.FORCE_KEY]
    assert spec["after_divergence"] is False
    assert hook.parse_force_args(_params(spec)).after_divergence is False
    assert hook.parse_force_args(_params(_good_spec())).after_divergence is True
    with pytest.raises(ValueError, match="must be true or false"):
        hook.parse_force_args(_params({**spec, "after_divergence": 0}))


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda s: "not a dict", "must be an object"),
    (lambda s: {"plan": s["plan"]}, "missing \\['original'\\]"),
    (lambda s: {"original": s["original"]}, "missing \\['plan'\\]"),
    (lambda s: {**s, "extra": 1}, "unknown keys"),
    (lambda s: {**s, "original": "1 2 3"}, "'original'\\] must be a non-empty list"),
    (lambda s: {**s, "original": [1, -2, 3]}, "'original'\\] must be a non-empty list"),
    (lambda s: {**s, "plan": []}, "'plan'\\] must be a non-empty list"),
    (lambda s: {**s, "plan": [[1, 2, 9]]}, "must be \\[position, original, token, reward, shift\\]"),
    (lambda s: {**s, "plan": [["1", 2, 9, 0.0, 0.0]]}, "must be \\[position, original, token, reward, shift\\]"),
    (lambda s: {**s, "plan": [[1, 2, 9, float("nan"), 0.0]]}, "finite numbers"),
    (lambda s: {**s, "plan": [[1, 2, 9, True, 0.0]]}, "finite numbers"),
    (lambda s: {**s, "plan": [[4, 5, 8, 0, 0], [1, 2, 9, 0, 0]]}, "strictly increasing"),
    (lambda s: {**s, "plan": [[7, 5, 8, 0, 0]]}, "beyond the original response"),
    (lambda s: {**s, "plan": [[1, 3, 9, 0, 0]]}, "'original' has 2 there"),
    (lambda s: {**s, "plan": [[1, 2, 2, 0, 0]]}, "by itself"),
])
def test_validate_params_rejects_malformed_instructions(mutate, message):
    with pytest.raises(ValueError, match=message):
        hook.HSCRForcing.validate_params(_params(mutate(_good_spec())))
    with pytest.raises(ValueError, match=message):
        hook.HSCRForcingV2.validate_params(_params(mutate(_good_spec())))


def test_validate_params_rejects_steps_beyond_max_tokens_and_sampling():
    with pytest.raises(ValueError, match="beyond max_tokens \\(3\\)"):
        hook.HSCRForcing.validate_params(_params(_good_spec(), max_tokens=3))
    with pytest.raises(ValueError, match="temperature=0"):
        hook.HSCRForcing.validate_params(_params(_good_spec(), temperature=0.7))
    hook.HSCRForcing.validate_params(_params(_good_spec(), max_tokens=5))  # step 4 < 5: fine


# ---- a scripted model: the decision function run directly is the reference ----
def _model_choice(prefix: list[int]) -> int:
    """Greedy token of a scripted model: follows ORIGINAL, but after a replaced token at step 1 it skips
    one original token (so the re-decode leaves alignment and the later replacement fires late)."""
    shift = 1 if len(prefix) > 1 and prefix[1] == 9 else 0
    step = len(prefix) + shift
    return ORIGINAL[step] if step < len(ORIGINAL) else EOS


def _logits_for(prefix: list[int]) -> torch.Tensor:
    row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(len(prefix))) * 0.1
    row[_model_choice(prefix)] = 5.0
    return row


def _reference() -> tuple[list[int], list]:
    decoder = ForcedDecoder(ORIGINAL, _plan())
    out: list[int] = []
    while len(out) < 16 and (not out or out[-1] != EOS):
        forced = decoder.next_token(out, _model_choice(out))
        out.append(_model_choice(out) if forced is None else forced)
    return out, decoder.fired


def test_reference_scenario_leaves_alignment_and_still_fires_both():
    out, fired = _reference()
    assert [step for step, _ in fired] == [1, 3]  # the second replacement fired one step early, off-plan
    assert out[1] == 9 and out[3] == 8 and out[-1] == EOS


# ---- Model Runner V2 adapter, engine-free ----
class _Runner:
    """The request-state buffers the V2 runner shares with processors, and its decode loop."""

    def __init__(self, max_reqs: int = 4, max_len: int = 64):
        self.state = SimpleNamespace(
            device=torch.device("cpu"), max_num_reqs=max_reqs, vocab_size=VOCAB,
            all_token_ids=SimpleNamespace(gpu=torch.zeros(max_reqs, max_len, dtype=torch.int32)),
            prompt_len=SimpleNamespace(np=np.zeros(max_reqs, dtype=np.int32)),
            prefill_len=SimpleNamespace(np=np.zeros(max_reqs, dtype=np.int32)),
            total_len=SimpleNamespace(gpu=torch.zeros(max_reqs, dtype=torch.int32)),
        )
        self.processor = hook.HSCRForcingV2(SimpleNamespace(speculative_config=None), self.state)

    def add(self, slot: int, prompt: list[int], params: SamplingParams) -> bool:
        self.state.all_token_ids.gpu[slot, : len(prompt)] = torch.tensor(prompt)
        self.state.prompt_len.np[slot] = len(prompt)
        self.state.total_len.gpu[slot] = len(prompt)
        return self.processor.add_request(slot, params)

    def output(self, slot: int) -> list[int]:
        start, end = int(self.state.prompt_len.np[slot]), int(self.state.total_len.gpu[slot])
        return self.state.all_token_ids.gpu[slot, start:end].tolist()

    def step(self, slots: list[int], commit: bool = True) -> list[int]:
        logits = torch.stack([_logits_for(self.output(s)) for s in slots])
        n = len(slots)
        ctx = LogitsContext(
            expanded_idx_mapping=torch.tensor(slots), idx_mapping=torch.tensor(slots),
            idx_mapping_np=np.array(slots, dtype=np.int32), expanded_local_pos=torch.zeros(n, dtype=torch.int32),
            input_ids=torch.zeros(n, dtype=torch.int32), pos=torch.zeros(n, dtype=torch.int32),
            seq_lens_upper_bound_np=np.zeros(n, dtype=np.int32))
        chosen = self.processor.apply(logits, ctx).argmax(-1).tolist()
        if commit:
            for slot, token in zip(slots, chosen, strict=True):
                self.state.all_token_ids.gpu[slot, self.state.total_len.gpu[slot]] = token
                self.state.total_len.gpu[slot] += 1
        return chosen


def test_v2_adapter_matches_the_decision_function_with_reordered_rows():
    runner = _Runner()
    assert runner.add(2, [7, 7, 7], _params(_good_spec())) is True
    assert runner.add(0, [7, 7], _params()) is False  # plain greedy request: not this processor's
    for step in range(16):
        live = [s for s in (2, 0) if not runner.output(s) or runner.output(s)[-1] != EOS]
        if not live:
            break
        runner.step(live if step % 2 else live[::-1])  # rows != slots, and the order changes each step
    expected, fired = _reference()
    assert runner.output(2) == expected
    assert runner.processor.slots[2].decoder.fired == fired
    assert runner.output(0) == ORIGINAL + [EOS]  # the plain request decoded untouched


def test_v2_adapter_repeated_step_does_not_fire_twice():
    """A chunked-prefill step samples a row whose token is discarded: the real step that follows must
    still fire (the prototype's lockstep design desynchronised exactly there)."""
    runner = _Runner()
    runner.add(1, [7], _params(_good_spec()))
    runner.step([1])
    runner.step([1], commit=False)  # discarded sample at step 1 (would fire 9)
    assert runner.step([1]) == [9]  # the real step 1 fires again
    assert [step for step, _ in runner.processor.slots[1].decoder.fired] == [1]


def test_v2_adapter_recycled_slot_and_out_of_vocab_plan_are_neutral():
    runner = _Runner()
    runner.add(3, [7], _params(_good_spec()))
    assert runner.add(3, [7], _params()) is False  # a new occupant without forcing
    assert 3 not in runner.processor.slots
    bad = _good_spec() | {"plan": [[1, 2, VOCAB + 5, 0.0, 0.0]]}
    assert runner.add(1, [7], _params(bad)) is False  # ignored (logged), never raised inside the engine
    for _ in range(len(ORIGINAL) + 1):
        runner.step([1, 3])
    assert runner.output(1) == runner.output(3) == ORIGINAL + [EOS]


def test_v2_adapter_refuses_speculative_decoding():
    with pytest.raises(ValueError, match="speculative"):
        hook.HSCRForcingV2(SimpleNamespace(speculative_config=object()), _Runner().state)


# ---- the registered class: each runner builds its own adapter ----
def test_the_registered_class_loads_in_both_runners_and_becomes_their_adapter():
    from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns
    from vllm.v1.worker.gpu.sample.logits_processor.loader import (
        _load_v2_logitsprocs_by_fqcns,
        build_custom_logits_processors_params_validator,
    )

    # both loaders accept it (each checks subclassing of its own LogitsProcessor)
    assert _load_logitsprocs_by_fqcns([hook.FORCING_FQCN]) == [hook.HSCRForcingAuto]
    assert _load_v2_logitsprocs_by_fqcns([hook.FORCING_FQCN]) == [hook.HSCRForcingAuto]
    # constructed as each runner constructs it
    config = SimpleNamespace(speculative_config=None, model_config=SimpleNamespace(get_vocab_size=lambda: VOCAB))
    assert type(hook.HSCRForcingAuto(config, torch.device("cpu"), False)) is hook.HSCRForcing
    assert type(hook.HSCRForcingAuto(config, _Runner().state)) is hook.HSCRForcingV2
    # Model Runner V2's admission check runs the hook's validation
    validate = build_custom_logits_processors_params_validator([hook.FORCING_FQCN])
    validate(_params(_good_spec()))
    with pytest.raises((ValueError, VLLMValidationError), match="forces step 4, beyond max_tokens"):
        validate(_params(_good_spec(), max_tokens=3))


# ---- V1 adapter, engine-free (batch bookkeeping) ----
def test_v1_adapter_follows_adds_moves_swaps_and_removals():
    config = SimpleNamespace(speculative_config=None, model_config=SimpleNamespace(get_vocab_size=lambda: VOCAB))
    processor = hook.HSCRForcing(config, torch.device("cpu"), False)
    forced_out, plain_out = [], []
    added = [(0, _params(_good_spec()), [7], forced_out), (1, _params(), [7], plain_out)]
    processor.update_state(BatchUpdate(2, removed=[], moved=[], added=added))
    assert list(processor.requests) == [0]
    processor.update_state(BatchUpdate(2, removed=[], added=[], moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert list(processor.requests) == [1]
    outputs = {1: forced_out, 0: plain_out}
    def running(out):
        return not out or out[-1] != EOS

    while running(forced_out) or running(plain_out):
        logits = torch.stack([_logits_for(outputs[0]), _logits_for(outputs[1])])
        chosen = processor.apply(logits).argmax(-1).tolist()
        for row, out in outputs.items():
            if running(out):
                out.append(chosen[row])
    assert forced_out == _reference()[0]
    assert plain_out == ORIGINAL + [EOS]
    processor.update_state(BatchUpdate(1, removed=[1], added=[], moved=[]))
    assert processor.requests == {}
    assert processor.is_argmax_invariant() is False


# ---- inside the engine ----
def _engine_prompt(backend, item):
    visual = backend.encode_images([item.image])[0]
    return backend._prompt(backend.prompt_ids(item.question), visual), visual


def _run_engine(engine, submissions):
    """Submit (request_id, prompt, params) together; returns ({id: token ids}, {id: error})."""
    errors = {}
    for request_id, prompt, params in submissions:
        try:
            engine.add_request(request_id, prompt, params)
        except VLLMValidationError as exc:  # validate_params' ValueError, as vLLM reports it (HTTP 400)
            errors[request_id] = str(exc)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
    return outputs, errors


def test_bad_requests_are_rejected_and_leave_the_batch_alone(vllm_backend, heldout_items):
    items = heldout_items[:3]
    prompts = [_engine_prompt(vllm_backend, it) for it in items]
    plain = vllm_backend.generate([GenerateRequest(vllm_backend.prompt_ids(it.question), v, 32)
                                   for it, (_, v) in zip(items, prompts, strict=True)])
    # A valid forcing request: replace the first token of item 0's answer by another token.
    first = plain[0][0]
    other = next(t for t in range(vllm_backend.vocab_size) if t != first and t not in vllm_backend.special_token_ids)
    good_force = {hook.FORCE_KEY: {"original": plain[0], "plan": [[0, first, other, 0.0, 0.0]]}}

    def sp(extra=None, max_tokens=32):
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, detokenize=False, extra_args=extra)

    bad = {
        "missing": sp({hook.FORCE_KEY: {"plan": [[0, first, other, 0.0, 0.0]]}}),
        "wrong-type": sp({hook.FORCE_KEY: {"original": plain[0], "plan": "replace the first token"}}),
        "beyond-max-tokens": sp({hook.FORCE_KEY: {"original": plain[0] + [first] * 8,
                                                  "plan": [[len(plain[0]) + 4, first, other, 0.0, 0.0]]}},
                                max_tokens=len(plain[0]) + 2),
    }
    submissions = [("plain-1", prompts[1][0], sp()), ("forced-0", prompts[0][0], sp(good_force))]
    submissions += [(name, prompts[2][0], params) for name, params in bad.items()]
    submissions += [("plain-2", prompts[2][0], sp())]
    outputs, errors = _run_engine(vllm_backend.llm.llm_engine, submissions)

    assert set(errors) == set(bad)
    assert "missing ['original']" in errors["missing"]
    assert "'plan'] must be a non-empty list" in errors["wrong-type"]
    assert "beyond max_tokens" in errors["beyond-max-tokens"]
    eos = vllm_backend.eos_token_id
    assert outputs["plain-1"] == plain[1] + [eos]
    assert outputs["plain-2"] == plain[2] + [eos]
    assert outputs["forced-0"][0] == other  # the forcing request was honoured next to the rejected ones


def test_out_of_vocab_token_is_refused_by_the_backend_and_ignored_by_the_engine(vllm_backend, heldout_items):
    item = heldout_items[0]
    prompt, visual = _engine_prompt(vllm_backend, item)
    ids = vllm_backend.prompt_ids(item.question)
    answer = vllm_backend.generate([GenerateRequest(ids, visual, 32)])[0]
    plan = [Replacement(0, answer[0], vllm_backend.vocab_size + 3, 0.0, 0.0)]
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        vllm_backend.generate([GenerateRequest(ids, visual, 32, forced=ForcedDecoder(answer, plan))])
    # Straight to the engine (validate_params cannot know the vocabulary): decoded as plain greedy.
    extra = hook.force_args(ForcedDecoder(answer, plan))
    outputs, errors = _run_engine(vllm_backend.llm.llm_engine, [
        ("oov", prompt, SamplingParams(temperature=0.0, max_tokens=32, detokenize=False, extra_args=extra))])
    assert not errors and outputs["oov"] == answer + [vllm_backend.eos_token_id]


# ---- the replay of a forced request's output ----
def _tied_row(best: int, rival: int) -> tuple[torch.Tensor, bool]:
    """Raw logits where ``best`` and ``rival`` (a higher id) tie at the top, and whether top-k ranks
    ``rival`` first (the case that matters; torch's top-k orders ties by position in its own way)."""
    for seed in range(100):
        row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed))
        row[best] = row[rival] = 5.0
        if int(torch.topk(row, 2).indices[0]) == rival:
            return row, True
    return row, False


def test_replay_resolves_exact_ties_as_the_engine_argmax_does():
    """bf16 logits tie often on a GPU: the engine's greedy choice (argmax, lowest id) must be the replay's."""
    from vllm.logprobs import FlatLogprobs, append_logprobs_for_next_position
    from vllm.v1.sample.sampler import Sampler

    from hscr_worker.backends.vllm import REPLAY_TOP, _replay

    engine_side = ForcedDecoder(ORIGINAL, _plan())
    emitted: list[int] = []
    returned = FlatLogprobs()
    rival_first = []
    for original in ORIGINAL:  # the model wants the original token at every step, tied
        row, flipped = _tied_row(original, 10)
        rival_first.append(flipped)
        greedy = int(row.argmax())
        assert greedy == original
        forced = engine_side.next_token(emitted, greedy)  # what the hook decides in the engine
        token = greedy if forced is None else forced
        # what vLLM returns for logprobs=REPLAY_TOP in raw_logprobs mode
        top = Sampler.gather_logprobs(Sampler.compute_logprobs(row[None]), REPLAY_TOP, torch.tensor([token]))
        append_logprobs_for_next_position(returned, top.logprob_token_ids[0].tolist(), top.logprobs[0].tolist(),
                                          [None] * (REPLAY_TOP + 1), int(top.selected_token_ranks[0]), REPLAY_TOP)
        emitted.append(token)
    assert emitted == [1, 9, 3, 4, 8, 6]
    assert rival_first[1] and rival_first[2]  # a forced and an unforced step whose returned rank 1 is the rival
    caller = ForcedDecoder(ORIGINAL, _plan())
    _replay(GenerateRequest([0], torch.zeros(1, 4), len(ORIGINAL), forced=caller), emitted, returned)
    assert caller.fired == engine_side.fired and len(caller.fired) == 2


def test_engine_options_in_llm_shorthand_start_an_engine_with_the_hook(vllm_engine, fixture_model, heldout_items):
    """Any vllm.LLM keyword works as LLM takes it (an int compilation_config: LLM converts it itself)."""
    from hscr_worker.core.replace import ForcedDecoder, Replacement

    backend = vllm_engine(fixture_model, compilation_config=0)
    prompt = backend.prompt_ids(heldout_items[0].question)
    visual = backend.encode_images([heldout_items[0].image])[0]
    own = backend.generate([GenerateRequest(prompt, visual, 16)])[0]
    other = next(t for t in range(backend.vocab_size) if t != own[0] and t not in backend.special_token_ids)
    decoder = ForcedDecoder(own, [Replacement(0, own[0], other, 0.0, 1.0)])
    forced = backend.generate([GenerateRequest(prompt, visual, 16, forced=decoder)])[0]
    assert forced[0] == other and len(decoder.fired) == 1  # the hook runs in that engine
