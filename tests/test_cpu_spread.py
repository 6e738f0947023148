"""Products spread over CPU streams give the whole product's values, bit for bit, and its gradients."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_gemma import cpu_spread, lora
from mlx_gemma.loading import load_model
from mlx_gemma.models.layers import GeGLU

from conftest import FIXTURES

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="spreading applies to the CPU only")


@pytest.fixture(autouse=True)
def four_threads(monkeypatch):
    monkeypatch.setenv(cpu_spread.THREADS_ENV, "4")


spread_copy = cpu_spread._spread_copy  # the same layer (same parameter arrays) as its spreading subclass


def equal(a: mx.array, b: mx.array) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(mx.array_equal(a, b).item())


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("rows", [512, 515, 100])  # 4 slices, uneven slices, too few rows to spread
@pytest.mark.parametrize("bias", [False, True])
def test_linear_and_tied_head(dtype, rows, bias):
    mx.random.seed(0)
    layer = nn.Linear(96, rows, bias=bias)
    layer.set_dtype(dtype)
    x = mx.random.normal((2, 3, 96)).astype(dtype)
    assert equal(spread_copy(layer)(x), layer(x))
    embedding = nn.Embedding(rows, 96)
    embedding.set_dtype(dtype)
    assert equal(spread_copy(embedding).as_linear(x), embedding.as_linear(x))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("rows", [515, 100])  # uneven slices; too few rows to spread
def test_gated_mlp(dtype, rows):
    """Gate and up made slice by slice and joined once: the plain MLP's values and gradients."""
    mx.random.seed(4)
    mlp = GeGLU(48, rows, "gelu_pytorch_tanh")
    mlp.set_dtype(dtype)
    x = (mx.random.normal((2, 5, 48)) * 2).astype(dtype)

    def loss(params, x, module):
        module.update(params)
        return (module(x).astype(mx.float32) ** 2).sum()

    params = mlp.trainable_parameters()
    plain, plain_grads = mlp(x), mx.grad(loss, argnums=(0, 1))(params, x, mlp)
    mlp = cpu_spread.prepare_for_device(mlp)
    assert type(mlp) is cpu_spread.SpreadGeGLU and type(mlp.gate_proj) is cpu_spread.SpreadLinear
    assert equal(mlp(x), plain)
    grads = mx.grad(loss, argnums=(0, 1))(params, x, mlp)
    for (name, got), (_, want) in zip(tree_flatten(grads[0]), tree_flatten(plain_grads[0])):
        assert equal(got, want), name  # each weight slice's gradient sums as the whole one
    # The input's gradient adds a partial product per slice: a reordered sum.
    np.testing.assert_allclose(np.array(grads[1].astype(mx.float32)), np.array(plain_grads[1].astype(mx.float32)),
                               atol=1e-2 if dtype == mx.bfloat16 else 1e-5, rtol=1e-2 if dtype == mx.bfloat16 else 1e-5)
    mlp.gate_proj = lora.LoRALinear(mlp.gate_proj, rank=2)  # a wrapped gate (B = 0): each layer spreads itself
    assert equal(mlp(x), plain)


def dequantized_weight(layer, dtype) -> mx.array:
    """The layer's weight dequantized whole by mx.dequantize, as the blocks dequantize it in `dtype`.

    Affine 2-, 4- and 8-bit weights: computed in float32 and rounded to `dtype` once (affine scales
    and biases cast first: `mx.dequantize(..., dtype=float32)` with bf16 ones computes in bf16 and
    rounds every weight).  Other modes and widths: mx.dequantize in `dtype` itself.
    """
    scales, biases = layer["scales"], layer.get("biases")
    if layer.mode == "affine" and 32 % layer.bits == 0:
        scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
        return mx.dequantize(layer["weight"], scales, biases, group_size=layer.group_size, bits=layer.bits,
                             mode=layer.mode, dtype=mx.float32).astype(dtype)
    if dtype == mx.float32 and layer.mode == "affine":
        scales, biases = scales.astype(dtype), biases.astype(dtype)
    return mx.dequantize(layer["weight"], scales, biases, group_size=layer.group_size, bits=layer.bits, mode=layer.mode,
                         dtype=dtype)


