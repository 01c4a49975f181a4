"""HSCR over a batch of items, on any backend.

``run_hscr`` follows method.md step by step:

1. encode each image once into post-projector visual tokens (``backend.encode_images``);
2. greedy-generate the model's own answer under the full image;
3. pick the response to corrupt (own answer, or the preferred answer by teacher forcing);
4. score it under the full image and under ``n_masks`` seeded dropout masks;
5. shift per position, averaged over the masks -> the top-n modality-coupled positions, by shift or by |shift|
   (``coupling``; ``core.coupling``);
6. one hallucinated token per coupled position, lowest contrastive reward (``core.replace``);
7. level m replaces the m most coupled positions: re-decode under the full image with the
   replacements forced (or splice them in place). A re-decode starts at its level's first
   replaced position, not at the start of the response: up to there it would only reproduce the
   response (see ``reproduced_prefix``), so that part goes in the prompt as ``response_prefix``.
   Levels are re-decoded mildest first, ``candidates_per_round`` per item per engine call, and an
   item stops as soon as step 8 keeps j levels with the gap (``candidates_per_round=0``: every
   level in one call, as the paper generates them all). Level m+1 is level m plus one
   replacement, so its re-decode repeats level m's until the new replacement fires: a level
   continues from the longest stretch an earlier round's level shares with it, and a level whose
   new replacement never fires there is that level's decode, with nothing decoded at all
   (``core.replace.divergence``);
8. rerank candidates by similarity to the preferred answer; keep j levels with the gap
   (``core.rerank``).

Everything is batched across items; no I/O happens here. ``HSCRBatch`` holds the steps as stages
around the engine calls, so ``run_hscr_stream`` can put one batch's re-decode rounds and the next
batch's own answers into the same engine call.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from PIL import Image

from hscr_client import HSCRParams

from .backends.base import Backend, GenerateRequest, ScoreRequest, VisualTokens
from .core.coupling import coupled_positions, token_shift
from .core.dropout import keep_masks, mask_generator
from .core.replace import ForcedDecoder, Replacement, divergence, hallucinated_token, level_plans, splice
from .core.rerank import Selection, select_levels

Similarity = Callable[[Sequence[str], str], list[float]]
# A decoded dispreferred candidate: its response ids, the (step, replacement) pairs that fired, the unfired count.
Candidate = tuple[list[int], list[tuple[int, Replacement]], int]
K = TypeVar("K")


@dataclass
class PreparedItem:
    custom_id: str
    question: str
    image: Image.Image
    preferred: str | None = None


@dataclass
class Level:
    level: int  # 1 = mildest (most similar to the preferred answer)
    text: str
    n_replacements: int
    replacements: list[dict]  # position, original, replacement, reward, shift
    similarity: float
    unfired: int = 0  # planned replacements that never found their token in the re-decode


@dataclass
class ItemResult:
    custom_id: str
    question: str
    image: Image.Image
    chosen: str
    own_answer: str
    corrupted: str
    coupled: list[dict]  # position, token, shift; largest shift first
    levels: list[Level] = field(default_factory=list)
    n_candidates: int = 0
    shortfall: bool = False
    error: str | None = None


def _normalized(text: str) -> str:
    return " ".join(text.lower().replace(" .", ".").rstrip(" .!").split())


def pick_chosen(reference: str | None, own: str, mode: str) -> str:
    """The preferred answer: the reference (``mode`` 'reference'), or the model's own answer where it agrees with
    the reference (``mode`` 'own', on-policy); the own answer where there is no reference."""
    if not reference:
        return own
    if mode == "own" and _normalized(own) == _normalized(reference):
        return own
    return reference


def reproduced_prefix(full: torch.Tensor, response: Sequence[int]) -> int:
    """How many leading tokens of ``response`` greedy decoding under the full image reproduces.

    ``full`` holds the teacher-forced full-image logits of ``response``: row t is what the decoder
    sees after ``response[:t]``, so greedy decoding follows the response while its argmax agrees.
    """
    agrees = full.argmax(-1) == torch.tensor(list(response), dtype=torch.long)
    return len(response) if bool(agrees.all()) else int((~agrees).int().argmax())


def run_hscr(backend: Backend, items: Sequence[PreparedItem], params: HSCRParams,
             similarity: Similarity, *, prefix_redecode: bool = True, share_decodes: bool = True,
             full_scores_from_decode: bool = True) -> list[ItemResult]:
    """Run HSCR on ``items``; each result carries its levels or an ``error`` for that item alone.

    ``prefix_redecode=False`` re-decodes every level from the start of the response, and
    ``share_decodes=False`` re-decodes a level without continuing an earlier round's level: the
    same results at a higher cost (kept to check and measure exactly that).
    ``full_scores_from_decode=False`` scores the own answer under the full image in a second,
    teacher-forced pass instead of keeping the decode's own logits: the same decisions from logits
    that differ only in float rounding (about 1e-5), at the cost of that pass.
    """
    if not items:
        return []
    batch = HSCRBatch(backend, items, params, similarity, prefix_redecode=prefix_redecode,
                      share_decodes=share_decodes, full_scores_from_decode=full_scores_from_decode)
    backend.generate_chained(batch.plan(backend.generate(batch.answer_requests)), batch.follow,
                             successor=batch.successor)
    return batch.finish()


def run_hscr_stream(backend: Backend, batches: Iterable[tuple[K, Sequence[PreparedItem]]], params: HSCRParams,
                    similarity: Similarity, *, overlap: bool | None = None) -> Iterator[tuple[K, list[ItemResult]]]:
    """``run_hscr`` over a stream of ``(key, items)`` batches; yields ``(key, results)`` in order.

    With ``overlap`` (default: ``backend.continuous_batching``) batch k's re-decode goes into the
    same ``generate`` call as batch k+1's own answers: both depend only on earlier work, so an
    engine that batches requests of any length together (vLLM) decodes them in the same steps,
    and a stream costs about ``max(answer, re-decode)`` steps per batch instead of their sum.
    Every request stays independent, so the decisions are those of ``run_hscr`` on each batch.
    A batch's results come out one batch later than without overlap.

    By default a backend that decodes a whole stream in one chained batch (the transformers backend:
    ``streams_chained``) does that instead (``_stream_chained``) where ``backend.chains_stream`` says so for the
    first batch's size; ``overlap=False`` runs batch by batch.
    """
    if overlap is None and not backend.continuous_batching and backend.streams_chained:
        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            return
        batches = itertools.chain([first], batches)
        if backend.chains_stream(len(first[1])):
            yield from _stream_chained(backend, batches, params, similarity)
            return
    if overlap is None:
        overlap = backend.continuous_batching
    if not overlap:
        for key, items in batches:
            yield key, run_hscr(backend, items, params, similarity)
        return
    # Planned batches whose re-decode rounds ride the next calls, oldest first; results leave in order.
    waiting: list[tuple[K, HSCRBatch]] = []

    def call(answers: Sequence[GenerateRequest]) -> list[list[int]]:
        """One engine call: ``answers`` and every waiting batch's pending round; returns the answers' outputs."""
        pending = [(batch, batch.redecode_requests) for _, batch in waiting if not batch.done]
        outputs = backend.generate([*answers, *(r for _, requests in pending for r in requests)])
        at = len(answers)
        for batch, requests in pending:
            batch.absorb(outputs[at:at + len(requests)])
            at += len(requests)
        return outputs[:len(answers)]

    def ready() -> Iterator[tuple[K, list[ItemResult]]]:
        while waiting and waiting[0][1].done:
            key, batch = waiting.pop(0)
            yield key, batch.finish()

    for key, items in batches:
        batch = HSCRBatch(backend, items, params, similarity)
        own = call(batch.answer_requests)
        yield from ready()
        batch.plan(own)
        waiting.append((key, batch))
        yield from ready()
    while waiting:
        call([])
        yield from ready()


@dataclass
class _Streamed:
    """One ``HSCRBatch`` of a chained stream (``_stream_chained``): its own answers as they finish, then its
    levels."""

    batch: HSCRBatch
    own: list[list[int] | None] = field(default_factory=list)
    planned: bool = False

    def __post_init__(self) -> None:
        self.own = [None] * len(self.batch.answer_requests)
        self._index = {id(r): k for k, r in enumerate(self.batch.answer_requests)}
        if not self.own:  # every item refused: nothing to decode
            self.batch.plan([])
            self.planned = True

    def follow(self, request: GenerateRequest, ids: list[int]) -> list[GenerateRequest]:
        k = self._index.pop(id(request), None)
        if k is None:
            return self.batch.follow(request, ids)
        self.own[k] = ids
        if self._index:
            return []
        self.planned = True
        return self.batch.plan(self.own)

    @property
    def ready(self) -> bool:
        return self.planned and self.batch.done


def _stream_chained(backend: Backend, batches: Iterable[tuple[K, Sequence[PreparedItem]]], params: HSCRParams,
                    similarity: Similarity) -> Iterator[tuple[K, list[ItemResult]]]:
    """``run_hscr_stream`` in one chained decode batch (``backend.stream_chained``): a batch's own answers take
    rows as soon as the batch before it leaves rows free, and its levels follow in the same batch, so no row idles
    while one batch's last levels decode. Each item is planned as soon as its own answer is in (an ``HSCRBatch``
    of its own: items are independent), so its levels do not wait for the slowest answer of its batch. Each
    request is the one ``run_hscr`` makes, so are the decisions; results leave per batch, in order."""
    source = iter(batches)
    live: deque[tuple[K, list[_Streamed]]] = deque()  # per batch, oldest first: results leave in order
    of_image: dict[int, _Streamed] = {}  # id(visual embeddings) -> its item (an item's requests share them)

    def more() -> list[GenerateRequest]:
        for key, items in source:
            entries = [_Streamed(HSCRBatch(backend, [item], params, similarity)) for item in items]
            live.append((key, entries))
            requests = [r for entry in entries for r in entry.batch.answer_requests]
            of_image.update((id(r.visual.embeds), entry) for entry in entries for r in entry.batch.answer_requests)
            if requests:
                return requests
        return []

    def ready() -> Iterator[tuple[K, list[ItemResult]]]:
        while live and all(entry.ready for entry in live[0][1]):
            key, entries = live.popleft()
            for r in [r for entry in entries for r in entry.batch.answer_requests]:
                of_image.pop(id(r.visual.embeds), None)
            yield key, [result for entry in entries for result in entry.batch.finish()]

    def follow(request: GenerateRequest, ids: list[int]) -> list[GenerateRequest]:
        return of_image[id(request.visual.embeds)].follow(request, ids)

    def successor(request: GenerateRequest) -> Successor | None:
        return of_image[id(request.visual.embeds)].batch.successor(request)

    for _ in backend.stream_chained(more, follow, successor):
        yield from ready()
    yield from ready()
    if live:
        raise RuntimeError(f"the chained stream ended with {len(live)} batches unfinished")


class HSCRBatch:
    """One batch of items through HSCR in stages around the caller's engine calls:

    1. ``answer_requests``: the own-answer decodes (steps 1-2; images are encoded at construction);
    2. ``plan(own_answers)``: scoring under the full and dropped images, coupled positions,
       hallucinated tokens and level plans (steps 3-6); fills ``redecode_requests``, the first round
       of step 7;
    3. ``absorb(redecoded)`` per round: the round's candidates in; the next round's requests out
       (empty once every item has its levels or has none left to try: ``done``); or ``follow(request,
       ids)`` per finished request: an item's next round as soon as its own round is in (items are
       independent, so an engine can decode one item's next level while others still decode theirs);
    4. ``finish()``: the kept levels, reranked (step 8) -> one result per item.

    ``run_hscr`` runs them back to back; ``run_hscr_stream`` interleaves batches.
    """

    def __init__(self, backend: Backend, items: Sequence[PreparedItem], params: HSCRParams,
                 similarity: Similarity, *, prefix_redecode: bool = True, share_decodes: bool = True,
                 full_scores_from_decode: bool = True):
        check_params_supported(backend, params)
        self.backend, self.params, self.similarity = backend, params, similarity
        self.prefix_redecode, self.share_decodes = prefix_redecode, share_decodes
        visual = backend.encode_images([it.image for it in items]) if items else []
        # An item the model cannot take fails alone (an engine would refuse the whole call for it).
        refused: dict[int, str] = {}
        prompts: list[list[int]] = []
        preferred: list[list[int] | None] = []  # the ids of the response to corrupt when teacher forced
        for k, (it, v) in enumerate(zip(items, visual, strict=True)):
            ids = backend.encode_text(it.preferred) if params.corrupt == "preferred" and it.preferred else None
            preferred.append(ids)
            try:
                prompts.append(backend.prompt_ids(it.question))
            except ValueError as exc:  # e.g. a question holding the image token in a form the profile keeps
                prompts.append([])
                refused[k] = f"the question cannot be put in the model's prompt: {exc}"
                continue
            if ids is not None and backend.image_token_id in ids:
                refused[k] = ("the preferred answer holds the image placeholder token; remove it from the answer "
                              "(it cannot be scored as a response)")
            elif why := _too_long(backend, prompts[k], v, ids, params.max_new_tokens):
                refused[k] = why
        self._rejected = {k: ItemResult(custom_id=it.custom_id, question=it.question, image=it.image,
                                        chosen=it.preferred or "", own_answer="", corrupted="", coupled=[],
                                        error=refused[k])
                          for k, it in enumerate(items) if k in refused}
        self._size = len(items)
        keep = [k for k in range(len(items)) if k not in self._rejected]
        self.items = items = [items[k] for k in keep]
        self.visual, self.prompts = [visual[k] for k in keep], [prompts[k] for k in keep]
        self.preferred_ids = [preferred[k] for k in keep]
        # Where the own answer is the response to corrupt, its full-image score rows are the logits
        # the greedy decode already computed: the decode returns them, and no second pass is needed.
        self.answer_requests = [
            GenerateRequest(p, v, params.max_new_tokens, return_logits=full_scores_from_decode and ids is None)
            for p, v, ids in zip(self.prompts, self.visual, self.preferred_ids, strict=True)]
        self.results: list[ItemResult] = []
        self.corrupted: list[list[int]] = []  # per item: the response that gets corrupted
        self._plans: list[list[list[Replacement]]] = []  # per item: its level plans, mildest first
        # per item with plans: its candidates so far, (ids, fired (step, replacement) pairs, unfired count)
        self._candidates: dict[int, list[Candidate]] = {}
        self._followed: dict[int, int] = {}  # per item: response tokens the full-image greedy decode reproduces
        # per item in a round: its level plans with their decoders (a re-decode) or finished candidates (an
        # earlier decode already holds all of it: ``_resume``), its requests and the outputs that are in
        self._jobs: dict[int, list[tuple[list[Replacement], ForcedDecoder | Candidate]]] = {}
        self._requests: dict[int, list[GenerateRequest]] = {}
        self._outputs: dict[int, list[list[int] | None]] = {}
        # id(request) -> (item, its round's outputs, index in its round)
        self._pending: dict[int, tuple[int, list[list[int] | None], int]] = {}
        # per item: rounds requested ahead of the round in flight (``successor``), oldest first, as above
        self._ahead: dict[int, list[tuple[list, list[GenerateRequest], list[list[int] | None]]]] = {}

    def plan(self, own: Sequence[list[int]]) -> list[GenerateRequest]:
        """Steps 3-7 from the own answers; returns (and keeps) the re-decode requests."""
        backend, items, params = self.backend, self.items, self.params
        prompts, visual = self.prompts, self.visual
        self.corrupted = corrupted = [ids if preferred is None else preferred
                                      for ids, preferred in zip(own, self.preferred_ids, strict=True)]

        # Step 4: the full image (unless the decode returned its rows) and n_masks dropped variants,
        # scored in one batched call.
        full_logits = {i: request.logits for i, request in enumerate(self.answer_requests)
                       if corrupted[i] and request.logits is not None}
        if any(full_logits[i].shape[0] != len(corrupted[i]) for i in full_logits):
            raise RuntimeError("the backend returned decode logits that do not match its answer")
        dropped_visual = []
        for it, v in zip(items, visual, strict=True):
            masks = keep_masks(v.n_tokens, params.dropout_ratio, params.n_masks,
                               mask_generator(params.mask_seed, it.custom_id))
            dropped_visual.append([v.dropped(keep, params.dropout_mode) for keep in masks])
        # A response can be scored when it is not empty and holds no image placeholder (a model may emit it).
        scorable = [bool(r) and backend.image_token_id not in r for r in corrupted]
        unscored = [i for i, ok in enumerate(scorable) if ok and i not in full_logits]
        requests = [ScoreRequest(prompts[i], visual[i], corrupted[i]) for i in unscored]
        requests += [ScoreRequest(p, dv, r)
                     for p, dvs, r, ok in zip(prompts, dropped_visual, corrupted, scorable, strict=True) if ok
                     for dv in dvs]
        scores = iter(backend.score(requests))
        full_logits |= {i: next(scores) for i in unscored}
        # Per item: one row set per mask; the shift is averaged over the masks (method.md, step 1), the
        # rows for the candidates and the reward (a per-position offset between logits and
        # log-probabilities, which leaves those choices unchanged).
        dropped_by_mask = {i: torch.stack([next(scores) for _ in range(params.n_masks)])
                           for i, ok in enumerate(scorable) if ok}
        dropped_logits = {i: rows.mean(0) for i, rows in dropped_by_mask.items()}

        plans_by_item: list[list[list[Replacement]]] = []
        for i, it in enumerate(items):
            own_text = backend.decode(own[i])
            result = ItemResult(custom_id=it.custom_id, question=it.question, image=it.image,
                                chosen=pick_chosen(it.preferred, own_text, params.chosen), own_answer=own_text,
                                corrupted=backend.decode(corrupted[i]), coupled=[])
            self.results.append(result)
            plans_by_item.append([])
            if not corrupted[i]:
                result.error = "the model gave an empty answer: nothing to corrupt"
                continue
            if not scorable[i]:
                result.error = "the model's answer holds the image placeholder token: it cannot be scored"
                continue
            response = torch.tensor(corrupted[i])
            full, dropped = full_logits[i], dropped_logits[i]
            shift = torch.stack([token_shift(full, rows, response, params.shift, values=backend.score_values)
                                 for rows in dropped_by_mask[i]]).mean(0)
            # A replacement must fall inside the re-decode budget (a long preferred answer may exceed it).
            eligible = torch.tensor([t not in backend.special_token_ids and position < params.max_new_tokens
                                     for position, t in enumerate(corrupted[i])])
            positions = coupled_positions(shift, params.n_coupled, min_shift=params.min_shift, eligible=eligible,
                                          coupling=params.coupling)
            result.coupled = [{"position": p, "token": backend.decode([corrupted[i][p]]), "shift": float(shift[p])}
                              for p in positions]
            replacements = []
            for p in positions:
                choice = hallucinated_token(full[p], dropped[p], corrupted[i][p], beta=params.contrast_beta,
                                            top_k=params.top_k_candidates, pool=params.candidate_pool,
                                            plausibility=params.plausibility,
                                            banned=sorted(backend.special_token_ids))
                if choice is not None:
                    replacements.append(Replacement(p, corrupted[i][p], choice[0], choice[1], float(shift[p])))
            if not replacements:
                if not self._own_is_rejected(result):  # else the own answer, answered without the image, is the level
                    result.error = "no modality-coupled token found: the answer does not depend on the image"
                continue
            plans_by_item[i] = level_plans(replacements)

        # Step 7: the levels, mildest first, in rounds of ``candidates_per_round`` per item (or spliced in
        # place at once); an item stops once its levels are kept (``_next_round``).
        self._plans = plans_by_item
        self._candidates = {i: [] for i, plans in enumerate(plans_by_item) if plans}
        if params.replace_mode == "redecode":
            # The own answer is the greedy decode itself; a preferred answer is followed only as long
            # as the model's greedy choice agrees with it (beyond that the re-decode goes its own way).
            self._followed = {i: reproduced_prefix(full_logits[i], corrupted[i])
                              if self.preferred_ids[i] is not None else len(corrupted[i]) for i in self._candidates}
        else:
            for i in self._candidates:
                self._candidates[i] = [(splice(corrupted[i], plan), [(r.position, r) for r in plan], 0)
                                       for plan in plans_by_item[i]]
        self._next_round(list(self._candidates))
        return self.redecode_requests

    def _next_round(self, items: Sequence[int]) -> None:
        """The re-decode requests of the next ``candidates_per_round`` levels of each of ``items``."""
        if self.params.replace_mode == "redecode":
            for i in items:
                self._round(i)

    def _round(self, i: int) -> None:
        """Item ``i``'s next round: its next ``candidates_per_round`` levels; a round whose levels earlier
        decodes hold whole is taken in at once, and the one after it planned."""
        params = self.params
        per_round = params.candidates_per_round or params.n_coupled
        while True:
            done = len(self._candidates[i])
            jobs = [(plan, self._resume(i, plan)) for plan in self._plans[i][done:done + per_round]]
            requests = [self._request(i, job) for _, job in jobs if isinstance(job, ForcedDecoder)]
            if requests:
                self._jobs[i], self._requests[i], self._outputs[i] = jobs, requests, [None] * len(requests)
                self._pending |= {id(r): (i, self._outputs[i], index) for index, r in enumerate(requests)}
                return
            self._take(i, jobs, [])
            if not jobs or not self._more(i):
                return

    def _take(self, i: int, jobs: Sequence[tuple[list[Replacement], ForcedDecoder | Candidate]],
              outputs: Sequence[list[int]]) -> None:
        """Item ``i``'s round in: its candidates in plan order (the reranker breaks ties by it)."""
        decoded = iter(outputs)
        for plan, job in jobs:
            if isinstance(job, ForcedDecoder):
                job = (next(decoded), list(job.fired), len(plan) - len(job.fired))
            self._candidates[i].append(job)

    def _more(self, i: int) -> bool:
        """Whether item ``i`` has levels left to decode and not yet ``n_levels`` kept with the gap."""
        return len(self._candidates[i]) < len(self._plans[i]) and self._rank(i)[2].shortfall

    @property
    def redecode_requests(self) -> list[GenerateRequest]:
        """The pending re-decode requests of every item, in item order."""
        return [r for i in sorted(self._requests) for r in self._requests[i]]

    def _resume(self, i: int, plan: list[Replacement]) -> ForcedDecoder | Candidate:
        """Where item ``i``'s re-decode with ``plan`` starts: the decoder of a request whose response prefix is
        the longest stretch that an earlier decode of the item shares with it, or the finished candidate when
        an earlier decode holds the whole of it (``core.replace.divergence``; exact, as greedy decoding is).

        The earlier decodes are the response being corrupted (as far as greedy decoding reproduces it) and,
        with ``share_decodes``, the levels of earlier rounds. Without ``prefix_redecode`` it starts at 0.
        """
        budget, corrupted = self.params.max_new_tokens, self.corrupted[i]
        late = self.params.fire_after_divergence
        if not self.prefix_redecode:
            return self._decoder(i, plan)
        # (tokens, greedy choices where they differ from the tokens, whether the decode ended there)
        # (a preferred answer: greedy decoding follows it this far, and where it would stop is unknown)
        earlier = [(corrupted[:min(self._followed[i], budget)], {}, self.preferred_ids[i] is None)]
        if self.share_decodes:
            earlier += [(ids, {step: r.original for step, r in fired}, True) for ids, fired, _ in self._candidates[i]]
        def reach(tokens: list[int], greedy_at: dict[int, int], ended: bool):
            """(steps shared, whether the level is all of that decode, the replacements fired, the decode)"""
            steps, fired = divergence(corrupted, plan, tokens, greedy_at, after_divergence=late)
            return steps, steps == len(tokens) and (ended or steps >= budget), fired, tokens

        steps, complete, fired, source = max((reach(*decode) for decode in earlier), key=lambda r: r[:2])
        if complete:  # it would decode exactly what that decode did, and stop where it stopped
            return list(source[:budget]), fired, len(plan) - len(fired)
        steps = min(steps, budget - 1)  # (a preferred answer may outrun the budget: keep a step to decode)
        fired = [(step, r) for step, r in fired if step < steps]
        return self._decoder(i, plan, source[:steps], fired)

    def _decoder(self, i: int, plan: list[Replacement], prefix: Sequence[int] = (),
                 fired: Sequence[tuple[int, Replacement]] = ()) -> ForcedDecoder:
        """The decoder of item ``i``'s level ``plan``, from ``prefix`` (an earlier decode's tokens, in which the
        replacements ``fired`` fired)."""
        return ForcedDecoder(self.corrupted[i], plan, response_prefix=list(prefix), fired=list(fired),
                             after_divergence=self.params.fire_after_divergence)

    def _request(self, i: int, job: ForcedDecoder) -> GenerateRequest:
        """The re-decode request of item ``i`` that ``job`` decides, after its response prefix."""
        return GenerateRequest(self.prompts[i], self.visual[i], self.params.max_new_tokens - len(job.response_prefix),
                               forced=job, response_prefix=list(job.response_prefix))

    def absorb(self, redecoded: Sequence[list[int]]) -> list[GenerateRequest]:
        """Take one round's re-decode outputs (for ``redecode_requests``, in order); returns the next round's
        requests, empty when every item is done: it has ``n_levels`` levels with the gap, or no level left."""
        requests = self.redecode_requests
        if len(redecoded) != len(requests):
            raise ValueError(f"expected {len(requests)} re-decode outputs, got {len(redecoded)}")
        for request, ids in zip(requests, redecoded, strict=True):
            self.follow(request, ids)
        return self.redecode_requests

    def follow(self, request: GenerateRequest, ids: list[int]) -> list[GenerateRequest]:
        """Take one re-decode's output; returns its item's next round's requests once the item's round is in
        (none while others of the round are pending, or when the item is done)."""
        i, outputs, index = self._pending.pop(id(request))
        outputs[index] = ids
        while i in self._requests and all(out is not None for out in self._outputs[i]):
            del self._requests[i]
            self._take(i, self._jobs.pop(i), self._outputs.pop(i))
            ahead = self._ahead.get(i)
            # the next round was requested ahead (``successor``): wanted where it was certain to be, else where the
            # reranker is still short
            if ahead and (not any(r.speculative for r in ahead[0][1]) or self._more(i)):
                self._jobs[i], self._requests[i], self._outputs[i] = ahead.pop(0)
                for wanted in self._requests[i]:
                    wanted.speculative = False
            elif ahead:  # the item is done: what was requested speculatively is not wanted
                for _, requests, _ in self._ahead.pop(i):
                    for unwanted in requests:
                        unwanted.withdrawn = True
                        self._pending.pop(id(unwanted), None)  # (gone already where it finished first)
            elif self._more(i):
                self._round(i)
                return self._requests.get(i, [])
        return []

    def successor(self, request: GenerateRequest) -> Successor | None:
        """What watches ``request``'s decode for the point where its item's next level leaves it, so that the
        next level can be requested then instead of when ``request`` finishes (``Backend.generate_chained``).

        Where one level decodes per round (``candidates_per_round`` 1, shared decodes), ``request`` is the item's
        newest and a plan is left. The next level is certain to be requested whatever ``request`` decodes where
        fewer than ``n_levels`` candidates are in once it is (the reranker is still short); else it is requested
        speculatively where the backend takes such requests (``Backend.speculative_levels``): wanted once the
        reranker is still short with ``request``'s decode in (``follow``), withdrawn where it is not. Exact either
        way: greedy decoding is deterministic, so the next level decodes what it would from ``request``'s finished
        decode (``_resume``), and a withdrawn level never reaches the reranker."""
        params = self.params
        if params.candidates_per_round != 1 or not (self.share_decodes and self.prefix_redecode) \
                or id(request) not in self._pending:
            return None
        i, outputs, _ = self._pending[id(request)]
        ahead = self._ahead.get(i, [])
        if outputs is not (ahead[-1][2] if ahead else self._outputs.get(i)):
            return None  # not the item's newest request
        issued = len(self._candidates[i]) + 1 + len(ahead)
        speculative = issued + self._own_is_rejected(self.results[i]) >= params.n_levels
        if issued >= len(self._plans[i]) or speculative and not self.backend.speculative_levels:
            return None
        return Successor(self, i, self._plans[i][issued], request, speculative=speculative)

    def _request_ahead(self, i: int, plan: list[Replacement], job: ForcedDecoder,
                       speculative: bool = False) -> GenerateRequest:
        """Item ``i``'s next level, requested while the level before it still decodes (``Successor``)."""
        request = self._request(i, job)
        request.speculative = speculative
        outputs: list[list[int] | None] = [None]
        self._ahead.setdefault(i, []).append(([(plan, job)], [request], outputs))
        self._pending[id(request)] = (i, outputs, 0)
        return request

    @property
    def done(self) -> bool:
        return not self._requests

    def _own_is_rejected(self, result: ItemResult) -> bool:
        """``own_rejected``: the own answer disagrees with the preferred one, so it is a dispreferred candidate."""
        return self.params.own_rejected and _normalized(result.own_answer) != _normalized(result.chosen)

    def _rank(self, i: int) -> tuple[list[tuple[str, list[tuple[int, Replacement]], int]], list[float], Selection]:
        """Item ``i``'s distinct dispreferred candidates so far, their similarities to the preferred answer and
        the reranker's selection (step 8)."""
        result = self.results[i]
        seen, unique = {result.chosen, result.own_answer}, []
        if self._own_is_rejected(result):
            unique.append((result.own_answer, [], 0))  # what the model says where it is wrong
        for ids, done, unfired in self._candidates.get(i, []):
            text = self.backend.decode(ids)
            if text not in seen and done:
                seen.add(text)
                unique.append((text, done, unfired))
        if not unique:
            return unique, [], Selection([], shortfall=True)
        texts = [text for text, _, _ in unique]
        if self.params.drop_corrections:  # a corruption closer to the preferred answer than its source corrected it
            *sims, bar = self.similarity([*texts, result.corrupted], result.chosen)
            kept = [k for k, (_, done, _) in enumerate(unique) if not done or sims[k] <= bar + 1e-9]
            unique, sims = [unique[k] for k in kept], [sims[k] for k in kept]
            if not unique:
                return unique, [], Selection([], shortfall=True)
        else:
            sims = self.similarity(texts, result.chosen)
        severity = [len(done) for _, done, _ in unique] if self.params.severity_order else None
        return unique, sims, select_levels(sims, self.params.n_levels, self.params.min_similarity_gap, severity,
                                         keep_ties=self.params.keep_tied_levels)

    def finish(self, redecoded: Sequence[list[int]] | None = None) -> list[ItemResult]:
        """Step 8 once every round is in (``redecoded``: the last round's outputs, if not absorbed yet) -> one
        result per item."""
        if redecoded is not None:
            self.absorb(redecoded)
        if not self.done:
            raise RuntimeError("finish() before every re-decode round is in; absorb() the pending requests first")
        backend = self.backend
        for i, result in enumerate(self.results):
            if result.error:
                continue
            unique, sims, selection = self._rank(i)
            result.n_candidates = len(unique)
            if not unique:
                result.error = ("every replacement reproduced the preferred answer or moved the answer toward it: "
                                "no dispreferred response")
                continue
            result.shortfall = selection.shortfall
            for level, k in enumerate(selection.indices, start=1):
                text, done, unfired = unique[k]
                result.levels.append(Level(
                    level=level, text=text, n_replacements=len(done), similarity=float(sims[k]),
                    unfired=unfired,
                    replacements=[{"position": step, "original": backend.decode([r.original]),
                                   "replacement": backend.decode([r.token]), "reward": r.reward, "shift": r.shift}
                                  for step, r in done]))
        return self._in_input_order()

    def _in_input_order(self) -> list[ItemResult]:
        """The results of the items that ran, with the rejected ones back in their input positions."""
        ran = iter(self.results)
        return [self._rejected[k] if k in self._rejected else next(ran) for k in range(self._size)]


