"""Fast matrix products on MLX's CPU backend: spread over the cores, quantized ones in float32 or in blocks.

MLX's CPU backend computes one matrix product on one thread when the
weights are bf16, fp16 or (in the Linux wheels) float32: its reference
kernel, `simd_gemm` (mlx/backend/cpu/gemms/simd_gemm.h), and the quantized
kernels likewise.  Every MLX stream has a thread of its own, so a product
whose weight is cut by output rows into one slice per stream runs on that
many cores at once.  The slices give bit-for-bit the whole product's values:
each output element sums the same products in the same order.

MLX's CPU quantized product takes one token at a time and, for bf16 on
x86, computes in bf16 element by element.  So a quantized layer here runs
MLX's kernel in float32 for a few tokens (decoding), and for more (prefill,
training) dequantizes its weight 256 KiB at a time and multiplies each block
with the float kernel (see `_quantized_product`): several times faster for
every batch and prompt, and summed in float32, for a few short-lived blocks.

`prepare_for_device(model)`, the step every model passes when the default device is the
CPU (Linux without a GPU, or a Mac user who asks for the CPU), replaces each `nn.Linear`,
`nn.QuantizedLinear` and the tied output head by a layer of a subclass that slices its
weight, and the gated MLP (`GeGLU`) by one that slices gate and up together.  Parameters,
names and saved files are unchanged.  On a GPU one product already fills the device, so
nothing changes there, and a spread layer that finds itself on a GPU stream runs as a
plain one.  `MLX_GEMMA_CPU_THREADS` sets how many cores to use (default: the cores this
process may run on, at most 8; 1 runs float products whole); `MLX_GEMMA_CPU_FAST_PATH=0`
turns the whole step off.  benchmarks/RESULTS.md has the measured effect.
"""

from __future__ import annotations

import functools
import os
import threading

import mlx.core as mx
import mlx.nn as nn

from .errors import MlxGemmaError
from .models.layers import GeGLU, gated

# Fewer output rows than this per slice and the streams' hand-off costs more than the slice saves.
MIN_ROWS_PER_SLICE = 128
# A dequantized weight block holds at most this many bytes.  About nine blocks of a product
# are alive at once (see _on_streams); smaller blocks cost more in per-operation overhead
# (benchmarks/RESULTS.md, "Measurements behind the defaults", for this and the next two).
DEQUANTIZED_BLOCK_BYTES = 256 * 1024
# Up to this many rows of x (tokens times batch) go through MLX's quantized kernel in float32.
# It unpacks the whole weight again for each row, so its time grows by a full pass per row;
# dequantizing once and multiplying blocks in bf16 costs a fixed pass (the dequantization,
# about what the kernel spends on 4-5 rows) plus about half the kernel's time per row, so the
# two meet near 8 rows.  Past it the time still grows with the rows: MLX's float products on
# x86 are scalar loops too (benchmarks/bench_quantized_head.py measures both paths).
KERNEL_MAX_ROWS = 8
# The float32 scales and biases cast for one block of the kernel path hold at most this many
# bytes: larger blocks gain little time for much more memory.
FLOAT_SCALES_BLOCK_BYTES = 64 * 1024
MAX_THREADS = 8
THREADS_ENV = "MLX_GEMMA_CPU_THREADS"


def cpu_threads() -> int:
    """How many cores a product is spread over (MLX_GEMMA_CPU_THREADS, else the usable cores, at most 8)."""
    value = os.environ.get(THREADS_ENV)
    if value:
        if not value.isdigit() or int(value) < 1:
            raise MlxGemmaError(f"{THREADS_ENV} must be a positive whole number, got {value!r}")
        return int(value)
    return min(_usable_cores(), MAX_THREADS)


@functools.cache
def _usable_cores() -> int:  # asked once: cpu_threads() runs at every product
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_thread_streams = threading.local()  # MLX 0.32 streams belong to the thread that made them


def _helper_streams(n: int) -> tuple[mx.Stream, ...]:
    """n CPU streams (threads) besides the caller's, made once per calling thread."""
    made = _thread_streams.__dict__.setdefault("by_count", {})
    if n not in made:
        made[n] = tuple(mx.new_stream(mx.cpu) for _ in range(n))
    return made[n]


