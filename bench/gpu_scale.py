"""HSCR at 7B scale: what a preference row costs on a GPU (issue #7), LLaVA-1.5-7B, Qwen2.5-VL-7B or Gemma 3 4B.

``--arch llava-1.5-7b`` (default) builds a LLaVA-1.5-7B-architecture model (CLIP ViT-L/14-336 +
Vicuna/Llama-2-7B) from its config with random bf16 weights (nothing is downloaded: the compute is
measured, not the answers), a word-level tokenizer built in code (32,000 words, ``<image>`` = 32000,
vocab padded to 32,064 as in llava-hf), synthetic 336x336 images and ~50-token questions.
``--arch qwen2.5-vl-7b`` builds Qwen2.5-VL-7B-Instruct's architecture the same way (windowed
ViT of 32 blocks, 2x2 merger, Qwen2-7B language model with M-RoPE; 8.29 B parameters), a
word-level tokenizer over its 152,064-entry vocabulary with Qwen's special tokens at their published
ids and its ChatML template, and ``Qwen2VLImageProcessor`` bounded so that a synthetic
``--image-size`` square (448 px) gives ``(448 / 28)**2`` = 256 visual tokens. ``--arch gemma3-4b`` builds
MedGemma-4b-it's architecture (Gemma 3 4B: SigLIP-so400m at 896 px pooled to 256 soft tokens, a 34-layer
language model with sliding-window and global layers, bidirectional attention among an image's tokens; 4.30 B
parameters), a word-level tokenizer over its 262,208-entry vocabulary with Gemma's special tokens at their
published ids, and the Gemma 3 chat template. Then, per batch size, plain greedy
generation and HSCR generation (``run_hscr``, 3 levels) of the same items run side by side on the
same GPU, every response forced to ``--max-new-tokens`` (random weights would stop at a random EOS).

Prints tokens/s, rows/s, GPU-seconds per 1,000 rows (a row = one item with its levels), the ratio
HSCR / plain and peak GPU memory, per backend: transformers always, vLLM where
``hscr_worker.backends.vllm`` imports and CUDA is present. For vLLM also ``stream``: plain vs HSCR
over ``--stream-chunks`` chunks per batch size, batch by batch and overlapped (chunk k's re-decode
in the same engine call as chunk k+1's own answers, what ``hscr generate`` does on vLLM).
``--tiny`` runs a tiny config on the CPU (what CI tests).

    python bench/gpu_scale.py --out gpu_scale.json            # on a GPU machine
    python bench/gpu_scale.py --arch qwen2.5-vl-7b --out gpu_scale_qwen.json
    python bench/gpu_scale.py --arch gemma3-4b --out gpu_scale_gemma3.json
    python bench/gpu_scale.py --tiny --batch-sizes 1 2 --min-rows 1 --out /tmp/gpu_scale.json
    python bench/gpu_scale.py --tiny --arch qwen2.5-vl-7b --batch-sizes 1 2 --min-rows 1 --out /tmp/g.json
"""

from __future__ import annotations  # noqa: I001  (the torchvision shim must import first)

import argparse
import gc
import importlib.util
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hscr_worker.backends.transformers import TransformersBackend  # first: makes torchvision importable

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import env_block, measure, measure_stream, rows_for, write_json  # noqa: E402
from hscr_client import HSCRParams  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessor,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from hscr_worker.fixture import gemma3 as gemma_fixture  # noqa: E402
from hscr_worker.fixture import qwen as qwen_fixture  # noqa: E402
from hscr_worker.fixture.model import make_portable  # noqa: E402
from hscr_worker.pipeline import PreparedItem  # noqa: E402
from hscr_worker.similarity import get_similarity  # noqa: E402

