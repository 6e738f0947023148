"""keras-hub `Gemma3Backbone` presets (with a `Gemma3VisionEncoder`, and text-only) -> our Gemma 3.

The fast tests read the tiny preset keras-hub wrote in tests/fixtures/keras_gemma3_vlm/
(make_keras_gemma3_vlm.py: SigLIP of 2 layers at 56 px pooled to 4 soft tokens, a 6-layer
Gemma 3 with a window of 6 shorter than the prompts and linear RoPE scaling 4 on the global
layer) and compare with keras-hub's logits and `Gemma3CausalLM.generate` tokens recorded
beside it.  The `oracle` test builds a fresh random backbone with keras-hub itself.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

h5py = pytest.importorskip("h5py", reason="reading Keras presets needs h5py")

import mlx_gemma  # noqa: E402
from mlx_gemma.convert import convert  # noqa: E402
from mlx_gemma.convert.keras import read_keras_preset  # noqa: E402
from mlx_gemma.errors import ConfigError, TokenizerError, UnsupportedModelError  # noqa: E402
from mlx_gemma.generate import generate_step  # noqa: E402
from mlx_gemma.loading import load_model_from  # noqa: E402
from mlx_gemma.tasks import Gemma3CausalLM  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
PRESET = FIXTURES / "keras_gemma3_vlm"
RTOL = 1e-4  # of the reference logits' largest magnitude
VISION_GROUP = "layers/gemma3_vision_encoder"


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(PRESET / "reference.npz"))


@pytest.fixture(scope="module")
def model():
    ck = read_keras_preset(PRESET)
    return load_model_from(ck.config, {k: mx.array(v) for k, v in ck.weights.items()})


def rel_err(ours, want) -> float:
    return float(np.abs(np.array(ours, dtype=np.float32) - want).max() / np.abs(want).max())


def case_inputs(ref, case):
    """Token ids and the case's images as our model takes them ([n, H, W, C] in [-1, 1])."""
    return mx.array(ref[f"{case}_token_ids"]), mx.array(ref[f"{case}_images"][0])


