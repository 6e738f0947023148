"""What the Gemma architectures truly share: the norm, the MLP, soft-capping,
attention with masks, and fp16-safe residuals.

Each model file (gemma.py, gemma2.py, gemma3.py) builds its own attention and
block from these pieces; nothing here knows which architecture it serves.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx
import mlx.nn as nn

# Largest finite float16; residual sums are clipped to it (see `residual_add`).
_FP16_MAX = 65504.0


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: the stored weight `w` is an offset, the scale is `1 + w`.

    The product is taken in float32 and rounded once to the input dtype, as the
    Hugging Face reference does (transformers PR #29402: `(x * w).to(fp16)`,
    not `x.to(fp16) * w`); adding 1 to a bf16 weight first would round it.
    """

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self._scale(), self.eps).astype(x.dtype)

    def _scale(self) -> mx.array:
        """1 + w in float32, made once per weight array rather than at every call.

        A decoding step runs six norms per block; on a GPU, where small kernels
        cost their launch, the two extra ops each would otherwise take show.
        The cache holds the weight array itself, so a new weight (loading,
        training, a transform's tracer) is never matched by a stale scale.
        """
        cached = self.__dict__.get("_scale_of")
        if cached is None or cached[0] is not self.weight:
            cached = (self.weight, 1.0 + self.weight.astype(mx.float32))
            self.__dict__["_scale_of"] = cached
        return cached[1]


def gelu_for(name: str):
    """The activation named by a Hugging Face config (`hidden_activation`)."""
    activations = {
        "gelu_pytorch_tanh": nn.gelu_approx,  # tanh approximation, Gemma's default
        "gelu_new": nn.gelu_approx,
        "gelu_fast": nn.gelu_approx,
        "gelu": nn.gelu,  # exact erf GELU (Gemma 2/3 honour it when a config asks)
    }
    if name not in activations:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(activations)}")
    return activations[name]


@functools.cache
def gated(act):
    """act(gate) * up as one compiled kernel, written over the gate's buffer.

    So the MLP's widest step holds two intermediate-sized arrays, not three
    (gate, up and the activation, op by op); the values are the same.  Not
    `shapeless`: MLX 0.32's shapeless kernels never reuse an input's buffer.
    """
    return mx.compile(lambda gate, up: act(gate) * up)


class GeGLU(nn.Module):
    """Gated GELU MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = gelu_for(activation)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gated(self.act)(self.gate_proj(x), self.up_proj(x)))


def softcap(x: mx.array, cap: float | None) -> mx.array:
    """cap * tanh(x / cap): Gemma 2's bound on attention and output logits."""
    if cap is None:
        return x
    return mx.tanh(x / cap) * cap


def residual_add(x: mx.array, y: mx.array) -> mx.array:
    """x + y, kept finite in float16.

    Gemma 2/3 activations outgrow float16's range; summing in float32 and
    clipping to the largest finite half keeps fp16 inference from turning into
    inf/NaN (the same remedy mlx-lm's gemma3_text applies).
    """
    if x.dtype != mx.float16:
        return x + y
    total = x.astype(mx.float32) + y.astype(mx.float32)
    return mx.clip(total, -_FP16_MAX, _FP16_MAX).astype(mx.float16)


def embedding_scale(hidden_size: int, dtype: mx.Dtype) -> mx.array:
    """sqrt(hidden_size) rounded to the activation dtype, as the references do
    (transformers: `embed_scale.to(weight.dtype)`; in bf16 sqrt(2304) = 48.0)."""
    return mx.array(math.sqrt(hidden_size), dtype=mx.float32).astype(dtype)


