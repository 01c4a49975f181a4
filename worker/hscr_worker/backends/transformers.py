"""The reference backend: any supported checkpoint through transformers, on CPU or CUDA.

Prompts go in as embeddings (the image placeholder expanded to the visual tokens) with explicit
positions from the model family: a model that sees only ``inputs_embeds`` cannot tell where an
image's tokens sit (Qwen's M-RoPE would silently count them as text), and a dropped image must
keep its survivors where they were. Greedy decoding is a small loop over the KV cache, so those
positions hold at every step. A family whose image tokens attend to each other bidirectionally
(Gemma 3) also gets ``token_type_ids`` marking the image's rows in the prompt pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hscr_worker._compat import ensure_torchvision_importable

ensure_torchvision_importable()

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText, DynamicCache  # noqa: E402

from .base import BackendStats, GenerateRequest, ProcessorBackend, ScoreRequest, VisualTokens  # noqa: E402


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


class TransformersBackend(ProcessorBackend):
    name = "transformers"

    def __init__(self, model_path: str, *, device: str | None = None, dtype: str | None = None,
                 batch_size: int = 32, ignore_eos: bool = False, profile: str | None = None,
                 min_pixels: int | None = None, max_pixels: int | None = None, reuse_prompt_cache: bool = True):
        # Re-decodes continue the own answer's KV cache (``_continue``) instead of prefilling prompt and image
        # again; False prefills every request (kept to check and measure exactly that).
        self.reuse_prompt_cache = reuse_prompt_cache
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
                        kept: Sequence[tuple[_CachedRow, int] | None]) -> list[list[int]]:
        fresh = [k for k, row in enumerate(kept) if row is None]
        if not fresh:
            return self._continue(requests, kept)
        if len(fresh) < len(requests):  # two passes: the rows to prefill, and the rows continuing a kept cache
            rest = [k for k, row in enumerate(kept) if row is not None]
            out: dict[int, list[int]] = dict(zip(fresh, self._generate_batch([requests[k] for k in fresh],
                                                                              [None] * len(fresh)), strict=True))
            out |= dict(zip(rest, self._continue([requests[k] for k in rest], [kept[k] for k in rest]), strict=True))
            return [out[k] for k in range(len(requests))]
        inputs = [self._inputs([*r.prompt_ids, *r.response_prefix], r.visual) for r in requests]
        embeds, positions, mask, types = self._pad(inputs, left=True,
                                                   images=[self._image_span(r.prompt_ids, r.visual) for r in requests])
        next_position = torch.stack([p.max() + 1 for _, p in inputs])  # [B]: the first response token's
        cache = DynamicCache(config=self.model.config)
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

    def _reusable_row(self, request: GenerateRequest) -> tuple[_CachedRow, int] | None:
        """The kept own-answer row ``request`` can continue (same prompt, same image tensor), and how many of its
        response-prefix tokens that row's cache holds: all but at least the last one, which is fed with the
        ones after the shared stretch (a level continuing another level's decode shares only part of it)."""
        if not self.reuse_prompt_cache or request.return_logits:
            return None
        row = self._reusable.get((tuple(request.prompt_ids), id(request.visual.embeds)))
        if row is None or row.visual is not request.visual.embeds:
            return None
        shared = 0
        for have, want in zip(row.tokens, request.response_prefix[:-1], strict=False):
            if have != want:
                break
            shared += 1
        return row, shared

    def _continue(self, requests: Sequence[GenerateRequest], kept: Sequence[tuple[_CachedRow, int]]) -> list[list[int]]:
        """Decode ``requests`` from kept caches: each row's keys up to the shared part of its response prefix,
        the rest of the prefix fed as one chunk (or, without a prefix, the prompt's last token: the first
        logits), then greedy decoding."""
        spans = []  # (row, end of the reused columns, the tokens fed, their first position)
        for r, (row, shared) in zip(requests, kept, strict=True):
            if r.response_prefix:
                spans.append((row, row.prompt_end + shared, r.response_prefix[shared:], row.next_position + shared))
            else:
                spans.append((row, row.prompt_end - 1, [row.last_prompt_token], row.last_prompt_position))
        length = max(end - row.first for row, end, _, _ in spans)
        chunk = max(len(fed) for _, _, fed, _ in spans)
        n_pos = kept[0][0].n_positions
        cache = DynamicCache(config=self.model.config)
        for index in range(len(kept[0][0].cache.layers)):
            keys, values = [], []
            for row, end, _, _ in spans:  # left-padded to a common length, as a prefilled batch is
                layer, pad = row.cache.layers[index], (0, 0, length - (end - row.first), 0)
                keys.append(torch.nn.functional.pad(layer.keys[row.row, :, row.first:end], pad))
                values.append(torch.nn.functional.pad(layer.values[row.row, :, row.first:end], pad))
            cache.update(torch.stack(keys), torch.stack(values), index)
        # The fed chunks end together (their last row gives each request's first logits): a shorter one is
        # padded on its left, a masked gap between its cached keys and its tokens.
        mask = torch.zeros(len(requests), length + chunk, device=self.device, dtype=torch.long)
        tokens = torch.full((len(requests), chunk), self.pad_token_id, device=self.device, dtype=torch.long)
        positions = torch.zeros(len(requests), chunk, device=self.device, dtype=torch.long)
        for b, (row, end, fed, first) in enumerate(spans):
            mask[b, length - (end - row.first):length] = 1
            mask[b, length + chunk - len(fed):] = 1
            tokens[b, chunk - len(fed):] = torch.tensor(fed, device=self.device)
            positions[b] = (first + torch.arange(chunk, device=self.device) - (chunk - len(fed))).clamp(min=0)
        logits = self._forward(self._embed_tokens(tokens), positions.unsqueeze(0).expand(n_pos, -1, -1),
                               mask, None, cache)[:, -1]
        fed_tokens = sum(len(fed) for _, _, fed, _ in spans)
        self.stats.prefill_tokens += fed_tokens
        self.stats.reused_prefill_tokens += int(mask.sum()) - fed_tokens
        next_position = torch.tensor([row.next_position + len(r.response_prefix)
                                      for r, (row, _) in zip(requests, kept, strict=True)], device=self.device)
        generated, _ = self._decode(requests, logits, cache, mask, next_position, n_pos, drop_finished=True)
        return self._responses(requests, generated)

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