def dequantized_product(layer, x: mx.array, dtype) -> mx.array:
    """x @ W.T with the layer's weight dequantized whole in `dtype`: what the blocks must add up to."""
    return x.astype(dtype) @ dequantized_weight(layer, dtype).T


def unspread_product(layer, x: mx.array) -> mx.array:
    """MLX's own quantized product in float32 (affine scales and biases cast): the reference."""
    scales, biases = layer["scales"].astype(mx.float32), layer["biases"].astype(mx.float32)
    return mx.quantized_matmul(x.astype(mx.float32), layer["weight"], scales, biases, transpose=True,
                               group_size=layer.group_size, bits=layer.bits)


@pytest.fixture
def small_blocks(monkeypatch):  # 7 rows of 128 inputs per block: 74 blocks of a 515-row weight, the last short
    monkeypatch.setattr(cpu_spread, "DEQUANTIZED_BLOCK_BYTES", 7 * 128 * 2)  # bf16 dequantized rows
    monkeypatch.setattr(cpu_spread, "FLOAT_SCALES_BLOCK_BYTES", 7 * 2 * 2 * 4)  # float32 scales and biases, 2 groups


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])  # 2/4/8: the compiled unpacking; 3/6: mx.dequantize
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("tokens", [1, 5, 12])  # up to KERNEL_MAX_ROWS, the float32 kernel; beyond, dequantized
def test_quantized_linear_and_head(bits, dtype, tokens, small_blocks):
    mx.random.seed(1)
    layer = nn.QuantizedLinear(128, 515, bias=True, group_size=64, bits=bits)
    layer.set_dtype(dtype)
    embedding = nn.QuantizedEmbedding(515, 128, group_size=64, bits=bits)
    embedding.set_dtype(dtype)
    x = mx.random.normal((tokens, 128)).astype(dtype)
    got_linear, got_head = spread_copy(layer)(x), spread_copy(embedding).as_linear(x)
    if tokens > cpu_spread.KERNEL_MAX_ROWS:  # exactly the product of the weight dequantized in x's dtype
        assert equal(got_linear, dequantized_product(layer, x, dtype) + layer.bias)
        assert equal(got_head, dequantized_product(embedding, x, dtype))
        # Against MLX's unspread product: each weight rounded once to x's dtype, and the output,
        # so within two roundings of the sum of |x| |w| (float32: the sum's order alone).
        step = 2.0 ** -8 if dtype == mx.bfloat16 else 2.0 ** -20
        for got, quantized in [(got_head, embedding), (got_linear, layer)]:
            want = unspread_product(quantized, x) + (quantized.bias if "bias" in quantized else 0)
            magnitude = mx.abs(x.astype(mx.float32)) @ mx.abs(dequantized_weight(quantized, mx.float32)).T
            assert mx.all(mx.abs(got.astype(mx.float32) - want) <= 2 * step * magnitude + step * mx.abs(want)).item()
        return
    # MLX's kernel in float32: as exact as the quantized weight allows, within one rounding
    # of the output dtype (two with the bias added after).
    step = 2.0 ** -8 if dtype == mx.bfloat16 else 2.0 ** -23
    for got, exact, roundings in [(got_head, dequantized_product(embedding, x, mx.float32), 1),
                                  (got_linear, dequantized_product(layer, x, mx.float32) + layer.bias, 2)]:
        assert got.dtype == dtype and got.shape == exact.shape
        error = mx.abs(got.astype(mx.float32) - exact).max().item()
        assert error <= roundings * step * mx.abs(exact).max().item()


