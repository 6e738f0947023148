"""Gemma 4's MoE router and experts (models/moe.py) against transformers 5.25, fp32.

References: tests/fixtures/moe_reference.npz, written by
tests/fixtures/make_moe_reference.py from transformers' `Gemma4TextRouter`,
`Gemma4TextExperts` and the MoE half of `Gemma4TextDecoderLayer` (random tiny
weights, E=4 and E=8 experts, top-2, few and many tokens: the unsorted and the
sorted gather path); the oracle tests recompute them live.  Quantized experts
are checked against the float experts holding their dequantized weights.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import FIXTURES
from mlx.utils import tree_flatten

from mlx_gemma.convert.quantize import dequantize_model, quantize_model
from mlx_gemma.convert.writer import write_model_folder
from mlx_gemma.errors import AdapterError, ConfigError, MlxGemmaError, WeightsMismatchError
from mlx_gemma.loading import check_weights, quantize_like
from mlx_gemma.models import moe
from mlx_gemma.models.layers import GeGLU
from mlx_gemma.models.moe import (
    MLX_LM_EXPERTS, ExpertLinear, Experts, QuantizedExpertLinear, Router, sanitize_experts, sanitize_quantization,
    to_mlx_lm_layout, to_mlx_lm_quantization,
)
from mlx_gemma.tensorfile import load_file
from mlx_gemma.tuner.lora import LoRALinear, enable_lora

REFERENCE = FIXTURES / "moe_reference.npz"
CASES = ("e4k2_few", "e4k2_many", "e8k2_few", "e8k2_many")
EPS = 1e-6  # Gemma4TextConfig's rms_norm_eps, which the fixture keeps


def rel_err(ours, expected) -> float:
    expected = np.asarray(expected)
    return float(np.abs(np.asarray(ours) - expected).max() / np.abs(expected).max())


def scaled_rms_norm(x: mx.array, weight: mx.array) -> mx.array:
    """transformers' Gemma4RMSNorm (x * pow(mean(x^2) + eps, -0.5) * w), for the block test's two norms."""
    return x * mx.power(mx.mean(x * x, axis=-1, keepdims=True) + EPS, -0.5) * weight


class Block(nn.Module):
    """A decoder block's MoE half, under transformers' names (router, experts) beside a dense Linear."""

    def __init__(self, experts: int, top_k: int, hidden: int = 32, width: int = 16):
        super().__init__()
        self.router = Router(hidden, experts, top_k, EPS)
        self.experts = Experts(experts, hidden, width, "gelu_pytorch_tanh")
        self.o_proj = nn.Linear(hidden, hidden, bias=False)  # projections LoRA may adapt
        self.mlp = GeGLU(hidden, 2 * hidden, "gelu_pytorch_tanh")

    def __call__(self, x: mx.array) -> mx.array:  # [N, H]: enough of a block to train through
        h = self.o_proj(x) + self.mlp(x)
        return h + self.experts(h, *reversed(self.router(h)))


class Stack(nn.Module):
    """The least a model offers the converter's quantizer and the tuner: `layers`, `float_prefixes`, `args`."""

    float_prefixes = ()

    @property
    def layers(self) -> list[Block]:
        return self.model.layers

    def __init__(self, experts: int = 4, top_k: int = 2, hidden: int = 32, width: int = 16, n: int = 1):
        super().__init__()
        self.model = nn.Module()  # so paths read `model.layers.N...`, as in a real model
        self.model.layers = [Block(experts, top_k, hidden, width) for _ in range(n)]
        self.args = type("Args", (), {"model_type": "moe_test", "hidden_size": hidden})()


def case_data(case: str) -> dict[str, np.ndarray]:
    ref = np.load(REFERENCE)
    return {k.split("/", 1)[1]: ref[k] for k in ref.files if k.startswith(case + "/")}