UNK, BOS, EOS = 0, 1, 2  # Llama's special ids
PROFILE = "llava-1.5"  # the prompt format of the architecture measured
CHAT_TEMPLATE = (  # llava-1.5: "USER: <image>\n{question} ASSISTANT:"
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def model_config(tiny: bool) -> LlavaConfig:
    """llava-hf/llava-1.5-7b-hf's architecture, or a tiny one of the same shape for the CPU."""
    if tiny:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=56, patch_size=14, projection_dim=32, hidden_act="quick_gelu")
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, vocab_size=576, max_position_embeddings=512)  # head_dim 32:
        # vLLM's CPU attention rejects 16, and --tiny --backends vllm should run
        image_token = 512
    else:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                                  hidden_act="quick_gelu", layer_norm_eps=1e-5)
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                           rms_norm_eps=1e-5)
        image_token = 32000
    text.bos_token_id, text.eos_token_id, text.pad_token_id = BOS, EOS, image_token + 1
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", bos_token_id=BOS, eos_token_id=EOS, pad_token_id=image_token + 1,
                       image_seq_length=(vision.image_size // vision.patch_size) ** 2, tie_word_embeddings=False)


def build_processor(config: LlavaConfig) -> LlavaProcessor:
    """A word-level tokenizer over the whole vocabulary (words ``w<id>``) and a CLIP image processor,
    built in code: the real backend's prompt, text and image paths run with nothing downloaded."""
    image_token, pad_token = config.image_token_index, config.image_token_index + 1
    specials = {UNK: "<unk>", BOS: "<s>", EOS: "</s>", image_token: "<image>", pad_token: "<pad>"}
    vocab = {specials.get(i, f"w{i}"): i for i in range(config.text_config.vocab_size)}
    vocab["USER:"], vocab["ASSISTANT:"] = 3, 4  # the chat template's words (ids stay unique)
    del vocab["w3"], vocab["w4"]
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    size = config.vision_config.image_size
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=config.vision_config.patch_size,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE)


# ---- Qwen2.5-VL-7B ----
# Qwen's special tokens at their published offsets from <|endoftext|> (151643 in Qwen2.5-VL-7B-Instruct:
# <|im_start|> 151644, <|im_end|> 151645, <|vision_start|> 151652, <|vision_end|> 151653,
# <|image_pad|> 151655, <|video_pad|> 151656); the tiny config puts <|endoftext|> at 512.
QWEN_SPECIAL_OFFSETS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|vision_start|>": 9,
                        "<|vision_end|>": 10, "<|image_pad|>": 12, "<|video_pad|>": 13}
QWEN_PROFILE = "qwen2.5-vl"
QWEN_PATCH, QWEN_MERGE = 14, 2  # 28 px per visual token after the 2x2 merge
QWEN_IMAGE_SIZE, QWEN_TINY_IMAGE_SIZE = 448, 112  # (448 / 28)**2 = 256 visual tokens; tiny: 16
QWEN_MIN_PIXELS = 56 * 56  # the published preprocessor's min_pixels (3136)
# the words of the ChatML template around a question (its default system prompt), whitespace-split
QWEN_TEMPLATE_WORDS = ("system", "You", "are", "a", "helpful", "assistant.", "user", "assistant")
QWEN_FIRST_QUESTION_WORD = 16  # question words are w16 .. below <|endoftext|>
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def qwen_config(tiny: bool) -> Qwen2_5_VLConfig:
    """Qwen/Qwen2.5-VL-7B-Instruct's architecture (its config.json's numbers), or a tiny one of the
    same shape for the CPU (text head_dim 32 for vLLM's CPU attention, M-RoPE sections summing to 16)."""
    if tiny:
        special_base = 512
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      window_size=QWEN_PATCH * QWEN_MERGE * 2, fullatt_block_indexes=[1])  # 2x2-token windows
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=576, max_position_embeddings=512, max_window_layers=2)
        head_dim = 64 // 2
    else:
        special_base = 151643
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
        text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
                    max_window_layers=28, sliding_window=32768)
        head_dim = 3584 // 28
    ids = {token: special_base + offset for token, offset in QWEN_SPECIAL_OFFSETS.items()}
    vision |= dict(hidden_act="silu", in_channels=3, patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE,
                   temporal_patch_size=2, tokens_per_second=2)
    # M-RoPE: temporal/height/width sections of the rotary half-dimension (published: 16/24/24 of 64)
    mrope = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    assert sum(mrope) == head_dim // 2, mrope
    text |= dict(hidden_act="silu", rms_norm_eps=1e-6, use_sliding_window=False, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope},
                 bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                 pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False,
                              image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"])
    config.bos_token_id, config.eos_token_id = text["bos_token_id"], text["eos_token_id"]
    config.pad_token_id = text["pad_token_id"]
    return config


def qwen_special_ids(config: Qwen2_5_VLConfig) -> dict[str, int]:
    base = config.image_token_id - QWEN_SPECIAL_OFFSETS["<|image_pad|>"]
    return {token: base + offset for token, offset in QWEN_SPECIAL_OFFSETS.items()}


