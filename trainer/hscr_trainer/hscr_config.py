"""Configuration of the HSCR training job: one dataclass on top of ``transformers.TrainingArguments``."""

from __future__ import annotations

from dataclasses import dataclass, field

from hscr_worker._compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before transformers touches torchvision (the package no longer does it)

from transformers import TrainingArguments  # noqa: E402

from .losses import LOSSES, VARIANTS  # noqa: E402


@dataclass
class HSCRConfig(TrainingArguments):
    r"""Multi-level preference optimization (HSCR, Jiang et al., ACL 2025, method.md section 2).

    Every ``transformers.TrainingArguments`` field applies (batch size, gradient accumulation, bf16,
    checkpointing, logging). The fields below are HSCR's; defaults follow the paper where it states one.

    Loss:
        gamma (`float`, defaults to `0.1`): temperature ``g`` of the implicit reward ``g * log pi/ref``
            (TRL's ``beta``). Paper: 0.1.
        loss_type (`list[str]`, defaults to `["explicit", "implicit"]`): loss terms to sum, from
            ``losses.LOSSES``, or one variant name from ``losses.VARIANTS`` (``dpo``, ``explicit``,
            ``implicit``, ``hscr``). Paper: explicit + implicit.
        loss_weights (`list[float]` or `None`, defaults to `None`): one weight per loss term; `None` means
            equal weights of 1. Paper: equal.
        nll_weight (`float`, defaults to `1.0`): weight of the NLL term on the preferred answer (per-token mean;
            RPO, arXiv 2404.19733, = TRL's ``rpo_alpha``). Default 1: without it the summed-log-prob losses push the
            preferred answer down too and collapse the fixtures at lr 5e-5 x 2 epochs (docs/trainer.md, tables 3-5).
            Paper: no SFT term (``--nll_weight 0``).
        dpop_lambda (`float`, defaults to `0.0`): DPOP's penalty (arXiv 2402.13228) inside every pair: a winner whose
            likelihood fell below the reference's pays ``lambda`` times the fall. Paper: none.
        image_dropout_ratio (`float`, defaults to `0.95`): share of visual tokens zeroed (the worker's dropout, at the
            projector's output) for the ``image_conditional`` term (mDPO, arXiv 2406.11839), per item a fixed mask.

    Data:
        dataset_config (`str`, defaults to `"ranked"`): which config of the HSCR dataset to read: ``ranked``
            (one row per item, all levels) or ``pairs`` (TRL format, regrouped per item).
        max_levels (`int` or `None`, defaults to `None`): keep at most this many dispreferred levels per item.
        shuffle_buffer (`int`, defaults to `10000`): items held in the streaming shuffle buffer.

    Model:
        use_peft (`bool`, defaults to `True`): train LoRA adapters (peft) instead of every weight. Paper: LoRA.
        lora_r, lora_alpha, lora_dropout: LoRA rank (paper: 16), scale and dropout.
        lora_target_modules (`list[str]` or `None`): names of the language model's linear layers that get
            adapters (never the vision tower's); `None` means the model family's ``lora_targets``
            (LLaVA and Qwen2-VL: ``q_proj k_proj v_proj o_proj``).
        freeze_vision_tower (`bool`, defaults to `True`): keep the vision encoder frozen in full fine-tuning
            (LLaVA's and Gemma 3's ``vision_tower``; Qwen2-VL's ``visual`` but its ``merger``); the projector trains.
        model_profile (`str` or `None`, defaults to `None`): the ``hscr_worker`` model profile whose prompt
            format training uses (``fixture``, ``llava-1.5``, ``llava-med``, ``qwen2-vl``, ``qwen2.5-vl``, ``gemma3``);
            `None` detects it from the checkpoint, as ``hscr generate`` does without ``--profile``.
        precompute_ref_log_probs (`bool`, defaults to `False`): score the dataset with the reference once, before
            training, instead of one reference forward pass per step.
        model_dtype (`str`, defaults to `"auto"`): dtype the model is loaded in: ``auto`` (bfloat16 when
            ``bf16`` is on, else float32), ``float32`` or ``bfloat16``.
    """

    gamma: float = field(
        default=0.1, metadata={"help": "Temperature g of the implicit reward (TRL's beta). Paper: 0.1."})
    loss_type: list[str] = field(
        default_factory=lambda: ["explicit", "implicit"],
        metadata={"help": f"Loss terms {sorted(LOSSES)} or one variant {sorted(VARIANTS)}. Paper: explicit implicit."})
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per loss term (default: all 1, the paper's equal weights)."})
    nll_weight: float = field(
        default=1.0, metadata={"help": "Weight of the per-token NLL term on the preferred answer (RPO, arXiv "
                                       "2404.19733; TRL's rpo_alpha). Default 1: without it the preference losses "
                                       "collapsed the fixtures at lr 5e-5 x 2 epochs (docs/trainer.md). Paper: 0."})
    dpop_lambda: float = field(
        default=0.0, metadata={"help": "DPOP (arXiv 2402.13228): penalty lambda on a pair winner's likelihood loss "
                                       "against the reference, inside every pair. Paper: 0."})
    image_dropout_ratio: float = field(
        default=0.95, metadata={"help": "Visual tokens zeroed for the image_conditional term (mDPO, arXiv "
                                        "2406.11839): the worker's dropout, one fixed mask per item."})
    dataset_config: str = field(
        default="ranked", metadata={"help": "Dataset config to read: 'ranked' (all levels per item) or 'pairs'."})
    max_levels: int | None = field(
        default=None, metadata={"help": "Keep at most this many dispreferred levels per item (default: all)."})
    shuffle_buffer: int = field(default=10000, metadata={"help": "Items held in the streaming shuffle buffer."})
    use_peft: bool = field(default=True, metadata={"help": "Train LoRA adapters instead of all weights. Paper: LoRA."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank. Paper: 16."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Language-model linear layers given adapters (default: the model family's "
                                        "lora_targets, q_proj k_proj v_proj o_proj)."})
    freeze_vision_tower: bool = field(
        default=True, metadata={"help": "Keep the vision encoder frozen during full fine-tuning (the projector "
                                        "trains)."})
    model_profile: str | None = field(
        default=None, metadata={"help": "Prompt format: an hscr_worker model profile (fixture, llava-1.5, llava-med, "
                                        "qwen2-vl, qwen2.5-vl, gemma3; default: detected, as hscr generate does)."})
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "Score every response with the reference once before training (saves one "
                                         "forward pass per step; worth it for several epochs or runs)."})
    model_dtype: str = field(
        default="auto", metadata={"help": "Load dtype: auto (bfloat16 when --bf16, else float32), float32, bfloat16."})

    # TrainingArguments defaults changed to the paper's setup (or to what streaming needs).
    learning_rate: float = field(default=5e-7, metadata={"help": "AdamW learning rate. Paper: 5e-7."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Passes over the dataset. Paper: 2."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Items per device per step. Paper: 16."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    save_steps: float = field(default=100, metadata={"help": "Checkpoint every N optimizer steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept on disk."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator needs every field."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Experiment trackers to report to."})

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [t for t in self.loss_type.replace(",", " ").split() if t]
        supervised = self.loss_type == ["sft"]  # asked for by name: the control, not a mistake
        if len(self.loss_type) == 1 and self.loss_type[0] in VARIANTS:
            self.loss_type = list(VARIANTS[self.loss_type[0]])
        unknown = [t for t in self.loss_type if t not in LOSSES]
        if unknown or not self.loss_type:
            raise ValueError(f"loss_type {self.loss_type!r}: each term must be one of {sorted(LOSSES)} "
                             f"(or give one variant of {sorted(VARIANTS)})")
        if len(set(self.loss_type)) != len(self.loss_type):
            raise ValueError(f"loss_type {self.loss_type!r} repeats a term")
        if self.loss_weights is None:
            self.loss_weights = [1.0] * len(self.loss_type)
        if len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} values for {len(self.loss_type)} loss terms")
        if self.nll_weight < 0 or any(w < 0 for w in self.loss_weights):
            raise ValueError("loss weights must be >= 0")
        if self.nll_weight > 0 and "nll" not in self.loss_type:
            self.loss_type = [*self.loss_type, "nll"]
            self.loss_weights = [*self.loss_weights, self.nll_weight]
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if self.dataset_config not in ("ranked", "pairs"):
            raise ValueError(f"dataset_config must be 'ranked' or 'pairs', got {self.dataset_config!r}")
        if self.max_levels is not None and self.max_levels < 1:
            raise ValueError("max_levels must be >= 1")
        if self.shuffle_buffer < 1:
            raise ValueError("shuffle_buffer must be >= 1")
        if self.model_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"model_dtype must be auto, float32 or bfloat16, got {self.model_dtype!r}")
        if self.use_peft and self.lora_r < 1:
            raise ValueError("lora_r must be >= 1")
        if self.loss_type == ["nll"] and not supervised:
            raise ValueError("nll alone is supervised fine-tuning, not preference optimization; add a preference term "
                             "(or ask for it by name: loss_type sft)")
        if self.dpop_lambda < 0:
            raise ValueError("dpop_lambda must be >= 0")
        if not 0 < self.image_dropout_ratio <= 1:
            raise ValueError(f"image_dropout_ratio must be in (0, 1], got {self.image_dropout_ratio}")
        super().__post_init__()
        # Each process reads its own batches. Dispatching (accelerate's default for an IterableDataset) slices
        # every tensor of a batch along dim 0 as if it held one row per sequence, and the collator's do not:
        # Qwen2-VL's pixel_values are the patches of every image, level_mask has one row per item.
        if self.accelerator_config.dispatch_batches is None:
            self.accelerator_config.dispatch_batches = False
        elif self.accelerator_config.dispatch_batches:
            raise ValueError("accelerator_config.dispatch_batches=True cannot split HSCR batches (image patches and "
                             "per-item tensors are not one row per sequence); leave it unset")
