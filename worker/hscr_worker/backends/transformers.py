"""The reference backend: any LLaVA-family checkpoint through transformers, on CPU or CUDA."""

from __future__ import annotations

from collections.abc import Sequence

from hscr_worker._compat import ensure_torchvision_importable

ensure_torchvision_importable()

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessor  # noqa: E402

from ._vision import encode_images  # noqa: E402
from .base import GenerateRequest, ProcessorBackend, ScoreRequest  # noqa: E402
from .profiles import resolve_profile  # noqa: E402


class _ForceTokens(LogitsProcessor):
    """Adapter from transformers' generate loop to each request's ``ForcedDecoder``."""

    def __init__(self, requests: Sequence[GenerateRequest], eos_token_id: int):
        self.requests = requests
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        greedy = scores.argmax(-1).tolist()
        for row, request in enumerate(self.requests):
            prefix = input_ids[row].tolist()
            # A finished row (at EOS, or at its own budget: the batch decodes to the longest) keeps being
            # padded while others decode: its decoder must not fire there.
            if request.forced is None or self.eos_token_id in prefix or len(prefix) >= request.max_new_tokens:
                continue
            token = request.forced.next_token(prefix, greedy[row])
            if token is not None:
                forced = torch.full_like(scores[row], float("-inf"))
                forced[token] = 0.0
                scores[row] = forced
        return scores


class TransformersBackend(ProcessorBackend):
    name = "transformers"

    def __init__(self, model_path: str, *, device: str | None = None, dtype: str | None = None,
                 batch_size: int = 32, ignore_eos: bool = False, profile: str | None = None):
        self.model_path = str(model_path)
        # Benchmarks only: random weights would stop at a random EOS; this decodes every response
        # to exactly max_new_tokens. Off by default, so responses end at EOS as usual.
        self.ignore_eos = ignore_eos
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = getattr(torch, dtype) if dtype else (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.processor = AutoProcessor.from_pretrained(self.model_path)
        self.tokenizer = self.processor.tokenizer
        self.profile = resolve_profile(profile, self.model_path, self.processor)
        self.model = AutoModelForImageTextToText.from_pretrained(self.model_path, dtype=torch_dtype)
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        config = self.model.config
        # Positions beyond the trained range give garbage (or an error), as in vLLM's max_model_len.
        self.max_context_tokens = getattr(config.get_text_config(), "max_position_embeddings", None)
        self.image_token_id = int(config.image_token_id)
        self.eos_token_id = int(self.tokenizer.eos_token_id)
        self.pad_token_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                                else self.eos_token_id)
        self.special_token_ids = frozenset(int(i) for i in self.tokenizer.all_special_ids) | {self.image_token_id}
        self._embed_tokens = self.model.get_input_embeddings()

    # ---- images (text: ProcessorBackend) ----
    def encode_images(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        return encode_images(self.model, self.processor, self.profile, images, device=self.device,
                             batch_size=self.batch_size)

    def _embeds(self, ids: Sequence[int], visual: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the single image placeholder expanded into ``visual`` rows."""
        at = list(ids).index(self.image_token_id)
        text = self._embed_tokens(torch.tensor(list(ids), device=self.device))
        return torch.cat([text[:at], visual.to(self.device, text.dtype), text[at + 1:]])

    # ---- generation and scoring ----
    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerateRequest]) -> list[list[int]]:
        out: list[list[int]] = []
        for start in range(0, len(requests), self.batch_size):
            out += self._generate_batch(requests[start:start + self.batch_size])
        return out

    def _generate_batch(self, requests: Sequence[GenerateRequest]) -> list[list[int]]:
        embeds = [self._embeds([*r.prompt_ids, *r.response_prefix], r.visual) for r in requests]
        length = max(e.shape[0] for e in embeds)
        hidden = embeds[0].shape[1]
        batch = torch.zeros(len(embeds), length, hidden, device=self.device, dtype=embeds[0].dtype)
        mask = torch.zeros(len(embeds), length, device=self.device, dtype=torch.long)
        for row, e in enumerate(embeds):  # left padding
            batch[row, length - e.shape[0]:] = e
            mask[row, length - e.shape[0]:] = 1
        max_new = max(r.max_new_tokens for r in requests)
        forcing = [_ForceTokens(requests, self.eos_token_id)] if any(r.forced is not None for r in requests) else []
        output = self.model.generate(
            inputs_embeds=batch, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
            num_beams=1, logits_processor=forcing, eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id, top_p=None, top_k=None, temperature=None,
            min_new_tokens=max_new if self.ignore_eos else None,
            return_dict_in_generate=True, output_logits=any(r.return_logits for r in requests),
        )
        responses = []
        for row, r in enumerate(requests):
            ids = output.sequences[row].tolist()
            if self.eos_token_id in ids:
                ids = ids[: ids.index(self.eos_token_id)]
            ids = ids[: r.max_new_tokens]
            if r.return_logits:  # output.logits: one [batch, V] tensor per step, before any processor
                r.logits = torch.stack([output.logits[t][row] for t in range(len(ids))]).float().cpu() if ids \
                    else torch.empty(0, output.logits[0].shape[-1])
            responses.append([*r.response_prefix, *ids])
        return responses

    @torch.inference_mode()
    def score(self, requests: Sequence[ScoreRequest]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for start in range(0, len(requests), self.batch_size):
            out += self._score_batch(requests[start:start + self.batch_size])
        return out

    def _score_batch(self, requests: Sequence[ScoreRequest]) -> list[torch.Tensor]:
        prompts = [self._embeds(r.prompt_ids, r.visual) for r in requests]
        responses = [self._embed_tokens(torch.tensor(r.response_ids, device=self.device, dtype=torch.long))
                     for r in requests]
        full = [torch.cat([p, a]) for p, a in zip(prompts, responses, strict=True)]
        length = max(e.shape[0] for e in full)
        batch = torch.zeros(len(full), length, full[0].shape[1], device=self.device, dtype=full[0].dtype)
        for row, e in enumerate(full):  # right padding: causal attention keeps pads out of real rows
            batch[row, : e.shape[0]] = e
        logits = self.model(inputs_embeds=batch).logits
        out = []
        for row, (p, r) in enumerate(zip(prompts, requests, strict=True)):
            n_prompt, n_resp = p.shape[0], len(r.response_ids)
            out.append(logits[row, n_prompt - 1: n_prompt - 1 + n_resp].float().cpu())
        return out
