"""The reference backend: any supported checkpoint through transformers, on CPU or CUDA.

Prompts go in as embeddings (the image placeholder expanded to the visual tokens) with explicit
positions from the model family: a model that sees only ``inputs_embeds`` cannot tell where an
image's tokens sit (Qwen's M-RoPE would silently count them as text), and a dropped image must
keep its survivors where they were. Greedy decoding is a small loop over the KV cache, so those
positions hold at every step. A family whose image tokens attend to each other bidirectionally
(Gemma 3) also gets ``token_type_ids`` marking the image's rows in the prompt pass.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field

from hscr_worker._compat import ensure_torchvision_importable

ensure_torchvision_importable()

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText, DynamicCache  # noqa: E402
from transformers.cache_utils import DynamicLayer  # noqa: E402

from .base import (  # noqa: E402
    BackendStats,
    DecodeWatch,
    GenerateRequest,
    ProcessorBackend,
    ScoreRequest,
    VisualTokens,
)

# A chained decode batch drops the columns no row attends to once they are more than COMPACT_SLACK and more than
# COMPACT_SHARE of the widest row's: a copy of the cache then costs less than attending over them afterwards.
COMPACT_SLACK, COMPACT_SHARE = 32, 0.25
# By default a stream decodes in one chained batch up to this many rows (``batch_size``), and above it where a batch
# of the stream fills at most half the rows. Measured on a CPU against batch by batch (docs/bench.md): 0.89x the
# time with 8-item batches in 8 rows, 0.62-0.64x with 8-item batches in 32 rows (the worker's), and with 32-item
# batches in 32 rows 0.93-1.17x the time with more memory (1.33x plain's peak against 1.02x).
STREAM_CHAIN_MAX_ROWS = 16


class _GrowingLayer(DynamicLayer):
    """A full-attention cache layer that appends a step's keys into spare columns instead of concatenating.

    transformers' ``DynamicLayer`` copies the whole layer every step (``torch.cat``): at batch 32 on the compute-bound
    model that copy took two thirds of a decode step (``bench/kv_cache.py``). Here ``keys`` and ``values`` are views of
    buffers with ``SPARE`` more columns, so a step writes its own columns only; the buffers are copied once per
    ``SPARE`` steps. Assigning ``keys``/``values`` (row selection, compaction, widening) replaces the buffers, so code
    written for a ``DynamicLayer`` works unchanged, and the attention sees the same tensors."""

    SPARE = 64

    def __init__(self, **kwargs) -> None:
        self._buffers: dict[str, torch.Tensor | None] = {"keys": None, "values": None}
        self._lengths = {"keys": 0, "values": 0}  # each its own: code assigns keys, then reads values
        super().__init__(**kwargs)

    def _view(self, name: str) -> torch.Tensor | None:
        buffer = self._buffers[name]
        return None if buffer is None else buffer[:, :, :self._lengths[name]]

    def _assign(self, name: str, value: torch.Tensor | None) -> None:
        buffer = value if value is not None and value.dim() == 4 else None  # lazy init assigns an empty 1-D
        self._buffers[name], self._lengths[name] = buffer, 0 if buffer is None else buffer.shape[-2]

    keys = property(lambda self: self._view("keys"), lambda self, value: self._assign("keys", value))
    values = property(lambda self: self._view("values"), lambda self, value: self._assign("values", value))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        for name, states in (("keys", key_states), ("values", value_states)):
            buffer, start = self._buffers[name], self._lengths[name]
            end = start + states.shape[-2]
            if buffer is None or buffer.shape[-2] < end:
                grown = states.new_empty(*states.shape[:-2], end + self.SPARE, states.shape[-1])
                if start:
                    grown[:, :, :start] = buffer[:, :, :start]
                self._buffers[name] = buffer = grown
            buffer[:, :, start:end] = states
            self._lengths[name] = end
        return self.keys, self.values


@dataclass
class _CachedRow:
    """One own-answer decode whose KV cache later re-decodes of the same prompt and image continue."""

    visual: torch.Tensor  # the image's embeddings tensor (identity, not value, is the key)
    cache: DynamicCache  # its batch's cache; this row is ``row``, its columns ``first`` onwards
    row: int
    first: int  # column of the prompt's first token (left padding before it)
    prompt_end: int  # column of the first response token
    tokens: list[int]  # response tokens whose keys the cache holds
    last_prompt_token: int
    last_prompt_position: int
    next_position: int  # position of the first response token
    n_positions: int  # position rows of the family (3 for M-RoPE, else 1)

    def shared(self, want: Sequence[int]) -> int:
        """How much of ``want`` (``_want``) this row holds."""
        return _shared([self.last_prompt_token, *self.tokens], want)

    def width(self, shared: int) -> int:
        """Columns of the prompt but its last token and ``shared`` held tokens."""
        return self.prompt_end - 1 - self.first + shared


@dataclass
class _Slot:
    """A row of a chained decode batch (``TransformersBackend._chain``) and the request it decodes, if any. Its
    keys: the prompt but its last token, then ``held`` (the last prompt token and response tokens) at
    ``columns``; a later request of the same prompt and image continues the stretch of ``held`` it shares."""

    prompt_ids: tuple[int, ...]
    visual: torch.Tensor  # identity, not value
    held: list[int]
    columns: list[int]
    last_prompt_position: int
    next_position: int  # position of the first response token
    request: GenerateRequest | None = None
    feed: list[int] = field(default_factory=list)  # tokens to feed, one a step; a decision once it is empty
    generated: list[int] = field(default_factory=list)
    watch: DecodeWatch | None = None  # hands out a request that leaves this one's decode (``successor``)

    def continues(self, request: GenerateRequest) -> bool:
        return tuple(request.prompt_ids) == self.prompt_ids and request.visual.embeds is self.visual

    def copy(self) -> _Slot:
        """This row's keys, for a copy of the row that decodes another request."""
        return _Slot(self.prompt_ids, self.visual, list(self.held), list(self.columns), self.last_prompt_position,
                     self.next_position)

    def shared(self, want: Sequence[int]) -> int:
        return _shared(self.held, want)

    def feed_next(self, column: int) -> tuple[int, int]:
        """The next token to feed, which goes into ``column``, and its position."""
        token, index = self.feed.pop(0), len(self.held)
        self.held.append(token)
        self.columns.append(column)
        return token, self.last_prompt_position if index == 0 else self.next_position + index - 1