def test_quantized_other_modes(small_blocks):  # dequantized blocks for any number of rows
    mx.random.seed(4)
    layer = nn.QuantizedLinear(128, 300, bias=False, group_size=32, bits=4, mode="mxfp4")
    x = mx.random.normal((3, 128)).astype(mx.bfloat16)
    assert equal(spread_copy(layer)(x), dequantized_product(layer, x, mx.bfloat16))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("tokens", [3, 6])  # 6 and 12 rows: the float32 kernel, dequantized blocks
def test_quantized_gradient_and_compile(dtype, tokens, small_blocks):
    mx.random.seed(3)
    layer = nn.QuantizedLinear(128, 515, bias=False, group_size=64, bits=4)
    layer.set_dtype(dtype)
    twin = spread_copy(layer)
    x = mx.random.normal((2, tokens, 128)).astype(dtype)
    cotangent = mx.random.normal((2, tokens, 515)).astype(dtype)
    _, (g_blocks,) = mx.vjp(twin, [x], [cotangent])
    _, (g_whole,) = mx.vjp(lambda x: dequantized_product(layer, x, mx.float32), [x.astype(mx.float32)],
                           [cotangent.astype(mx.float32)])
    assert g_blocks.dtype == dtype
    tolerance = (2.0 ** -8 if dtype == mx.bfloat16 else 1e-6) * mx.abs(g_whole).max().item()
    np.testing.assert_allclose(np.array(g_blocks.astype(mx.float32)), np.array(g_whole), atol=tolerance)
    assert equal(mx.compile(twin)(x), twin(x))
    _, (g_compiled,) = mx.compile(lambda x, c: mx.vjp(twin, [x], [c]))(x, cotangent)
    np.testing.assert_allclose(np.array(g_compiled.astype(mx.float32)), np.array(g_blocks.astype(mx.float32)), atol=tolerance)


def test_quantized_blocks_are_made_as_they_are_used(monkeypatch):
    # 64 blocks of 64 KiB.  Made in MLX's breadth-first order, 20-28 of them were
    # alive at once (the tape is 20 arrays wide); each stream's block waiting for its
    # previous product keeps about nine.
    block_bytes = 64 * 1024
    monkeypatch.setattr(cpu_spread, "DEQUANTIZED_BLOCK_BYTES", block_bytes)
    layer = nn.QuantizedLinear(512, 4096, bias=False, group_size=64, bits=4)
    layer.set_dtype(mx.bfloat16)
    twin, x = spread_copy(layer), mx.random.normal((16, 512)).astype(mx.bfloat16)  # dequantized blocks
    mx.eval(layer.parameters(), x)
    peaks = []
    for _ in range(2):  # the first run also compiles the dequantizer
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(twin(x))
        mx.synchronize()
        peaks.append(mx.get_peak_memory() - before)
    assert peaks[-1] < 16 * block_bytes


def test_gradients_and_compile():
    mx.random.seed(2)
    layer = nn.Linear(64, 384)
    twin = spread_copy(layer)
    x = mx.random.normal((4, 64))

    def loss(weight, x, module):
        module.weight = weight
        return (module(x) ** 2).sum()

    g_plain = mx.grad(loss, argnums=(0, 1))(layer.weight, x, layer)
    g_spread = mx.grad(loss, argnums=(0, 1))(twin.weight, x, twin)
    assert equal(g_spread[0], g_plain[0])  # the weight's gradient: slice by slice, the same sums
    # The input's gradient adds one partial product per slice: float32 rounding of a reordered sum.
    np.testing.assert_allclose(np.array(g_spread[1]), np.array(g_plain[1]), atol=1e-6 * np.abs(np.array(g_plain[1])).max())
    compiled = mx.compile(lambda x: twin(x))
    assert equal(compiled(x), layer(x))


