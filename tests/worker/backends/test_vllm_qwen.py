"""vLLM's HSCR Qwen classes (``backends.vllm_models``) against the transformers reference (real CPU engine).

A tiny random-weight Qwen2.5-VL (``build_tiny_qwen``) and two non-square images of different grids.
The worker's visual tokens go to both backends; greedy decodes must be the same token ids and score
rows within ``SCORE_ATOL`` for a full image, a ``zero``-mode dropped one and a ``remove``-mode one
(~5 % kept): so the kept tokens sit at their full-image M-RoPE positions, the prompt's placeholder
expands to exactly the kept count, and the text after the image stays where it is under the full
image. (Moving the kept tokens to other slots of the same grid shifts these logits by ~1e-2, a made-up
grid by ~0.3: far above the tolerance.) Also: kept counts that differ within one engine step, a decode
whose image comes from the prefix cache, malformed input refused at admission, and the plugin entry
point that registers the classes in a spawned engine.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from hscr_worker.backends.base import GenerateRequest, ScoreRequest, VisualTokens

pytestmark = pytest.mark.vllm

pytest.importorskip("vllm")

SCORE_ATOL = 1e-4  # float32 on both sides; vLLM's CPU kernels sum in another order (measured ~2e-5)
KEEP_FRACTION = 0.05
QUESTION = "What does the image show?"
# Non-square images of two sizes (height x width, multiples of 8 px): grids (1, 12, 16) and (1, 16, 10)
# patches of 4 px -> 6x8 = 48 and 8x5 = 40 merged visual tokens.
IMAGE_SHAPES = ((48, 64), (64, 40))
LOGIT_SCALE = 50.0


def build_tiny_qwen(out_dir: Path, *, seed: int = 0) -> Path:
    """A tiny random-weight Qwen2.5-VL in the published layout, from the Qwen fixture's own builders
    (``hscr_worker.fixture.qwen``: Qwen2 byte-level BPE with Qwen's special tokens, the ChatML
    template, ``Qwen2_5_VLProcessor``, a 2-layer language model of head_dim 32 with M-RoPE), untrained.
    The output head is scaled up: at the init's std 0.02 the logits are near-uniform and a greedy
    choice could turn on the kernels' rounding instead of on the model."""
    from hscr_worker.fixture import qwen

    tokenizer = qwen.build_tokenizer()
    model = qwen.build_model(tokenizer, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_SCALE)
    model.save_pretrained(out_dir)
    qwen.build_processor(tokenizer).save_pretrained(out_dir)
    qwen.make_portable(Path(out_dir))
    return Path(out_dir)