def build_qwen_processor(config: Qwen2_5_VLConfig, image_size: int) -> Qwen2_5_VLProcessor:
    """A word-level tokenizer over the whole vocabulary (words ``w<id>``, the template's words at ids
    0-7, Qwen's special tokens at their ids, no BOS), the published ChatML template and a
    ``Qwen2VLImageProcessor`` whose pixel range keeps an ``image_size`` square at that size:
    ``(image_size / 28)**2`` visual tokens."""
    if image_size % (QWEN_PATCH * QWEN_MERGE):
        raise ValueError(f"--image-size must be a multiple of {QWEN_PATCH * QWEN_MERGE}, got {image_size}")
    specials = {i: token for token, i in qwen_special_ids(config).items()}
    vocab = {specials.get(i, f"w{i}"): i for i in range(config.text_config.vocab_size)}
    for i, word in enumerate(QWEN_TEMPLATE_WORDS):  # the chat template's words (ids stay unique)
        del vocab[f"w{i}"]
        vocab[word] = i
    # no unknown token: a word outside the vocabulary is a bug here, and the tokenizer says so
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    fast.add_special_tokens({"additional_special_tokens": [t for t in QWEN_SPECIAL_OFFSETS
                                                           if t not in ("<|im_end|>", "<|endoftext|>")]})
    common = dict(patch_size=QWEN_PATCH, merge_size=QWEN_MERGE, temporal_patch_size=2,
                  size={"shortest_edge": min(QWEN_MIN_PIXELS, image_size * image_size),
                        "longest_edge": image_size * image_size},
                  image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**common), tokenizer=fast,
                               video_processor=Qwen2VLVideoProcessor(**common),  # required; never used
                               chat_template=qwen_fixture.CHAT_TEMPLATE)


# ---- Gemma 3 4B (MedGemma-4b-it, MedGemma 1.5 4B) ----
# Gemma's special tokens at their published ids (google/gemma-3-4b-it, medgemma-4b-it); the tiny config puts
# them below 16. The newline runs are words too: vLLM's Gemma 3 processor looks them up.
GEMMA_SPECIAL = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105, "<end_of_turn>": 106,
                 "<start_of_image>": 255999, "<end_of_image>": 256000, "<image_soft_token>": 262144}
GEMMA_TINY_SPECIAL = {token: k for k, token in enumerate(GEMMA_SPECIAL)}
GEMMA_TEMPLATE_WORDS = ("user", "model", "\n", "\n\n", "\n\n\n", "\n\n\n\n")  # ids 4-9 (tiny: 9-14)
GEMMA_PROFILE = "gemma3"
GEMMA_FIRST_QUESTION_WORD = 16


def gemma_config(tiny: bool) -> Gemma3Config:
    """google/medgemma-4b-it's architecture (its config.json's numbers), or a tiny one of the same shape (head_dim
    32 for vLLM's CPU attention; a 112-px image of 8x8 patches pooled 2x2 into 16 soft tokens)."""
    special = GEMMA_TINY_SPECIAL if tiny else GEMMA_SPECIAL
    if tiny:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=112)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, vocab_size=576,
                    max_position_embeddings=512, sliding_window=512,
                    layer_types=["sliding_attention", "full_attention"])
        tokens = 16
    else:
        vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                      image_size=896)
        text = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, vocab_size=262208,
                    max_position_embeddings=131072, sliding_window=1024,
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
        tokens = 256
    vision |= dict(patch_size=14, vision_use_head=False, layer_norm_eps=1e-6)
    text |= dict(hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True,
                 bos_token_id=special["<bos>"], eos_token_id=[special["<eos>"], special["<end_of_turn>"]],
                 pad_token_id=special["<pad>"])
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=tokens,
                          boi_token_index=special["<start_of_image>"], eoi_token_index=special["<end_of_image>"],
                          image_token_index=special["<image_soft_token>"], tie_word_embeddings=True)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (special["<bos>"], special["<eos>"],
                                                                     special["<pad>"])
    return config


def gemma_special_ids(config: Gemma3Config) -> dict[str, int]:
    return GEMMA_TINY_SPECIAL if config.image_token_index < 1000 else GEMMA_SPECIAL


