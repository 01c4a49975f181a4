"""``hscr convert-llava``: an original LLaVA-Med checkpoint in, an HF LLaVA one out, checked against LLaVA's forward.

The source is a small LLaVA-Med-shaped checkpoint written here (Mistral language model with
grouped-query attention, CLIP tower loaded from a separate directory, ``mlp2x_gelu`` projector,
``mm_vision_select_layer=-2``, ``patch`` features, two weight shards, stray vision-tower and
``inv_freq`` tensors). Random weights are right here: the point is that the converted model
computes what LLaVA computes from the original tensors, not what it answers.

The reference forward is LLaVA's (``llava_arch.prepare_inputs_labels_for_multimodal``) written
out with transformers' Mistral and CLIP models: CLIP hidden state ``select_layer`` without CLS,
the projector, the features spliced in place of the image placeholder, the language model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence

import pytest
import torch
from PIL import Image

from hscr_worker._compat import ensure_torchvision_importable

ensure_torchvision_importable()

from transformers import (  # noqa: E402
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from hscr_worker.convert import ConversionError, convert_llava_checkpoint  # noqa: E402

WORDS = ["[", "]", "INST", "/", "what", "is", "the", "organ", "shown", "?", "a", "liver", "lung", "no", "yes",
         "there", "lesion", "in", "left", "right", "normal", "."]
SELECT_LAYER = -2
QUESTION = "what organ is shown ?"


def _tokenizer(pad: str | None = "<unk>") -> PreTrainedTokenizerFast:
    """A word-level tokenizer; LLaVA-Med's pads with <unk>, so the converter adds <image> only."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token=pad)


def _original_config(vocab: int, clip_dir: str) -> dict:
    """What LLaVA-Med v1.5's config.json holds, at toy sizes."""
    return {"architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral", "vocab_size": vocab,
            "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 256, "rope_theta": 1000000.0, "sliding_window": None,
            "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
            "torch_dtype": "float32", "image_aspect_ratio": "pad", "mm_hidden_size": 64,
            "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
            "mm_vision_select_feature": "patch", "mm_vision_select_layer": SELECT_LAYER,
            "mm_vision_tower": clip_dir, "tokenizer_model_max_length": 256, "tune_mm_mlp_adapter": False,
            "use_mm_proj": True}