def images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SHAPES]


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> str:
    return str(build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen2.5-vl")))


@pytest.fixture(scope="module")
def qwen_hf(tiny_qwen_dir):
    from hscr_worker.backends.transformers import TransformersBackend

    return TransformersBackend(tiny_qwen_dir, device="cpu", ignore_eos=True)


@pytest.fixture(scope="module")
def qwen_vllm(tiny_qwen_dir, vllm_engine):
    return vllm_engine(tiny_qwen_dir, ignore_eos=True)


@pytest.fixture(scope="module")
def cases(qwen_hf):
    """Per image: (prompt, full, zero-dropped, remove-dropped), the masks seeded per image."""
    prompt = qwen_hf.prompt_ids(QUESTION)
    out = []
    for k, visual in enumerate(qwen_hf.encode_images(images())):
        keep = torch.rand(visual.n_tokens, generator=torch.Generator().manual_seed(k)) < KEEP_FRACTION
        keep[visual.n_tokens // 2] = True  # at least one survivor
        out.append((prompt, visual, visual.dropped(keep, "zero"), visual.dropped(keep, "remove")))
    return out


def test_fixture_images_are_non_square_grids(cases):
    grids = [full.grid for _, full, _, _ in cases]
    assert grids == [(1, 12, 16), (1, 16, 10)]  # rows != cols both ways: the text after starts at max(rows, cols)
    assert all(0 < removed.n_tokens < full.n_tokens // 4 for _, full, _, removed in cases)


def test_qwen_image_data_fields():
    from hscr_worker.backends.vllm_models import INDEX_KEY, qwen_image_data

    full = VisualTokens(torch.randn(48, 8), (1, 12, 16))
    data = qwen_image_data(full)
    assert set(data) == {"image_embeds", "image_grid_thw"} and data["image_grid_thw"].tolist() == [[1, 12, 16]]
    removed = full.dropped(torch.arange(48) % 7 == 0, "remove")
    data = qwen_image_data(removed)
    assert data["image_embeds"].shape == (7, 8) and data[INDEX_KEY].tolist() == [list(range(0, 48, 7))]
    with pytest.raises(ValueError, match="grid"):
        qwen_image_data(VisualTokens(torch.randn(4, 8)))


def _model_for_positions(cls, merge: int = 2):
    """A model instance with only the config that ``get_mrope_input_positions`` reads."""
    model = cls.__new__(cls)
    torch.nn.Module.__init__(model)
    model.config = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=merge, tokens_per_second=2))
    return model


def _image_feature(offset: int, grid, index=None):
    from hscr_worker.backends.vllm_models import INDEX_KEY

    data = {"image_grid_thw": SimpleNamespace(data=torch.tensor(grid))}
    length = grid[1] * grid[2] // 4
    if index is not None:
        data[INDEX_KEY] = SimpleNamespace(data=torch.tensor(index))
        length = len(index)
    return SimpleNamespace(modality="image", mm_position=SimpleNamespace(offset=offset, length=length), data=data)


@pytest.mark.parametrize("arch", ["HSCRQwen2VLForConditionalGeneration", "HSCRQwen2_5_VLForConditionalGeneration"])
def test_mrope_positions_are_stock_for_full_images_and_keep_full_image_places(arch):
    from hscr_worker.backends import vllm_models
    from hscr_worker.families.qwen2_vl import mrope_positions

    cls = getattr(vllm_models, arch)
    model = _model_for_positions(cls)
    stock = super(vllm_models._KeptTokensModel, model)  # vLLM's own Qwen class
    # full images, one and two of them, with text before, between and after (or none after)
    for tokens, features in [
        (63, [_image_feature(5, (1, 12, 16))]),
        (53, [_image_feature(5, (1, 12, 16))]),  # the prompt ends with the image
        (110, [_image_feature(3, (1, 16, 10)), _image_feature(50, (1, 12, 16))]),
        (7, []),
    ]:
        mine, delta = model.get_mrope_input_positions(list(range(tokens)), features)
        theirs, their_delta = stock.get_mrope_input_positions(list(range(tokens)), features)
        assert torch.equal(mine, theirs.to(mine.dtype)) and delta == their_delta
    # kept tokens: the family's rule, and decoding continues where it does under the full image
    index = [0, 17, 18, 47]
    mine, delta = model.get_mrope_input_positions(list(range(5 + 4 + 10)), [_image_feature(5, (1, 12, 16), index)])
    assert torch.equal(mine, mrope_positions(5, 10, (1, 12, 16), 2, torch.tensor(index)))
    full, full_delta = model.get_mrope_input_positions(list(range(5 + 48 + 10)), [_image_feature(5, (1, 12, 16))])
    assert 5 + 4 + 10 + delta == 5 + 48 + 10 + full_delta == int(full.max()) + 1


def test_greedy_decodes_are_the_same_token_ids(qwen_vllm, qwen_hf, cases):
    requests = [GenerateRequest(prompt, visual, 16) for prompt, *visuals in cases for visual in visuals]
    from_vllm = qwen_vllm.generate(requests)
    assert from_vllm == qwen_hf.generate(requests)
    assert all(len(r) == 16 for r in from_vllm)


def test_scores_match_full_zero_and_removed(qwen_vllm, qwen_hf, cases):
    answers = qwen_hf.generate([GenerateRequest(prompt, full, 16) for prompt, full, _, _ in cases])
    requests = [ScoreRequest(prompt, visual, answer)
                for (prompt, *visuals), answer in zip(cases, answers, strict=True) for visual in visuals]
    # the same kept count for both images: one engine step, one stacked [2, n] index
    for (prompt, full, _, _), answer in zip(cases, answers, strict=True):
        keep = torch.zeros(full.n_tokens, dtype=torch.bool)
        keep[[1, full.n_tokens - 2]] = True
        requests.append(ScoreRequest(prompt, full.dropped(keep, "remove"), answer))
    from_vllm, from_hf = qwen_vllm.score(requests), qwen_hf.score(requests)
    for request, a, b in zip(requests, from_vllm, from_hf, strict=True):
        assert a.shape == b.shape == (len(request.response_ids), qwen_vllm.vocab_size)
        worst = float((a - b).abs().max())
        assert worst <= SCORE_ATOL, f"{request.visual.n_tokens} visual tokens: logit difference {worst:.2e}"


def _engine_rows(qwen_vllm, prompts_and_visuals, answer: list[int] | None, max_tokens: int = 1):
    """One ``LLM.generate`` over (prompt, visual) pairs: raw logit rows ``[T, V]`` per pair (of ``answer``
    after the prompt, or with ``answer=None`` of the ``max_tokens`` greedy decode steps) and the outputs."""
    from vllm import SamplingParams

    from hscr_worker.backends.vllm_models import qwen_image_data

    prompts = [{"prompt_token_ids": list(prompt) + (answer or []),
                "multi_modal_data": {"image": qwen_image_data(visual)},
                "multi_modal_uuids": {"image": [qwen_vllm.profile.cache_key(visual)]}}
               for prompt, visual in prompts_and_visuals]
    # raw logits (the backend's logprobs_mode); prompt logprobs bypass the prefix cache, decode steps do not
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, detokenize=False, ignore_eos=True,
                              **({"prompt_logprobs": -1} if answer else {"logprobs": -1}))
    outputs = qwen_vllm.llm.generate(prompts, sampling, use_tqdm=False)
    rows = []
    for out in outputs:
        entries = out.prompt_logprobs[-len(answer):] if answer else out.outputs[0].logprobs
        row = torch.full((len(entries), qwen_vllm.vocab_size), float("-inf"))
        for r, entry in zip(row, entries, strict=True):
            r[list(entry)] = torch.tensor([lp.logprob for lp in entry.values()])
        rows.append(row)
    return rows, outputs


