"""keras-hub PaliGemmaBackbone presets -> MLX folders, against keras-hub's own logits.

References: tests/fixtures/keras_paligemma*/reference.npz, written by
tests/fixtures/make_keras_paligemma.py with keras-hub 0.32 (JAX, float32): the
backbone's logits over 9 image tokens + 8 text tokens (the last 3 a causal
response), for two different images.  The PaliGemma 2 preset's sliding window
(6) is shorter than the prefix (14), so keras-hub's band mask is exercised.
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES

import mlx_gemma
from mlx_gemma.convert import convert
from mlx_gemma.convert.keras import read_keras_preset
from mlx_gemma.errors import UnsupportedModelError, WeightsMismatchError

NAMES = ["keras_paligemma", "keras_paligemma2"]


def converted(name, tmp_path, **kwargs):
    return convert(keras_path=FIXTURES / name, mlx_path=tmp_path / "out", progress=False, **kwargs)


def logits_like_keras(model, tokenizer, ref):
    n = model.args.num_image_tokens
    ids = np.concatenate([np.full((2, n), tokenizer.image_token_id), ref["token_ids"]], axis=1)
    prefix = ids.shape[1] - int(ref["response_mask"][0].sum())
    return np.array(model(mx.array(ids), pixel_values=mx.array(ref["images"]), prefix_length=prefix))


@pytest.mark.parametrize("name", NAMES)
def test_converted_preset_matches_keras_hub(name, tmp_path):
    ref = np.load(FIXTURES / name / "reference.npz")
    model, tokenizer = mlx_gemma.load(converted(name, tmp_path))
    ours, expected = logits_like_keras(model, tokenizer, ref), ref["logits"]
    assert ours.shape == expected.shape == (2, 17, 400)
    # Every position, image tokens included.
    assert np.abs(ours - expected).max() / np.abs(expected).max() < 1e-5
    assert np.abs(expected[0, -1] - expected[1, -1]).max() > 1e-2  # the two images matter


def test_paligemma2_preset_settings(tmp_path):
    model = mlx_gemma.load_model(converted("keras_paligemma2", tmp_path))
    assert model.args.text.model_type == "gemma2"
    assert model.windows == [6, None, 6]
    assert (model.args.text.attn_logit_softcapping, model.args.text.final_logit_softcapping) == (5.0, 10.0)
    assert model.args.vision.image_size == 42 and model.args.num_image_tokens == 9


def test_quantized_preset_keeps_the_vision_tower_float(tmp_path):
    from mlx.utils import tree_flatten

    out = converted("keras_paligemma", tmp_path, quantize=True, q_group_size=32)
    params = dict(tree_flatten(mlx_gemma.load_model(out).parameters()))
    assert "model.language_model.layers.0.mlp.gate_proj.scales" in params
    assert not any(k.endswith(".scales") for k in params if "vision_tower" in k or "projector" in k)


def copy_preset(name, tmp_path):
    dest = tmp_path / name
    shutil.copytree(FIXTURES / name, dest)
    return dest


def test_pooling_heads_are_refused(tmp_path):
    folder = copy_preset("keras_paligemma", tmp_path)
    top = json.loads((folder / "config.json").read_text())
    top["config"]["vit_pooling"] = "map"
    (folder / "config.json").write_text(json.dumps(top))
    with pytest.raises(UnsupportedModelError, match="vit_pooling='map'"):
        read_keras_preset(folder)


def test_unregistered_class_name_is_read(tmp_path):
    folder = copy_preset("keras_paligemma", tmp_path)
    top = json.loads((folder / "config.json").read_text())
    del top["registered_name"]
    (folder / "config.json").write_text(json.dumps(top))
    assert read_keras_preset(folder).config["model_type"] == "paligemma"


def test_missing_projector_is_refused(tmp_path):
    h5py = pytest.importorskip("h5py")
    folder = copy_preset("keras_paligemma", tmp_path)
    with h5py.File(folder / "model.weights.h5", "a") as f:
        del f["layers/pali_gemma_vit/layers/dense/vars/1"]
    with pytest.raises(WeightsMismatchError, match="missing variables: 'layers/pali_gemma_vit/layers/dense/vars/1'"):
        read_keras_preset(folder)
