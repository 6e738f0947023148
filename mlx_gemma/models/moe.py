"""Gemma 4's mixture of experts (26B-A4B): the router and the expert bank, run with MLX's gathered matmuls.

A Gemma 4 MoE decoder layer runs its dense MLP and, beside it, this sparse block
(transformers 5.25 `Gemma4TextDecoderLayer`): the `Router` reads the residual
stream *before* the MLP's norm and picks `top_k` of `num_experts` experts per
token; the `Experts` read `pre_feedforward_layernorm_2` of that same residual and
return, per token, the routing-weighted sum of its experts' gated-GELU MLPs.  The
decoder (gemma4.py) owns the norms and the sum with the dense MLP.

Weights keep transformers' names and layouts, so HF checkpoints load after one
rename (a parameter becomes a module's `.weight`, see `sanitize_experts`):

    router.proj.weight          [E, H]       an nn.Linear (quantized: 8 bits, as mlx-lm does)
    router.scale                [H]          per-dimension scale after the unscaled RMSNorm
    router.per_expert_scale     [E]          multiplies each chosen expert's weight
    experts.gate_up_proj.weight [E, 2I, H]   rows [0, I) are the gate, [I, 2I) the up projection
    experts.down_proj.weight    [E, H, I]

mlx-community folders (mlx-lm 0.32 `gemma4_text.py`) split the first into
`experts.switch_glu.gate_proj` / `up_proj` (and rename the second
`experts.switch_glu.down_proj`), quantized or not; `sanitize_experts` joins them
back.  Quantized rows are independent (groups run along the input width), so
concatenating the packed weights, scales and biases of gate and up along the rows
is exactly the quantization of the joined float tensor.

Running the experts: one `mx.gather_mm` (float) or `mx.gather_qmm` (quantized)
per projection, each (token, chosen expert) pair a row multiplied by the weight
its index selects; never a Python loop over experts.  When there are many pairs
(`SORT_MIN_PAIRS`, mlx-lm's threshold) on a GPU, the pairs are sorted by expert
first and `sorted_indices=True` is passed, as mlx-lm does: consecutive rows then
share an expert, so MLX's GPU kernels multiply each expert's run of rows as one
matrix product, reading its weights once instead of once per pair (prefill; not
measured here, where no GPU was at hand); a decode step has too few pairs for the
sort to pay.  On the CPU, MLX 0.32's
gather_mm multiplies every pair on its own, sorted or not, so there we do not sort:
measured on a 26B-A4B-shaped layer (E=128, H=2816, I=704, K=8, fp32, 8 to 1024
pairs, on a shared 2-core machine), sorting took 0.8x-1.3x the time, no steady
gain, while it copies each token's row once per pair; grouping each
expert's rows into zero-padded tiles (one product per tile) took twice as long,
as MLX's CPU float product is compute-bound there (about the same FLOP/s for 1
row as for 128), so only fewer operations help.  bf16 / fp16 products run in
float32 on the CPU (MLX 0.32's CPU GatherMM takes float32 only): with fewer
pairs than experts (decoding) only the experts in use are gathered and cast.

Quantization: each projection is an `ExpertLinear` module (`weight` [E, out, in])
with `to_quantized`, so the converter's `nn.quantize` turns it into a
`QuantizedExpertLinear` (packed `weight`, `scales`, `biases`, run by
`gather_qmm`) and `dequantize` turns it back.  The router's `proj` is an
`nn.Linear`: the converter gives it 8 bits at group size 64, as mlx-lm 0.32's
`quant_predicate` does, so folders written by either library hold the same layers.

LoRA: the experts are frozen and take no adapters (they are neither `nn.Linear`
nor `nn.QuantizedLinear`, which is all the tuner wraps); adapters go on the
attention projections and the dense MLP, and the gradient still flows through
the experts to the layers below.  An adapter naming expert projections (mlx-lm's
`switch_glu` keys) is refused by the tuner with an `AdapterError`.

Numerics follow transformers (fp32 within float rounding):
- the router's RMSNorm is computed in float32 and rounded to the activation
  dtype, then scaled by `scale` and `hidden_size ** -0.5` in that dtype; the
  softmax is over all experts in float32; the top-k probabilities are
  renormalised to sum to 1 and multiplied by `per_expert_scale`; the weights
  stay float32 (transformers' `Gemma4TextRouter`).
- keras-hub 0.32 (`gemma4_moe.py`) computes the same function but rounds the
  probabilities to the activation dtype before top-k, applies `per_expert_scale`
  to each expert's output rather than to its weight, and runs every expert on
  every token (einsum over all E); mlx-lm 0.32 takes the softmax of the top-k
  scores only, in the activation dtype.  In float32 all agree to rounding (the
  tests check keras-hub's and mlx-lm's layers within 1e-5); in bf16 we keep
  transformers' float32 softmax and weights, as the issue asks ("weights as
  transformers normalizes them"); Google's own Gemma 4 training code is not
  available here to settle it.
- Each expert's output is weighted in float32 and the K of them are summed in
  float32, rounded once to the activation dtype (transformers rounds each
  weighted expert output, then sums in the activation dtype: equal in fp32).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..errors import ConfigError, MlxGemmaError, WeightsMismatchError
from .layers import gated, gelu_for

# At least this many (token, expert) pairs and the pairs are sorted by expert (mlx-lm's switch_layers.py threshold).
SORT_MIN_PAIRS = 64
# MLX 0.32's CPU gather_mm multiplies each pair on its own, sorted or not: sorting measured no faster there.
SORT_ON_CPU = False
# mlx-lm 0.32 (gemma4_text.py `quant_predicate`) quantizes the router's projection so, whatever the rest gets.
ROUTER_QUANTIZATION = {"group_size": 64, "bits": 8}


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(None, f"{name} must be a positive integer, found {value!r:.80}")
    return value


def _expect_shape(name: str, array: mx.array, shape: tuple) -> None:
    """Refuse an input whose shape is not `shape` (None matches any size)."""
    ok = array.ndim == len(shape) and all(s is None or s == d for s, d in zip(shape, array.shape))
    if not ok:
        wanted = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise MlxGemmaError(f"{name} must have shape {wanted}, found {list(array.shape)}")


class Router(nn.Module):
    """Per token: which `top_k` experts, and with what weights (transformers' Gemma4TextRouter)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, eps: float):
        super().__init__()
        _positive("hidden_size", hidden_size)
        _positive("num_experts", num_experts)
        if _positive("top_k_experts", top_k) > num_experts:
            raise ConfigError(None, f"top_k_experts ({top_k}) must not exceed num_experts ({num_experts})")
        self.top_k = top_k
        self.eps = eps
        self.proj = nn.Linear(hidden_size, num_experts, bias=False)
        self.scale = mx.ones((hidden_size,))
        self.per_expert_scale = mx.ones((num_experts,))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:  # [N, H] -> ([N, K] float32, [N, K] uint32)
        hidden = self.scale.shape[0]
        _expect_shape("the router's input", x, (None, hidden))
        xf = x.astype(mx.float32)
        # transformers' Gemma4RMSNorm: x * pow(mean(x^2) + eps, -0.5) in float32, no weight, rounded to x's dtype.
        normed = (xf * mx.power(mx.mean(xf * xf, axis=-1, keepdims=True) + self.eps, -0.5)).astype(x.dtype)
        normed = normed * self.scale * (hidden ** -0.5)  # in x's dtype, as transformers scales it
        probs = mx.softmax(self.proj(normed).astype(mx.float32), axis=-1)  # [N, E]; float32 as transformers
        k = self.top_k
        # Indices carry no gradient (MLX refuses a VJP through them); the weights do, as in transformers.
        picked = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[:, :k])  # the k largest, any order
        top = mx.take_along_axis(probs, picked, axis=-1)
        order = mx.stop_gradient(mx.argsort(-top, axis=-1))  # largest first, as torch.topk returns them
        indices = mx.take_along_axis(picked, order, axis=-1).astype(mx.uint32)
        top = mx.take_along_axis(top, order, axis=-1)
        weights = top / top.sum(axis=-1, keepdims=True) * self.per_expert_scale[indices].astype(mx.float32)
        return weights, indices


