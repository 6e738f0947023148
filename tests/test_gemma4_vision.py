"""Gemma 4's vision tower and multimodal embedder against transformers 5.25.

References: tests/fixtures/tiny_gemma4_vision/reference.npz, made by make_gemma4_vision.py with
transformers' `Gemma4VisionModel` (`last_hidden_state`: every image's soft tokens, padding dropped)
and `Gemma4MultimodalEmbedder` on the inputs of its `Gemma4ImageProcessorPil`, fp32, with clip
bounds that clamp and standardization on.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from conftest import FIXTURES

from mlx_gemma.errors import ConfigError, ImageError
from mlx_gemma.models.gemma4_vision import (
    Gemma4VisionArgs,
    Gemma4VisionModel,
    MultimodalEmbedder,
    pool_by_position,
    split_vision_weights,
)

FOLDER = FIXTURES / "tiny_gemma4_vision"


@pytest.fixture(scope="module")
def fixture():
    config = json.loads((FOLDER / "config.json").read_text())
    args = Gemma4VisionArgs.from_dict(config["vision_config"])
    tower = Gemma4VisionModel(args)
    embedder = MultimodalEmbedder(args.hidden_size, config["text_hidden_size"], args.rms_norm_eps)
    tower_weights, embedder_weights = split_vision_weights(tower.sanitize(mx.load(str(FOLDER / "model.safetensors"))))
    tower.load_weights(tower_weights, strict=True)
    embedder.load_weights(embedder_weights, strict=True)
    return tower, embedder, dict(np.load(FOLDER / "reference.npz"))


def inputs(ref: dict, case: str) -> tuple[mx.array, mx.array]:
    """The processor's pixel values (u8 / 255 in float64, rounded to float32, as it computes them)."""
    pixels = (ref[f"{case}_pixels_u8"].astype(np.float64) / 255).astype(np.float32)
    return mx.array(pixels), mx.array(ref[f"{case}_positions"].astype(np.int32))


