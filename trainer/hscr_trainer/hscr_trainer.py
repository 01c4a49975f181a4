"""The HSCR trainer: ``transformers.Trainer`` with the multi-level preference loss.

``compute_loss`` follows TRL's DPOTrainer: one forward pass over every response of the batch, the
log-ratios against the frozen reference computed once, then a loop over ``(loss_type, weight)``
calling the pure functions of :mod:`hscr_trainer.losses`. Checkpointing, resuming, gradient
accumulation, bf16 and the progress bar are the Trainer's own.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import defaultdict

from hscr_worker._compat import ensure_torchvision_importable

ensure_torchvision_importable()

import torch  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer  # noqa: E402

from hscr_worker.fixture import resolve_model  # noqa: E402

from .data import BOOKKEEPING_KEYS, PreferenceCollator, PreferenceStream, select_sequences  # noqa: E402
from .hscr_config import HSCRConfig  # noqa: E402
from .losses import LOSSES, pair_statistics  # noqa: E402

# Where each family keeps its vision encoder, and the part of it that is the projector (trained in
# full fine-tuning, as LLaVA-1.5 and the Qwen2-VL recipes do): parameter-name components.
VISION_ENCODER = {"llava": "vision_tower", "qwen2-vl": "visual", "gemma3": "vision_tower"}
PROJECTOR = {"llava": "multi_modal_projector", "qwen2-vl": "visual.merger", "gemma3": "multi_modal_projector"}
LANGUAGE_MODEL = "language_model"


def load_model(name_or_path: str, args: HSCRConfig):
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.model_dtype)
    if dtype is None:  # auto
        dtype = torch.bfloat16 if args.bf16 else torch.float32
    return AutoModelForImageTextToText.from_pretrained(resolve_model(name_or_path), dtype=dtype)


def model_family(model, processor, profile: str | None = None):
    """The ``hscr_worker`` model family serving ``model`` (detected from its config unless ``profile``)."""
    from hscr_worker.families import resolve_profile

    return resolve_profile(profile, getattr(model, "name_or_path", "") or "", processor, config=model.config)


def _within(name: str, component: str) -> bool:
    return f".{component}." in f".{name}."


def vision_encoder_parameters(model, family) -> list[str]:
    """Names of the vision encoder's parameters (the projector excluded)."""
    encoder, projector = VISION_ENCODER[family.family], PROJECTOR[family.family]
    names = [n for n, _ in model.named_parameters() if _within(n, encoder) and not _within(n, projector)]
    if not names:
        raise ValueError(f"found no {encoder!r} parameters in this {family.family} model: cannot freeze its "
                         f"vision encoder")
    return names


def language_model_lora_targets(model, targets) -> str:
    """A peft ``target_modules`` regex for the linear layers named ``targets`` in the language model only
    (never the vision tower or the projector); ValueError for a name the language model lacks."""
    import re

    linear = [name for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and _within(name, LANGUAGE_MODEL)]
    if not linear:
        raise ValueError(f"the model has no linear layers under {LANGUAGE_MODEL!r}: cannot place LoRA adapters")
    targets = list(dict.fromkeys(targets))
    missing = [t for t in targets if not any(name.rsplit(".", 1)[-1] == t for name in linear)]
    if missing:
        present = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ValueError(f"LoRA target modules {missing} are not linear layers of the language model; "
                         f"it has {present}")
    return rf".*\.{LANGUAGE_MODEL}\..*\.({'|'.join(re.escape(t) for t in targets)})"


def apply_peft(model, args: HSCRConfig, family):
    """LoRA adapters on ``--lora_target_modules`` (default: the family's ``lora_targets``) in the
    language model."""
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules or family.lora_targets
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=language_model_lora_targets(model, targets), bias="none")
    return get_peft_model(model, config)