class Successor:
    """Item ``i``'s next level (``plan``) checked against the decode of ``request`` (the level before it) step
    by step, as ``core.replace.divergence`` checks a finished decode: at the first step where the next level's
    decoder decides otherwise, the next level is requested with the tokens before that step as its prefix."""

    def __init__(self, batch: HSCRBatch, i: int, plan: list[Replacement], request: GenerateRequest,
                 speculative: bool = False):
        self.batch, self.i, self.plan, self.speculative = batch, i, plan, speculative
        self.tokens: list[int] = []
        self.decoder = batch._decoder(i, plan)
        self.request: GenerateRequest | None = None  # the next level's, once requested
        # the prefix was decoded already: the forced steps' greedy choices are the originals it replaced
        greedy_at = {step: r.original for step, r in request.forced.fired} if request.forced else {}
        for token in request.response_prefix:
            if self.step(token, greedy_at.get(len(self.tokens), token)) is not None:
                break

    def step(self, token: int, greedy: int) -> GenerateRequest | None:
        """The decode emitted ``token`` where the model's greedy choice was ``greedy``; returns the next level's
        request at the step where it leaves this decode (once; None before and after)."""
        if self.request is not None or len(self.tokens) >= self.batch.params.max_new_tokens - 1:
            return None
        before = list(self.decoder.fired)
        forced = self.decoder.next_token(self.tokens, greedy)
        if (greedy if forced is None else forced) == token:
            self.tokens.append(token)
            return None
        job = self.batch._decoder(self.i, self.plan, self.tokens, before)
        self.request = self.batch._request_ahead(self.i, self.plan, job, self.speculative)
        return self.request


