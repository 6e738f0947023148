"""`mlx_gemma.load` on Gemma 4 folders that mlx-lm 0.32's own convert wrote with a mixed recipe:
per-layer quantization keys under mlx-lm's names (`language_model.model.*`, switch_glu expert
halves) read under ours, so the folder loads directly (no convert) with mlx-lm's logits."""

from __future__ import annotations

import json
import shutil

import pytest

import mlx.nn as nn

import mlx_gemma
from mlx_gemma.convert import convert
from mlx_gemma.errors import ConfigError
from mlx_gemma.loading import quantize_like
from mlx_gemma.models import gemma4
from mlx_gemma.models.moe import QuantizedExpertLinear

from conftest import FIXTURES
from test_convert_gemma4 import IDS, rel_err, wide_folder

RTOL = 1e-4


def quantized_bits(model) -> dict[str, int]:
    """Module path -> bits of every quantized layer."""
    return {name: m.bits for name, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear,
                                                                              QuantizedExpertLinear))}


def mlx_lm_mixed(src, dest):
    """mlx-lm 0.32's convert of `src`, 4-bit with its mixed_4_6 recipe (6 bits on some layers); the
    SentencePiece file copied beside (mlx-lm writes the tokenizer's JSON files only)."""
    mlx_lm_convert = pytest.importorskip("mlx_lm.convert").convert
    mlx_lm_convert(str(src), mlx_path=str(dest), quantize=True, q_group_size=32, q_bits=4,
                   quant_predicate="mixed_4_6")
    shutil.copy(src / "tokenizer.model", dest / "tokenizer.model")
    return json.loads((dest / "config.json").read_text())["quantization"]


@pytest.mark.oracle
def test_mlx_lm_mixed_moe_folder_loads_with_mlx_lm_logits(tmp_path):
    """gemma4_text with experts (widths that group size 32 divides, per-layer inputs, shared KV): mlx-lm
    names the experts' settings switch_glu.{gate,up,down}_proj."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    ours = convert(wide_folder(tmp_path / "hf"), mlx_path=tmp_path / "float", progress=False)
    community = tmp_path / "community"
    written = mlx_lm_mixed(ours, community)
    six = [k for k, v in written.items() if isinstance(v, dict) and v["bits"] == 6 and "switch_glu" in k]
    assert six  # the recipe gives some experts 6 bits: loaded at 4 they would not fit
    model, tokenizer = mlx_gemma.load(community)
    theirs, _ = mlx_lm_utils.load_model(community)
    assert rel_err(model(IDS), theirs(IDS)) < RTOL
    bits = quantized_bits(model)
    for key in six:
        assert bits[key.replace("switch_glu.gate_proj", "gate_up_proj").replace("switch_glu.", "")] == 6, key


@pytest.mark.oracle
def test_mlx_lm_mixed_gemma4_layout_folder_loads_with_mlx_lm_logits(tmp_path):
    """A tower-less `gemma4` config: mlx-lm keeps the model type and writes every per-layer key under
    `language_model.model.`; it loads as gemma4_text."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    src = tmp_path / "hf"
    shutil.copytree(FIXTURES / "tiny_gemma4_31b", src)
    config = json.loads((src / "config.json").read_text())
    # mlx-lm 0.32 reads the global layers' shape from these keys only, and the vocabulary from the top level
    config["text_config"].update(global_head_dim=64, num_global_key_value_heads=1)
    config["vocab_size"] = config["text_config"]["vocab_size"]
    (src / "config.json").write_text(json.dumps(config))
    community = tmp_path / "community"
    written = mlx_lm_mixed(src, community)
    six = [k for k, v in written.items() if isinstance(v, dict) and v["bits"] == 6]
    assert six and all(k.startswith("language_model.model.") for k in six)
    model, _ = mlx_gemma.load(community)
    assert model.model_type == "gemma4_text"
    theirs, _ = mlx_lm_utils.load_model(community)
    assert rel_err(model(IDS), theirs(IDS)) < RTOL
    bits = quantized_bits(model)
    assert all(bits[k.replace("language_model.model.", "model.")] == 6 for k in six)


def test_readable_quantization_names():
    config = {"model_type": "gemma4", "text_config": {"model_type": "gemma4_text"}, "quantization": {
        "group_size": 64, "bits": 4, "language_model.lm_head": False,
        "language_model.model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 6},
        "language_model.model.layers.1.experts.switch_glu.gate_proj": {"group_size": 64, "bits": 8},
        "language_model.model.layers.1.experts.switch_glu.up_proj": {"group_size": 64, "bits": 8},
        "language_model.model.layers.1.experts.switch_glu.down_proj": {"group_size": 64, "bits": 6}}}
    assert gemma4.readable_quantization(config)["quantization"] == {
        "group_size": 64, "bits": 4, "lm_head": False,
        "model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 6},
        "model.layers.1.experts.gate_up_proj": {"group_size": 64, "bits": 8},
        "model.layers.1.experts.down_proj": {"group_size": 64, "bits": 6}}
    with_tower = {**config, "vision_config": {}}  # gemma4_mm's paths: the text under model.language_model.
    with_tower["quantization"] = {**config["quantization"], "vision_tower.encoder.layers.0.mlp.up_proj.linear": False,
                                  "model.language_model.layers.2.mlp.up_proj": {"group_size": 32, "bits": 8}}
    assert gemma4.readable_quantization(with_tower)["quantization"] == {
        "group_size": 64, "bits": 4, "lm_head": False,
        "model.language_model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 6},
        "model.language_model.layers.1.experts.gate_up_proj": {"group_size": 64, "bits": 8},
        "model.language_model.layers.1.experts.down_proj": {"group_size": 64, "bits": 6},
        "model.vision_tower.encoder.layers.0.mlp.up_proj.linear": False,
        "model.language_model.layers.2.mlp.up_proj": {"group_size": 32, "bits": 8}}  # HF's paths: ours already
    other = {"model_type": "gemma3_text", "quantization": {"bits": 4, "language_model.model.x": False}}
    assert gemma4.readable_quantization(other) is other


def test_gate_and_up_settings_that_differ_are_refused(tmp_path):
    config = {"model_type": "gemma4_text", "quantization": {
        "group_size": 64, "bits": 4,
        "language_model.model.layers.0.experts.switch_glu.gate_proj": {"group_size": 64, "bits": 8},
        "language_model.model.layers.0.experts.switch_glu.up_proj": {"group_size": 64, "bits": 4}}}
    where = tmp_path / "config.json"
    with pytest.raises(ConfigError, match="gate_proj and up_proj") as raised:
        quantize_like(nn.Linear(64, 64), config, {}, where)
    assert raised.value.path == str(where)