def test_different_kept_counts_in_one_engine_step(qwen_vllm, qwen_hf, cases):
    """Both removed images in one ``LLM.generate`` (the backend groups by count; the engine must not care)."""
    (prompt, full0, _, _), (_, full1, _, _) = cases
    first = full0.dropped(torch.isin(torch.arange(full0.n_tokens), torch.tensor([3, 20, 41])), "remove")
    second = full1.dropped(torch.isin(torch.arange(full1.n_tokens), torch.tensor([0, 39])), "remove")
    answer = [17, 9, 23]
    rows, outputs = _engine_rows(qwen_vllm, [(prompt, first), (prompt, second)], answer)
    expected = qwen_hf.score([ScoreRequest(prompt, first, answer), ScoreRequest(prompt, second, answer)])
    for out, visual, mine, reference in zip(outputs, (first, second), rows, expected, strict=True):
        assert len(out.prompt_token_ids) == len(prompt) - 1 + visual.n_tokens + len(answer)
        assert float((mine - reference).abs().max()) <= SCORE_ATOL


def test_kept_positions_hold_on_a_prefix_cache_hit(qwen_vllm, qwen_hf, cases):
    """A decode whose first KV blocks (128 tokens), image included, comes from the prefix cache: vLLM
    then hands the model only the image's ``keep_on_cpu`` fields to place the rest of the prompt."""
    _, full, _, removed = cases[0]
    prompt = qwen_hf.prompt_ids(" ".join([QUESTION] * 30))
    pairs = [(prompt, full), (prompt, removed)]
    first, _ = _engine_rows(qwen_vllm, pairs, None, max_tokens=4)
    again, outputs = _engine_rows(qwen_vllm, pairs, None, max_tokens=4)
    assert all(out.num_cached_tokens >= 128 for out in outputs)
    expected = qwen_hf.score([ScoreRequest(prompt, v, list(out.outputs[0].token_ids))
                              for (_, v), out in zip(pairs, outputs, strict=True)])
    for rows in (first, again):
        assert max(float((a - b).abs().max()) for a, b in zip(rows, expected, strict=True)) <= SCORE_ATOL


def test_a_malformed_index_is_refused_and_the_engine_serves_on(qwen_vllm, cases):
    prompt, full, _, removed = cases[0]
    outside = VisualTokens(removed.embeds, removed.grid, removed.index + full.n_tokens)
    with pytest.raises(ValueError, match="image_token_index"):
        qwen_vllm.score([ScoreRequest(prompt, outside, [17, 9])])
    short = VisualTokens(removed.embeds[:-1], removed.grid, removed.index)
    with pytest.raises(ValueError):
        qwen_vllm.score([ScoreRequest(prompt, short, [17, 9])])
    assert qwen_vllm.generate([GenerateRequest(prompt, removed, 2)])[0]