def stack_for(ref: dict[str, np.ndarray]) -> Stack:
    """A one-block Stack holding the reference's weights, loaded through sanitize_experts (HF names)."""
    experts, hidden = ref["router.proj.weight"].shape
    stack = Stack(experts, ref["router_indices"].shape[1], hidden, ref["experts.down_proj"].shape[2])
    hf = {f"model.layers.0.{k}": mx.array(ref[k]) for k in ref if k.startswith(("router.", "experts."))}
    weights = sanitize_experts(hf)
    weights.update({f"model.layers.0.{k}": v for k, v in tree_flatten(stack.layers[0].parameters())
                    if k.startswith(("o_proj", "mlp"))})
    check_weights(stack, weights, None)
    stack.load_weights(list(weights.items()), strict=True)
    return stack


# --- against transformers (fixture) ------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_router_matches_transformers(case):
    ref = case_data(case)
    block = stack_for(ref).layers[0]
    weights, indices = block.router(mx.array(ref["residual"].reshape(-1, ref["residual"].shape[-1])))
    assert indices.dtype == mx.uint32 and weights.dtype == mx.float32
    np.testing.assert_array_equal(np.array(indices), ref["router_indices"])  # largest first, as torch.topk
    assert rel_err(weights, ref["router_weights"]) < 1e-5


PATHS = ("unsorted", "sorted")


def force_path(monkeypatch, path: str) -> None:
    """Make Experts take one of its two ways to run, whatever the device (sorting is off on the CPU)."""
    monkeypatch.setattr(moe, "SORT_MIN_PAIRS", 1 if path == "sorted" else 1 << 30)
    monkeypatch.setattr(moe, "SORT_ON_CPU", True)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES)
def test_experts_match_transformers(case, path, monkeypatch):
    force_path(monkeypatch, path)
    ref = case_data(case)
    block = stack_for(ref).layers[0]
    out = block.experts(mx.array(ref["experts_input"]), mx.array(ref["router_indices"]), mx.array(ref["router_weights"]))
    assert out.shape == ref["experts"].shape
    assert rel_err(out, ref["experts"]) < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_router_and_experts_block_matches_transformers(case):
    """The decoder's MoE half: the router reads the residual, the experts its pre_feedforward_layernorm_2."""
    ref = case_data(case)
    block = stack_for(ref).layers[0]
    residual = mx.array(ref["residual"])
    flat = residual.reshape(-1, residual.shape[-1])
    weights, indices = block.router(flat)
    mixed = block.experts(scaled_rms_norm(flat, mx.array(ref["pre_feedforward_layernorm_2.weight"])), indices, weights)
    out = scaled_rms_norm(mixed.reshape(residual.shape), mx.array(ref["post_feedforward_layernorm_2.weight"]))
    assert rel_err(out, ref["block"]) < 1e-5