def build_gemma_processor(config: Gemma3Config) -> Gemma3Processor:
    """A word-level tokenizer over the whole vocabulary (words ``w<id>``, Gemma's special tokens at their ids,
    the template's words and the newline runs), Gemma 3's chat template and its image processor at the tower's
    size (no pan-and-scan)."""
    specials = {i: token for token, i in gemma_special_ids(config).items()}
    vocab = {specials.get(i, f"w{i}"): i for i in range(config.text_config.vocab_size)}
    first = 9 if config.image_token_index < 1000 else 4
    for i, word in enumerate(GEMMA_TEMPLATE_WORDS, start=first):
        del vocab[f"w{i}"]
        vocab[word] = i
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # newlines are whitespace: the prompt has none
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})
    fast.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                                                           "<end_of_image>", "<image_soft_token>"]})
    size = config.vision_config.image_size
    images = Gemma3ImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                  do_pan_and_scan=False)
    return Gemma3Processor(image_processor=images, tokenizer=fast, chat_template=gemma_fixture.CHAT_TEMPLATE,
                           image_seq_length=config.mm_tokens_per_image)


# ---- the architectures ----
@dataclass(frozen=True)
class Arch:
    name: str  # --arch
    label: str  # as printed
    profile: str  # the model family profile its prompts take
    model_class: type
    # the checkpoint in the published layout (what vLLM loads); run only when vLLM will load it
    make_portable: object
    # vLLM's max_model_len where the config's context is longer (Qwen's 128k would size buffers for nothing)
    max_model_len: int | None


ARCHS = {
    "llava-1.5-7b": Arch("llava-1.5-7b", "LLaVA-1.5-7B", PROFILE, LlavaForConditionalGeneration, make_portable, None),
    "qwen2.5-vl-7b": Arch("qwen2.5-vl-7b", "Qwen2.5-VL-7B", QWEN_PROFILE, Qwen2_5_VLForConditionalGeneration,
                          qwen_fixture.make_portable, 4096),
    "gemma3-4b": Arch("gemma3-4b", "Gemma 3 4B (MedGemma-4b-it)", GEMMA_PROFILE, Gemma3ForConditionalGeneration,
                      gemma_fixture.make_portable, 4096),
}


def arch_of(config) -> Arch:
    if isinstance(config, Gemma3Config):
        return ARCHS["gemma3-4b"]
    return ARCHS["llava-1.5-7b" if isinstance(config, LlavaConfig) else "qwen2.5-vl-7b"]


def visual_tokens(config, image_size: int | None = None) -> int:
    """Visual tokens per image: LLaVA's fixed grid, Gemma's pooled soft tokens, or Qwen's ``image_size`` square
    after the 2x2 merge."""
    if isinstance(config, LlavaConfig):
        return config.image_seq_length
    if isinstance(config, Gemma3Config):
        return config.mm_tokens_per_image
    return (image_size // (QWEN_PATCH * QWEN_MERGE)) ** 2


def write_random_checkpoint(config: LlavaConfig | Qwen2_5_VLConfig, processor, directory: Path, *,
                            device: torch.device, dtype: torch.dtype, portable: bool, seed: int = 0) -> int:
    """Save a random-weights checkpoint that both backends load like any other; returns its parameter count.

    Built where it runs (seconds for 7B on a GPU) and saved in one file; ``portable`` rewrites it with
    the fixture's own ``make_portable`` (LLaVA: CLIP keys as vLLM wants them; Qwen: the published key
    layout; a second pass over the 14-17 GB, so only when vLLM will load it).
    """
    arch = arch_of(config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = arch.model_class._from_config(config, dtype=dtype)
    if arch.profile == QWEN_PROFILE:  # a turn ends at <|im_end|>, the text at <|endoftext|> (as published)
        ids = qwen_special_ids(config)
        model.generation_config = GenerationConfig(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                                                   eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]])
    if arch.profile == GEMMA_PROFILE:  # a turn ends at <end_of_turn>, the text at <eos>; a non-zero projector
        ids = gemma_special_ids(config)
        model.generation_config = GenerationConfig(bos_token_id=ids["<bos>"], pad_token_id=ids["<pad>"],
                                                   eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]])
        gemma_fixture.reinit_projector(model)
    n_parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory, max_shard_size="1000GB")
    del model
    processor.save_pretrained(directory)
    if portable:
        arch.make_portable(directory)
    return n_parameters


