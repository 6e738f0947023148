"""PaliGemmaCausalLM (mlx_gemma/tasks/pali_gemma*.py) against the references:

* keras-hub 0.32 itself: tests/fixtures/keras_pali_generate.json holds its
  PaliGemmaCausalLM.generate outputs on the tiny presets tests/fixtures/keras_paligemma{,2}
  (written by tests/fixtures/make_keras_pali_generate.py, with their embedding table
  scaled by 0.1 on both sides, so greedy does not just repeat the last token): one
  image + a string, two images + prompts of different lengths, strip_prompt, a stop
  id, and the dict form;
  the backbone's hidden states against keras-hub's logits in the presets' reference.npz;
* transformers: greedy ids on the tiny HF PaliGemma fixtures (their reference.npz, from
  PaliGemmaForConditionalGeneration.generate), through the dict form and through strings
  and images (so the preprocessing is transformers' processor's too);
* keras-hub's preset table: every name, Kaggle handle and parameter count.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES
from test_loading import prepare_hub_cache

import mlx_gemma
from mlx_gemma.errors import GenerationError, ImageError, MlxGemmaError
from mlx_gemma.tasks import (
    PALI_PRESETS,
    PaliGemmaBackbone,
    PaliGemmaCausalLM,
    PaliGemmaCausalLMPreprocessor,
    PaliGemmaTokenizer,
)

KERAS = json.loads((FIXTURES / "keras_pali_generate.json").read_text(encoding="utf-8"))


@pytest.fixture(autouse=True, scope="module")
def converted_presets_cache(tmp_path_factory):
    """keras-hub presets are converted into MLX_GEMMA_CACHE: one out of the user's home, per module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_GEMMA_CACHE", str(tmp_path_factory.mktemp("mlx_gemma_cache")))
        yield


@pytest.fixture(scope="module")
def keras_lms():
    """The tiny keras-hub presets, their embedding table scaled as the make script scaled keras-hub's."""
    lms = {}
    for name, ref in KERAS.items():
        lm = PaliGemmaCausalLM.from_preset(FIXTURES / name, sequence_length=ref["sequence_length"])
        table = lm.backbone.token_embedding
        table.weight = mx.array(np.asarray(table.weight) * np.float32(ref["embedding_scale"]))
        lms[name] = lm
    return lms


def keras_images(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(8-bit pixels [2, 42, 42, 3], the same in [-1, 1]) as the make script gave keras-hub."""
    raw = np.load(FIXTURES / name / "reference.npz")["images"]
    return np.round((raw + 1.0) * 127.5).astype(np.uint8), raw


# ----- against keras-hub's recorded outputs ---------------------------------------------


@pytest.mark.parametrize("name", list(KERAS))
def test_generate_matches_keras_hub(keras_lms, name):
    lm = keras_lms[name]
    pre = lm.preprocessor
    pixels, raw = keras_images(name)
    try:
        for case in KERAS[name]["generate"]:
            inputs, kwargs = dict(case["inputs"]), case["kwargs"]
            form = case["form"]
            lm.preprocessor = None if form == "raw" else pre
            if form == "one_image":
                inputs["images"] = pixels[case["image"]]
            elif form == "two_images":
                inputs["images"] = list(pixels)
            else:
                inputs = {"images": raw, "token_ids": np.array(inputs["token_ids"]),
                          "padding_mask": np.array(inputs["padding_mask"])}
            out = lm.generate(inputs, **kwargs)
            if form == "raw":
                expected = dict(case["output"])
                assert ("images" in out) == expected.pop("images_returned"), kwargs
                if "images" in out:
                    np.testing.assert_array_equal(out.pop("images"), raw)
                assert {k: np.asarray(v).tolist() for k, v in out.items()} == expected, (form, kwargs)
            else:
                assert out == case["output"], (form, kwargs)
    finally:
        lm.preprocessor = pre


@pytest.mark.parametrize("name", list(KERAS))
def test_generate_preprocess_matches_keras_hub(keras_lms, name):
    ref = KERAS[name]["generate_preprocess"]
    pixels, _ = keras_images(name)
    packed = keras_lms[name].preprocessor.generate_preprocess({"images": list(pixels), "prompts": ref["prompts"]})
    assert packed["token_ids"].tolist() == ref["token_ids"]
    assert packed["padding_mask"].tolist() == ref["padding_mask"]
    # keras-hub's converter gives x / 127.5 - 1 of these pixels (the make script checks it there)
    np.testing.assert_allclose(packed["images"], pixels / 127.5 - 1.0, atol=1e-6)


@pytest.mark.parametrize("name", list(KERAS))
def test_backbone_call_equals_keras_hubs_logits(name):
    """keras-hub's backbone over image + text with a response_mask (reference.npz, made by keras-hub)."""
    ref = np.load(FIXTURES / name / "reference.npz")
    backbone = PaliGemmaBackbone.from_preset(FIXTURES / name)
    hidden = backbone({"images": ref["images"], "token_ids": ref["token_ids"],
                       "padding_mask": np.ones_like(ref["token_ids"]), "response_mask": ref["response_mask"]})
    logits = np.array(backbone.model.logits(hidden))
    scale = np.abs(ref["logits"]).max()
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4 * scale, rtol=0)


