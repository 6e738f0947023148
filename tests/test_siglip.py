"""The SigLIP vision tower (+ PaliGemma's projector) against transformers' image features.

References: `image_features` in tests/fixtures/tiny_paligemma*/reference.npz,
transformers' `get_image_features(pixel_values).pooler_output` (SigLIP's last
hidden state through the linear projector), fp32.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES

import mlx_gemma
from mlx_gemma.errors import ConfigError
from mlx_gemma.models.siglip import VisionArgs, VisionModel


@pytest.mark.parametrize("name", ["paligemma", "paligemma2"])
def test_image_features_match_transformers(name):
    folder = FIXTURES / f"tiny_{name}"
    ref = np.load(folder / "reference.npz")
    model = mlx_gemma.load_model(folder)
    pixels = mx.array(ref["pixel_values"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    ours = np.array(model.model.image_features(pixels))
    expected = ref["image_features"]
    assert ours.shape == expected.shape == (2, 9, 64)
    assert np.abs(ours - expected).max() / np.abs(expected).max() < 1e-5


def test_patch_order_is_row_major():
    """Patch k of the grid is at row k // grid, column k % grid (transformers' flatten order)."""
    args = VisionArgs(hidden_size=8, intermediate_size=8, num_hidden_layers=0, num_attention_heads=2,
                      image_size=28, patch_size=14)
    tower = VisionModel(args)
    tower.vision_model.embeddings.position_embedding.weight = mx.zeros((4, 8))
    pixels = mx.zeros((1, 28, 28, 3))
    pixels[0, 0:14, 14:28] = 1.0  # top-right patch: index 1
    emb = tower.vision_model.embeddings(pixels)
    bias = tower.vision_model.embeddings.patch_embedding.bias
    changed = [int(mx.abs(emb[0, k] - bias).max().item() > 0) for k in range(4)]
    assert changed == [0, 1, 0, 0]


def test_sanitize_transposes_torch_conv_and_drops_head():
    args = VisionArgs(hidden_size=8, intermediate_size=8, num_hidden_layers=0, num_attention_heads=2,
                      image_size=28, patch_size=14)
    tower = VisionModel(args)
    torch_kernel = mx.arange(8 * 3 * 14 * 14).reshape(8, 3, 14, 14).astype(mx.float32)
    out = tower.sanitize({
        "vision_model.embeddings.patch_embedding.weight": torch_kernel,
        "vision_model.head.probe": mx.zeros((1, 1, 8)),
    })
    assert list(out) == ["vision_model.embeddings.patch_embedding.weight"]
    w = out["vision_model.embeddings.patch_embedding.weight"]
    assert w.shape == (8, 14, 14, 3)
    assert mx.array_equal(w[2, 5, 7], torch_kernel[2, :, 5, 7])
    # Already MLX-shaped kernels are left alone (an MLX folder loads back unchanged).
    again = tower.sanitize({"vision_model.embeddings.patch_embedding.weight": w})
    assert mx.array_equal(again["vision_model.embeddings.patch_embedding.weight"], w)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image_size": 30}, "not a multiple of patch_size"),
        ({"patch_size": 0}, "patch_size must be a positive integer"),
        ({"hidden_size": 30}, "not a multiple of num_attention_heads"),
        ({"hidden_act": "swish"}, "unsupported activation"),
    ],
)
def test_bad_vision_configs_are_refused(change, message):
    config = {"hidden_size": 32, "num_attention_heads": 4, "image_size": 28, "patch_size": 14, **change}
    with pytest.raises(ConfigError, match=message):
        VisionArgs.from_dict(config, "config.json")