class OriginalLlava:
    """LLaVA's forward over the original checkpoint's modules (the reference)."""

    def __init__(self, root, seed: int = 0):
        from safetensors.torch import load_file, save_file

        torch.manual_seed(seed)
        self.source, self.clip_dir = root / "llava-med-toy", root / "clip-vit-toy"
        self.tokenizer = _tokenizer()
        vocab = len(self.tokenizer)
        config = _original_config(vocab, str(self.clip_dir))
        text_fields = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in (
            "architectures", "model_type", "image_aspect_ratio", "tokenizer_model_max_length",
            "tune_mm_mlp_adapter", "use_mm_proj")}
        self.language = MistralForCausalLM(MistralConfig(**text_fields)).eval()
        self.vision = CLIPVisionModel(CLIPVisionConfig(
            image_size=56, patch_size=14, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, projection_dim=32)).eval()
        self.projector = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 128))
        self.image_processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})

        self.source.mkdir()
        (self.source / "config.json").write_text(json.dumps(config))
        self.tokenizer.save_pretrained(self.source)
        state = {f"model.{k}": v for k, v in self.language.model.state_dict().items()}
        state["lm_head.weight"] = self.language.lm_head.weight
        state.update({f"model.mm_projector.{k}": v for k, v in self.projector.state_dict().items()})
        # what LLaVA's trainer may leave behind; LLaVA itself ignores both at load time
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)
        state["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] = torch.zeros(64)
        names = sorted(state)
        for part, half in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
            save_file({k: state[k].detach().contiguous() for k in half},
                      self.source / f"model-0000{part + 1}-of-00002.safetensors")
        self.vision.save_pretrained(self.clip_dir)
        self.image_processor.save_pretrained(self.clip_dir)
        # older hub CLIP checkpoints (openai's among them) also store this buffer, which vLLM refuses to load
        tower = load_file(self.clip_dir / "model.safetensors")
        tower["embeddings.position_ids"] = torch.arange(17).unsqueeze(0)
        save_file(tower, self.clip_dir / "model.safetensors")

    def prompt_ids(self, question: str, image_token_id: int) -> list[int]:
        """LLaVA-Med's mistral_instruct prompt (``tokenizer_image_token``): one placeholder id for the image."""
        before, after = "[INST] ", f"\n{question} [/INST]"
        return (self.tokenizer(before, add_special_tokens=False)["input_ids"] + [image_token_id]
                + self.tokenizer(after, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def logits(self, question: str, image: Image.Image, response: Sequence[int] = (), *,
               pad: bool = False) -> torch.Tensor:
        """LLaVA-Med's mistral_instruct prompt with the image spliced in, then ``response``; logits at every
        position. ``pad``: LLaVA's ``image_aspect_ratio="pad"`` preprocessing (``process_images``), the image
        centred on a square of the image processor's mean colour before the processor sees it."""
        if pad:
            image = expand2square(image, tuple(int(x * 255) for x in self.image_processor.image_mean))
        before, after = "[INST] ", f"\n{question} [/INST]"
        ids_before = self.tokenizer(before, add_special_tokens=False)["input_ids"]
        ids_after = self.tokenizer(after, add_special_tokens=False)["input_ids"] + list(response)
        pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        hidden = self.vision(pixels, output_hidden_states=True).hidden_states[SELECT_LAYER][:, 1:]
        features = self.projector(hidden)[0]
        embed = self.language.get_input_embeddings()
        embeds = torch.cat([embed(torch.tensor(ids_before)), features, embed(torch.tensor(ids_after))])
        return self.language(inputs_embeds=embeds[None]).logits[0]


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's ``expand2square`` (llava/mm_utils.py): the image centred on a square canvas of ``background``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas

def _image(seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (40, 64, 3), generator=generator, dtype=torch.uint8)  # not square
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> OriginalLlava:
    return OriginalLlava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "llava-med-toy-hf"
    report = convert_llava_checkpoint(original.source, out, shard_bytes=200_000)  # several output shards
    return out, report


def test_converted_layout(converted, original):
    out, report = converted
    vocab = len(original.tokenizer)
    assert report.vocab_size == vocab + 1 and report.image_token_id == vocab  # <image>; <unk> stays the pad
    assert report.text_model_type == "mistral"
    # the stray tower tensor; inv_freq and CLIP's position_ids buffer
    assert report.skipped["vision tower in the LLaVA checkpoint"] == 1 and report.skipped["unused"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["vision_feature_layer"] == SELECT_LAYER and config["vision_feature_select_strategy"] == "default"
    assert config["text_config"]["num_key_value_heads"] == 2 and config["image_token_index"] == vocab
    assert not any(k.startswith("mm_") for k in config["text_config"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert not list(out.glob("part-*"))


def test_converted_model_computes_what_llava_computes(converted, original):
    """Transformers' LlavaForConditionalGeneration on the output == LLaVA's forward on the input (original vocab)."""
    from transformers import AutoProcessor

    out, _ = converted
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    vocab = len(original.tokenizer)
    for seed in range(3):
        image = _image(seed)
        text = f"[INST] {processor.image_token}\n{QUESTION} [/INST]"
        inputs = processor(images=[image], text=text, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0]
        expected = original.logits(QUESTION, image)
        assert logits.shape[0] == expected.shape[0]  # the placeholder expanded to the tower's 16 patches
        torch.testing.assert_close(logits[:, :vocab], expected, atol=1e-5, rtol=1e-5)


def _tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a converted checkpoint, by name."""
    from safetensors.torch import load_file

    return {k: v for f in sorted(directory.glob("model-*.safetensors")) for k, v in load_file(f).items()}


def _with_config(original: OriginalLlava, directory, **changes):
    """The original checkpoint (linked) under ``directory`` with ``changes`` to its config."""
    directory.mkdir()
    for f in original.source.iterdir():
        if f.name != "config.json":
            (directory / f.name).symlink_to(f)
    config = json.loads((original.source / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))
    return directory


def test_conversion_refuses_what_it_cannot_express(original, tmp_path):
    with pytest.raises(ConversionError, match="--vision-tower"):
        convert_llava_checkpoint(original.source, tmp_path / "a", vision_tower=tmp_path / "nowhere")
    for k, (change, message) in enumerate(((dict(mm_projector_type="linear"), "mlp2x_gelu"),
                                           (dict(mm_use_im_start_end=True), "mm_use_im_start_end"),
                                           (dict(model_type="llava_mpt"), "not an original LLaVA checkpoint"),
                                           (dict(image_aspect_ratio="anyres"), "LlavaNext"),
                                           (dict(mm_patch_merge_type="spatial_unpad"), "LlavaNext"),
                                           (dict(unfreeze_mm_vision_tower=True), "its own vision tower"))):
        with pytest.raises(ConversionError, match=message):
            convert_llava_checkpoint(_with_config(original, tmp_path / f"bad-{k}", **change), tmp_path / "out")
    # a CLIP directory without its encoder: refused after writing started, and nothing is left behind
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "clip-partial"
    shutil.copytree(original.clip_dir, partial)
    tower = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in tower.items() if not k.startswith("encoder.")}, partial / "model.safetensors")
    with pytest.raises(ConversionError, match="required tensors"):
        convert_llava_checkpoint(original.source, tmp_path / "partial-out", vision_tower=partial)
    assert not (tmp_path / "partial-out").exists()
    (tmp_path / "mine").mkdir()  # an empty directory the user made stays, empty
    with pytest.raises(ConversionError, match="required tensors"):
        convert_llava_checkpoint(original.source, tmp_path / "mine", vision_tower=partial)
    assert (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())
    target = tmp_path / "full"
    target.mkdir()
    (target / "x").write_text("")
    with pytest.raises(ConversionError, match="not empty"):
        convert_llava_checkpoint(original.source, target)


def test_llava_med_profile_gives_the_model_what_llava_med_gives_it(converted, original):
    """The ``llava-med`` profile (prompt ids, pad-to-square images) through the transformers backend against
    LLaVA's own preprocessing and forward on the original checkpoint. The two backends share the profile's
    code (the test below), so only a reference outside it can catch a bug there."""
    from hscr_worker.backends.base import ScoreRequest
    from hscr_worker.backends.transformers import TransformersBackend

    out, report = converted
    hf = TransformersBackend(str(out), device="cpu", profile="llava-med")
    prompt = hf.prompt_ids(QUESTION)
    assert prompt == original.prompt_ids(QUESTION, report.image_token_id)
    response = original.tokenizer("a lesion in the left lung .", add_special_tokens=False)["input_ids"]
    vocab = len(original.tokenizer)
    for seed in range(3):
        image = _image(seed)  # 64 x 40: padded to a square first
        rows = hf.score([ScoreRequest(prompt, hf.encode_images([image])[0], response)])[0]
        expected = original.logits(QUESTION, image, response, pad=True)[-len(response) - 1:-1]
        torch.testing.assert_close(rows[:, :vocab], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.vllm
def test_converted_model_runs_in_both_backends(converted, original, vllm_engine):
    """The output as a user runs it: ``--profile llava-med`` in both backends, scores within the parity tolerance."""
    from hscr_worker.backends.base import GenerateRequest, ScoreRequest
    from hscr_worker.backends.transformers import TransformersBackend

    out, report = converted
    hf = TransformersBackend(str(out), device="cpu", profile="llava-med")
    engine = vllm_engine(str(out), profile="llava-med")
    assert engine.profile.name == hf.profile.name == "llava-med"
    images = [_image(seed) for seed in range(4)]
    visual = hf.encode_images(images)
    assert all(torch.equal(a.embeds, b.embeds) for a, b in zip(engine.encode_images(images), visual, strict=True))
    assert all(v.embeds.shape == (16, 128) for v in visual)  # 4x4 patches of the padded-to-square image, CLS dropped
    prompt = hf.prompt_ids(QUESTION)
    assert engine.prompt_ids(QUESTION) == prompt and prompt.count(report.image_token_id) == 1
    requests = [GenerateRequest(prompt, v, 8) for v in visual]
    answers = engine.generate(requests)
    assert answers == hf.generate(requests) and all(answers)
    rows_vllm = engine.score([ScoreRequest(prompt, v, a) for v, a in zip(visual, answers, strict=True)])
    rows_hf = hf.score([ScoreRequest(prompt, v, a) for v, a in zip(visual, answers, strict=True)])
    worst = max(float((a - b).abs().max()) for a, b in zip(rows_vllm, rows_hf, strict=True))
    assert worst <= 1e-4, f"largest logit difference {worst:.2e}"


def test_cli_converts_and_explains_a_missing_vision_tower(original, tmp_path):
    import subprocess
    import sys

    hscr = [sys.executable, "-c", "from hscr_client._cli import main; main()"]
    done = subprocess.run([*hscr, "convert-llava", str(original.source), str(tmp_path / "out"), "--dtype", "bfloat16"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "llava-med" in done.stdout and "vocabulary" in done.stdout
    from safetensors import safe_open

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    for name in ("language_model.lm_head.weight", "vision_tower.vision_model.embeddings.patch_embedding.weight"):
        with safe_open(str(tmp_path / "out" / index["weight_map"][name]), "pt") as f:
            assert f.get_tensor(name).dtype == torch.bfloat16
    bad = _with_config(original, tmp_path / "no-clip", mm_vision_tower="openai/clip-vit-large-patch14-336")
    done = subprocess.run([*hscr, "convert-llava", str(bad), str(tmp_path / "out2")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "openai/clip-vit-large-patch14-336" in done.stderr and "--vision-tower" in done.stderr
    assert "Traceback" not in done.stderr


def test_pickled_shards_and_tied_embeddings(original, converted, tmp_path):
    """LLaVA-1.5's ``pytorch_model-*.bin`` shards (read with weights_only) and a config with tied embeddings."""
    from safetensors.torch import load_file

    source = _with_config(original, tmp_path / "bin", tie_word_embeddings=True)
    state = {}
    for shard in sorted(source.glob("*.safetensors")):
        state.update(load_file(shard))
        shard.unlink()
    del state["lm_head.weight"]
    torch.save(state, source / "pytorch_model-00001-of-00001.bin")
    convert_llava_checkpoint(source, tmp_path / "out")

    mine, reference = _tensors(tmp_path / "out"), _tensors(converted[0])
    assert set(mine) == set(reference)
    assert torch.equal(mine["language_model.lm_head.weight"], mine["language_model.model.embed_tokens.weight"])
    assert all(torch.equal(mine[k], reference[k]) for k in mine if k != "language_model.lm_head.weight")
    # without the tie, a missing head is a missing shard, not something to make up
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(ConversionError, match="no lm_head.weight"):
        convert_llava_checkpoint(source, tmp_path / "untied")


def test_a_tokenizer_without_pad_gets_one(original, tmp_path):
    source = _with_config(original, tmp_path / "no-pad")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            (source / name).unlink()
    _tokenizer(pad=None).save_pretrained(source)
    report = convert_llava_checkpoint(source, tmp_path / "out")
    vocab = len(original.tokenizer)
    assert report.vocab_size == vocab + 2 and report.image_token_id == vocab
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["pad_token_id"] == vocab + 1


def test_vision_tower_from_a_full_clip_checkpoint(original, converted, tmp_path):
    """The hub's CLIP checkpoints are whole CLIPModels: ``vision_model.*`` is the tower, the rest is left out."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    vision_config = original.vision.config
    text = CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, projection_dim=32, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    clip = CLIPModel(CLIPConfig(text_config=text.to_dict(),
                                vision_config=vision_config.to_dict(), projection_dim=32))
    clip.vision_model.load_state_dict(original.vision.state_dict())  # transformers 5: the model is the tower
    clip.save_pretrained(tmp_path / "clip-full")
    original.image_processor.save_pretrained(tmp_path / "clip-full")
    report = convert_llava_checkpoint(original.source, tmp_path / "out", vision_tower=tmp_path / "clip-full")
    assert report.skipped["CLIP text side"] > 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vision_config"]["num_hidden_layers"] == vision_config.num_hidden_layers

    mine, reference = _tensors(tmp_path / "out"), _tensors(converted[0])
    assert set(mine) == set(reference) and all(torch.equal(mine[k], reference[k]) for k in mine)


@pytest.mark.vllm
def test_vllm_backend_refuses_a_checkpoint_missing_vision_weights(converted, tmp_path):
    """The vision side loads quietly (it skips the language model's layers), so it checks what loaded itself."""
    from safetensors.torch import load_file, save_file

    from hscr_worker.backends.vllm import VLLMBackend

    broken = tmp_path / "llava-med-broken"
    shutil.copytree(converted[0], broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = broken / index["weight_map"]["multi_modal_projector.linear_2.weight"]
    save_file({k: v for k, v in load_file(shard).items() if k != "multi_modal_projector.linear_2.weight"}, shard)
    del index["weight_map"]["multi_modal_projector.linear_2.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="do not load cleanly.*linear_2"):
        VLLMBackend(str(broken), profile="llava-med")