def attention(
    queries: mx.array,  # [B, n_heads, T, head_dim]
    keys,  # [B, n_kv_heads, S, head_dim], or mx.quantize's (w_q, scales, biases) of it
    values,  # as keys
    scale: float,
    mask: mx.array | str | None,  # bool [B|1, 1, T, S], "causal" or None
    logit_softcap: float | None = None,
) -> mx.array:  # [B, n_heads, T, head_dim]
    """Scaled dot-product attention with grouped KV heads.

    Without soft-capping this is MLX's fused kernel.  Soft-capping (Gemma 2)
    has to act on the scores before the softmax, which the fused kernel cannot
    do, so that path spells the attention out; its softmax runs in float32 as
    the reference's eager attention does.  Quantized keys and values (a
    quantized KV cache) take that path too, multiplying by them as they are
    stored (`mx.quantized_matmul`, as mlx-lm's quantized attention).
    """
    quantized = isinstance(keys, (tuple, list))
    if logit_softcap is None and not quantized:
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)

    B, n_heads, T, D = queries.shape
    n_kv, S = (keys[0] if quantized else keys).shape[1:3]
    q = queries.reshape(B, n_kv, n_heads // n_kv, T, D)  # heads grouped by their KV head
    scores = _kv_matmul(q * scale, keys, D, transpose=True)  # [B, n_kv, rep, T, S]
    scores = softcap(scores, logit_softcap)
    if isinstance(mask, str):
        mask = causal_mask(T, S)
    if mask is not None:
        mask = mx.expand_dims(mask, 2)  # broadcast over the heads sharing a KV head
        scores = mx.where(mask, scores, mx.array(-mx.inf, dtype=scores.dtype))
    if quantized:
        weights = mx.softmax(scores.astype(mx.float32), axis=-1)
    else:  # summed in float32, rounded once: the float32 softmax cast back, without its float32 copy
        weights = mx.softmax(scores, axis=-1, precise=True)
    out = _kv_matmul(weights, values, D, transpose=False)
    return out.reshape(B, n_heads, T, D).astype(queries.dtype)  # [B, n_heads, T, head_dim]


def _kv_matmul(x: mx.array, kv, head_dim: int, transpose: bool) -> mx.array:
    """x @ kv^T (transpose) or x @ kv, each KV head [S, D] shared by its group of query heads."""
    if not isinstance(kv, (tuple, list)):
        kv = mx.expand_dims(kv, 2)
        return x @ (kv.swapaxes(-1, -2) if transpose else kv)
    w, scales, biases = (mx.expand_dims(p, 2) for p in kv)
    # In float32, as the fused kernel accumulates: bf16 products and weights lose greedy ties.
    scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
    # The packing tells the settings: head_dim / bits values per uint32 word, one scale per group.
    return mx.quantized_matmul(x.astype(mx.float32), w, scales, biases, transpose=transpose,
                               group_size=head_dim // scales.shape[-1], bits=w.shape[-1] * 32 // head_dim)


def causal_mask(T: int, S: int) -> mx.array:
    """Bool [1, 1, T, S]: the T queries are the last T of S positions."""
    return build_mask(mx.arange(S - T, S), mx.arange(S))


def build_mask(
    query_positions: mx.array,  # [T] absolute positions of the queries
    key_positions: mx.array,  # [S] absolute positions of the keys
    *,
    window: int | None = None,
    key_valid: mx.array | None = None,  # bool [B, S]: False for padding
    prefix_length: mx.array | None = None,  # [B]: tokens that attend bidirectionally
) -> mx.array:  # bool [B|1, 1, T, S]
    """Which keys each query may attend to.

    Causal, limited to the last `window` positions when given (a query at p
    sees keys p - window < k <= p, as transformers' sliding-window overlay),
    widened to a full prefix for prefix-LM models, narrowed by padding.  Every
    query always sees itself, so a padding query never has an all-masked row
    (whose softmax would be NaN and leak into the batch).
    """
    q = query_positions[:, None]
    k = key_positions[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    allowed = allowed[None, None]
    if prefix_length is not None:
        p = prefix_length[:, None, None, None]
        in_prefix = (k < p) & (q < p)
        if window is not None:
            in_prefix = in_prefix & (mx.abs(q - k) < window)
        allowed = allowed | in_prefix
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    return allowed | (k == q)[None, None]