def relative(ours: mx.array, expected: np.ndarray) -> float:
    return float(np.abs(np.array(ours) - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("case", ["one", "two", "batch"])
def test_features_match_transformers(fixture, case):
    """One image; two of different sizes in a batch; three with one filling every patch (no padding)."""
    tower, embedder, ref = fixture
    features = tower(*inputs(ref, case))
    assert features.shape == ref[f"{case}_features"].shape
    assert features.shape[0] == ref[f"{case}_tokens"].sum()
    assert relative(features, ref[f"{case}_features"]) < 1e-4
    assert relative(embedder(features), ref[f"{case}_embedded"]) < 1e-4


def test_an_image_gives_the_same_tokens_alone_and_in_a_batch(fixture):
    tower, _, ref = fixture
    pixels, positions = inputs(ref, "two")
    together = np.array(tower(pixels, positions))
    first = int(ref["two_tokens"][0])
    alone = [np.array(tower(pixels[i:i + 1], positions[i:i + 1])) for i in range(2)]
    np.testing.assert_allclose(together[:first], alone[0], rtol=1e-5, atol=1e-5 * np.abs(together).max())
    np.testing.assert_allclose(together[first:], alone[1], rtol=1e-5, atol=1e-5 * np.abs(together).max())


def test_clip_bounds_are_applied(fixture):
    """The fixture's bounds clamp: lifting them changes the output."""
    tower, _, ref = fixture
    pixels, positions = inputs(ref, "one")
    before = np.array(tower(pixels, positions))
    attn = tower.encoder.layers[0].self_attn.q_proj
    saved = attn.input_max, attn.output_max
    attn.input_max, attn.output_max = mx.array(np.inf), mx.array(np.inf)
    try:
        after = np.array(tower(pixels, positions))
    finally:
        attn.input_max, attn.output_max = saved
    assert np.abs(after - before).max() > 1e-3 * np.abs(before).max()


def test_config_keeps_unknown_keys_and_refuses_bad_values():
    args = Gemma4VisionArgs.from_dict({"hidden_size": 8, "head_dim": 4, "num_attention_heads": 2,
                                       "num_key_value_heads": 1, "future_key": [1, 2]})
    assert args.extra == {"future_key": [1, 2]} and args.rope_theta == 100.0
    assert Gemma4VisionArgs.from_dict({"rope_parameters": {"rope_type": "default", "rope_theta": 7}}).rope_theta == 7
    bad = [{"head_dim": 6}, {"rope_parameters": {"rope_type": "yarn"}}, {"rope_parameters": {"rope_theta": -1}},
           {"hidden_activation": "relu"}, {"num_attention_heads": 3, "num_key_value_heads": 2},
           {"pooling_kernel_size": 0}, {"patch_size": "16"}]
    for config in bad:
        with pytest.raises(ConfigError, match="vision_config"):
            Gemma4VisionArgs.from_dict(config, path="config.json")


def small_tower(**overrides) -> Gemma4VisionModel:
    config = dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=4, patch_size=2, pooling_kernel_size=2,
                  position_embedding_size=4, **overrides)
    return Gemma4VisionModel(Gemma4VisionArgs.from_dict(config))


def test_bad_inputs_are_image_errors():
    tower = small_tower()
    good_pixels, good_positions = mx.zeros((1, 4, 12)), mx.array([[[0, 0], [1, 0], [0, 1], [1, 1]]])
    assert tower(good_pixels, good_positions).shape == (1, 8)
    with pytest.raises(ImageError, match="pixel_values"):
        tower(mx.zeros((1, 4, 11)), good_positions)
    with pytest.raises(ImageError, match="pixel_values"):
        tower(mx.zeros((1, 3, 12)), good_positions[:, :3])
    with pytest.raises(ImageError, match="position_ids"):
        tower(good_pixels, good_positions[..., :1])
    with pytest.raises(ImageError, match="position embeddings"):
        tower(good_pixels, good_positions * 4)


def test_pooling_averages_each_window_in_row_major_order():
    """A 4 x 2 patch grid pooled 2 x 2: slot 0 is the left window, slot 1 the right one."""
    x_pos, y_pos = np.meshgrid(np.arange(4), np.arange(2), indexing="xy")
    positions = np.stack([x_pos, y_pos], -1).reshape(1, 8, 2)
    positions = np.concatenate([positions, np.full((1, 4, 2), -1)], axis=1)  # 4 padding patches
    values = np.arange(12, dtype=np.float32).reshape(1, 12, 1)
    values[0, 8:] = 0  # padding is zeroed before pooling
    pooled, keep = pool_by_position(mx.array(values), mx.array(positions), 2, 3)
    # left window: patches 0, 1, 4, 5; right: 2, 3, 6, 7; slot 2 is never reached
    np.testing.assert_allclose(np.array(pooled)[0, :, 0], [2.5, 4.5, 0.0])
    assert np.array(keep).tolist() == [[True, True, False]]


def test_sanitize_drops_unused_clip_bounds_and_rope_tables():
    plain = small_tower()
    weights = {"model.vision_tower.encoder.layers.0.self_attn.q_proj.input_min": mx.array(-1.0),
               "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight": mx.zeros((8, 8)),
               "model.vision_tower.encoder.rotary_emb.inv_freq": mx.zeros((1,))}
    assert list(plain.sanitize(weights)) == ["model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight"]
    clipped = small_tower(use_clipped_linears=True)
    assert len(clipped.sanitize(weights)) == 2


def test_bfloat16_tower_stays_bfloat16_and_close(fixture):
    """A bf16 checkpoint (bounds and weights bf16, or float32 bounds) runs in bf16 end to end."""
    tower, _, ref = fixture
    half = Gemma4VisionModel(tower.args)
    half.load_weights([(k, v.astype(mx.bfloat16)) for k, v in tree_flatten(tower.parameters())])
    half.encoder.layers[0].mlp.up_proj.input_max = tower.encoder.layers[0].mlp.up_proj.input_max  # float32
    features = half(*inputs(ref, "one"))
    assert features.dtype == mx.bfloat16
    assert relative(features.astype(mx.float32), ref["one_features"]) < 0.05


def test_weights_split_from_hf_and_mlx_vlm_layouts():
    hf = mx.load(str(FOLDER / "model.safetensors"))
    vlm = {k.removeprefix("model."): v for k, v in hf.items()}  # mlx-vlm 0.7.10 drops `model.`
    other = {"model.language_model.embed_tokens.weight": mx.zeros((2, 2))}
    for weights in (hf, vlm):
        tower, embedder = split_vision_weights({**weights, **other})
        assert len(tower) + len(embedder) == len(hf) and [k for k, _ in embedder] == ["embedding_projection.weight"]
        assert ("patch_embedder.input_proj.weight" in dict(tower)) and ("std_bias" in dict(tower))