def spread(product, rows: int, *sliced: mx.array) -> mx.array:
    """product(*slices) over row ranges of the `sliced` arrays, one range per stream, joined on the last axis.

    Public for products outside a layer (training's head-gradient blocks, tuner/losses.py)."""
    parts = min(cpu_threads(), rows // MIN_ROWS_PER_SLICE)
    if parts < 2 or mx.default_device() != mx.cpu:
        return product(*sliced)
    bounds = [rows * i // parts for i in range(parts + 1)]
    slices = [lambda _, a=a, b=b: product(*(s[a:b] for s in sliced)) for a, b in zip(bounds, bounds[1:])]
    return mx.concatenate(_on_streams(slices), axis=-1)


def streams(count: int) -> tuple[mx.Stream, ...]:
    """The streams `_on_streams` takes turns on for `count` blocks of work (the caller's, then
    helpers; at most `cpu_threads()`), for callers that schedule blocks of their own (the
    trainable output head's gradient, tuner/losses.py).  The default stream alone off the CPU."""
    if mx.default_device() != mx.cpu:
        return (mx.default_stream(mx.default_device()),)
    parts = max(1, min(cpu_threads(), count))
    return (mx.default_stream(mx.cpu),) + _helper_streams(parts - 1)


def _quantized_product(layer, x: mx.array) -> mx.array:
    """x @ W.T for a quantized layer, in blocks of W's rows that alternate over the streams.

    MLX's CPU quantized kernel (`_qmm_t` in mlx/backend/cpu/quantized.cpp)
    takes the rows of x one at a time, and it is fast only in float32: for bf16
    it computes in bf16, element by element, since its SIMD path needs a SIMD
    width for the dtype, which x86 lacks (about 8x slower than float32 there).
    So, on the CPU:
    - up to KERNEL_MAX_ROWS rows of x (decoding): MLX's kernel in float32, each
      block of W with its scales and biases cast to float32;
    - more rows (a prefill, training, a batch of decoding rows): W dequantized
      block by block, each block through the float product (about 20x faster
      than the bf16 kernel).
    Both sum in float32: the float32 kernel is as exact as the quantized
    weight allows, and the dequantized path gives exactly x @ W'.T, W' the
    weight rounded once to x's dtype (mx.dequantize's for modes and widths
    `_affine_dequantizer` does not take).  The gradient dequantizes again, in
    float32, rather than keep every block of the forward pass alive (QLoRA
    memory).
    """
    blocks = _QuantizedBlocks(layer)

    @mx.custom_function
    def product(x):
        if layer.mode == "affine" and x.size // blocks.in_features <= KERNEL_MAX_ROWS:
            return blocks.through_kernel(x)
        return blocks.through_float_product(x)

    @product.vjp
    def product_vjp(primals, cotangent, output):
        return blocks.input_gradient(cotangent).astype(primals[0].dtype)

    return product(x)


class _QuantizedBlocks:
    """A quantized layer's weight cut into blocks of rows, and the three block-wise products
    `_quantized_product` chooses from."""

    def __init__(self, layer):
        self.layer = layer
        weight, scales = layer["weight"], layer["scales"]
        biases = layer["biases"] if "biases" in layer else None
        self.params = [weight, scales] + ([] if biases is None else [biases])
        self.rows, self.groups = scales.shape
        self.in_features = weight.shape[1] * 32 // layer.bits

    def ranges(self, block: int) -> list[tuple[int, int]]:
        """[start, stop) row ranges of at most `block` rows."""
        return [(start, min(start + block, self.rows)) for start in range(0, self.rows, block)]

    def block_of(self, after, start: int, stop: int) -> list[mx.array]:
        """Rows start:stop of the weight, scales (and biases)."""
        # Waiting for `after` keeps a block from being made long before it is used: see _on_streams.
        return [p[start:stop] for p in mx.depends(self.params, after)]

    def dequantized(self, after, start: int, stop: int, dtype: mx.Dtype) -> mx.array:
        """Rows start:stop of the weight, dequantized to `dtype`."""
        layer = self.layer
        weight, scales, *biases = self.block_of(after, start, stop)
        if layer.mode == "affine" and 32 % layer.bits == 0:
            return _affine_dequantizer(layer.group_size, layer.bits, dtype)(weight, scales, biases[0])
        return mx.dequantize(weight, scales, biases[0] if biases else None,
                             group_size=layer.group_size, bits=layer.bits, mode=layer.mode, dtype=dtype)

    def through_kernel(self, x: mx.array) -> mx.array:
        """x @ W.T by MLX's quantized kernel in float32, block by block (few rows of x: decoding)."""
        layer = self.layer
        x32 = x.astype(mx.float32)

        def block_product(after, start, stop):
            weight, scales, biases = self.block_of(after, start, stop)
            return mx.quantized_matmul(x32, weight, scales.astype(mx.float32), biases.astype(mx.float32),
                                       transpose=True, group_size=layer.group_size, bits=layer.bits,
                                       mode="affine").astype(x.dtype)

        # Rows per block: each row has a float32 scale and bias per group.
        block = max(1, FLOAT_SCALES_BLOCK_BYTES // (self.groups * 2 * 4))
        blocks = [lambda after, a=a, b=b: block_product(after, a, b) for a, b in self.ranges(block)]
        return mx.concatenate(_on_streams(blocks, first=x32), axis=-1)

    def through_float_product(self, x: mx.array) -> mx.array:
        """x @ W.T with W dequantized block by block to x's dtype (many rows of x: a prefill, training)."""
        block = max(1, DEQUANTIZED_BLOCK_BYTES // (self.in_features * x.dtype.size))
        blocks = [lambda after, a=a, b=b: x @ self.dequantized(after, a, b, x.dtype).T for a, b in self.ranges(block)]
        return mx.concatenate(_on_streams(blocks, first=x), axis=-1)

    def input_gradient(self, cotangent: mx.array) -> mx.array:
        """The gradient with respect to x: the sum over blocks of cotangent[..., block] @ W[block], in float32."""
        g = cotangent.astype(mx.float32)
        block = max(1, DEQUANTIZED_BLOCK_BYTES // (self.in_features * 4))
        blocks = [lambda after, a=a, b=b: g[..., a:b] @ self.dequantized(after, a, b, mx.float32)
                  for a, b in self.ranges(block)]
        return functools.reduce(mx.add, _on_streams(blocks, first=g, fold=mx.add))


@functools.cache
def _affine_dequantizer(group_size: int, bits: int, dtype: mx.Dtype):
    """Affine 2-, 4- and 8-bit weights dequantized as one fused kernel: scale * q + bias
    computed in float32 and rounded to `dtype` once.

    On the CPU `mx.dequantize` is spelled out in whole-array steps (one shifted
    uint32 copy per packed value, their join, then the scale: `affine_dequantize`
    in mlx/ops.cpp), about ten bytes of temporaries per weight; compiled, the
    unpacking, scale and offset run as one elementwise kernel writing only the
    result.  Values sit in each uint32 from the low bits up, as MLX packs them.
    In float32 rather than in bf16/fp16: x86 has no bf16 arithmetic, so each
    bf16 step converts and rounds in software, and the kernel took twice as long
    (a fixed cost of every product past KERNEL_MAX_ROWS).  One rounding of
    the exact value also matches the float32 kernel's weights more closely than
    mx.dequantize's rounding after the scale and again after the offset.
    """
    per_word = 32 // bits
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    mask = mx.array((1 << bits) - 1, dtype=mx.uint32)

    @mx.compile
    def dequantize(w, scales, biases):  # w: [n, K / per_word]; scales, biases: [n, K / group_size]
        n, groups = scales.shape
        w = w.reshape(n, groups, group_size // per_word, 1)
        q = ((w >> shifts) & mask).astype(mx.float32)  # [n, groups, words per group, per_word]
        out = q * scales[..., None, None].astype(mx.float32) + biases[..., None, None].astype(mx.float32)
        return out.astype(dtype).reshape(n, groups * group_size)

    return dequantize


def _on_streams(blocks, first=None, fold=None) -> list[mx.array]:
    """Each of `blocks` on the caller's stream and the helper streams in turn.

    In turn, not in runs: MLX dispatches a graph in the order it was built, so
    runs would keep one stream busy while the others wait.  Each block is a
    function of one array, which is what it should wait for: `first` for a
    stream's first block, then the stream's previous result.  Blocks that
    depend on nothing else (a dequantized weight) would otherwise be made as
    early as MLX's breadth-first ordering likes (`eval_impl` in
    mlx/transforms.cpp builds its tape 20 arrays wide): twenty blocks per
    product, and whole layers ahead of their use.  One decoding step through
    Gemma 3 270M's 4-bit body, dequantized on 2 cores, peaked 10.8 MB above
    the weights that way (48.8 MB with 64 KiB blocks), and 6.3 MB in order
    (5.2 MB with 128 KiB).  With `fold`, each stream folds its own results
    together and one array per stream comes back.
    """
    parts = min(cpu_threads(), len(blocks))
    streams = (mx.default_stream(mx.cpu),) + _helper_streams(parts - 1)
    results, previous = [], [first] * parts
    for i, make in enumerate(blocks):
        with mx.stream(streams[i % parts]):
            value = make(previous[i % parts])
            if fold is None or i < parts:
                results.append(value)
            else:
                results[i % parts] = fold(results[i % parts], value)
        previous[i % parts] = value
    return results


class SpreadGeGLU(GeGLU):
    """The MLP with act(gate) * up made slice by slice on the streams and joined once.

    Spreading gate and up as two products would join each (its slices and the
    whole copy alive at once) before the elementwise product, raising the MLP's
    peak well above mlx-lm's (figures in benchmarks/RESULTS.md).  Each slice sums
    and rounds as the whole product would, so the values are the same.
    """

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = self.gate_proj, self.up_proj
        if not (type(gate) is type(up) is SpreadLinear and "bias" not in gate and "bias" not in up):
            return super().__call__(x)  # quantized or LoRA-wrapped: each layer spreads itself
        hidden = spread(lambda g, u: gated(self.act)(x @ g.T, x @ u.T), gate.weight.shape[0], gate.weight, up.weight)
        return self.down_proj(hidden)


class SpreadLinear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self:  # fused as nn.Linear fuses it (one rounding)
            return spread(lambda w, b: mx.addmm(b, x, w.T), self.weight.shape[0], self.weight, self.bias)
        return spread(lambda w: x @ w.T, self.weight.shape[0], self.weight)


class SpreadQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device() != mx.cpu:
            return super().__call__(x)
        y = _quantized_product(self, x)
        return y + self["bias"] if "bias" in self else y


class SpreadEmbedding(nn.Embedding):
    def as_linear(self, x: mx.array) -> mx.array:  # the tied output head: Gemma's largest product
        return spread(lambda w: x @ w.T, self.weight.shape[0], self.weight)


class SpreadQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        if mx.default_device() != mx.cpu:
            return super().as_linear(x)
        return _quantized_product(self, x)


_SPREAD = {GeGLU: SpreadGeGLU, nn.Linear: SpreadLinear, nn.QuantizedLinear: SpreadQuantizedLinear,
           nn.Embedding: SpreadEmbedding, nn.QuantizedEmbedding: SpreadQuantizedEmbedding}
FAST_PATH_ENV = "MLX_GEMMA_CPU_FAST_PATH"  # "0" turns the CPU fast path off


def fast_path_enabled() -> bool:
    """Whether `prepare_for_device` spreads products on the CPU (MLX_GEMMA_CPU_FAST_PATH, default on)."""
    value = os.environ.get(FAST_PATH_ENV, "1")
    if value not in ("0", "1"):
        raise MlxGemmaError(f"{FAST_PATH_ENV} must be 0 (off) or 1 (on), got {value!r}")
    return value == "1"


def _spread_copy(module: nn.Module) -> nn.Module:
    """A new layer of the spread class holding the same parameters; `module` itself is untouched."""
    cls = _SPREAD[type(module)]
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    dict.update(new, module)
    return new


def _replace_children(parent) -> None:
    items = enumerate(parent) if isinstance(parent, list) else list(parent.items())
    for key, child in items:
        if type(child) in _SPREAD:
            child = _spread_copy(child)
            parent[key] = child
        if isinstance(child, (nn.Module, list, dict)):
            _replace_children(child)


def prepare_for_device(model: nn.Module, enabled: bool | None = None) -> nn.Module:
    """The one step every model passes before it runs (load, a keras backbone, fuse, after
    quantizing): on the CPU, its plain linear layers, embeddings and gated MLPs are replaced by
    their spread versions; elsewhere, or with the fast path off, nothing changes.

    The replacements are new layer objects holding the same parameters (names, saved files,
    numerics and gradients unchanged); a reference kept to an old layer still sees the old
    one.  Layers of other classes (LoRA wrappers) keep theirs and call the spread layer
    they wrap.  Idempotent; returns `model` (a new object only when `model` is itself one such
    layer).  `enabled=None` follows MLX_GEMMA_CPU_FAST_PATH.
    """
    if mx.default_device() != mx.cpu or not (fast_path_enabled() if enabled is None else enabled):
        return model
    if type(model) in _SPREAD:
        model = _spread_copy(model)
    _replace_children(model)
    return model