def _want(request: GenerateRequest) -> list[int]:
    """What a continued request's row must hold or be fed: the last prompt token and the response prefix."""
    return [int(request.prompt_ids[-1]), *request.response_prefix]


def _shared(held: Sequence[int], want: Sequence[int]) -> int:
    """How many leading tokens of ``want`` (last prompt token, response prefix) ``held`` has, all but at least
    the last one: that one is fed, which gives the first logits."""
    n = 0
    for have, token in zip(held, want[:-1], strict=False):
        if have != token:
            break
        n += 1
    return n


class TransformersBackend(ProcessorBackend):
    name = "transformers"

    def __init__(self, model_path: str, *, device: str | None = None, dtype: str | None = None,
                 batch_size: int = 32, ignore_eos: bool = False, profile: str | None = None,
                 min_pixels: int | None = None, max_pixels: int | None = None, reuse_prompt_cache: bool = True,
                 chain_redecodes: bool = True, stream_chain: bool | None = None, speculative_levels: bool = True):
        # Re-decodes continue the own answer's KV cache (``_continue``) instead of prefilling prompt and image
        # again; False prefills every request (kept to check and measure exactly that).
        self.reuse_prompt_cache = reuse_prompt_cache
        # Re-decodes and their follow-ups share one decode batch (``_chain``); False decodes them in rounds, a
        # call per round (``Backend.generate_chained``), kept to measure the chain against.
        self.chain_redecodes = chain_redecodes
        # A stream decodes in one chained batch (``stream_chained``): the next batch's own answers fill the rows a
        # batch's tail leaves; False runs it batch by batch (``run_hscr`` per batch); None (the default):
        # ``chains_stream`` decides by the rows and the stream's batch size.
        self.stream_chain = stream_chain
        # A chain decodes an item's next level in a row nothing else wants before the reranker knows it needs it
        # (``Backend.speculative_levels``): a batch's tail, where a few items' levels would decode one after the
        # other in near-empty steps, runs them side by side; False waits for each (kept to measure against).
        self.speculative_levels = speculative_levels
        self._reusable: dict[tuple[tuple[int, ...], int], _CachedRow] = {}
        self.stats = BackendStats()
        # Benchmarks only: random weights would stop at a random EOS; this decodes every response
        # to exactly max_new_tokens. Off by default, so responses end at EOS as usual.
        self.ignore_eos = ignore_eos
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = getattr(torch, dtype) if dtype else (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        config = self._load_text_side(model_path, profile, min_pixels=min_pixels, max_pixels=max_pixels)
        self.model = AutoModelForImageTextToText.from_pretrained(self.model_path, dtype=torch_dtype)
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        # Positions beyond the trained range give garbage (or an error), as in vLLM's max_model_len.
        self.max_context_tokens = getattr(config.get_text_config(), "max_position_embeddings", None)
        self.pad_token_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                                else self.eos_token_id)
        self._embed_tokens = self.model.get_input_embeddings()
        self._sliding = any(layer.is_sliding for layer in DynamicCache(config=self.model.config).layers)

    # ---- images (text: ProcessorBackend) ----
    def encode_images(self, images: Sequence[Image.Image]) -> list[VisualTokens]:
        return self.profile.encode_images(self.model, self.processor, images, device=self.device,
                                          batch_size=self.batch_size)

    def _inputs(self, ids: Sequence[int], visual: VisualTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``[L, hidden]`` with the single placeholder expanded into the visual rows, and their
        positions ``long[P, L]`` (P = 1, or 3 for M-RoPE)."""
        ids = list(ids)
        at = ids.index(self.image_token_id)
        text = self._embed_tokens(torch.tensor(ids, device=self.device))
        embeds = torch.cat([text[:at], visual.embeds.to(self.device, text.dtype), text[at + 1:]])
        positions = self.profile.position_ids(ids, self.image_token_id, visual)
        if positions is None:
            positions = torch.arange(embeds.shape[0]).unsqueeze(0)
        return embeds, positions.to(self.device)

    def _pad(self, inputs: Sequence[tuple[torch.Tensor, torch.Tensor]], *, left: bool,
             images: Sequence[tuple[int, int]] | None = None):
        """One batch from ``(embeds [L, hidden], positions [P, L])`` rows: embeddings ``[B, L, hidden]``,
        positions ``long[P, B, L]``, the attention mask and the token types; padded on the left (decoding
        appends on the right) or on the right (scoring reads each row from its start).

        Token types (``long[B, L]``, 1 = image) only for a family whose image tokens attend to each other
        bidirectionally (Gemma 3), from each row's image span ``images[row] = (start, n_tokens)``; else None.
        """
        length = max(e.shape[0] for e, _ in inputs)
        embeds = torch.zeros(len(inputs), length, inputs[0][0].shape[1], device=self.device, dtype=inputs[0][0].dtype)
        positions = torch.ones(inputs[0][1].shape[0], len(inputs), length, device=self.device, dtype=torch.long)
        mask = torch.zeros(len(inputs), length, device=self.device, dtype=torch.long)
        bidirectional = self.profile.image_attention == "bidirectional"
        types = torch.zeros(len(inputs), length, device=self.device, dtype=torch.long) if bidirectional else None
        for row, (e, p) in enumerate(inputs):
            offset = length - e.shape[0] if left else 0
            span = slice(offset, offset + e.shape[0])
            embeds[row, span], positions[:, row, span], mask[row, span] = e, p, 1
            if types is not None:
                start, n = images[row]
                types[row, offset + start: offset + start + n] = 1  # kept and zeroed rows are image rows too
        return embeds, positions, mask, types

    def _image_span(self, ids: Sequence[int], visual: VisualTokens) -> tuple[int, int]:
        """Where the visual rows sit in the expanded prompt: (first row, count)."""
        return list(ids).index(self.image_token_id), visual.n_tokens

    def _new_cache(self) -> DynamicCache:
        """An empty KV cache whose full-attention layers grow in place (``_GrowingLayer``); sliding-window layers
        (Gemma 3) keep transformers' own."""
        cache = DynamicCache(config=self.model.config)
        cache.layers = [_GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
        return cache

    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 types: torch.Tensor | None = None, cache: DynamicCache | None = None) -> torch.Tensor:
        """Logits ``[B, L, V]``; ``positions`` is ``long[P, B, L]``; ``types`` the token types (Gemma 3's
        bidirectional image attention; a decode step's new tokens are text: None)."""
        position_ids = positions[0] if positions.shape[0] == 1 else positions
        extra = {} if types is None else {"token_type_ids": types}
        return self.model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=mask,
                          past_key_values=cache, use_cache=cache is not None, **extra).logits

    # ---- generation and scoring ----
    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerateRequest]) -> list[list[int]]:
        # Rows that continue a kept cache are looked up before this call's own answers replace the kept caches.
        kept = [self._reusable_row(r) for r in requests]
        if any(self._keeps(r) for r in requests):
            self._reusable.clear()
        out: list[list[int]] = []
        for start in range(0, len(requests), self.batch_size):
            out += self._generate_batch(requests[start:start + self.batch_size], kept[start:start + self.batch_size])
        return out

    def _generate_batch(self, requests: Sequence[GenerateRequest],
                        kept: Sequence[_CachedRow | None]) -> list[list[int]]:
        fresh = [k for k, row in enumerate(kept) if row is None]
        if not fresh:
            return self._chain(requests, kept)
        if len(fresh) < len(requests):  # two passes: the rows to prefill, and the rows continuing a kept cache
            rest = [k for k, row in enumerate(kept) if row is not None]
            out: dict[int, list[int]] = dict(zip(fresh, self._generate_batch([requests[k] for k in fresh],
                                                                              [None] * len(fresh)), strict=True))
            out |= dict(zip(rest, self._chain([requests[k] for k in rest], [kept[k] for k in rest]), strict=True))
            return [out[k] for k in range(len(requests))]
        inputs = [self._inputs([*r.prompt_ids, *r.response_prefix], r.visual) for r in requests]
        embeds, positions, mask, types = self._pad(inputs, left=True,
                                                   images=[self._image_span(r.prompt_ids, r.visual) for r in requests])
        next_position = torch.stack([p.max() + 1 for _, p in inputs])  # [B]: the first response token's
        cache = self._new_cache()
        logits = self._forward(embeds, positions, mask, types, cache)[:, -1]
        self.stats.prefill_tokens += int(mask.sum())
        keep_cache = all(self._keeps(r) for r in requests)
        generated, mask = self._decode(requests, logits, cache, mask, next_position, positions.shape[0],
                                       drop_finished=not keep_cache)
        if keep_cache:
            self._keep_for_reuse(requests, inputs, generated, cache, mask)
        return self._responses(requests, generated)

    def _decode(self, requests: Sequence[GenerateRequest], logits: torch.Tensor, cache: DynamicCache,
                mask: torch.Tensor, next_position: torch.Tensor, n_pos: int,
                *, drop_finished: bool = False) -> tuple[list[list[int]], torch.Tensor]:
        """Greedy decoding from the last prefilled row's ``logits [B, V]``; ``next_position [B]`` is the position
        of each row's first decoded token. Returns the tokens per row (stop token included) and the final mask.

        ``drop_finished``: a finished row leaves the batch (its cache rows too), so requests of unequal length
        (re-decodes that start at different steps) cost their own steps, not the longest one's. Off where the
        cache is kept for later requests, which address it by row."""
        max_new = max(r.max_new_tokens for r in requests)
        generated: list[list[int]] = [[] for _ in requests]
        rows: list[list[torch.Tensor]] = [[] for _ in requests]
        done = [False] * len(requests)
        alive = list(range(len(requests)))  # batch row -> request
        for step in range(max_new):
            scores = logits.float()
            greedy = scores.argmax(-1).tolist()
            tokens = []
            for b, k in enumerate(alive):
                r, token = requests[k], greedy[b]
                if not done[k]:
                    if r.return_logits:
                        rows[k].append(scores[b].cpu())
                    if r.forced is not None:  # the decoder decides on the model's own greedy choice
                        forced = r.forced.next_token(generated[k], greedy[b])
                        token = greedy[b] if forced is None else forced
                    generated[k].append(token)
                    stop = token in self.stop_token_ids and not self.ignore_eos
                    done[k] = stop or len(generated[k]) >= r.max_new_tokens
                tokens.append(token)
            self.stats.decoded_tokens += sum(1 for g in generated if len(g) > step)
            if all(done) or step == max_new - 1:
                break
            if drop_finished and any(done[k] for k in alive):
                keep = [b for b, k in enumerate(alive) if not done[k]]
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, next_position = mask[index], next_position[index]
                alive, tokens = [alive[b] for b in keep], [tokens[b] for b in keep]
            step_embeds = self._embed_tokens(torch.tensor(tokens, device=self.device)).unsqueeze(1)
            step_positions = (next_position + step).view(1, -1, 1).expand(n_pos, -1, -1)
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            logits = self._forward(step_embeds, step_positions, mask, None, cache)[:, -1]
        for k, r in enumerate(requests):
            if r.return_logits:  # step t's row predicts response token t, as a score row does
                n = len(generated[k] if self.ignore_eos else self._cut_at_stop(generated[k]))
                r.logits = torch.stack(rows[k][:n]) if n else torch.empty(0, logits.shape[-1])
        return generated, mask

    def _responses(self, requests: Sequence[GenerateRequest], generated: list[list[int]]) -> list[list[int]]:
        return [[*r.response_prefix, *(ids if self.ignore_eos else self._cut_at_stop(ids))]
                for r, ids in zip(requests, generated, strict=True)]

    # ---- re-decodes continue the own answer's KV cache ----
    def _keeps(self, request: GenerateRequest) -> bool:
        """Whether this decode's KV cache is kept for later re-decodes: a plain decode from the prompt."""
        return self.reuse_prompt_cache and request.forced is None and not request.response_prefix

    def _keep_for_reuse(self, requests: Sequence[GenerateRequest], inputs, generated: list[list[int]],
                        cache: DynamicCache, mask: torch.Tensor) -> None:
        """Keep these own-answer decodes' KV cache until the next call that decodes own answers: a later request
        with the same prompt and image tensor whose response prefix they decoded continues from it instead of
        prefilling the prompt and image again (HSCR's re-decodes start inside the own answer)."""
        columns = mask.shape[1]
        if any(layer.keys.shape[-2] != columns for layer in cache.layers):
            return  # a sliding-window layer dropped its oldest columns: they cannot be addressed
        length = max(e.shape[0] for e, _ in inputs)  # the padded prompt
        fed = columns - length  # response tokens whose keys the cache holds
        for row, (r, (e, p)) in enumerate(zip(requests, inputs, strict=True)):
            self._reusable[(tuple(r.prompt_ids), id(r.visual.embeds))] = _CachedRow(
                visual=r.visual.embeds, cache=cache, row=row, first=length - e.shape[0], prompt_end=length,
                tokens=generated[row][:fed], last_prompt_token=int(r.prompt_ids[-1]),
                last_prompt_position=int(p[:, -1].max()), next_position=int(p.max()) + 1,
                n_positions=p.shape[0])

    def _reusable_row(self, request: GenerateRequest) -> _CachedRow | None:
        """The kept own-answer row ``request`` can continue: same prompt, same image tensor."""
        if not self.reuse_prompt_cache or request.return_logits:
            return None
        row = self._reusable.get((tuple(request.prompt_ids), id(request.visual.embeds)))
        return None if row is None or row.visual is not request.visual.embeds else row

    @torch.inference_mode()
    def generate_chained(self, requests: Sequence[GenerateRequest],
                         follow: Callable[[GenerateRequest, list[int]], Sequence[GenerateRequest]],
                         successor: Callable[[GenerateRequest], DecodeWatch | None] | None = None) -> None:
        # A sliding-window layer would drop a row's oldest columns: only full attention decodes chained.
        if self._sliding or not self.reuse_prompt_cache or not self.chain_redecodes:
            return super().generate_chained(requests, follow)
        while requests:
            kept = [self._reusable_row(r) for r in requests]
            continued = [k for k, row in enumerate(kept) if row is not None]
            fresh = [r for r, row in zip(requests, kept, strict=True) if row is None]
            if continued:  # their follow-ups decode in the same chain: the kept answers may become its rows
                self._chain([requests[k] for k in continued], [kept[k] for k in continued], follow, successor,
                            adopt=True)
            requests = [new for r, ids in zip(fresh, self.generate(fresh), strict=True) for new in follow(r, ids)] \
                if fresh else []

    @property
    def streams_chained(self) -> bool:
        """Whether ``stream_chained`` runs here (``stream_chain``; one chained decode batch needs every layer's full
        columns)."""
        return self.stream_chain is not False and not self._sliding and self.reuse_prompt_cache \
            and self.chain_redecodes

    def chains_stream(self, chunk: int) -> bool:
        """Whether a stream of ``chunk``-item batches decodes in one chained batch: ``stream_chain`` where set, else
        where the rows are at most ``STREAM_CHAIN_MAX_ROWS`` or a batch fills at most half of them."""
        if not self.streams_chained:
            return False
        if self.stream_chain is not None:
            return self.stream_chain
        return self.batch_size <= STREAM_CHAIN_MAX_ROWS or 2 * chunk <= self.batch_size

    @torch.inference_mode()
    def stream_chained(self, more: Callable[[], Sequence[GenerateRequest]],
                       follow: Callable[[GenerateRequest, list[int]], Sequence[GenerateRequest]],
                       successor: Callable[[GenerateRequest], DecodeWatch | None] | None = None,
                       max_rows: int | None = None) -> Iterator[None]:
        """One chained decode batch over a stream (``pipeline.run_hscr_stream``): whenever a row is free and
        nothing waits, ``more()`` hands over the next requests (the next batch's own answers; empty at the end),
        each prefilled alone into a free row; what ``follow`` returns for a finished request decodes in the same
        batch. So one batch's last levels share the steps with the next batch's own answers instead of leaving
        rows idle. Yields after every step in which a request finished (its ``follow`` ran); ``max_rows``
        (default ``batch_size``) caps the rows."""
        if not self.streams_chained:
            raise RuntimeError("stream_chained needs full-attention layers, reuse_prompt_cache and chain_redecodes")
        requests = list(more())
        if requests:
            yield from self._chain_steps(requests, [self._reusable_row(r) for r in requests], follow, successor,
                                         more=more, max_rows=max_rows)

    def _prefilled(self, request: GenerateRequest) -> _CachedRow:
        """``request``'s prompt prefilled alone, as a kept row a chained row continues (as a kept own answer's, the
        chain feeds the last prompt token again: its logits are the first response token's)."""
        embeds, positions = self._inputs(request.prompt_ids, request.visual)
        cache = DynamicCache(config=self.model.config)  # a kept row is only read: no spare columns
        n = embeds.shape[0]
        self._forward(embeds[None], positions[:, None], torch.ones(1, n, dtype=torch.long, device=self.device),
                      None, cache)
        self.stats.prefill_tokens += n
        return _CachedRow(visual=request.visual.embeds, cache=cache, row=0, first=0, prompt_end=n, tokens=[],
                          last_prompt_token=int(request.prompt_ids[-1]),
                          last_prompt_position=int(positions[:, -1].max()), next_position=int(positions.max()) + 1,
                          n_positions=positions.shape[0])

    def _adopted(self, requests: Sequence[GenerateRequest], kept: Sequence[_CachedRow | None], cap: int,
                 ) -> tuple[DynamicCache, torch.Tensor, list[_Slot | None], list[int]] | None:
        """Where each of ``requests`` continues its own row of one kept own-answer batch of at most ``cap`` rows:
        that batch's cache as a chained batch (its mask and its rows as slots, holding the own answers) and each
        request's row; else None. Its kept rows are dropped, since the chain writes over them: without this the
        chain's rows were a copy beside them, the largest part of HSCR's peak memory above plain's."""
        if not kept or any(row is None for row in kept):
            return None
        cache, rows = kept[0].cache, [row.row for row in kept]
        n_rows, columns = cache.layers[0].keys.shape[0], cache.layers[0].keys.shape[-2]
        if any(row.cache is not cache for row in kept) or len(set(rows)) < len(rows) or n_rows > cap:
            return None
        mask = torch.zeros(n_rows, columns, device=self.device, dtype=torch.long)
        slots: list[_Slot | None] = [None] * n_rows
        for request, row in zip(requests, kept, strict=True):
            end = row.prompt_end + len(row.tokens)  # a row that stopped early holds pad keys after its answer
            mask[row.row, row.first:end] = 1
            slots[row.row] = _Slot(tuple(request.prompt_ids), row.visual, [row.last_prompt_token, *row.tokens],
                                   list(range(row.prompt_end - 1, end)), row.last_prompt_position, row.next_position)
        self._reusable = {key: row for key, row in self._reusable.items() if row.cache is not cache}
        return cache, mask, slots, rows

    def _chain(self, requests: Sequence[GenerateRequest], kept: Sequence[_CachedRow],
               follow: Callable[[GenerateRequest, list[int]], Sequence[GenerateRequest]] | None = None,
               successor: Callable[[GenerateRequest], DecodeWatch | None] | None = None, *, adopt: bool = False,
               ) -> list[list[int]]:
        """``_chain_steps`` run to its end."""
        steps = self._chain_steps(requests, kept, follow, successor, adopt=adopt)
        while True:
            try:
                next(steps)
            except StopIteration as end:
                return end.value

    def _chain_steps(self, requests: Sequence[GenerateRequest], kept: Sequence[_CachedRow | None],
                     follow: Callable[[GenerateRequest, list[int]], Sequence[GenerateRequest]] | None = None,
                     successor: Callable[[GenerateRequest], DecodeWatch | None] | None = None, *,
                     more: Callable[[], Sequence[GenerateRequest]] | None = None, max_rows: int | None = None,
                     adopt: bool = False) -> Generator[None, None, list[list[int]]]:
        """Decode ``requests`` from kept caches in one decode batch of up to ``batch_size`` rows (slots), a row
        taking the next request as soon as its own finishes (``requests`` beyond the slots, and what ``follow``
        returns for each finished request). Returns the responses of ``requests``.

        A request's row holds the keys of the prompt and of the stretch of its response prefix that its source
        holds; the rest of the prefix is fed one token per step, the last one giving its first logits. The
        source is whichever holds the most of it: the row it takes over, for a follow-up of the same prompt and
        image (that row's keys past the shared stretch are masked, not copied: a level mostly repeats the decode
        of the level before it, so its prefix is that decode's but for the last token); another row of the same
        prompt and image (copied); a kept own answer (its rows copied in); else its prompt, prefilled alone.
        A row's columns are its own: positions are explicit, and masked columns (left padding, a gap) count for
        nothing, so rows of any length and start share the steps.

        ``successor`` (``Backend.generate_chained``): a request handed out mid-decode continues a copy of the
        row it leaves, in an idle row or a new one up to ``batch_size`` rows, so an item's next level decodes
        beside the level it leaves instead of after it.

        ``adopt``: where every request continues its own row of one kept own-answer batch, that batch's cache
        becomes the chain's, each request decoding in its own answer's row, instead of a copy of it beside it
        (``_adopted``; its kept rows are gone then, as the caller's follow-ups all decode in the chain).

        ``more`` (``stream_chained``): where rows are free and nothing waits, the next requests of a stream; a
        request no kept row holds is prefilled alone when a row takes it, and the steps yield. No copy of a finished
        own answer is kept: its levels continue its row (or a copy of a row of its item), which held the same
        prefix in every measured run, and a copy of each was a second batch of caches. ``max_rows`` caps the rows
        (default ``batch_size``)."""
        stream = more is not None
        if stream:  # what no kept row holds is prefilled as a row takes it (``place``); the first here, for the shapes
            kept = [kept[0] or self._prefilled(requests[0]), *kept[1:]]
        n_pos = kept[0].n_positions
        cap = max_rows or self.batch_size
        adopted = self._adopted(requests, kept, cap) if adopt and not stream else None
        queue = deque(zip(requests, kept, strict=True))
        fresh: deque[tuple[GenerateRequest, None]] = deque()  # a stream's new requests: after the queued ones
        spare: list[tuple[GenerateRequest, _CachedRow | None]] = []  # speculative requests: in rows left over

        def take() -> tuple[GenerateRequest, _CachedRow | None]:
            """The next waiting request: continuations of earlier work first, so a batch's levels finish (while rows
            of their items still hold their prompts) before the next batch's own answers fill every row."""
            return queue.popleft() if queue else fresh.popleft()

        slots: list[_Slot | None] = [None] * min(len(requests), cap)
        mask = torch.zeros(len(slots), 0, device=self.device, dtype=torch.long)
        out: dict[int, list[int]] = {}
        logits_of: dict[int, list[torch.Tensor]] = {}  # id(request) -> its score rows (``return_logits``)

        def place(s: int, request: GenerateRequest, source: _CachedRow | None) -> None:
            """Put ``request`` into row ``s``, continuing whichever holds the most of its prefix: the row's own keys,
            a copy of another row of its prompt and image, or ``source`` (a kept own answer, its rows copied in);
            where none holds its prompt, the prompt prefilled alone."""
            nonlocal cache, mask
            want, slot = _want(request), slots[s]
            own = slot.shared(want) if slot is not None and slot.continues(request) else -1
            kept_shared = source.shared(want) if source is not None else -1
            peers = [(other.shared(want), t) for t, other in enumerate(slots)
                     if t != s and other is not None and other.continues(request)]
            peer_shared, peer = max(peers, default=(-1, None))
            if peer_shared > max(own, kept_shared):  # another row holds more of it: a copy of that row
                for layer in cache.layers:
                    layer.keys[s] = layer.keys[peer]
                    layer.values[s] = layer.values[peer]
                mask[s] = mask[peer]
                slot, own = slots[peer].copy(), peer_shared
            elif max(own, kept_shared) < 0:  # nothing holds its prompt: prefilled alone (a stream's new request)
                source = self._prefilled(request)
                kept_shared = source.shared(want)
            if kept_shared > own:
                n = source.width(kept_shared)
                if n > mask.shape[1]:  # every row gets masked columns on its left
                    grow = n - mask.shape[1]
                    cache, mask = self._widen(cache, mask, grow, source.cache)
                    for other in slots:
                        if other is not None:
                            other.columns = [c + grow for c in other.columns]
                at, end = mask.shape[1] - n, source.prompt_end - 1 + kept_shared
                for layer, kept_layer in zip(cache.layers, source.cache.layers, strict=True):
                    layer.keys[s, :, at:] = kept_layer.keys[source.row, :, source.first:end]
                    layer.values[s, :, at:] = kept_layer.values[source.row, :, source.first:end]
                mask[s] = 0
                mask[s, at:] = 1
                first = mask.shape[1] - kept_shared
                slot = _Slot(tuple(request.prompt_ids), request.visual.embeds, want[:kept_shared],
                             list(range(first, first + kept_shared)), source.last_prompt_position,
                             source.next_position)
            else:
                if own < len(slot.columns):
                    mask[s, slot.columns[own]:] = 0
                slot.held, slot.columns = slot.held[:own], slot.columns[:own]
            slot.request, slot.generated, slot.feed = request, [], want[len(slot.held):]
            self.stats.prefill_tokens += len(slot.feed)
            self.stats.reused_prefill_tokens += int(mask[s].sum())
            slots[s] = slot
            slot.watch = successor(request) if successor is not None else None
            if slot.watch is not None and slot.watch.request is not None:  # it leaves inside the prefix
                forks.append(slot.watch.request)

        def fork(request: GenerateRequest) -> None:
            """Place ``request``, handed out by a row's decode, in an idle row or a new one (``place`` copies the
            row it leaves into it); where every row is busy, it waits like a follow-up."""
            source = self._reusable_row(request)
            free = next((t for t, slot in enumerate(slots) if slot is None or slot.request is None), None)
            if free is None and len(slots) < cap:
                free = add_rows(1)[0]
            if free is None:
                (spare if request.speculative else queue).append((request, source))
            else:
                place(free, request, source)

        def add_rows(n: int) -> list[int]:
            """``n`` empty rows at the end of the batch (one copy of the cache for all of them)."""
            nonlocal mask
            for layer in cache.layers:
                layer.keys = torch.cat([layer.keys, layer.keys.new_zeros(n, *layer.keys.shape[1:])])
                layer.values = torch.cat([layer.values, layer.values.new_zeros(n, *layer.values.shape[1:])])
            mask = torch.cat([mask, mask.new_zeros(n, mask.shape[1])])
            slots.extend([None] * n)
            return list(range(len(slots) - n, len(slots)))

        def fill() -> None:
            """Idle rows (in a stream, and new rows up to ``cap``) take the waiting requests: the continuations, then
            a stream's new own answers. A continuation takes an idle row of its own prompt and
            image first: the row it continues, before another request writes over it."""
            free = [s for s, slot in enumerate(slots) if slot is None or slot.request is None]
            for s in [s for s in free if slots[s] is not None]:
                match = next((k for k, (request, _) in enumerate(queue) if slots[s].continues(request)), None)
                if match is not None:
                    free.remove(s)
                    place(s, *queue[match])
                    del queue[match]
            waiting = len(queue) + len(fresh)
            if stream and waiting > len(free) and len(slots) < cap:
                free += add_rows(min(waiting - len(free), cap - len(slots)))
            for s in free[:waiting]:
                place(s, *take())
            # then speculative requests, while a row of their prompt and image holds keys to copy (else a prefill)
            held = [k for k, (request, _) in enumerate(spare)
                    if any(other is not None and other.continues(request) for other in slots)]
            taken = dict(zip(held, free[waiting:], strict=False))
            for k, s in taken.items():
                place(s, *spare[k])
            spare[:] = [entry for k, entry in enumerate(spare) if k not in taken]

        def refill() -> bool:
            """A stream: ``more()``'s requests wait for rows (``fill``); whether there were any."""
            nonlocal more
            new = list(more()) if more is not None else []
            if not new:
                more = None  # the stream is over
                return False
            fresh.extend((request, None) for request in new)
            fill()
            return True

        def settle() -> None:
            """After ``follow`` ran: withdrawn requests leave their rows and ``spare``, and the speculative requests
            their caller now wants wait like any other (``GenerateRequest.speculative``)."""
            for slot in slots:
                if slot is not None and slot.request is not None and slot.request.withdrawn:
                    self.stats.withdrawn_tokens += len(slot.generated)
                    slot.request = None
            queue.extend(entry for entry in spare if not entry[0].speculative and not entry[0].withdrawn)
            spare[:] = [entry for entry in spare if entry[0].speculative and not entry[0].withdrawn]

        def fork_all() -> None:
            while forks:
                fork(forks.pop(0))

        def finished(s: int) -> list[GenerateRequest]:
            slot = slots[s]
            request, ids = slot.request, slot.generated
            if request.withdrawn:  # withdrawn as it finished: its caller does not want it
                self.stats.withdrawn_tokens += len(ids)
                return []
            response = [*request.response_prefix, *(ids if self.ignore_eos else self._cut_at_stop(ids))]
            if request.return_logits:  # step t's row predicts response token t, as a score row does
                rows = logits_of.pop(id(request))[:len(response)]
                request.logits = torch.stack(rows) if rows else torch.empty(0, logits.shape[-1])
            if id(request) in ids_of:
                out[ids_of[id(request)]] = response
            return list(follow(request, response)) if follow is not None else []

        ids_of = {id(r): k for k, r in enumerate(requests)}
        forks: list[GenerateRequest] = []  # requests a row's decode handed out, placed between steps
        if adopted is not None:  # each request in its own answer's row
            cache, mask, slots, rows = adopted
            for s, (request, _) in zip(rows, queue, strict=True):
                place(s, request, None)
            queue.clear()
        else:
            width = max(source.width(source.shared(_want(r))) for r, source in list(queue)[:len(slots)]
                        if source is not None)
            cache, mask = self._widen(None, mask, width, kept[0].cache)
            for s in range(len(slots)):
                place(s, *queue.popleft())
        del kept, adopted  # a stream's prompt prefilled for the shapes is in its row now: not held besides
        fork_all()
        while True:
            active = [s for s, slot in enumerate(slots) if slot is not None and slot.request is not None]
            if not active:
                if fresh:
                    fill()
                elif not refill():
                    break
                active = [s for s, slot in enumerate(slots) if slot is not None and slot.request is not None]
            widest = int(mask.sum(1).max())  # an adopted batch starts with its own answers past the levels masked
            if mask.shape[1] - widest > max(COMPACT_SLACK, COMPACT_SHARE * widest):
                cache, mask = self._compact(cache, mask, slots)
            column = mask.shape[1]
            inputs = [self.pad_token_id] * len(slots)
            positions = [0] * len(slots)
            for s in active:
                inputs[s], positions[s] = slots[s].feed_next(column)
            column_mask = mask.new_zeros(len(slots), 1)  # an idle row's pad token is never attended to
            column_mask[active] = 1
            mask = torch.cat([mask, column_mask], dim=1)
            step_positions = torch.tensor(positions, device=self.device).view(1, -1, 1).expand(n_pos, -1, -1)
            logits = self._forward(self._embed_tokens(torch.tensor(inputs, device=self.device)).unsqueeze(1),
                                   step_positions, mask, None, cache)[:, -1]
            deciding = [s for s in active if not slots[s].feed]
            scores = logits[deciding].float()
            greedy = scores.argmax(-1).tolist() if deciding else []
            done = []
            for row, (s, choice) in enumerate(zip(deciding, greedy, strict=True)):
                slot = slots[s]
                if slot.request.return_logits:
                    logits_of.setdefault(id(slot.request), []).append(scores[row].cpu())
                forced = slot.request.forced.next_token(slot.generated, choice) if slot.request.forced else None
                token = choice if forced is None else forced
                slot.generated.append(token)
                self.stats.decoded_tokens += 1
                if slot.watch is not None and (new := slot.watch.step(token, choice)) is not None:
                    forks.append(new)
                if (token in self.stop_token_ids and not self.ignore_eos) or \
                        len(slot.generated) >= slot.request.max_new_tokens:
                    done.append(s)
                else:
                    slot.feed.append(token)
            fork_all()  # before a finished row takes a follow-up: a fork copies the row's keys
            for s in done:
                slot = slots[s]
                follow_ups = finished(s)
                slot.request = None
                for new in follow_ups:  # the finished row takes the first follow-up it can continue
                    source = self._reusable_row(new)
                    if slots[s].request is None and (source is not None or slot.continues(new)):
                        place(s, new, source)
                    else:
                        queue.append((new, source))
            settle()
            fill()
            fork_all()
            idle = [s for s, slot in enumerate(slots) if slot is None or slot.request is None]
            # the next batch comes in as soon as rows are free: it fills the rows the tail of this one leaves
            if more is not None and not queue and not fresh and (idle or len(slots) < cap) and refill():
                idle = [s for s, slot in enumerate(slots) if slot is None or slot.request is None]
            # a smaller batch is cheaper per step
            if not queue and not fresh and len(slots) > 1 and 2 * len(idle) >= len(slots):
                keep = [s for s in range(len(slots)) if s not in idle]
                if keep:
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    mask, slots = mask[index], [slots[s] for s in keep]
            if done:
                yield
        return [out[k] for k in range(len(requests))]

    def _compact(self, cache: DynamicCache, mask: torch.Tensor,
                 slots: Sequence[_Slot | None]) -> tuple[DynamicCache, torch.Tensor]:
        """``cache`` and ``mask`` without the columns no row attends to. A chained row's columns only grow (a
        follow-up masks the keys it does not continue), so without this the cache would hold every step of the
        chain: memory and attention work grow with the chain, not with the rows. Each row keeps its attended
        columns in their order, right-aligned; positions are explicit, so a key's column does not matter."""
        width = int(mask.sum(1).max())
        index = torch.sort(mask, dim=1, stable=True).indices[:, -width:]  # masked columns first, then attended
        new_column = torch.full_like(mask, -1)
        new_column.scatter_(1, index, torch.arange(width, device=mask.device).expand_as(index))
        for s, slot in enumerate(slots):
            if slot is not None and slot.columns:
                slot.columns = new_column[s, slot.columns].tolist()
        for layer in cache.layers:
            gather = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys = layer.keys.gather(2, gather)
            layer.values = layer.values.gather(2, gather)
        return cache, mask.gather(1, index)

    def _widen(self, cache: DynamicCache | None, mask: torch.Tensor, grow: int,
               like: DynamicCache) -> tuple[DynamicCache, torch.Tensor]:
        """``cache`` and ``mask`` with ``grow`` masked columns added on the left; where there is no cache yet,
        a zero one of ``mask``'s rows, with its layers shaped like ``like``'s."""
        mask = torch.nn.functional.pad(mask, (grow, 0))
        if cache is None:
            cache = self._new_cache()
            for index, layer in enumerate(like.layers):
                shape = (mask.shape[0], layer.keys.shape[1], mask.shape[1])
                cache.update(layer.keys.new_zeros(*shape, layer.keys.shape[-1]),
                             layer.values.new_zeros(*shape, layer.values.shape[-1]), index)
            return cache, mask
        for layer in cache.layers:
            layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, grow, 0))
            layer.values = torch.nn.functional.pad(layer.values, (0, 0, grow, 0))
        return cache, mask

    @torch.inference_mode()
    def score(self, requests: Sequence[ScoreRequest]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for start in range(0, len(requests), self.batch_size):
            out += self._score_batch(requests[start:start + self.batch_size])
        return out

    def _score_batch(self, requests: Sequence[ScoreRequest]) -> list[torch.Tensor]:
        inputs = [self._inputs([*r.prompt_ids, *r.response_ids], r.visual) for r in requests]
        batch = self._pad(inputs, left=False, images=[self._image_span(r.prompt_ids, r.visual) for r in requests])
        logits = self._forward(*batch)
        self.stats.scored_tokens += int(batch[2].sum())
        out = []
        for row, ((e, _), r) in enumerate(zip(inputs, requests, strict=True)):
            n_resp = len(r.response_ids)
            start = e.shape[0] - n_resp
            out.append(logits[row, start - 1: start - 1 + n_resp].float().cpu())
        return out
