"""Converting Gemma 4 text checkpoints: transformers' two key layouts and mlx-community folders in,
an mlx-community folder out that mlx_gemma and mlx-lm 0.32 both load; quantization (experts and the
per-layer embedding table included), what stays float, and the refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from mlx_gemma.convert import convert, mlx_lm_compatible
from mlx_gemma.errors import MlxGemmaError, ModelFileError, UnsupportedModelError
from mlx_gemma.loading import load_model
from mlx_gemma.models import gemma4
from mlx_gemma.models.moe import MLX_LM_EXPERTS, QuantizedExpertLinear

from conftest import FIXTURES

NAMES = ["e2b", "31b", "moe"]  # HF layouts: model.* (e2b, moe) and model.language_model.* (31b, `gemma4`)
RTOL = 1e-4


def fixture(name: str):
    return FIXTURES / f"tiny_gemma4_{name}"


def reference(name: str) -> dict:
    return dict(np.load(fixture(name) / "reference.npz"))


def rel_err(ours, ref) -> float:
    """Largest difference over the reference's largest magnitude."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def wide_folder(path, moe: bool = True, seed: int = 0):
    """An HF-layout Gemma 4 folder (random weights from our own model) whose widths are multiples of
    64, so every kind of layer can quantize: experts, the per-layer table (6 x 16 = 96 wide: group 32
    only), the per-layer gate, the router.  The tiny transformers fixtures are too narrow for that."""
    config = {
        "model_type": "gemma4_text", "architectures": ["Gemma4ForCausalLM"], "vocab_size": 512,
        "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 6, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32, "sliding_window": 4, "num_kv_shared_layers": 2,
        "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": 512, "final_logit_softcapping": 30.0,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
        "per_layer_config": {"2": {"head_dim": 64}, "5": {"head_dim": 64}}, "use_double_wide_mlp": True,
    }
    if moe:
        config.update(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=64)
    model = gemma4.Model(gemma4.ModelArgs.from_dict(config))
    mx.random.seed(seed)
    model.update(tree_map(lambda p: p + 0.08 * mx.random.normal(p.shape), model.parameters()))
    # transformers stores the experts as bare tensors (no `.weight`)
    weights = {k.removesuffix(".weight") if ".experts." in k else k: v
               for k, v in tree_flatten(model.parameters())}
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    shutil.copy(fixture("e2b") / "tokenizer.model", path / "tokenizer.model")
    return path


IDS = mx.array([[2, 17, 301, 45, 9, 88, 120, 7, 7, 400, 3, 51]])


# ----- float conversion -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_float_conversion_keeps_transformers_logits(tmp_path, name):
    dest = convert(fixture(name), mlx_path=tmp_path / "out", progress=False)
    config = json.loads((dest / "config.json").read_text())
    assert config["model_type"] == "gemma4_text" and config["architectures"] == ["Gemma4ForCausalLM"]
    assert "text_config" not in config and config["global_head_dim"] == 64
    ref = reference(name)
    model = load_model(dest)
    assert rel_err(model(mx.array(ref["input_ids"])), ref["logits"]) < RTOL


def test_written_config_spells_what_mlx_lm_reads():
    """transformers keeps the global layers' shape in per_layer_config only; mlx-lm 0.32 reads
    global_head_dim / num_global_key_value_heads, and its defaults differ (shared layers 20, ...)."""
    config = json.loads((fixture("31b") / "config.json").read_text())["text_config"]
    out = mlx_lm_compatible({**config, "model_type": "gemma4_text"})
    assert out["global_head_dim"] == 64 and out["num_global_key_value_heads"] == 1
    assert out["num_kv_shared_layers"] == 0 and out["use_double_wide_mlp"] is False
    assert out["per_layer_config"] == config["per_layer_config"]  # kept for transformers
    # a config whose last layer is sliding is written as run: transformers forces it global
    odd = {**config, "model_type": "gemma4_text", "layer_types": config["layer_types"][:5] + ["sliding_attention"]}
    odd.pop("per_layer_config")
    assert mlx_lm_compatible(odd)["layer_types"][-1] == "full_attention"


def test_moe_experts_are_written_under_mlx_lm_names(tmp_path):
    dest = convert(fixture("moe"), mlx_path=tmp_path / "out", progress=False)
    names = set(mx.load(str(dest / "model.safetensors")))
    assert f"model.layers.0{MLX_LM_EXPERTS}gate_proj.weight" in names
    assert f"model.layers.0{MLX_LM_EXPERTS}down_proj.weight" in names
    assert not any(".experts.gate_up_proj" in n for n in names)