def test_registered_in_every_vllm_process_by_the_plugin_entry_point():
    """An engine in a process of its own (vLLM's default on a GPU) starts with a fresh model registry:
    only vLLM's ``vllm.general_plugins`` entry point registers the HSCR classes there."""
    tomllib = pytest.importorskip("tomllib")
    from vllm import ModelRegistry

    from hscr_worker.backends import vllm_models

    project = tomllib.loads((Path(__file__).parents[3] / "worker" / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["vllm.general_plugins"]["hscr_models"]
    assert target == "hscr_worker.backends.vllm_models:register_models"
    vllm_models.register_models()
    vllm_models.register_models()  # idempotent
    assert set(vllm_models.ARCHITECTURES) <= set(ModelRegistry.get_supported_archs())
    from hscr_worker.families import PROFILES

    assert {p.vllm_architecture for p in PROFILES.values() if p.vllm_architecture} == set(vllm_models.ARCHITECTURES)


def test_hscr_generate_runs_a_foreign_qwen_checkpoint_on_both_backends(tiny_qwen_dir, vllm_engine, heldout_dir,
                                                                         tmp_path, monkeypatch):
    """Any HF-format Qwen2.5-VL directory: ``hscr generate`` on both backends, no conversion; the same
    dataset comes out of each, and the manifest records the family (the vLLM engine is the session's,
    started on this directory with the CLI's options)."""
    import json

    from click.testing import CliRunner

    import hscr_worker.generate as generate_module
    from hscr_worker.cli import generate

    loaded = []
    real_load = generate_module.load_backend

    def load_backend(name, model, **options):
        loaded.append((name, model))
        return vllm_engine(model, **options) if name == "vllm" else real_load(name, model, **options)

    monkeypatch.setattr(generate_module, "load_backend", load_backend)
    items = heldout_dir / "items-qwen.jsonl"  # beside the images the item lines refer to
    items.write_text("".join((heldout_dir / "items.jsonl").read_text().splitlines(keepends=True)[:6]))
    ranked = {}
    for backend in ("transformers", "vllm"):
        out = tmp_path / backend
        result = CliRunner().invoke(generate, ["--backend", backend, "--model", tiny_qwen_dir, "--input", str(items),
                                               "--output", str(out), "--batch-size", "3", "--max-new-tokens", "12"])
        assert result.exit_code == 0, result.output
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["model"]["family"] == "qwen2-vl" and manifest["model"]["profile"] == "qwen2.5-vl"
        assert manifest["request_counts"]["total"] == 6
        errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
        rows = []
        for shard in sorted((out / "ranked").glob("*.parquet")):
            import pyarrow.parquet as pq

            rows += pq.read_table(shard, columns=["custom_id", "own_answer", "coupled", "levels"]).to_pylist()
        ranked[backend] = (sorted((r["custom_id"], r["own_answer"], [c["position"] for c in r["coupled"]],
                                   [lv["text"] for lv in r["levels"]]) for r in rows),
                           sorted((e["custom_id"], e["error"]) for e in errors))
    assert loaded == [("transformers", tiny_qwen_dir), ("vllm", tiny_qwen_dir)]
    assert ranked["transformers"] == ranked["vllm"]
    assert len(ranked["vllm"][0]) + len(ranked["vllm"][1]) == 6


def build_tiny_qwen2_vl(out_dir: Path, *, seed: int = 0) -> Path:
    """A tiny random-weight Qwen2-VL (MedVLM-R1's architecture: the Qwen2-VL vision tower, no windows),
    with the Qwen fixture's tokenizer, template and image processor in a ``Qwen2VLProcessor``."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    from hscr_worker.fixture import qwen

    tokenizer = qwen.build_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in qwen.SPECIAL_TOKENS}
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=64, hidden_size=128, mlp_ratio=4, num_heads=4, in_channels=3,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    model = Qwen2VLForConditionalGeneration(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_SCALE)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.save_pretrained(out_dir)
    base = qwen.build_processor(tokenizer)
    Qwen2VLProcessor(image_processor=base.image_processor, tokenizer=tokenizer, video_processor=base.video_processor,
                     chat_template=qwen.CHAT_TEMPLATE).save_pretrained(out_dir)
    return Path(out_dir)


def test_qwen2_vl_answers_and_scores_match_full_zero_and_removed(tmp_path_factory, vllm_engine):
    """Qwen2-VL (MedVLM-R1) through both backends: detected as qwen2-vl, the same greedy ids and score rows
    for a full, a zero-mode and a remove-mode image."""
    from hscr_worker.backends.transformers import TransformersBackend

    directory = str(build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl")))
    hf, engine = TransformersBackend(directory, device="cpu", ignore_eos=True), vllm_engine(directory, ignore_eos=True)
    assert hf.profile.name == engine.profile.name == "qwen2-vl"
    prompt = hf.prompt_ids(QUESTION)
    visuals = []
    for k, visual in enumerate(hf.encode_images(images())):
        keep = torch.rand(visual.n_tokens, generator=torch.Generator().manual_seed(k)) < KEEP_FRACTION
        keep[visual.n_tokens // 2] = True
        visuals += [visual, visual.dropped(keep, "zero"), visual.dropped(keep, "remove")]
    requests = [GenerateRequest(prompt, visual, 12) for visual in visuals]
    answers = hf.generate(requests)
    assert engine.generate(requests) == answers
    scored = [ScoreRequest(prompt, visual, answer) for visual, answer in zip(visuals, answers, strict=True)]
    for request, a, b in zip(scored, engine.score(scored), hf.score(scored), strict=True):
        worst = float((a - b).abs().max())
        assert worst <= SCORE_ATOL, f"{request.visual.n_tokens} visual tokens: logit difference {worst:.2e}"
