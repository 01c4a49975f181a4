"""GPU memory of the named Med-VLMs: bf16 weights and KV cache at a stated ``max_model_len`` (docs/models.md).

Each model is instantiated on PyTorch's meta device from its published architecture numbers (nothing
is downloaded or allocated), so the parameter count is exact for that architecture; the KV cache is
``2 (K, V) x layers x kv_heads x head_dim x 2 bytes`` per token (for Gemma 3 an upper bound: five of every
six layers slide over 1,024 tokens, and vLLM keeps only that window for them). vLLM adds activations, the CUDA
graphs and the vision encoder's workspace on top (``--gpu-memory-utilization`` bounds the total).

    python bench/model_memory.py --max-model-len 8192
"""

from __future__ import annotations

import argparse
import json

from hscr_worker._compat import ensure_torchvision_importable

ensure_torchvision_importable()

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    Gemma3Config,
    LlavaConfig,
    MistralConfig,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
)

# Published config.json numbers (text hidden, layers, heads, KV heads, intermediate, vocab; vision side).
QWEN25_VISION_7B = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, patch_size=14,
                        spatial_merge_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])


def qwen25(hidden: int, layers: int, heads: int, kv: int, inter: int, vision_inter: int = 3420) -> Qwen2_5_VLConfig:
    vision = {**QWEN25_VISION_7B, "intermediate_size": vision_inter, "out_hidden_size": hidden}
    text = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                intermediate_size=inter, vocab_size=152064,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision)


# Gemma 3's SigLIP-so400m tower (896 px, 14-px patches pooled to 256 soft tokens), as in MedGemma's config.json.
GEMMA3_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     image_size=896, patch_size=14, vision_use_head=False)


def gemma3(hidden: int, layers: int, heads: int, kv: int, head_dim: int, inter: int) -> Gemma3Config:
    text = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                head_dim=head_dim, intermediate_size=inter, vocab_size=262208, sliding_window=1024)
    return Gemma3Config(text_config=text, vision_config=GEMMA3_VISION, mm_tokens_per_image=256)


MODELS = {
    # name: (config, family, profile)
    "Lingshu-7B": (lambda: qwen25(3584, 28, 28, 4, 18944), "qwen2.5-vl"),
    "HuatuoGPT-Vision-7B-Qwen2.5VL": (lambda: qwen25(3584, 28, 28, 4, 18944), "qwen2.5-vl"),
    "Lingshu-32B": (lambda: qwen25(5120, 64, 40, 8, 27648, vision_inter=3456), "qwen2.5-vl"),
    "MedVLM-R1 (Qwen2-VL-2B)": (lambda: Qwen2VLConfig(
        text_config=dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2), tie_word_embeddings=True), "qwen2-vl"),
    "MedGemma-4b-it / MedGemma 1.5 4B (Gemma 3 4B)": (lambda: gemma3(2560, 34, 8, 4, 256, 10240), "gemma3"),
    "MedGemma-27b-it (Gemma 3 27B)": (lambda: gemma3(5376, 62, 32, 16, 128, 21504), "gemma3"),
    "LLaVA-Med v1.5 (Mistral-7B)": (lambda: LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text_config=MistralConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                  num_key_value_heads=8, intermediate_size=14336, vocab_size=32064),
        vision_feature_layer=-2), "llava-med"),
}


def footprint(config) -> dict:
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2
    return {"parameters": n, "weights_gib": n * 2 / 2**30, "kv_bytes_per_token": kv_per_token}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    args = parser.parse_args()
    rows = {}
    for name, (make, profile) in MODELS.items():
        f = footprint(make())
        f["kv_gib_one_sequence"] = f["kv_bytes_per_token"] * args.max_model_len / 2**30
        rows[name] = {"profile": profile, **f}
    if args.json:
        print(json.dumps({"max_model_len": args.max_model_len, "models": rows}, indent=2))
        return
    print(f"| model | profile | parameters | bf16 weights | KV cache per token | KV, one {args.max_model_len}-token "
          f"sequence |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['profile']} | {r['parameters'] / 1e9:.2f} B | {r['weights_gib']:.1f} GiB | "
              f"{r['kv_bytes_per_token'] / 1024:.0f} KiB | {r['kv_gib_one_sequence']:.2f} GiB |")


if __name__ == "__main__":
    main()