def model_inputs(batch: dict) -> dict:
    """What the model takes from a collated batch: ids, mask and whatever the processor made."""
    return {k: v for k, v in batch.items() if k not in BOOKKEEPING_KEYS}


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each sequence's response tokens ``(N,)`` and the response lengths ``(N,)``."""
    logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:]
    token_logps = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1).float() \
        - torch.logsumexp(logits.float(), dim=-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


@contextlib.contextmanager
def dropped_image(model, family, ratio: float, keys: list[str]):
    """Within this context ``model`` sees each sequence's image with ``ratio`` of its visual tokens zeroed: the
    worker's dropout (``hscr_worker.core.dropout``) at the projector's output, one mask per sequence key, so the
    policy and the reference see the same dropped image."""
    from hscr_worker.core.dropout import apply_dropout, keep_masks, mask_generator

    component = PROJECTOR[family.family]
    projector = next((m for name, m in model.named_modules() if f".{name}".endswith(f".{component}")), None)
    if projector is None:
        raise ValueError(f"found no {component!r} module in this {family.family} model: cannot drop its image")

    def drop(module, inputs, output):
        tokens = output if output.dim() == 3 else output.unsqueeze(0)  # Qwen2-VL: every image's tokens, flat
        masks = [keep_masks(tokens.shape[1], ratio, 1, mask_generator(0, key))[0]
                 for key in (keys if output.dim() == 3 else ["\x00".join(keys)])]
        dropped = torch.stack([apply_dropout(t, m.to(t.device), "zero") for t, m in zip(tokens, masks, strict=True)])
        return dropped if output.dim() == 3 else dropped[0]

    handle = projector.register_forward_hook(drop)
    try:
        yield
    finally:
        handle.remove()


def level_grid(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scatter per-sequence ``values (N,)`` into the ``(B, K+1)`` level grid (zeros where no level)."""
    grid = values.new_zeros(batch["level_mask"].shape)
    return grid.index_put((batch["item_index"], batch["level_index"]), values)


class HSCRTrainer(Trainer):
    """Multi-level preference optimization on an HSCR dataset (method.md section 2).

    Args:
        model: a model directory, hub id or fixture name (``fixture``, ``fixture-llava``,
            ``fixture-qwen2.5-vl``; loaded with ``AutoModelForImageTextToText``), or a model.
        args: :class:`HSCRConfig`.
        train_dataset: a :class:`PreferenceStream`, or a dataset URI (directory or ``s3://``) to stream.
        processing_class: the processor (default: loaded from ``model`` when it is a path).
    """

    def __init__(self, model, args: HSCRConfig, train_dataset, processing_class=None, callbacks=None,
                 ref_logps: dict[str, float] | None = None):
        if isinstance(model, str):
            processing_class = processing_class or AutoProcessor.from_pretrained(resolve_model(model))
            model = load_model(model, args)
        if processing_class is None:
            raise ValueError("pass processing_class (the processor) when model is not a path")
        # The family builds prompts as the generation backends do, names the LoRA targets and the vision encoder.
        self.family = model_family(model, processing_class, args.model_profile)
        if isinstance(train_dataset, str):
            train_dataset = PreferenceStream(train_dataset, args.dataset_config, seed=args.seed,
                                             shuffle_buffer=args.shuffle_buffer, max_levels=args.max_levels)
        self.ref_model = None
        if args.use_peft:
            model = apply_peft(model, args, self.family)
        else:
            if args.freeze_vision_tower:
                frozen = set(vision_encoder_parameters(model, self.family))
                for name, parameter in model.named_parameters():
                    if name in frozen:
                        parameter.requires_grad_(False)
            # The reference is the frozen starting model (with LoRA: the same model, adapters off).
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        super().__init__(model=model, args=args, train_dataset=train_dataset, processing_class=processing_class,
                         data_collator=PreferenceCollator(processing_class, family=self.family), callbacks=callbacks)
        # compute_loss returns a per-batch mean, so the Trainer must scale it for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.ref_logps = ref_logps  # sequence key -> reference log-prob (precomputed or passed in)

    @torch.no_grad()
    def compute_ref_logps(self) -> dict[str, float]:
        """Reference log-probs of every response of the dataset (one pass, no gradient)."""
        from tqdm import tqdm

        model = self.ref_model or self.model
        loader = torch.utils.data.DataLoader(self.train_dataset, batch_size=self.args.per_device_train_batch_size,
                                             collate_fn=self.data_collator)
        table: dict[str, float] = {}
        was_training = model.training
        model.eval()
        with self._reference_context(self.model):
            for batch in tqdm(loader, desc="reference log-probs", disable=self.args.disable_tqdm):
                batch = self._prepare_inputs(batch)
                logps, _ = sequence_logps(model, batch)
                table.update(zip(batch["sequence_keys"], logps.tolist(), strict=True))
        model.train(was_training)
        return table

    def train(self, *args, **kwargs):
        if self.ref_logps is None and self.args.precompute_ref_log_probs:
            self.ref_logps = self.compute_ref_logps()
        return super().train(*args, **kwargs)

    def _reference_logps(self, model, inputs) -> torch.Tensor:
        if self.ref_logps is not None:
            return torch.tensor([self.ref_logps[k] for k in inputs["sequence_keys"]],
                                device=inputs["input_ids"].device)
        with torch.no_grad(), self._reference_context(model):
            return sequence_logps(self.ref_model or model, inputs)[0]

    def _reference_context(self, model):
        if self.ref_model is None:
            return self.accelerator.unwrap_model(model).disable_adapter()
        return contextlib.nullcontext()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy_logps, lengths = sequence_logps(model, inputs)
        ref_logps = self._reference_logps(model, inputs)
        logratios = level_grid(policy_logps - ref_logps, inputs)
        level_mask = inputs["level_mask"]
        chosen = inputs["level_index"] == 0
        args: HSCRConfig = self.args
        extras = {"chosen_logps": policy_logps[chosen], "chosen_lengths": lengths[chosen],
                  "dpop_lambda": args.dpop_lambda}
        if "image_conditional" in args.loss_type:
            extras["dropped_logratios"] = self._dropped_image_logratios(model, inputs)
        loss = logratios.new_zeros(())
        for loss_type, weight in zip(args.loss_type, args.loss_weights, strict=True):
            term = LOSSES[loss_type](logratios, level_mask, args.gamma, **extras).mean()
            loss = loss + weight * term
            self._metrics[f"loss/{loss_type}"].append(term.item())
        for key, value in pair_statistics(logratios, level_mask, args.gamma).items():
            self._metrics[key].append(value.item())
        self._metrics["logps/chosen"].append(policy_logps[chosen].mean().item())
        return (loss, {"logratios": logratios}) if return_outputs else loss

    def _dropped_image_logratios(self, model, inputs) -> torch.Tensor:
        """``(B,)`` log pi/ref of each item's preferred answer with its image dropped (mDPO's conditional term)."""
        rows = (inputs["level_index"] == 0).nonzero().squeeze(-1)
        sub = select_sequences(inputs, rows)
        keys = [key.split("\x00", 1)[0] for key in sub["sequence_keys"]]  # per item: its custom id
        ratio = self.args.image_dropout_ratio
        with dropped_image(model, self.family, ratio, keys):
            policy, _ = sequence_logps(model, sub)
        reference_model = self.ref_model or model
        with torch.no_grad(), self._reference_context(model), dropped_image(reference_model, self.family, ratio, keys):
            reference, _ = sequence_logps(reference_model, sub)
        out = policy.new_zeros(inputs["level_mask"].shape[0])
        return out.index_put((inputs["item_index"][rows],), policy - reference)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and "loss" in logs:
            logs.update({key: round(sum(v) / len(v), 6) for key, v in self._metrics.items()})
            self._metrics.clear()
        super().log(logs, start_time)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore full-model weights with ``from_pretrained``.

        transformers 5 saves LLaVA checkpoints in the legacy key layout (``language_model.model.*``) but
        ``Trainer`` loads them back raw, so every key misses with only a warning and a "resumed" run
        silently restarts from the base weights. ``from_pretrained`` applies the key conversion; strict
        loading makes any remaining mismatch an error. LoRA checkpoints go through peft as usual.
        """
        unwrapped = self.accelerator.unwrap_model(model or self.model)
        if hasattr(unwrapped, "peft_config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restored = type(unwrapped).from_pretrained(resume_from_checkpoint, dtype=unwrapped.dtype)
        unwrapped.load_state_dict(restored.state_dict(), strict=True)

    def save_final(self, output_dir: str) -> str:
        """Save a standalone model (LoRA merged) and its processor, loadable by the generation backends."""
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        model.save_pretrained(output_dir)
        self.processing_class.save_pretrained(output_dir)
        return output_dir


def steps_for(n_items: int, args: HSCRConfig) -> int:
    """Optimizer steps for ``num_train_epochs`` passes over ``n_items`` (one process)."""
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    return max(1, math.ceil(n_items * args.num_train_epochs / per_step))