# ----- against transformers' greedy ids ----------------------------------------------------


@pytest.mark.parametrize("kind", ["paligemma", "paligemma2"])
def test_dict_form_greedy_equals_transformers(kind):
    """Row 1 alone equals transformers' greedy; in a batch, the shorter row 0 still does
    (keras-hub's loop re-reads the longer row's prompt tail causally: see pali_gemma_generation.py)."""
    ref = np.load(FIXTURES / f"tiny_{kind}" / "reference.npz")
    lm = PaliGemmaCausalLM.from_preset(FIXTURES / f"tiny_{kind}", preprocessor=None)
    n_image = lm.backbone.image_sequence_length
    pixels = ref["pixel_values"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    rows = [ids[mask.astype(bool)][n_image:] for ids, mask in zip(ref["input_ids"], ref["attention_mask"])]
    n = len(ref["greedy_ids"])
    L = max(len(r) for r in rows) + n
    token_ids = np.zeros((2, L), np.int32)
    padding_mask = np.zeros((2, L), bool)
    for b, r in enumerate(rows):
        token_ids[b, :len(r)], padding_mask[b, :len(r)] = r, True
    alone = lm.generate({"images": pixels[1:], "token_ids": token_ids[1:], "padding_mask": padding_mask[1:]},
                        stop_token_ids=None)
    assert alone["token_ids"][0, len(rows[1]):].tolist() == ref["greedy_ids"].tolist()
    both = lm.generate({"images": pixels, "token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=None)
    assert both["token_ids"][0, len(rows[0]):len(rows[0]) + n].tolist() == ref["batch_greedy_ids"][0].tolist()


@pytest.mark.parametrize("kind", ["paligemma", "paligemma2"])
def test_string_and_image_generate_equals_transformers(kind):
    """Odd-sized uint8 images and the prompt strings: transformers' processor's ids and pixels,
    then its greedy continuation (10 tokens, no stop)."""
    ref = np.load(FIXTURES / f"tiny_{kind}" / "reference.npz")
    lm = PaliGemmaCausalLM.from_preset(FIXTURES / f"tiny_{kind}")
    pre = lm.preprocessor
    prompt = "detect cat ; dog\n"  # the fixture's prompt, with the "\n" transformers' processor appends
    n = len(ref["greedy_ids"])
    packed = pre.generate_preprocess({"images": ref["image1"], "prompts": prompt})
    length = int(packed["padding_mask"].sum())
    assert packed["token_ids"][:length].tolist() == ref["input_ids"][1, lm.backbone.image_sequence_length:].tolist()
    np.testing.assert_allclose(packed["images"], ref["pixel_values"][1].transpose(1, 2, 0), atol=1e-6)
    answer = lm.generate({"images": ref["image1"], "prompts": prompt}, max_length=length + n, stop_token_ids=None,
                         strip_prompt=True)
    expected = pre.generate_postprocess({"token_ids": ref["greedy_ids"], "padding_mask": np.ones(n, bool)})
    assert answer == expected


def test_paths_pil_images_and_the_text_key_give_the_same_answer(keras_lms, tmp_path):
    from PIL import Image

    lm = keras_lms["keras_paligemma"]
    pixels, _ = keras_images("keras_paligemma")
    path = tmp_path / "image.png"
    Image.fromarray(pixels[1]).save(path)
    want = lm.generate({"images": pixels[1], "prompts": "ocr\n"}, max_length=12)
    assert lm.generate({"images": str(path), "prompts": "ocr\n"}, max_length=12) == want
    assert lm.generate({"images": Image.open(path), "text": "ocr\n"}, max_length=12) == want
    assert lm.generate({"images": pixels[1], "text": ["ocr\n", "ocr\n"]}, max_length=12) == [want, want]


# ----- presets ---------------------------------------------------------------------------


def keras_hub_pali_presets() -> dict:
    """keras-hub's own PaliGemma preset table, read as data from its source (no Keras import)."""
    spec = importlib.util.find_spec("keras_hub")
    if spec is None or not spec.origin:
        pytest.skip("keras-hub is not installed")
    path = Path(spec.origin).parent / "src" / "models" / "pali_gemma" / "pali_gemma_presets.py"
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "backbone_presets":
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path} has no backbone_presets")


@pytest.mark.oracle
def test_preset_table_matches_keras_hubs_presets():
    """Every keras-hub PaliGemma preset, its Kaggle handle, and keras-hub's parameter count
    for our shape (built lazily: nothing is allocated)."""
    ref = keras_hub_pali_presets()
    assert set(PALI_PRESETS) == set(ref)
    for name, p in PALI_PRESETS.items():
        assert p.kaggle == ref[name]["kaggle_handle"], name
        count = PaliGemmaBackbone.from_preset(name, load_weights=False, dtype="bfloat16").count_params()
        expected = ref[name]["metadata"]["params"]
        if name in ("pali_gemma2_mix_28b_448", "pali_gemma2_pt_28b_448", "pali_gemma2_pt_28b_896"):
            # keras-hub records the 224 px figure for these too; a larger image only adds
            # SigLIP position embeddings (1,152 wide), one per extra patch.
            expected += ((p.image_size // 14) ** 2 - 256) * 1152
        assert count == expected, name


def test_preset_names_resolve_through_the_hub_cache_and_load_weights_false(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    prepare_hub_cache(tmp_path / "hub", "google/paligemma-3b-mix-224", FIXTURES / "tiny_paligemma")
    by_name = PaliGemmaCausalLM.from_preset("pali_gemma_3b_mix_224")
    by_handle = PaliGemmaCausalLM.from_preset("hf://google/paligemma-3b-mix-224")
    image = np.load(FIXTURES / "tiny_paligemma" / "reference.npz")["image0"]
    inputs = {"images": image, "prompts": "caption en\n"}
    assert by_name.generate(inputs, max_length=12) == by_handle.generate(inputs, max_length=12)
    assert by_name.preprocessor.sequence_length == 256  # keras-hub: "text sequence length is 256"
    random = PaliGemmaCausalLM.from_preset("pali_gemma_3b_mix_224", load_weights=False)  # only the tokenizer
    assert random.backbone.image_size == 224 and random.backbone.image_sequence_length == 256
    assert random.backbone.vocabulary_size == 257_152 and random.preprocessor.image_size == 224
    assert random.backbone.count_params() == 2_923_335_408  # keras-hub's figure for pali_gemma_3b_mix_224


@pytest.mark.parametrize("name", list(KERAS))
def test_custom_backbone_from_keras_arguments(name):
    """PaliGemmaBackbone(**keras-hub's config) has the preset's shapes, hence its weights load strictly."""
    from mlx.utils import tree_flatten

    config = json.loads((FIXTURES / name / "config.json").read_text())["config"]
    args = {k: v for k, v in config.items() if k not in ("name", "trainable", "dtype")}
    backbone = PaliGemmaBackbone(**args)
    loaded = PaliGemmaBackbone.from_preset(FIXTURES / name)
    shapes = {k: v.shape for k, v in tree_flatten(loaded.model.parameters())}
    assert {k: v.shape for k, v in tree_flatten(backbone.model.parameters())} == shapes
    unloaded = PaliGemmaBackbone.from_preset(FIXTURES / name, load_weights=False)  # its config only
    assert {k: v.shape for k, v in tree_flatten(unloaded.model.parameters())} == shapes
    tokenizer = PaliGemmaTokenizer.from_folder(FIXTURES / name)
    lm = PaliGemmaCausalLM(backbone, PaliGemmaCausalLMPreprocessor(tokenizer, backbone.image_size, sequence_length=12))
    out = lm.generate({"images": keras_images(name)[0][0], "prompts": "caption en\n"})
    assert isinstance(out, str) and out.startswith("caption en")


# ----- bad input ---------------------------------------------------------------------------


def test_bad_input_is_a_typed_error(keras_lms, tmp_path):
    lm = keras_lms["keras_paligemma"]
    pixels, raw = keras_images("keras_paligemma")
    with pytest.raises(ImageError, match="2 images for 3 prompts"):
        lm.generate({"images": list(pixels), "prompts": ["a\n", "b\n", "c\n"]})
    with pytest.raises(ImageError, match="2 images for 1 prompts"):
        lm.generate({"images": list(pixels), "prompts": "a\n"})
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(ImageError, match="corrupt.png"):
        lm.generate({"images": corrupt, "prompts": "caption en\n"})
    with pytest.raises(ImageError, match="no such image file"):
        lm.generate({"images": tmp_path / "missing.jpg", "prompts": "caption en\n"})
    with pytest.raises(GenerationError, match="'prompts'"):
        lm.generate({"images": pixels[0]})
    with pytest.raises(GenerationError, match="takes a dict"):
        lm.generate("caption en\n")
    pre, lm.preprocessor = lm.preprocessor, None
    try:
        ids, mask = np.array([[2, 5, 0, 0]]), np.array([[1, 1, 0, 0]])
        with pytest.raises(ImageError, match=r"pixels \[batch, 42, 42, 3\]"):
            lm.generate({"images": np.zeros((1, 8, 8, 3)), "token_ids": ids, "padding_mask": mask},
                        stop_token_ids=None)
        with pytest.raises(ImageError, match="2 images for 1 rows"):
            lm.generate({"images": raw, "token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
        with pytest.raises(GenerationError, match="stop_token_ids='auto' needs a preprocessor"):
            lm.generate({"images": raw[:1], "token_ids": ids, "padding_mask": mask})
        with pytest.raises(GenerationError, match="missing"):
            lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
    finally:
        lm.preprocessor = pre
    with pytest.raises(MlxGemmaError, match="PaliGemmaBackbone"):
        PaliGemmaCausalLM(lm.preprocessor, lm.backbone)
    with pytest.raises(MlxGemmaError, match="not a PaliGemma model"):
        PaliGemmaBackbone.from_model(mlx_gemma.load_model(FIXTURES / "tiny_gemma"))
    with pytest.raises(MlxGemmaError, match="compile\\(\\) takes only a sampler"):
        lm.compile(optimizer="adam")
    lm.compile(sampler="beam")
    try:
        with pytest.raises(GenerationError, match="beam search is not available for PaliGemma"):
            lm.generate({"images": pixels[0], "prompts": "caption en\n"})
    finally:
        lm.compile()


def test_samplers_and_exports(keras_lms):
    lm = keras_lms["keras_paligemma2"]
    pixels, _ = keras_images("keras_paligemma2")
    inputs = {"images": list(pixels), "prompts": ["caption en\n", "ocr\n"]}
    greedy = lm.generate(inputs, stop_token_ids=None)
    lm.compile(sampler="top_k")
    try:
        assert len(lm.generate(inputs, stop_token_ids=None)) == 2
    finally:
        lm.compile()
    assert lm.generate(inputs, stop_token_ids=None) == greedy
    assert mlx_gemma.PaliGemmaCausalLM is PaliGemmaCausalLM and mlx_gemma.PaliGemmaBackbone is PaliGemmaBackbone


def test_kaggle_handle_downloads_with_kagglehub_and_converts(monkeypatch):
    """A stand-in kagglehub hands back the tiny preset, as kagglehub hands back its cache folder."""
    asked = []
    download = lambda handle: asked.append(handle) or str(FIXTURES / "keras_paligemma")  # noqa: E731
    monkeypatch.setitem(sys.modules, "kagglehub", types.SimpleNamespace(model_download=download))
    lm = PaliGemmaCausalLM.from_preset(PALI_PRESETS["pali_gemma_3b_mix_224"].kaggle, preprocessor=None)
    assert asked[0] == "keras/paligemma/keras/pali_gemma_3b_mix_224/4"
    ref = PaliGemmaBackbone.from_preset(FIXTURES / "keras_paligemma")
    assert lm.backbone.count_params() == ref.count_params() and lm.backbone.image_size == 42


def test_a_copied_keras_preset_folder_is_converted_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_GEMMA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "preset"
    shutil.copytree(FIXTURES / "keras_paligemma", folder)
    PaliGemmaCausalLM.from_preset(folder)
    converted = list((tmp_path / "cache" / "keras-presets").iterdir())
    PaliGemmaCausalLM.from_preset(folder)
    assert list((tmp_path / "cache" / "keras-presets").iterdir()) == converted and len(converted) == 1


@pytest.mark.oracle
def test_live_keras_hub_generate_on_a_fresh_preset(tmp_path):
    """keras-hub builds, saves and generates from a fresh random PaliGemma 2 style preset (window 3
    < image + prompt, soft-caps, three prompts of different lengths); we load the folder and agree."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras_hub = pytest.importorskip("keras_hub", reason="the live oracle needs keras-hub (pip install keras-hub jax)")
    backbone = keras_hub.models.PaliGemmaBackbone(
        vocabulary_size=400, image_size=28, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=32,
        intermediate_dim=64, head_dim=8, vit_patch_size=14, vit_num_heads=2, vit_hidden_dim=16, vit_num_layers=1,
        vit_intermediate_dim=24, use_post_ffw_norm=True, use_post_attention_norm=True, attention_logit_soft_cap=4.0,
        final_logit_soft_cap=8.0, use_sliding_window_attention=True, sliding_window_size=3, dtype="float32")
    rng = np.random.default_rng(12)
    for v in backbone.weights:  # a small embedding table: a random model that repeats itself less
        scale = 0.1 if "token_embedding" in v.path else 1.0 if v.path.endswith(("scale", "gamma")) else 0.4
        v.assign((rng.normal(0, scale, v.shape) + (1.0 if v.path.endswith("gamma") else 0.0)).astype("float32"))
    tok = keras_hub.models.PaliGemmaTokenizer(proto=str(FIXTURES / "tokenizer" / "tokenizer.model"))
    backbone.save_to_preset(str(tmp_path / "p"))
    tok.save_to_preset(str(tmp_path / "p"))
    converter = keras_hub.layers.PaliGemmaImageConverter(image_size=(28, 28), scale=1.0 / 127.5, offset=-1.0)
    pre = keras_hub.models.PaliGemmaCausalLMPreprocessor(tok, converter, sequence_length=20)
    keras_lm = keras_hub.models.PaliGemmaCausalLM(backbone=backbone, preprocessor=pre)
    images = rng.integers(0, 256, (3, 28, 28, 3)).astype(np.uint8)
    inputs = {"prompts": ["caption en\n", "x", "answer en what is it?\n"]}
    ours = PaliGemmaCausalLM.from_preset(tmp_path / "p", sequence_length=20)
    want = keras_lm.generate({**inputs, "images": list(images.astype("float32"))})
    assert ours.generate({**inputs, "images": list(images)}) == want
    packed = pre.generate_preprocess({**inputs, "images": list(images.astype("float32"))})
    packed = {k: np.asarray(packed[k]) for k in ("images", "token_ids", "padding_mask")}
    keras_lm.preprocessor, ours.preprocessor = None, None
    free = keras_lm.generate(dict(packed), stop_token_ids=None)
    got = ours.generate(dict(packed), stop_token_ids=None)
    assert got["token_ids"].tolist() == np.asarray(free["token_ids"]).tolist()
    lengths = packed["padding_mask"].sum(axis=1)
    stops = sorted({int(free["token_ids"][b][min(int(n) + b, 19)]) for b, n in enumerate(lengths)})
    want = keras_lm.generate(dict(packed), stop_token_ids=stops)
    got = ours.generate(dict(packed), stop_token_ids=stops)
    for key in ("token_ids", "padding_mask"):
        assert got[key].tolist() == np.asarray(want[key]).tolist(), key