def test_loaded_model_is_spread_and_unchanged(monkeypatch):  # one thread: the plain products
    spread = load_model(FIXTURES / "tiny_gemma3", dtype=mx.bfloat16)
    monkeypatch.setenv(cpu_spread.THREADS_ENV, "1")
    plain = load_model(FIXTURES / "tiny_gemma3", dtype=mx.bfloat16)
    assert isinstance(spread.model.layers[0].mlp.up_proj, cpu_spread.SpreadLinear)
    assert isinstance(spread.model.embed_tokens, cpu_spread.SpreadEmbedding)
    assert tree_flatten(spread.parameters()) and all(
        equal(a, b) for (_, a), (_, b) in zip(tree_flatten(spread.parameters()), tree_flatten(plain.parameters())))
    ids = mx.array([[2, 17, 300, 5, 99, 7]])
    assert equal(spread(ids), plain(ids))
    # LoRA wraps the spread layer; the wrapper keeps its own class.
    lora.enable_lora(spread, rank=2)
    q = spread.model.layers[0].self_attn.q_proj
    assert isinstance(q, lora.LoRALinear) and isinstance(q.linear, cpu_spread.SpreadLinear)


def test_prepare_for_device_replaces_layers_without_touching_the_old_ones(monkeypatch):
    model = load_model(FIXTURES / "tiny_gemma3")
    old = model.model.layers[0].mlp
    assert type(old) is cpu_spread.SpreadGeGLU  # load prepared it
    assert cpu_spread.prepare_for_device(model) is model and model.model.layers[0].mlp is old  # idempotent
    monkeypatch.setenv(cpu_spread.FAST_PATH_ENV, "0")
    plain = load_model(FIXTURES / "tiny_gemma3")
    assert type(plain.model.layers[0].mlp.up_proj) is nn.Linear and type(plain.model.embed_tokens) is nn.Embedding
    monkeypatch.setenv(cpu_spread.FAST_PATH_ENV, "1")
    kept = plain.model.layers[0].mlp  # a reference held by a caller
    cpu_spread.prepare_for_device(plain)
    assert type(kept) is GeGLU and type(kept.up_proj) is nn.Linear  # the caller's object is unchanged
    assert type(plain.model.layers[0].mlp) is cpu_spread.SpreadGeGLU
    assert plain.model.layers[0].mlp.up_proj.weight is kept.up_proj.weight  # the same parameters
    monkeypatch.setenv(cpu_spread.FAST_PATH_ENV, "yes")
    with pytest.raises(ValueError, match="MLX_GEMMA_CPU_FAST_PATH must be 0"):
        cpu_spread.prepare_for_device(plain)


def test_thread_count_setting(monkeypatch):
    monkeypatch.setenv(cpu_spread.THREADS_ENV, "two")
    with pytest.raises(ValueError, match="MLX_GEMMA_CPU_THREADS must be a positive whole number"):
        cpu_spread.cpu_threads()
    monkeypatch.setenv(cpu_spread.THREADS_ENV, "0")
    with pytest.raises(ValueError, match="positive"):
        cpu_spread.cpu_threads()
    monkeypatch.delenv(cpu_spread.THREADS_ENV)
    assert 1 <= cpu_spread.cpu_threads() <= cpu_spread.MAX_THREADS


def test_every_way_a_model_comes_into_being_is_prepared():
    """load, a keras-style backbone with random weights, and lora.fuse all give spread layers."""
    from mlx_gemma.tasks import GemmaBackbone

    def spread(model):
        return type(model.model.layers[0].mlp) is cpu_spread.SpreadGeGLU \
            and isinstance(model.model.layers[0].self_attn.q_proj, cpu_spread.SpreadLinear)

    assert spread(load_model(FIXTURES / "tiny_gemma3"))
    backbone = GemmaBackbone(vocabulary_size=64, num_layers=1, num_query_heads=2, num_key_value_heads=1,
                             hidden_dim=32, intermediate_dim=64, head_dim=16)
    assert spread(backbone.model)
    fused = load_model(FIXTURES / "tiny_gemma3")
    lora.enable_lora(fused, rank=2)
    assert spread(lora.fuse(fused))