def check_params_supported(backend: Backend, params: HSCRParams) -> None:
    """Refuse a setting the backend's score rows cannot serve as asked (before any item runs)."""
    if params.shift == "logit" and backend.score_values != "logits":
        raise ValueError(f"shift='logit' (the paper's raw-logit shift) needs raw logits, but this {backend.name} "
                         f"backend returns log-probabilities (its score rows hold the top-k tokens only); start it "
                         f"with score_values='logits' (hscr worker --score-values logits), or use shift='logprob'")
    if backend.score_top_k is not None and params.top_k_candidates > backend.score_top_k:
        raise ValueError(f"top_k_candidates={params.top_k_candidates} exceeds the {backend.score_top_k} tokens "
                         f"this {backend.name} backend returns per score row, so the candidates would silently come "
                         f"from fewer; start it with score_top_k >= {params.top_k_candidates} (--score-top-k of "
                         f"hscr worker or hscr generate), or lower top_k_candidates")


def _too_long(backend: Backend, prompt: list[int], visual: VisualTokens, preferred: list[int] | None,
              max_new_tokens: int) -> str | None:
    """Why an item cannot fit the backend's context, or None when it fits."""
    if backend.max_context_tokens is None:
        return None
    prompt_tokens = len(prompt) - 1 + visual.n_tokens  # the image placeholder expands to the visual tokens
    response = max_new_tokens if preferred is None else max(max_new_tokens, len(preferred))
    if prompt_tokens + response <= backend.max_context_tokens:
        return None
    return (f"the question and image take {prompt_tokens} tokens and the response up to {response}: more than the "
            f"model's context of {backend.max_context_tokens} tokens; shorten the question (or lower max_new_tokens)")