@pytest.mark.oracle
@pytest.mark.parametrize("name", NAMES)
def test_float_output_loads_in_mlx_lm_with_transformers_logits(tmp_path, name):
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    dest = convert(fixture(name), mlx_path=tmp_path / "out", progress=False)
    theirs, _ = mlx_lm_utils.load_model(dest)
    ref = reference(name)
    assert rel_err(theirs(mx.array(ref["input_ids"])), ref["logits"]) < RTOL


# ----- quantization ---------------------------------------------------------------------------


def _modules(model) -> dict:
    return dict(model.named_modules())


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_moe_equals_its_dequantized_weights(tmp_path, bits):
    """Experts (gather_qmm), the per-layer table and projections quantize; norms, scalars and the
    router's scales stay float; the router's projection gets 8 bits at group 64 (as mlx-lm)."""
    src = wide_folder(tmp_path / "hf")
    q = convert(src, mlx_path=tmp_path / "q", quantize=True, q_bits=bits, q_group_size=32, progress=False)
    model = load_model(q)
    mods = _modules(model)
    assert isinstance(mods["model.layers.0.experts.gate_up_proj"], QuantizedExpertLinear)
    assert isinstance(mods["model.layers.0.experts.down_proj"], QuantizedExpertLinear)
    assert isinstance(mods["model.embed_tokens_per_layer"], nn.QuantizedEmbedding)
    assert isinstance(mods["model.layers.0.per_layer_input_gate"], nn.QuantizedLinear)
    router = mods["model.layers.0.router.proj"]
    assert isinstance(router, nn.QuantizedLinear) and (router.bits, router.group_size) == (8, 64)
    floats = {k for k, v in tree_flatten(model.parameters()) if v.dtype == mx.float32 and k.endswith(
        ("norm.weight", "layer_scalar", "router.scale", "per_expert_scale"))}
    assert "model.layers.0.router.per_expert_scale" in floats and "model.norm.weight" in floats
    back = convert(q, mlx_path=tmp_path / "d", dequantize=True, progress=False)
    dequantized = load_model(back)
    assert not any(isinstance(m, (nn.QuantizedLinear, QuantizedExpertLinear)) for m in _modules(dequantized).values())
    assert rel_err(model(IDS), dequantized(IDS)) < 1e-5
    original = _modules(load_model(src))
    for name in ("model.layers.1.experts.gate_up_proj", "model.layers.1.experts.down_proj", "model.embed_tokens_per_layer"):
        step = float(mods[name].scales.max())  # each weight within one step of its source (MLX's affine grid)
        deq, src_w = _modules(dequantized)[name].weight, original[name].weight
        assert float(mx.abs(deq - src_w).max()) <= step * 1.001, name


def test_narrow_layers_stay_float_with_a_note(tmp_path):
    """e2b's per-layer table is 6 x 8 = 48 wide: no group size divides it, so it stays float (named
    in a warning) while the rest of the folder quantizes."""
    with pytest.warns(UserWarning, match="embed_tokens_per_layer"):
        dest = convert(fixture("e2b"), mlx_path=tmp_path / "q", quantize=True, q_bits=8, q_group_size=32,
                       progress=False)
    mods = _modules(load_model(dest))
    assert isinstance(mods["model.embed_tokens_per_layer"], nn.Embedding)
    assert not isinstance(mods["model.embed_tokens_per_layer"], nn.QuantizedEmbedding)
    assert isinstance(mods["model.layers.0.self_attn.o_proj"], nn.QuantizedLinear)


@pytest.mark.oracle
@pytest.mark.parametrize("recipe", [None, "mixed_4_6"])
def test_quantized_output_loads_in_mlx_lm_with_our_logits(tmp_path, recipe):
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    src = wide_folder(tmp_path / "hf")
    dest = convert(src, mlx_path=tmp_path / "q", quantize=True, q_group_size=32, quant_recipe=recipe, progress=False)
    theirs, _ = mlx_lm_utils.load_model(dest)
    assert rel_err(theirs(IDS), load_model(dest)(IDS)) < 1e-4