def test_config_follows_the_backbone():
    cfg = read_keras_preset(PRESET).config
    assert cfg["model_type"] == "gemma3" and cfg["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert (cfg["mm_tokens_per_image"], cfg["boi_token_index"], cfg["eoi_token_index"],
            cfg["image_token_index"]) == (4, 7, 400, 401)  # (56 / 14 / 2) ** 2; <start_of_image>, <end_of_image>, <img>
    text, vision = cfg["text_config"], cfg["vision_config"]
    # keras-hub: layer i local when i % 6 < 5 (bases 10k / 1M); intermediate_dim is HF's size.
    assert text["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert text["rope_parameters"] == {
        "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    assert (text["intermediate_size"], text["query_pre_attn_scalar"], text["sliding_window"]) == (128, 16, 6)
    assert (vision["image_size"], vision["patch_size"], vision["hidden_size"], vision["num_hidden_layers"]) == \
        (56, 14, 32, 2)


@pytest.mark.parametrize("case", ["one", "two"])
def test_logits_match_keras_hub(model, ref, case):
    ids, pixels = case_inputs(ref, case)
    assert rel_err(model(ids, pixel_values=pixels), ref[f"{case}_logits"]) < RTOL


def test_greedy_tokens_equal_keras_hub_generate(model, ref):
    """keras-hub's Gemma3CausalLM.generate (greedy, recorded) continues the one-image prompt so."""
    ids, pixels = case_inputs(ref, "one")
    want = ref["one_greedy"][0, ids.shape[1]:].tolist()
    for step_size in (None, 3):  # and chunks that would cut the image
        tokens = [t[0] for t, _ in generate_step(model, ids, max_tokens=len(want), pixel_values=pixels,
                                                 prefill_step_size=step_size)]
        assert tokens == want


def test_gemma3_causal_lm_of_the_preset_reproduces_keras_hub_generate(ref):
    """Our Gemma3CausalLM from the Keras preset folder, given what keras-hub's
    Gemma3CausalLM(preprocessor=None).generate was given (right-padded ids and mask, the
    images), returns keras-hub's recorded greedy ids."""
    lm = Gemma3CausalLM.from_preset(PRESET, preprocessor=None)
    ids = ref["one_token_ids"]
    grow = ref["one_greedy"].shape[1] - ids.shape[1]
    out = lm.generate({"token_ids": np.pad(ids, ((0, 0), (0, grow))),
                       "padding_mask": np.pad(np.ones_like(ids), ((0, 0), (0, grow))),
                       "images": ref["one_images"]}, stop_token_ids=None)
    assert np.asarray(out["token_ids"]).tolist() == ref["one_greedy"].tolist()


def test_converted_folder_loads(tmp_path, ref):
    convert(keras_path=PRESET, mlx_path=tmp_path / "out")
    loaded, tokenizer = mlx_gemma.load(tmp_path / "out")
    assert loaded.model_type == "gemma3" and tokenizer.piece_to_id("<img>") == 401
    ids, pixels = case_inputs(ref, "two")
    assert rel_err(loaded(ids, pixel_values=pixels), ref["two_logits"]) < RTOL


def text_only_copy(tmp_path) -> Path:
    """The preset as a text-only Gemma3Backbone: no vision encoder in the config or the weights."""
    folder = tmp_path / "text"
    shutil.copytree(PRESET, folder)
    top = json.loads((folder / "config.json").read_text())
    top["config"].update(vision_encoder=None, image_size=None)
    (folder / "config.json").write_text(json.dumps(top))
    with h5py.File(folder / "model.weights.h5", "a") as f:
        del f[VISION_GROUP]
    return folder


def test_text_only_preset_matches_keras_hub(tmp_path, ref):
    ck = read_keras_preset(text_only_copy(tmp_path))
    assert ck.config["model_type"] == "gemma3_text" and "vision_config" not in ck.config
    text = load_model_from(ck.config, {k: mx.array(v) for k, v in ck.weights.items()})
    assert rel_err(text(mx.array(ref["text_token_ids"])), ref["text_logits"]) < RTOL


def edited(tmp_path, fn) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(PRESET, folder)
    top = json.loads((folder / "config.json").read_text())
    fn(top["config"])
    (folder / "config.json").write_text(json.dumps(top))
    return folder


def test_query_scale_follows_the_config_flag(tmp_path):
    """query_head_dim_normalize=false scales by 1/sqrt(hidden // heads), as Google's Gemma3_27B
    (BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS) and transformers (query_pre_attn_scalar 168 for
    5376 / 32); keras-hub 0.32's decoder block ignores the flag (see keras_gemma3.py)."""
    cfg = read_keras_preset(edited(tmp_path, lambda c: c.update(query_head_dim_normalize=False))).config
    assert cfg["text_config"]["query_pre_attn_scalar"] == 64 // 4


@pytest.mark.parametrize("mutate, error, match", [
    (lambda c: c["vision_encoder"]["config"].update(layer_norm_epsilon=1e-5), UnsupportedModelError, "1e-6"),
    (lambda c: c["vision_encoder"]["config"].update(pool_size=3), UnsupportedModelError, "divide exactly"),
    (lambda c: c["vision_encoder"].update(class_name="Other"), UnsupportedModelError, "Gemma3VisionEncoder"),
    (lambda c: c["vision_encoder"]["config"].update(output_dim=32), ConfigError, "output_dim"),
    (lambda c: c.update(is_embedding_model=True), UnsupportedModelError, "embedding"),
    (lambda c: c.update(use_query_key_norm=False), UnsupportedModelError, "use_query_key_norm"),
    (lambda c: c.update(vision_encoder=[1]), ConfigError, "vision_encoder"),
])
def test_refused_configs(tmp_path, mutate, error, match):
    with pytest.raises(error, match=match):
        read_keras_preset(edited(tmp_path, mutate))


def test_vocabulary_without_image_pieces_refused(tmp_path):
    folder = edited(tmp_path, lambda c: None)
    shutil.copy(FIXTURES / "tokenizer" / "tokenizer.model", folder / "assets" / "tokenizer" / "vocabulary.spm")
    with pytest.raises(TokenizerError, match="<end_of_image>"):
        read_keras_preset(folder)


@pytest.mark.oracle
def test_live_keras_hub_fresh_preset(tmp_path):
    """A fresh random Gemma3Backbone with a vision encoder, built and saved by keras-hub, read by us:
    its logits for two images in one prompt, and Gemma3CausalLM.generate's greedy tokens."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras_hub = pytest.importorskip("keras_hub", reason="the live oracle needs keras-hub (pip install keras-hub jax)")
    import keras

    vision = keras_hub.models.Gemma3VisionEncoder(
        image_size=28, patch_size=7, num_heads=2, hidden_dim=16, num_layers=2, intermediate_dim=24, output_dim=32,
        pool_size=2, dtype="float32")
    backbone = keras_hub.models.Gemma3Backbone(
        vocabulary_size=512, image_size=28, num_layers=7, num_query_heads=2, num_key_value_heads=1, hidden_dim=32,
        intermediate_dim=48, head_dim=8, use_post_ffw_norm=True,
        use_post_attention_norm=True, use_sliding_window_attention=True, sliding_window_size=9,
        local_rope_scaling_factor=2.0, global_rope_scaling_factor=8.0, vision_encoder=vision, dtype="float32")
    rng = np.random.default_rng(11)
    for v in backbone.weights:
        v.assign(rng.normal(0, 0.4, v.shape).astype("float32"))
    backbone.save_to_preset(str(tmp_path / "p"))
    shutil.copytree(PRESET / "assets", tmp_path / "p" / "assets")  # the vocabulary with the image pieces
    ids = np.array([[2, 30, 7, *[401] * 4, 400, 108, 7, *[401] * 4, 400, 50, 60, 70, 80]], np.int32)
    images = rng.uniform(-1, 1, (1, 2, 28, 28, 3)).astype("float32")
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids), "images": images,
              "vision_indices": np.nonzero(ids[0] == 401)[0][None].astype("int32"),
              "vision_mask": (ids == 401).astype("int32")}
    want = np.asarray(keras.ops.convert_to_numpy(backbone.token_embedding(backbone(inputs), reverse=True)))
    ck = read_keras_preset(tmp_path / "p")
    ours = load_model_from(ck.config, {k: mx.array(v) for k, v in ck.weights.items()})
    assert rel_err(ours(mx.array(ids), pixel_values=mx.array(images[0])), want) < RTOL
    # keras-hub's own generate loop (greedy, no preprocessor: right-padded inputs) continues it so.
    lm = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    lm.compile(sampler="greedy")
    grow = ("token_ids", "padding_mask", "vision_mask")
    padded = {**inputs, **{k: np.pad(inputs[k], ((0, 0), (0, 6))) for k in grow}}
    keras_tokens = np.asarray(lm.generate(padded, stop_token_ids=None)["token_ids"])[0, ids.shape[1]:].tolist()
    tokens = [t[0] for t, _ in generate_step(ours, mx.array(ids), max_tokens=6, pixel_values=mx.array(images[0]))]
    assert tokens == keras_tokens
