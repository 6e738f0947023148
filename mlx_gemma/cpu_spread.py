"""Spreading each large matrix product over the CPU's cores.

MLX's CPU backend computes one matrix product on one thread when the
weights are bf16, fp16 or (in the Linux wheels) float32: its reference
kernel, `simd_gemm` (mlx/backend/cpu/gemms/simd_gemm.h), and the quantized
kernels likewise.  Every MLX stream has a thread of its own, so a product
whose weight is cut by output rows into one slice per stream runs on that
many cores at once.  The slices give bit-for-bit the whole product's values:
each output element sums the same products in the same order.

`load` applies this to a model when the default device is the CPU (Linux
without a GPU, or a Mac user who asks for the CPU): each `nn.Linear`,
`nn.QuantizedLinear` and the tied output head switch to a subclass that
slices its weight.  Parameters, names and saved files are unchanged.  On a
GPU one product already fills the device, so nothing changes there, and a
spread layer that finds itself on a GPU stream runs as a plain one.

Measured on a 2-core x86 CPU, Gemma 3 270M bf16: one decoding step 271 ->
150 ms, a 129-token prefill 5.2 -> 3.0 s (benchmarks/RESULTS.md has the
side-by-side figures).  `MLX_GEMMA_CPU_THREADS` sets how many cores to use
(default: the cores this process may run on, at most 8; 1 turns it off).
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx
import mlx.nn as nn

from .errors import MlxGemmaError

# Fewer output rows than this per slice and the streams' hand-off costs more than the slice saves.
MIN_ROWS_PER_SLICE = 128
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


@functools.cache
def _helper_streams(n: int) -> tuple[mx.Stream, ...]:
    """n CPU streams (threads) besides the caller's, made once per process."""
    return tuple(mx.new_stream(mx.cpu) for _ in range(n))


def _spread(product, rows: int, *sliced: mx.array) -> mx.array:
    """product(*slices) over row ranges of the `sliced` arrays, one range per stream, joined on the last axis.

    The first range runs on the caller's stream, the others on helper streams.
    """
    parts = min(cpu_threads(), rows // MIN_ROWS_PER_SLICE)
    if parts < 2 or mx.default_device() != mx.cpu:
        return product(*sliced)
    bounds = [rows * i // parts for i in range(parts + 1)]
    outputs = [product(*(a[: bounds[1]] for a in sliced))]
    for stream, start, stop in zip(_helper_streams(parts - 1), bounds[1:], bounds[2:]):
        with mx.stream(stream):
            outputs.append(product(*(a[start:stop] for a in sliced)))
    return mx.concatenate(outputs, axis=-1)


def _quantized_product(layer, x: mx.array):
    def product(weight, scales, *biases):
        return mx.quantized_matmul(x, weight, scales=scales, biases=biases[0] if biases else None, transpose=True,
                                   group_size=layer.group_size, bits=layer.bits, mode=layer.mode)

    arrays = [layer["weight"], layer["scales"]] + ([layer["biases"]] if "biases" in layer else [])
    return _spread(product, layer["weight"].shape[0], *arrays)


class SpreadLinear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self:  # fused as nn.Linear fuses it (one rounding)
            return _spread(lambda w, b: mx.addmm(b, x, w.T), self.weight.shape[0], self.weight, self.bias)
        return _spread(lambda w: x @ w.T, self.weight.shape[0], self.weight)


class SpreadQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        y = _quantized_product(self, x)
        return y + self["bias"] if "bias" in self else y


class SpreadEmbedding(nn.Embedding):
    def as_linear(self, x: mx.array) -> mx.array:  # the tied output head: Gemma's largest product
        return _spread(lambda w: x @ w.T, self.weight.shape[0], self.weight)


class SpreadQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return _quantized_product(self, x)


_SPREAD = {nn.Linear: SpreadLinear, nn.QuantizedLinear: SpreadQuantizedLinear,
           nn.Embedding: SpreadEmbedding, nn.QuantizedEmbedding: SpreadQuantizedEmbedding}


def spread_matmuls(model: nn.Module) -> nn.Module:
    """Switch the model's plain linear layers and embeddings to their spreading subclasses (in place).

    Only layers of exactly the base classes change (LoRA wrappers keep theirs
    and call the spread layer inside); a no-op off the CPU or with one core.
    """
    if mx.default_device() != mx.cpu or cpu_threads() < 2:
        return model
    for _, module in model.named_modules():
        spread = _SPREAD.get(type(module))
        if spread is not None:
            module.__class__ = spread
    return model