@pytest.mark.oracle
@pytest.mark.parametrize("case", CASES)
def test_fixture_is_what_transformers_computes(case, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(FIXTURES))
    from make_moe_reference import reference  # the fixture script; it imports torch and transformers

    live, stored = reference(case), case_data(case)
    assert live.keys() == stored.keys()
    for name in live:
        np.testing.assert_allclose(live[name], stored[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.oracle
@pytest.mark.parametrize("case", CASES)
def test_bfloat16_matches_transformers_in_bfloat16(case, monkeypatch):
    """Both in bf16 (transformers on CPU torch): the same experts picked, outputs within bf16 rounding."""
    torch = pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(FIXTURES))
    from make_moe_reference import CASES as SHAPES, decoder_layer  # the fixture script; it imports transformers

    ref = case_data(case)
    layer = decoder_layer(*SHAPES[case][:2], seed=CASES.index(case)).to(torch.bfloat16)
    residual = torch.tensor(ref["residual"]).to(torch.bfloat16).reshape(-1, ref["residual"].shape[-1])
    with torch.no_grad():
        _, weights, indices = layer.router(residual)
        normed = layer.pre_feedforward_layernorm_2(residual)
        expected = layer.experts(normed, indices, weights).float().numpy()
    block = stack_for(ref).layers[0]
    block.set_dtype(mx.bfloat16)
    ours_weights, ours_indices = block.router(mx.array(residual.float().numpy()).astype(mx.bfloat16))
    np.testing.assert_array_equal(np.array(ours_indices), indices.numpy())
    assert float(np.abs(np.array(ours_weights) - weights.numpy()).max()) < 2e-3
    out = block.experts(mx.array(normed.float().numpy()).astype(mx.bfloat16), mx.array(indices.numpy()),
                        mx.array(weights.numpy()))
    assert out.dtype == mx.bfloat16 and rel_err(out.astype(mx.float32), expected) < 1.5e-2


@pytest.mark.oracle
@pytest.mark.parametrize("case", ["e4k2_few", "e8k2_many"])
def test_keras_hub_computes_the_same_moe(case):
    """keras-hub 0.32's Gemma4Router + Gemma4MoEBlock (JAX, fp32), weights ported as its HF converter ports them."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    moe_layers = pytest.importorskip("keras_hub.src.models.gemma4.gemma4_moe")
    import keras

    ref = case_data(case)
    experts, hidden = ref["router.proj.weight"].shape
    width = ref["experts.down_proj"].shape[2]
    router = moe_layers.Gemma4Router(experts, ref["router_indices"].shape[1], EPS, dtype="float32")
    bank = moe_layers.Gemma4MoEBlock(experts, hidden, width, dtype="float32")
    router.build((None, None, hidden))
    bank.build((None, hidden))
    gate_up = ref["experts.gate_up_proj"]  # keras_hub/src/utils/transformers/convert_gemma4.py's transposes
    router.per_dim_scale.assign(ref["router.scale"])
    router.proj.kernel.assign(ref["router.proj.weight"].T)
    bank.gate_proj.assign(gate_up[:, :width].transpose(0, 2, 1))
    bank.up_proj.assign(gate_up[:, width:].transpose(0, 2, 1))
    bank.down_proj.assign(ref["experts.down_proj"].transpose(0, 2, 1))
    bank.per_expert_scale.assign(ref["router.per_expert_scale"])
    dispatch = router(ref["residual"])  # [T, E]: the top-k weights, before per_expert_scale
    out = keras.ops.convert_to_numpy(bank(ref["experts_input"], dispatch))
    ours = stack_for(ref).layers[0]
    weights, indices = ours.router(mx.array(ref["residual"].reshape(-1, hidden)))
    assert rel_err(ours.experts(mx.array(ref["experts_input"]), indices, weights), out) < 1e-5


def test_default_paths():
    """Few pairs: one row per token; many: rows sorted by expert (mlx-lm's way), except on the CPU."""
    experts = Experts(8, 32, 16, "gelu_pytorch_tanh")
    calls = []
    experts._sorted = lambda x, i: calls.append(len(x)) or mx.zeros((i.size, 1, 32))
    x = mx.zeros((40, 32))
    for n in (3, 40):
        experts(x[:n], mx.zeros((n, 2), mx.uint32), mx.ones((n, 2)))
    assert calls == ([] if mx.default_device() == mx.cpu else [40])


# --- quantized experts -------------------------------------------------------------------------


def routed(stack: Stack, tokens: int, seed: int = 0) -> tuple[mx.array, mx.array, mx.array]:
    """Random inputs [tokens, H] and their router's (indices, weights)."""
    x = mx.random.normal((tokens, stack.layers[0].router.scale.shape[0]), key=mx.random.key(seed))
    weights, indices = stack.layers[0].router(x)
    return x, indices, weights


def float_twin(layer: QuantizedExpertLinear) -> ExpertLinear:
    """The float layer holding `mx.dequantize` of a quantized one's weight (built here, not by moe.py)."""
    twin = ExpertLinear(layer.weight.shape[0], 1, 1)
    twin.weight = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=layer.group_size, bits=layer.bits)
    return twin


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("path", PATHS)
def test_quantized_experts_equal_float_experts_on_their_dequantized_weights(bits, path, monkeypatch):
    force_path(monkeypatch, path)
    tokens = 40
    stack = Stack(experts=8, hidden=64, width=32)
    x, indices, weights = routed(stack, tokens)
    before = np.array(stack.layers[0].experts(x, indices, weights))
    config = quantize_model(stack, {}, bits=bits, group_size=32)
    experts = stack.layers[0].experts
    assert isinstance(experts.gate_up_proj, QuantizedExpertLinear) and experts.gate_up_proj.bits == bits
    assert isinstance(experts.down_proj, QuantizedExpertLinear) and experts.down_proj.group_size == 32
    quantized = np.array(experts(x, indices, weights))
    floats = Experts(8, 64, 32, "gelu_pytorch_tanh")
    floats.gate_up_proj, floats.down_proj = float_twin(experts.gate_up_proj), float_twin(experts.down_proj)
    assert rel_err(quantized, floats(x, indices, weights)) < 1e-5  # gather_qmm == gather_mm of the dequantized
    assert rel_err(quantized, before) < (0.2 if bits == 4 else 0.02)  # and near the unquantized experts
    assert config["quantization"]["bits"] == bits


def test_modes_without_biases_run_and_dequantize():
    """mxfp4 (as a folder's `"mode"` may ask): scales only, no biases."""
    stack = Stack(experts=8, hidden=64, width=32)
    x, indices, weights = routed(stack, 5)
    experts = stack.layers[0].experts
    nn.quantize(experts, group_size=32, bits=4, mode="mxfp4")
    assert "biases" not in experts.gate_up_proj and experts.gate_up_proj.mode == "mxfp4"
    floats = Experts(8, 64, 32, "gelu_pytorch_tanh")
    floats.gate_up_proj, floats.down_proj = experts.gate_up_proj.dequantized(), experts.down_proj.dequantized()
    assert rel_err(experts(x, indices, weights), floats(x, indices, weights)) < 1e-5


def test_router_projection_gets_mlx_lms_eight_bits():
    stack = Stack(experts=8, hidden=64, width=32)
    config = quantize_model(stack, {}, bits=4, group_size=32)
    proj = stack.layers[0].router.proj
    assert isinstance(proj, nn.QuantizedLinear) and (proj.bits, proj.group_size) == (8, 64)
    assert config["quantization"]["model.layers.0.router.proj"] == {"group_size": 64, "bits": 8}
    narrow = Stack(hidden=32)  # 32 wide: no whole group of 64, so the router stays float
    quantize_model(narrow, {}, bits=4, group_size=32)
    assert isinstance(narrow.layers[0].router.proj, nn.Linear)


def test_dequantize_model_gives_float_experts():
    stack = Stack(experts=8, hidden=64, width=32)
    x, indices, weights = routed(stack, 40)
    config = quantize_model(stack, {}, bits=4, group_size=32)
    quantized = np.array(stack.layers[0].experts(x, indices, weights))
    packed = stack.layers[0].experts.gate_up_proj
    expected = np.array(float_twin(packed).weight)
    assert "quantization" not in dequantize_model(stack, config)
    experts = stack.layers[0].experts
    assert type(experts.gate_up_proj) is ExpertLinear and type(experts.down_proj) is ExpertLinear
    np.testing.assert_array_equal(np.array(experts.gate_up_proj.weight), expected)
    assert rel_err(experts(x, indices, weights), quantized) < 1e-5


def test_quantized_folder_round_trip(tmp_path):
    """quantize -> the converter's writer -> read back -> quantize_like (as loading does) -> same outputs."""
    stack = Stack(experts=8, hidden=64, width=32, n=2)
    x, indices, weights = routed(stack, 40)
    config = quantize_model(stack, {"model_type": "moe_test"}, bits=4, group_size=32, recipe="mixed_4_6")
    expected = np.array(stack.layers[1](x))
    dest = write_model_folder(tmp_path / "q", config, dict(tree_flatten(stack.parameters())), None, None)
    read = load_file(dest / "model.safetensors")
    assert read["model.layers.0.experts.gate_up_proj.scales"].shape == (8, 64, 2)  # [E, 2I, H / group]
    fresh = Stack(experts=8, hidden=64, width=32, n=2)
    quantize_like(fresh, config, read)
    check_weights(fresh, read, dest)
    fresh.load_weights(list(read.items()), strict=True)
    for block in fresh.layers:  # the recipe's edge blocks (both, of 2): down_proj 6 bits, as mlx-lm's switch_glu's
        assert (block.experts.down_proj.bits, block.experts.gate_up_proj.bits) == (6, 4)
    np.testing.assert_array_equal(np.array(fresh.layers[1](x)), expected)


# --- mlx-community layout ----------------------------------------------------------------------


@pytest.mark.parametrize("quantized", [False, True])
def test_sanitize_joins_mlx_community_halves(quantized):
    stack = Stack(experts=8, hidden=64, width=32)
    if quantized:
        quantize_model(stack, {}, bits=4, group_size=32)
    ours = dict(tree_flatten(stack.parameters()))
    theirs = to_mlx_lm_layout(ours)
    assert f"model.layers.0{MLX_LM_EXPERTS}gate_proj.weight" in theirs
    back = sanitize_experts(theirs)
    assert back.keys() == ours.keys()
    assert sanitize_experts(ours).keys() == ours.keys()  # our own folders pass unchanged
    for k in ours:
        np.testing.assert_array_equal(np.array(back[k]), np.array(ours[k]), err_msg=k)


def test_sanitize_quantization_renames_expert_overrides():
    q = {"group_size": 64, "bits": 4, f"model.layers.0{MLX_LM_EXPERTS}down_proj": {"group_size": 64, "bits": 6},
         f"model.layers.0{MLX_LM_EXPERTS}gate_proj": {"group_size": 64, "bits": 5},
         f"model.layers.0{MLX_LM_EXPERTS}up_proj": {"group_size": 64, "bits": 5}}
    assert sanitize_quantization(q) == {
        "group_size": 64, "bits": 4, "model.layers.0.experts.down_proj": {"group_size": 64, "bits": 6},
        "model.layers.0.experts.gate_up_proj": {"group_size": 64, "bits": 5}}
    assert to_mlx_lm_quantization(sanitize_quantization(q)) == q  # and back
    q[f"model.layers.0{MLX_LM_EXPERTS}up_proj"] = {"group_size": 64, "bits": 4}
    with pytest.raises(ConfigError, match="gate_proj and up_proj have different"):
        sanitize_quantization(q)


def mlx_lm_gemma4():
    """mlx-lm 0.32's gemma4_text module and ModelArgs for an 8-expert top-2 block of width 64 / 32."""
    lm = pytest.importorskip("mlx_lm.models.gemma4_text")
    return lm, lm.ModelArgs(hidden_size=64, num_hidden_layers=1, num_kv_shared_layers=0, enable_moe_block=True,
                            num_experts=8, top_k_experts=2, moe_intermediate_size=32, rms_norm_eps=EPS)


@pytest.mark.oracle
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_experts_load_here_with_the_same_outputs(bits):
    """mlx-lm 0.32's own Router / Experts (gemma4_text.py), its sanitize and quantization: we agree."""
    from types import SimpleNamespace

    lm, args = mlx_lm_gemma4()
    stack = Stack(experts=8, hidden=64, width=32)
    stack.layers[0].router.scale = mx.random.uniform(0.5, 1.5, (64,))
    stack.layers[0].router.per_expert_scale = mx.random.uniform(0.5, 1.5, (8,))
    hf = {k.removesuffix(".weight") if ".experts." in k else k: v for k, v in tree_flatten(stack.parameters())}
    theirs = lm.Model.sanitize(SimpleNamespace(args=args), hf)  # HF names -> switch_glu halves, by mlx-lm
    router, experts = lm.Router(args), lm.Experts(args)
    router.load_weights([(k.removeprefix("model.layers.0.router."), v) for k, v in theirs.items() if ".router." in k])
    experts.load_weights([(k.removeprefix("model.layers.0.experts."), v) for k, v in theirs.items() if ".experts." in k])
    config = {}
    if bits:
        nn.quantize(experts, group_size=32, bits=bits)
        config = {"quantization": {"group_size": 32, "bits": bits}}
    folder = {f"model.layers.0.experts.{k}": v for k, v in tree_flatten(experts.parameters())}
    folder.update({k: v for k, v in tree_flatten(stack.parameters()) if ".experts." not in k})
    ours = Stack(experts=8, hidden=64, width=32)
    weights = sanitize_experts(folder)
    quantize_like(ours, config, weights)
    ours.load_weights(list(weights.items()), strict=True)
    x = mx.random.normal((40, 64), key=mx.random.key(3)) * 3
    their_indices, their_weights = router(x)
    weights, indices = ours.layers[0].router(x)
    order = mx.argsort(their_indices, axis=-1)  # mlx-lm's top-k comes in no particular order
    np.testing.assert_array_equal(np.sort(np.array(indices), -1), np.array(mx.take_along_axis(their_indices, order, -1)))
    assert rel_err(mx.sort(weights, -1), mx.sort(their_weights, -1)) < 1e-5
    assert rel_err(ours.layers[0].experts(x, indices, weights), experts(x, indices, weights)) < 1e-5


@pytest.mark.oracle
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_loads_our_experts_with_the_same_outputs(bits):
    """to_mlx_lm_layout writes what mlx-lm 0.32's Experts load strictly (quantized by its own nn.quantize)."""
    lm, args = mlx_lm_gemma4()
    stack = Stack(experts=8, hidden=64, width=32)
    if bits:
        quantize_model(stack, {}, bits=bits, group_size=32)
    prefix = "model.layers.0.experts."
    ours = {k: v for k, v in tree_flatten(stack.parameters()) if k.startswith(prefix)}
    experts = lm.Experts(args)
    if bits:
        nn.quantize(experts, group_size=32, bits=bits)
    theirs = to_mlx_lm_layout(ours)
    experts.load_weights([(k.removeprefix("model.layers.0.experts."), v) for k, v in theirs.items()], strict=True)
    x, indices, weights = routed(stack, 40)
    assert rel_err(experts(x, indices, weights), stack.layers[0].experts(x, indices, weights)) < 1e-5


# --- training through the experts, and LoRA ----------------------------------------------------


def dense_experts(experts: Experts, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
    """The experts spelled out with a take per (token, expert) pair: a reference for gradients."""
    gate_up, down = (float_twin(p) if isinstance(p, QuantizedExpertLinear) else p
                     for p in (experts.gate_up_proj, experts.down_proj))
    h = mx.einsum("nkoh,nh->nko", gate_up.weight[indices], x)  # [N, K, 2I]
    gate, up = mx.split(h, 2, axis=-1)
    y = mx.einsum("nkhi,nki->nkh", down.weight[indices], nn.gelu_approx(gate) * up)
    return (y * weights[..., None]).sum(1)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_input_gradient_through_the_experts(quantized, path, monkeypatch):
    force_path(monkeypatch, path)
    tokens = 40
    stack = Stack(experts=8, hidden=64, width=32)
    if quantized:
        quantize_model(stack, {}, bits=8, group_size=32)
    experts = stack.layers[0].experts
    x, indices, weights = routed(stack, tokens)
    cotangent = mx.random.normal(x.shape, key=mx.random.key(1))
    grad = mx.grad(lambda x: (experts(x, indices, weights) * cotangent).sum())(x)
    expected = mx.grad(lambda x: (dense_experts(experts, x, indices, weights) * cotangent).sum())(x)
    assert rel_err(grad, expected) < 1e-5


@pytest.mark.parametrize("path", PATHS)
def test_experts_compile(path, monkeypatch):
    """No host sync on any path: the trainer compiles the forward and backward passes."""
    force_path(monkeypatch, path)
    stack = Stack(experts=8, hidden=64, width=32)
    x, indices, weights = routed(stack, 40)
    experts = stack.layers[0].experts
    compiled = mx.compile(lambda x, i, w: experts(x, i, w), inputs=experts.state)
    assert rel_err(compiled(x, indices, weights), experts(x, indices, weights)) < 1e-6


@pytest.mark.parametrize("quantized", [False, True])  # LoRA and QLoRA
def test_lora_adapts_the_dense_projections_and_leaves_the_experts_frozen(quantized):
    stack = Stack(experts=8, hidden=64, width=32)
    if quantized:
        quantize_model(stack, {}, bits=4, group_size=32)
    config = enable_lora(stack, rank=2, target_names=("o_proj", "down_proj"))
    assert config["lora_parameters"]["keys"] == ["o_proj", "mlp.down_proj"]  # not experts.down_proj
    expert_class = QuantizedExpertLinear if quantized else ExpertLinear
    assert isinstance(stack.layers[0].o_proj, LoRALinear) and type(stack.layers[0].experts.down_proj) is expert_class
    trainable = {k for k, _ in tree_flatten(stack.trainable_parameters())}
    assert trainable == {f"model.layers.0.{p}.lora_{ab}" for p in ("o_proj", "mlp.down_proj") for ab in "ab"}
    x = mx.random.normal((40, 64), key=mx.random.key(2))
    grads = dict(tree_flatten(nn.value_and_grad(stack, lambda x: stack.layers[0](x).square().sum())(x)[1]))
    assert grads.keys() == trainable and float(mx.abs(grads["model.layers.0.o_proj.lora_b"]).max()) > 0
    with pytest.raises(AdapterError, match="gate_up_proj"):
        enable_lora(Stack(), target_names=("gate_up_proj",))  # the experts take no adapters


# --- dtypes and bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tokens", [3, 40])  # 6 pairs < 8 experts: the used experts are cast; 80: the whole bank
def test_bfloat16_runs_in_float32_on_the_cpu_and_stays_bfloat16(quantized, path, tokens, monkeypatch):
    force_path(monkeypatch, path)
    """MLX 0.32's CPU GatherMM refuses bf16: the products run in float32, rounded to bf16 once each."""
    stack = Stack(experts=8, hidden=64, width=32)
    if quantized:
        quantize_model(stack, {}, bits=8, group_size=32)
    stack.set_dtype(mx.bfloat16)
    x, indices, _ = routed(stack, tokens)
    x = x.astype(mx.bfloat16)
    weights, indices = stack.layers[0].router(x)
    assert weights.dtype == mx.float32  # routing weights stay float32, as transformers keeps them
    out = stack.layers[0].experts(x, indices, weights)
    assert out.dtype == mx.bfloat16
    stack.set_dtype(mx.float32)  # the same bf16-rounded values, computed in float32 throughout
    expected = stack.layers[0].experts(x.astype(mx.float32), indices, weights)
    assert rel_err(out.astype(mx.float32), expected) < 2e-2


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="top_k_experts"):
        Router(32, 4, 5, EPS)
    with pytest.raises(ConfigError, match="num_experts"):
        Router(32, 0, 1, EPS)
    with pytest.raises(ConfigError, match="moe_intermediate_size"):
        Experts(4, 32, 0, "gelu_pytorch_tanh")
    with pytest.raises(ConfigError, match="hidden_activation"):
        Experts(4, 32, 16, "relu")


def test_bad_shapes_are_typed_errors():
    stack = Stack()
    router, experts = stack.layers[0].router, stack.layers[0].experts
    x, indices, weights = routed(stack, 5)
    with pytest.raises(MlxGemmaError, match="router's input"):
        router(x[None])
    with pytest.raises(MlxGemmaError, match="experts' input"):
        experts(x[:, :16], indices, weights)
    with pytest.raises(MlxGemmaError, match="expert indices"):
        experts(x, indices[:4], weights)
    with pytest.raises(MlxGemmaError, match="expert weights"):
        experts(x, indices, weights[:, :1])


def test_bad_expert_tensors_are_weights_errors():
    stack = Stack()
    weights = to_mlx_lm_layout(dict(tree_flatten(stack.parameters())))
    missing = {k: v for k, v in weights.items() if "up_proj" not in k}
    with pytest.raises(WeightsMismatchError, match="up_proj.weight is missing"):
        sanitize_experts(missing)
    weights[f"model.layers.0{MLX_LM_EXPERTS}up_proj.weight"] = mx.zeros((4, 8, 32))
    with pytest.raises(WeightsMismatchError, match="differ"):
        sanitize_experts(weights)
    hf = {k.removesuffix(".weight") if ".experts." in k else k: v for k, v in tree_flatten(stack.parameters())}
    hf["model.layers.0.experts.down_proj"] = mx.zeros((4, 16, 32))  # transposed
    with pytest.raises(WeightsMismatchError, match="experts.down_proj.weight"):
        check_weights(stack, sanitize_experts(hf), "model.safetensors")