def synthetic_items(n: int, config: LlavaConfig | Qwen2_5_VLConfig, question_words: int, seed: int,
                    image_size: int | None = None) -> list[PreparedItem]:
    """Random-noise images at the vision tower's size (Qwen: ``image_size``) and questions of random
    vocabulary words."""
    rng = np.random.default_rng(seed)
    if isinstance(config, LlavaConfig):
        size, first, vocab = config.vision_config.image_size, 5, config.image_token_index
    elif isinstance(config, Gemma3Config):  # question words between the template's words and <start_of_turn>
        size, first = config.vision_config.image_size, GEMMA_FIRST_QUESTION_WORD
        vocab = gemma_special_ids(config)["<start_of_turn>"] if config.image_token_index > 1000 else \
            config.text_config.vocab_size
    else:
        size, first, vocab = image_size, QWEN_FIRST_QUESTION_WORD, qwen_special_ids(config)["<|endoftext|>"]
    items = []
    for index in range(n):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        words = " ".join(f"w{i}" for i in rng.integers(first, vocab, size=question_words))
        items.append(PreparedItem(custom_id=f"gpu-scale-{index:05d}", question=words,
                                  image=Image.fromarray(pixels, "RGB")))
    return items


def vllm_backend(model_dir: Path, batch_size: int, device: torch.device, arch: Arch = ARCHS["llava-1.5-7b"],
                 **engine_options) -> tuple[object | None, str]:
    """The vLLM backend on the same checkpoint, or None and the reason it cannot run here."""
    # In-process engine: its allocations (weights, the preallocated KV cache) then show in the peak.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if device.type == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        from hscr_worker.backends.vllm import VLLMBackend
    except Exception as exc:  # another component, possibly absent or broken: never fatal here
        return None, f"hscr_worker.backends.vllm does not import: {type(exc).__name__}: {exc}"
    dtype = "float32" if device.type == "cpu" else "bfloat16"
    try:
        backend = VLLMBackend(str(model_dir), dtype=dtype, ignore_eos=True, profile=arch.profile, batch_size=batch_size,
                              **engine_options)
    except Exception as exc:
        return None, f"VLLMBackend failed to start: {type(exc).__name__}: {exc}"
    return backend, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llava-1.5-7b",
                        help="the architecture measured (random weights from its published config)")
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU in float32 (for CI)")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"qwen2.5-vl-7b: side of the square synthetic images, a multiple of 28 "
                             f"((side / 28)**2 visual tokens; default {QWEN_IMAGE_SIZE}, --tiny "
                             f"{QWEN_TINY_IMAGE_SIZE}); LLaVA's is fixed at its tower's 336")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--min-rows", type=int, default=8,
                        help="rows timed per batch size, in whole batches (8: batch 1 times 8 rows, 32 one batch)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--question-words", type=int, default=50)
    parser.add_argument("--backends", nargs="+", choices=["transformers", "vllm"], default=None,
                        help="default: transformers, plus vllm on CUDA (on the CPU vllm runs only when named here)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="passes over the items per batch size (the ratio is of the totals)")
    parser.add_argument("--stream-chunks", type=int, default=4,
                        help="vLLM: also time plain vs HSCR over a stream of this many chunks per batch size, "
                             "chunk k's re-decode overlapped with chunk k+1's own answers (0: skip)")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="one untimed plain + HSCR pass first (CUDA kernels, allocator)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--workdir", default=None, help="where the random checkpoint is saved (default: a temp dir)")
    parser.add_argument("--out", default=None, help="write the JSON results here (rewritten after each backend)")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or min(args.max_new_tokens, args.question_words, args.repeats, args.min_rows) < 1:
        parser.error("batch sizes, --max-new-tokens, --question-words, --repeats and --min-rows must be positive")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.tiny and device.type != "cuda":
        parser.error("the 7B configuration needs a CUDA GPU; use --tiny on the CPU")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    min_rows = args.min_rows
    backend_batch = max(args.batch_sizes)
    backends = args.backends or (["transformers", "vllm"] if device.type == "cuda" else ["transformers"])

    # Random weights give no image dependence: min_shift 0 lets every response position be coupled.
    params = HSCRParams(max_new_tokens=args.max_new_tokens, min_shift=0.0)
    similarity = get_similarity(params.similarity)
    arch = ARCHS[args.arch]
    image_size = None
    if arch.profile == QWEN_PROFILE:
        image_size = args.image_size or (QWEN_TINY_IMAGE_SIZE if args.tiny else QWEN_IMAGE_SIZE)
        if image_size < 1 or image_size % (QWEN_PATCH * QWEN_MERGE):
            parser.error(f"--image-size must be a positive multiple of {QWEN_PATCH * QWEN_MERGE}")
        config = qwen_config(args.tiny)
        processor = build_qwen_processor(config, image_size)
    else:
        if args.image_size is not None:
            parser.error("--image-size is for --arch qwen2.5-vl-7b (LLaVA's tower takes 336x336, Gemma's 896x896)")
        config = gemma_config(args.tiny) if arch.profile == GEMMA_PROFILE else model_config(args.tiny)
        processor = build_gemma_processor(config) if arch.profile == GEMMA_PROFILE else build_processor(config)
    n_items = max(max(rows_for(b, min_rows), b * args.stream_chunks) for b in args.batch_sizes)
    items = synthetic_items(n_items, config, args.question_words, 0, image_size)
    report: dict = {"benchmark": "gpu_scale", "env": env_block(device), "arch": arch.name, "tiny": args.tiny,
                    "dtype": str(dtype), "max_new_tokens": args.max_new_tokens, "question_words": args.question_words,
                    "visual_tokens": visual_tokens(config, image_size), "profile": arch.profile,
                    "params": params.model_dump(), "backends": {}}
    if image_size is not None:
        report["image_size"] = image_size

    def save() -> None:
        if args.out:
            write_json(args.out, report)

    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        model_dir = Path(workdir) / f"random-{arch.name}"
        began = time.perf_counter()
        portable = "vllm" in backends and importlib.util.find_spec("vllm") is not None
        report["parameters"] = write_random_checkpoint(config, processor, model_dir, device=device, dtype=dtype,
                                                       portable=portable)
        report["checkpoint_seconds"] = time.perf_counter() - began
        print(f"gpu_scale: random {f'tiny {arch.label}-shaped' if args.tiny else arch.label} checkpoint, "
              f"{report['parameters'] / 1e6:,.1f} M params, {dtype}, saved in {report['checkpoint_seconds']:.1f} s; "
              f"{device}; {report['visual_tokens']} visual tokens per image; batch sizes {args.batch_sizes}, "
              f"{args.max_new_tokens} new tokens", flush=True)

        if "transformers" in backends:
            began = time.perf_counter()
            backend = TransformersBackend(str(model_dir), device=str(device), batch_size=backend_batch,
                                          ignore_eos=True, profile=arch.profile)
            entry: dict = {"init_seconds": time.perf_counter() - began, "backend_batch_size": backend_batch}
            entry["results"] = measure(backend, items, args.batch_sizes, params, similarity, device,
                                       min_rows=min_rows, warmup=args.warmup, repeats=args.repeats)
            report["backends"]["transformers"] = entry
            save()
            del backend
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()  # vLLM sizes its KV cache from the free memory

        if "vllm" in backends:
            began = time.perf_counter()
            context = config.get_text_config().max_position_embeddings
            engine_options = ({"max_model_len": arch.max_model_len}
                              if arch.max_model_len and context > arch.max_model_len else {})
            backend, why_not = vllm_backend(model_dir, backend_batch, device, arch, **engine_options)
            entry = {"skipped": why_not} if backend is None else {"init_seconds": time.perf_counter() - began}
            if backend is not None:
                try:
                    entry["results"] = measure(backend, items, args.batch_sizes, params, similarity, device,
                                               min_rows=min_rows, warmup=args.warmup, repeats=args.repeats)
                    if args.stream_chunks:
                        entry["stream"] = []
                        for b in args.batch_sizes:
                            row = measure_stream(backend, items[:b * args.stream_chunks], b, params, similarity,
                                                 device, repeats=args.repeats)
                            entry["stream"].append(row)
                            print(f"        vllm stream of {row['chunks']} chunks of {b}: HSCR/plain "
                                  f"{row['hscr_overlapped_over_plain_time']:.2f}x overlapped, "
                                  f"{row['hscr_batch_by_batch_over_plain_time']:.2f}x batch by batch", flush=True)
                            save()
                except Exception as exc:  # keep the transformers figures and say what broke
                    entry["failed"] = f"{type(exc).__name__}: {exc}"
                    print(f"        vllm failed: {entry['failed']}", flush=True)
            report["backends"]["vllm"] = entry
            if backend is None:
                print(f"        vllm skipped: {why_not}", flush=True)
        else:
            report["backends"]["vllm"] = {"skipped": "not requested (on the CPU the vLLM backend's own tests cover it)"}
    save()
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