def _needs_float32(x: mx.array) -> bool:
    """MLX 0.32's CPU GatherMM takes float32 only, and its quantized kernel computes bf16 in bf16 (x86)."""
    return x.dtype != mx.float32 and mx.default_device() == mx.cpu


def _in_float32(product, x: mx.array, indices: mx.array, weight: mx.array, *quantization: mx.array) -> mx.array:
    """`product(x, weight, indices, *quantization)` computed in float32 and rounded once to x's dtype (CPU).

    With fewer (token, expert) pairs than experts (decoding), only the experts the pairs use are
    gathered and cast, one copy per pair; with more, the whole bank is cast once.
    """
    if indices.size < weight.shape[0]:
        flat = indices.flatten()
        weight, quantization = weight[flat], [q[flat] for q in quantization]
        indices = mx.arange(flat.size, dtype=mx.uint32).reshape(indices.shape)  # pair j -> gathered copy j
    as32 = [a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a for a in (weight, *quantization)]
    return product(x.astype(mx.float32), as32[0], indices, *as32[1:]).astype(x.dtype)


class ExpertLinear(nn.Module):
    """E bias-free linear maps in one tensor, `weight` [E, out, in]; each row of x uses the one its index names."""

    def __init__(self, num_experts: int, input_dims: int, output_dims: int):
        super().__init__()
        bound = 1.0 / math.sqrt(input_dims)  # nn.Linear's initial range; checkpoints overwrite it
        self.weight = mx.random.uniform(-bound, bound, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        # x [..., 1, in] broadcast against indices [...] -> [..., 1, out]
        def product(x, weight, indices):
            return mx.gather_mm(x, weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

        if _needs_float32(x):
            return _in_float32(product, x, indices, self.weight)
        return product(x, self.weight, indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine") -> "QuantizedExpertLinear":
        return QuantizedExpertLinear.from_float(self, group_size, bits, mode)


class QuantizedExpertLinear(nn.Module):
    """`ExpertLinear` with its weight packed by `mx.quantize` (per expert, groups along the input), run by gather_qmm.

    Frozen, as MLX's QuantizedLinear: a packed weight has no gradient.
    """

    def __init__(self, weight: mx.array, scales: mx.array, biases: mx.array | None,
                 group_size: int, bits: int, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight = weight  # [E, out, in * bits / 32] uint32
        self.scales = scales  # [E, out, in / group_size]
        if biases is not None:  # affine mode only
            self.biases = biases
        self.freeze()

    @classmethod
    def from_float(cls, layer: ExpertLinear, group_size: int, bits: int, mode: str = "affine"):
        weight, scales, *biases = mx.quantize(layer.weight, group_size, bits, mode=mode)
        return cls(weight, scales, biases[0] if biases else None, group_size, bits, mode)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        def product(x, weight, indices, scales, biases=None):
            return mx.gather_qmm(x, weight, scales, biases, rhs_indices=indices, transpose=True,
                                 group_size=self.group_size, bits=self.bits, mode=self.mode,
                                 sorted_indices=sorted_indices)

        leaves = [self["weight"], self["scales"]] + ([self["biases"]] if "biases" in self else [])
        if _needs_float32(x):
            return _in_float32(product, x, indices, *leaves)
        return product(x, leaves[0], indices, *leaves[1:])

    def dequantized(self) -> ExpertLinear:
        """The float layer this one rounds (`mx.dequantize` of its weight)."""
        weight = mx.dequantize(self.weight, self.scales, self.get("biases"), group_size=self.group_size,
                               bits=self.bits, mode=self.mode)
        layer = ExpertLinear(*weight.shape[:1], 1, 1)
        layer.weight = weight
        return layer


class Experts(nn.Module):
    """The expert bank: per token, for each of its K experts, down(act(gate) * up), weighted and summed."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        _positive("num_experts", num_experts)
        _positive("hidden_size", hidden_size)
        _positive("moe_intermediate_size", intermediate_size)
        try:
            self.act = gelu_for(activation)
        except ValueError as e:
            raise ConfigError(None, f"hidden_activation: {e}") from None
        self.gate_up_proj = ExpertLinear(num_experts, hidden_size, 2 * intermediate_size)
        self.down_proj = ExpertLinear(num_experts, intermediate_size, hidden_size)

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:  # [N,H],[N,K],[N,K] -> [N,H]
        _expect_shape("the experts' input", x, (None, self.down_proj_dims()[1]))
        _expect_shape("the expert indices", indices, (x.shape[0], None))
        _expect_shape("the expert weights", weights, tuple(indices.shape))
        n, k = indices.shape
        indices = mx.stop_gradient(indices).astype(mx.uint32)
        y = self._pair_outputs(x, indices).reshape(n, k, -1)  # [N, K, H]
        # Weighted in float32 and summed once (transformers weights each expert's output in float32 too).
        out = (y.astype(mx.float32) * weights.astype(mx.float32)[..., None]).sum(axis=1)
        return out.astype(x.dtype)

    def _pair_outputs(self, x: mx.array, indices: mx.array) -> mx.array:
        """Each (token, expert) pair's MLP output, token-major ([N, K, 1, H] or [N*K, 1, H]).  The hook expert
        parallel overrides (distributed/tensor_parallel.py) to run only the pairs one rank holds."""
        if self.sorts(indices.size):
            return self._sorted(x, indices)
        return self._mlp(x[:, None, None, :], indices, False)  # one row per token, broadcast over its K experts

    @staticmethod
    def sorts(pairs: int) -> bool:
        """Whether `pairs` (token, expert) pairs run sorted by expert (many pairs, not on the CPU)."""
        return pairs >= SORT_MIN_PAIRS and (SORT_ON_CPU or mx.default_device() != mx.cpu)

    def _mlp(self, rows: mx.array, idx: mx.array, sorted_indices: bool) -> mx.array:  # [..., M, H] -> [..., M, H]
        gate, up = mx.split(self.gate_up_proj(rows, idx, sorted_indices), 2, axis=-1)
        return self.down_proj(gated(self.act)(gate, up), idx, sorted_indices)

    def _sorted(self, x: mx.array, indices: mx.array) -> mx.array:
        """One row per (token, expert) pair, the rows sorted by expert (mlx-lm's order) -> [N*K, 1, H], token-major."""
        k, flat = indices.shape[1], indices.flatten()
        order = mx.argsort(flat)
        y = self._mlp(x[order // k][:, None, :], flat[order], True)
        return y[mx.argsort(order)]

    def down_proj_dims(self) -> tuple[int, int]:
        """(intermediate, hidden) widths, read from the down projection, quantized or not."""
        layer = self.down_proj
        if isinstance(layer, QuantizedExpertLinear):
            return layer.scales.shape[-1] * layer.group_size, layer.scales.shape[1]
        return layer.weight.shape[2], layer.weight.shape[1]


# mlx-lm 0.32 keeps the expert projections under this (gemma4_text.py `sanitize`), gate and up apart.
MLX_LM_EXPERTS = ".experts.switch_glu."


def sanitize_experts(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Expert tensors of an HF checkpoint or an mlx-community folder under our names; other keys unchanged.

    HF: `<layer>.experts.gate_up_proj` / `.down_proj` are the tensors themselves (-> `.weight`).
    mlx-lm: `<layer>.experts.switch_glu.{gate,up,down}_proj.{weight,scales,biases}`; gate and up
    are joined along their rows (axis -2 of each leaf), gate first, as transformers stores them.
    """
    out, halves = {}, {}
    for key, value in weights.items():
        if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            out[key + ".weight"] = value
        elif MLX_LM_EXPERTS in key:
            base, _, rest = key.partition(MLX_LM_EXPERTS)
            proj, _, leaf = rest.partition(".")
            if proj == "down_proj":
                out[f"{base}.experts.down_proj.{leaf}"] = value
            elif proj in ("gate_proj", "up_proj"):
                halves.setdefault((base, leaf), {})[proj] = value
            else:
                out[key] = value  # not ours: the strict load names it
        else:
            out[key] = value
    for (base, leaf), pair in halves.items():
        out[f"{base}.experts.gate_up_proj.{leaf}"] = _joined(base, leaf, pair)
    return out


def _joined(base: str, leaf: str, pair: dict[str, mx.array]) -> mx.array:
    """gate and up (mlx-lm's halves of one leaf) as transformers' gate_up rows: [E, 2I, ...]."""
    where = f"{base}{MLX_LM_EXPERTS}"
    missing = [p for p in ("gate_proj", "up_proj") if p not in pair]
    if missing:
        raise WeightsMismatchError(None, f"{where}{missing[0]}.{leaf} is missing (gate and up come in pairs)")
    gate, up = pair["gate_proj"], pair["up_proj"]
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise WeightsMismatchError(
            None, f"{where}gate_proj.{leaf} {list(gate.shape)} {gate.dtype} and up_proj.{leaf} "
                  f"{list(up.shape)} {up.dtype} differ; they must match to be joined")
    if gate.ndim != 3:
        raise WeightsMismatchError(None, f"{where}gate_proj.{leaf} must be 3-D [experts, rows, cols], "
                                         f"found {list(gate.shape)}")
    return mx.concatenate([gate, up], axis=-2)


def sanitize_quantization(quantization: dict) -> dict:
    """A config's `quantization` entry with mlx-lm's per-layer expert keys under our module paths.

    mlx-lm's mixed recipes may give `...switch_glu.gate_proj` / `up_proj` / `down_proj` their own
    settings; gate and up become one module here, so theirs must agree.
    """
    out, halves = {}, {}
    for key, value in quantization.items():
        base, sep, proj = key.partition(MLX_LM_EXPERTS)
        if not sep:
            out[key] = value
        elif proj == "down_proj":
            out[f"{base}.experts.down_proj"] = value
        elif proj in ("gate_proj", "up_proj"):
            halves.setdefault(base, {})[proj] = value
        else:
            out[key] = value
    for base, pair in halves.items():
        if pair.get("gate_proj") != pair.get("up_proj"):
            raise ConfigError(None, f"quantization: {base}{MLX_LM_EXPERTS}gate_proj and up_proj have different "
                                    f"settings ({pair.get('gate_proj')!r:.60} and {pair.get('up_proj')!r:.60}); "
                                    "they are one tensor here")
        out[f"{base}.experts.gate_up_proj"] = pair["gate_proj"]
    return out


def to_mlx_lm_layout(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Our expert tensors under mlx-lm 0.32's names (gate and up apart), so mlx-lm loads a folder we write.

    The inverse of `sanitize_experts` for our own names; other keys are unchanged.
    """
    out = {}
    for key, value in weights.items():
        base, sep, rest = key.rpartition(".experts.")
        proj, _, leaf = rest.partition(".")
        if not sep or proj not in ("gate_up_proj", "down_proj") or not leaf:
            out[key] = value
        elif proj == "gate_up_proj":
            gate, up = mx.split(value, 2, axis=-2)  # rows [0, I) gate, [I, 2I) up; packed leaves split likewise
            out[f"{base}{MLX_LM_EXPERTS}gate_proj.{leaf}"], out[f"{base}{MLX_LM_EXPERTS}up_proj.{leaf}"] = gate, up
        else:
            out[f"{base}{MLX_LM_EXPERTS}down_proj.{leaf}"] = value
    return out


def to_mlx_lm_quantization(quantization: dict) -> dict:
    """A `quantization` entry with our per-layer expert keys under mlx-lm's (the inverse of sanitize_quantization)."""
    out = {}
    for key, value in quantization.items():
        base, sep, proj = key.rpartition(".experts.")
        if sep and proj == "gate_up_proj":
            out[f"{base}{MLX_LM_EXPERTS}gate_proj"] = out[f"{base}{MLX_LM_EXPERTS}up_proj"] = value
        elif sep and proj == "down_proj":
            out[f"{base}{MLX_LM_EXPERTS}down_proj"] = value
        else:
            out[key] = value
    return out
