"""LoRA / QLoRA / DoRA and full fine-tuning on Gemma 4 text, and fusing back.

Blocks differ in Gemma 4: KV-shared blocks have no k_proj / v_proj, k_eq_v global blocks no
v_proj, MoE blocks carry experts (frozen: no adapters; the gradient still flows through them).
Adapters go where the named projections exist, as mlx-lm does, so its loader reads ours."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from mlx_gemma import lora
from mlx_gemma.convert import convert
from mlx_gemma.errors import AdapterError, UnsupportedModelError
from mlx_gemma.fuse import fuse_model
from mlx_gemma.loading import load_model
from mlx_gemma.lora import main as lora_main
from mlx_gemma.models.moe import QuantizedExpertLinear

from conftest import FIXTURES
from test_convert_gemma4 import wide_folder
from test_tuner_lora import IDS, assert_close, randomize_adapters
from test_tuner_trainer import cli_data


def fixture(name: str):
    return FIXTURES / f"tiny_gemma4_{name}"


def adapted_paths(model) -> list[str]:
    return sorted(p for p, _ in lora.lora_layers(model))


def test_default_targets_skip_what_shared_and_k_eq_v_blocks_lack():
    """e2b: blocks 4-5 read keys/values from earlier blocks (no k/v projections); 31b: its global
    blocks (2, 5) use the key projection as values (no v_proj).  Neither is an error."""
    e2b = load_model(fixture("e2b"))
    lora.enable_lora(e2b, rank=2)  # q_proj, v_proj in every block
    paths = adapted_paths(e2b)
    assert [p for p in paths if p.endswith("q_proj")] == [f"model.layers.{i}.self_attn.q_proj" for i in range(6)]
    assert [p for p in paths if p.endswith("v_proj")] == [f"model.layers.{i}.self_attn.v_proj" for i in range(4)]
    m31 = load_model(fixture("31b"))
    lora.enable_lora(m31, rank=2, target_names=lora.TARGETS)
    v = sorted(int(p.split(".")[2]) for p in adapted_paths(m31) if p.endswith("v_proj"))
    assert v == [0, 1, 3, 4]
    assert len([p for p in adapted_paths(m31) if p.endswith("k_proj")]) == 6


def test_target_names_are_still_checked():
    model = load_model(fixture("e2b"))
    with pytest.raises(AdapterError, match="no projection named 'w_proj'"):
        lora.enable_lora(model, target_names=("w_proj",))
    with pytest.raises(AdapterError, match="none of"):  # the last two blocks are shared: no v_proj there
        lora.enable_lora(load_model(fixture("e2b")), target_names=("v_proj",), num_layers=2)
    with pytest.raises(AdapterError, match="switch_glu"):  # experts take no adapters (mlx-lm's names)
        lora.enable_lora(load_model(fixture("moe")), target_names=("experts.switch_glu.gate_proj",))


def test_moe_adapters_on_attention_and_dense_mlp_experts_frozen():
    model = load_model(fixture("moe"))
    lora.enable_lora(model, rank=2, target_names=lora.TARGETS)
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable and all(".lora_" in k for k in trainable)
    assert not any("experts" in p or "router" in p for p in adapted_paths(model))
    assert {p.rsplit(".", 1)[1] for p in adapted_paths(model)} == set(lora.TARGETS)
    randomize_adapters(model)
    ids = mx.array(IDS)

    def loss(params):
        model.update(params)
        return model(ids).astype(mx.float32).square().mean()

    grads = dict(tree_flatten(mx.grad(loss)(model.trainable_parameters())))
    # the first block's adapters get a gradient through every MoE block above them
    assert float(mx.abs(grads["model.layers.0.mlp.down_proj.lora_b"]).max()) > 0


@pytest.mark.parametrize("name", ["e2b", "31b", "moe"])
@pytest.mark.parametrize("dora", [False, True])
def test_fused_folder_equals_base_plus_adapters(tmp_path, name, dora):
    base = convert(fixture(name), mlx_path=tmp_path / "base", progress=False)
    model = load_model(base)
    config = lora.enable_lora(model, rank=4, target_names=lora.TARGETS, dora=dora)
    randomize_adapters(model)
    lora.save_adapters(tmp_path / "adapter", model, config)
    adapted = model(mx.array(IDS))
    reloaded = lora.load_adapters(load_model(base), tmp_path / "adapter")
    assert mx.array_equal(reloaded(mx.array(IDS)), adapted)
    fused = load_model(fuse_model(base, tmp_path / "adapter", tmp_path / "fused"))
    assert not lora.lora_layers(fused)
    # fp32: W + BA rounds differently from Wx + (xA)B, and these random models amplify rounding
    # about 1000x (8-bit weights move e2b's logits by half their scale); float64 below is exact.
    assert_close(fused(mx.array(IDS)), adapted, rtol=1e-3)
    with mx.stream(mx.cpu):
        wide = lora.load_adapters(load_model(base, dtype=mx.float64), tmp_path / "adapter")
        wide.update(tree_map(lambda v: v.astype(mx.float64), wide.parameters()))
        adapted64 = wide(mx.array(IDS))
        assert_close(lora.fuse(wide)(mx.array(IDS)), adapted64, rtol=1e-9)


def test_fuse_reads_a_transformers_gemma4_folder(tmp_path):
    """The 31b fixture is a tower-less `gemma4` (Gemma4ForConditionalGeneration) folder: fused as
    its text model, gemma4_text."""
    model = load_model(fixture("31b"))
    config = lora.enable_lora(model, rank=2)
    randomize_adapters(model)
    lora.save_adapters(tmp_path / "adapter", model, config)
    out = fuse_model(fixture("31b"), tmp_path / "adapter", tmp_path / "fused")
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma4_text"
    assert_close(load_model(out)(mx.array(IDS)), model(mx.array(IDS)), rtol=1e-5)


def test_qlora_on_quantized_experts_and_fuse_requantizes(tmp_path):
    base = convert(wide_folder(tmp_path / "hf"), mlx_path=tmp_path / "q", quantize=True, q_bits=8,
                   q_group_size=32, progress=False)
    model = load_model(base)
    config = lora.enable_lora(model, rank=4, target_names=lora.TARGETS)
    assert isinstance(model.layers[0].experts.gate_up_proj, QuantizedExpertLinear)
    assert isinstance(model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    randomize_adapters(model)
    lora.save_adapters(tmp_path / "adapter", model, config)
    fused = load_model(fuse_model(base, tmp_path / "adapter", tmp_path / "fused"))
    assert isinstance(fused.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(fused.layers[0].experts.down_proj, QuantizedExpertLinear)
    assert_close(fused(mx.array(IDS)), lora.fuse(model)(mx.array(IDS)), rtol=1e-5)


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["e2b", "moe"])
def test_mlx_lm_loads_our_adapters_and_our_fused_folder(tmp_path, name):
    pytest.importorskip("mlx_lm")
    from mlx_lm.tuner.utils import load_adapters as lm_load_adapters
    from mlx_lm.utils import load_model as lm_load_model

    base = convert(fixture(name), mlx_path=tmp_path / "base", progress=False)
    model = load_model(base)
    config = lora.enable_lora(model, rank=4, target_names=lora.TARGETS)
    randomize_adapters(model)
    lora.save_adapters(tmp_path / "adapter", model, config)
    theirs, _ = lm_load_model(base)
    lm_load_adapters(theirs, str(tmp_path / "adapter"))
    assert_close(theirs(mx.array(IDS)), model(mx.array(IDS)), rtol=1e-4)
    fused, _ = lm_load_model(fuse_model(base, tmp_path / "adapter", tmp_path / "fused"))
    assert_close(fused(mx.array(IDS)), model(mx.array(IDS)), rtol=1e-3)  # fp32 fusing: see above
    assert_close(fused(mx.array(IDS)), load_model(tmp_path / "fused")(mx.array(IDS)), rtol=1e-4)


def _run(capsys, *args) -> str:
    code = lora_main([str(a) for a in args])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    return printed.out


@pytest.mark.parametrize("name", ["e2b", "moe"])
def test_cli_trains_adapters_and_a_full_fine_tune(tmp_path, capsys, name):
    data = cli_data(tmp_path)
    common = ["--model", fixture(name), "--data", data, "--train", "--iters", "3", "--batch-size", "2",
              "--learning-rate", "1e-3", "--steps-per-report", "1"]
    out = _run(capsys, *common, "--adapter-path", tmp_path / "adapters", "--lora-keys", *lora.TARGETS)
    assert "Saved adapters" in out
    adapted = lora.load_adapters(load_model(fixture(name)), tmp_path / "adapters")
    assert not mx.array_equal(adapted(mx.array(IDS)), load_model(fixture(name))(mx.array(IDS)))
    out = _run(capsys, *common, "--fine-tune-type", "full", "--num-layers", "2", "--adapter-path", tmp_path / "full")
    trained = load_model(tmp_path / "full")
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["model_type"] == "gemma4_text" and config["global_head_dim"] == 64
    before = load_model(fixture(name))
    changed = [k for k, v in tree_flatten(trained.parameters())
               if not mx.array_equal(v, dict(tree_flatten(before.parameters()))[k])]
    assert changed and all(k.startswith(("model.layers.4.", "model.layers.5.")) for k in changed)
    assert np.isfinite(np.asarray(trained(mx.array(IDS)))).all()


def test_fuse_still_refuses_models_with_images(tmp_path):
    """Only tower-less multimodal configs fuse as text models; PaliGemma is refused, nothing written."""
    with pytest.raises(UnsupportedModelError, match="images"):
        fuse_model(FIXTURES / "tiny_paligemma", tmp_path / "no_adapter", tmp_path / "fused")
    assert not (tmp_path / "fused").exists()