@pytest.mark.oracle
@pytest.mark.parametrize("recipe", [None, "mixed_4_6"])
def test_an_mlx_lm_written_folder_converts(tmp_path, recipe):
    """A folder mlx-lm 0.32's own convert wrote (quantized, experts as switch_glu halves, a mixed
    recipe's per-layer settings under its names) converts here, giving what mlx-lm computes on it;
    and back to float (-d)."""
    mlx_lm_convert = pytest.importorskip("mlx_lm.convert").convert
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    ours_float = convert(wide_folder(tmp_path / "hf"), mlx_path=tmp_path / "float", progress=False)
    community = tmp_path / "community"
    mlx_lm_convert(str(ours_float), mlx_path=str(community), quantize=True, q_group_size=32, q_bits=4,
                   quant_predicate=recipe)
    theirs, _ = mlx_lm_utils.load_model(community)
    dest = convert(community, mlx_path=tmp_path / "out", progress=False)
    assert rel_err(load_model(dest)(IDS), theirs(IDS)) < 1e-4
    again, _ = mlx_lm_utils.load_model(dest)
    assert rel_err(again(IDS), theirs(IDS)) < 1e-4
    floats = convert(community, mlx_path=tmp_path / "deq", dequantize=True, progress=False)
    assert rel_err(load_model(floats)(IDS), theirs(IDS)) < 1e-4


@pytest.mark.oracle
def test_an_mlx_lm_written_multimodal_layout_folder_converts(tmp_path):
    """mlx-lm's own convert of a tower-less `gemma4` folder keeps model_type gemma4 and writes weights
    and per-layer quantization keys under `language_model.model.` (its mixed recipe's 6-bit layers):
    converted here to gemma4_text, giving what mlx-lm computes on its folder."""
    mlx_lm_convert = pytest.importorskip("mlx_lm.convert").convert
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    src = tmp_path / "hf"
    shutil.copytree(fixture("31b"), src)
    config = json.loads((src / "config.json").read_text())
    # mlx-lm 0.32 reads the global layers' shape from these keys only, and the vocabulary from the top level
    config["text_config"].update(global_head_dim=64, num_global_key_value_heads=1)
    config["vocab_size"] = config["text_config"]["vocab_size"]
    (src / "config.json").write_text(json.dumps(config))
    community = tmp_path / "community"
    mlx_lm_convert(str(src), mlx_path=str(community), quantize=True, q_group_size=32, q_bits=4,
                   quant_predicate="mixed_4_6")
    written = json.loads((community / "config.json").read_text())
    assert written["model_type"] == "gemma4"
    assert any(k.startswith("language_model.model.") and v["bits"] == 6 for k, v in written["quantization"].items()
               if isinstance(v, dict))
    theirs, _ = mlx_lm_utils.load_model(community)
    dest = convert(community, mlx_path=tmp_path / "out", progress=False)
    assert json.loads((dest / "config.json").read_text())["model_type"] == "gemma4_text"
    assert rel_err(load_model(dest)(IDS), theirs(IDS)) < 1e-4
    again, _ = mlx_lm_utils.load_model(dest)
    assert rel_err(again(IDS), theirs(IDS)) < 1e-4


# ----- refusals ----------------------------------------------------------------------------------


def test_a_missing_shard_is_named_and_nothing_is_written(tmp_path):
    src = tmp_path / "sharded"
    shutil.copytree(fixture("moe"), src)
    weights = mx.load(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        mx.save_safetensors(str(src / file), {k: weights[k] for k in keys})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFileError, match="model-00002-of-00002.safetensors"):
        convert(src, mlx_path=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "sharded"] == []


def test_a_wrong_shaped_expert_tensor_is_named_and_nothing_is_written(tmp_path):
    src = tmp_path / "bad"
    shutil.copytree(fixture("moe"), src)
    weights = mx.load(str(src / "model.safetensors"))
    name = next(k for k in weights if k.endswith("layers.1.experts.down_proj"))
    weights[name] = weights[name][:, :, :-1]
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    with pytest.raises(ModelFileError, match="experts.down_proj") as e:
        convert(src, mlx_path=tmp_path / "out", progress=False)
    assert str(src) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_gemma4_gguf_is_refused_naming_the_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "gemma4.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma4")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="gemma4") as e:
        convert(gguf_path=path, mlx_path=tmp_path / "out", progress=False)
    assert str(path) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_quantize_and_dequantize_together_are_refused():
    with pytest.raises(MlxGemmaError, match="exclude"):
        convert(fixture("e2b"), mlx_path="never", quantize=True, dequantize=True)
