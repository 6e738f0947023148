"""Gemma 4's audio tower (E2B / E4B): log-mel frames -> one soft token per 40 ms, and its embedder.

A USM-style conformer, as transformers 5.25's `Gemma4AudioModel` defines it:

- sub-sampling: two stride-2 3x3 convolutions over (time, mel), each LayerNorm (no bias)
  + ReLU, then a linear projection to the width (time / 4: 10 ms frames -> 40 ms tokens);
- conformer layers: half-step feed-forward, chunked local self-attention with a
  Transformer-XL relative position term, a light convolution (GLU, causal depthwise
  conv), a second half-step feed-forward, a final norm; most linears are "clipped"
  (their input and output clamped to bounds stored in the checkpoint);
- an output projection; `AudioEmbedder` (transformers' `Gemma4MultimodalEmbedder`) then
  maps tokens to the text width (a scale-free RMSNorm and a linear map).

Attention sees, for each query, itself and the `attention_context_left - 2` frames before
it (and `attention_context_right - 1` after): queries go in chunks of `attention_chunk_size`,
each against a window of keys around its chunk.  Weight names are Hugging Face's
(`model.audio_tower.*`, `model.embed_audio.*` in a Gemma4ForConditionalGeneration checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..arguments import is_integer, is_real
from ..errors import AudioError, ConfigError
from .config import parse_config
# The vision tower's pieces are the same modules in transformers (Gemma4RMSNorm, Gemma4ClippableLinear).
from .gemma4_vision import ClippableLinear
from .gemma4_vision import VisionRMSNorm as RMSNorm

# transformers' ACT2FN names a config may give `hidden_act`.
ACTIVATIONS = {"silu": nn.silu, "swish": nn.silu, "gelu": nn.gelu, "gelu_pytorch_tanh": nn.gelu_approx,
               "relu": nn.relu}
# The sub-sampling convolutions: 3x3, stride 2, padding 1 (fixed in transformers' code, not in the config).
SUBSAMPLE_KERNEL, SUBSAMPLE_STRIDE = 3, 2


@dataclass
class AudioArgs:
    hidden_size: int = 1024  # conformer width
    num_hidden_layers: int = 12  # conformer layers
    num_attention_heads: int = 8  # heads (head dim = hidden_size / heads)
    hidden_act: str = "silu"  # feed-forward and light-conv activation
    subsampling_conv_channels: list[int] = field(default_factory=lambda: [128, 32])  # the two convs' channels
    conv_kernel_size: int = 5  # the light conv's causal depthwise kernel (frames)
    residual_weight: float = 0.5  # each feed-forward adds this times its output (half-step)
    attention_chunk_size: int = 12  # queries attend in chunks of this many frames
    attention_context_left: int = 13  # left context: the query and context_left - 2 earlier frames
    attention_context_right: int = 0  # right context: context_right - 1 later frames (0: none)
    attention_logit_cap: float = 50.0  # attention logits are cap * tanh(logit / cap)
    attention_invalid_logits_value: float = -1.0e9  # logit given to masked keys
    use_clipped_linears: bool = True  # linears clamp inputs / outputs to checkpoint bounds
    rms_norm_eps: float = 1e-6  # epsilon of the light conv, sub-sampling and embedder norms (the others: 1e-6)
    gradient_clipping: float = 1e10  # hidden states are clamped to +- this (named for training)
    output_proj_dims: int = 1536  # width of the tower's output (the embedder's input)
    model_type: str = "gemma4_audio"  # the config's own tag
    extra: dict[str, Any] = field(default_factory=dict)  # keys we keep but do not interpret

    @classmethod
    def from_dict(cls, config: dict, path=None, where: str = "audio_config.") -> "AudioArgs":
        args = parse_config(cls, config, path, where)
        for key in ("conv_kernel_size", "attention_chunk_size", "attention_context_left", "output_proj_dims"):
            v = getattr(args, key)
            if not is_integer(v) or not 0 < v <= 1 << 16:
                raise ConfigError(path, f"{where}{key} must be a positive integer, got {v!r:.80}")
        right = args.attention_context_right
        if not is_integer(right) or not 0 <= right <= 1 << 16:
            raise ConfigError(path, f"{where}attention_context_right must be an integer >= 0, got {right!r:.80}")
        channels = args.subsampling_conv_channels
        if len(channels) != 2 or not all(is_integer(c) and 0 < c <= 1 << 14 for c in channels):
            raise ConfigError(path, f"{where}subsampling_conv_channels must be two positive integers, "
                              f"got {channels!r:.80}")
        if args.hidden_size % args.num_attention_heads or args.hidden_size % 2:
            raise ConfigError(path, f"{where}hidden_size {args.hidden_size} must be even and a multiple of "
                              f"num_attention_heads {args.num_attention_heads}")
        if args.hidden_act not in ACTIVATIONS:
            raise ConfigError(path, f"{where}hidden_act {args.hidden_act!r:.40} is not one of {sorted(ACTIVATIONS)}")
        for key in ("attention_logit_cap", "gradient_clipping", "residual_weight"):
            if not is_real(getattr(args, key)) or getattr(args, key) <= 0:
                raise ConfigError(path, f"{where}{key} must be a positive number, got {getattr(args, key)!r:.80}")
        return args

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def clamp(x: mx.array, limit: float) -> mx.array:
    """x clamped to +-limit, the limit capped at the dtype's largest value (transformers' `gradient_clipping`)."""
    limit = min(limit, float(mx.finfo(x.dtype).max))
    return mx.clip(x, -limit, limit)


# ----- sub-sampling: 4 mel frames -> 1 token ---------------------------------------------------


class SubSampleLayer(nn.Module):
    """Zero the padded frames, then a 3x3 stride-2 conv (padding 1), LayerNorm over channels, ReLU."""

    def __init__(self, channels_in: int, channels_out: int, eps: float):
        super().__init__()
        # MLX convolutions are channels-last: weight [out, 3, 3, in] (torch: [out, in, 3, 3]).
        self.conv = nn.Conv2d(channels_in, channels_out, SUBSAMPLE_KERNEL, stride=SUBSAMPLE_STRIDE, padding=1,
                              bias=False)
        self.norm = nn.LayerNorm(channels_out, eps=eps, bias=False)

    def __call__(self, x: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        # x [B, T, F, C_in], mask [B, T] -> [B, ceil(T / 2), ceil(F / 2), C_out], [B, ceil(T / 2)]
        x = x * mask[:, :, None, None].astype(x.dtype)
        x = nn.relu(self.norm(self.conv(x.astype(self.conv.weight.dtype))))
        return x, mask[:, ::SUBSAMPLE_STRIDE]


class SubSampleConvProjection(nn.Module):
    def __init__(self, args: AudioArgs):
        super().__init__()
        c0, c1 = args.subsampling_conv_channels
        self.layer0 = SubSampleLayer(1, c0, args.rms_norm_eps)
        self.layer1 = SubSampleLayer(c0, c1, args.rms_norm_eps)
        # transformers sizes the projection for c0 // 4 mel positions after the two convs
        # (the real tower: 128 mel bins and c0 = 128).
        self.mel_out = c0 // 4
        self.input_proj_linear = nn.Linear(self.mel_out * c1, args.hidden_size, bias=False)

    def __call__(self, features: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        # features [B, T, n_mels], mask [B, T] -> [B, T', hidden], [B, T'] with T' = ceil(ceil(T / 2) / 2)
        bins = -(-(-(-features.shape[2] // 2)) // 2)
        if bins != self.mel_out:
            raise AudioError("input_features", f"{features.shape[2]} mel bins per frame; this tower takes "
                             f"{4 * self.mel_out - 3} to {4 * self.mel_out}")
        x, mask = self.layer0(features[..., None], mask)
        x, mask = self.layer1(x, mask)
        B, T, F, C = x.shape
        # (mel position, channel) flattened mel-major, as transformers' permute(0, 2, 3, 1).reshape.
        return self.input_proj_linear(x.reshape(B, T, F * C)), mask


# ----- the conformer layer -------------------------------------------------------------------


def relative_positions(args: AudioArgs) -> mx.array:
    """Sinusoidal embeddings [context // 2 + 1, hidden] of distances context // 2 ... 0, [sin | cos],
    with context = chunk + left - 1 + right (transformers' Gemma4AudioRelPositionalEncoding)."""
    context = args.attention_chunk_size + args.attention_context_left - 1 + args.attention_context_right
    n = args.hidden_size // 2
    increment = math.log(10_000.0) / max(n - 1, 1)
    inv_timescales = mx.exp(mx.arange(n, dtype=mx.float32) * -increment)  # [n]
    positions = mx.arange(context // 2, -1, -1, dtype=mx.float32)[:, None]  # [P, 1]
    scaled = positions * inv_timescales[None, :]
    return mx.concatenate([mx.sin(scaled), mx.cos(scaled)], axis=-1)


def block_mask(valid: mx.array, args: AudioArgs) -> mx.array:
    """Key validity [B, 1, U, W, C] for queries in U chunks of W against their C-frame contexts.

    Query q = u W + w sees context key k = u W - (left - 1) + c when k is a real frame of
    the clip and 0 <= q - k < left - 1 or 0 < k - q < right (transformers' sliding window,
    `sliding_window_mask_function((left - 1, right))`, with the padding mask).
    """
    B, T = valid.shape
    W, P, F = args.attention_chunk_size, args.attention_context_left - 1, args.attention_context_right
    U, C = -(-T // W), W + P + F
    q = mx.arange(U)[:, None, None] * W + mx.arange(W)[None, :, None]  # [U, W, 1]
    k = mx.arange(U)[:, None, None] * W - P + mx.arange(C)[None, None, :]  # [U, 1, C]
    dist = q - k
    window = ((dist >= 0) & (dist < P)) | ((dist < 0) & (-dist < F))  # [U, W, C]
    inside = (k >= 0) & (k < T)
    real = mx.take(valid, mx.clip(k, 0, T - 1).reshape(-1), axis=1).reshape(B, U, 1, C)
    mask = (window & inside)[None] & real & (q < T)[None]  # padded queries see nothing, as the reference
    return mask[:, None]


class Attention(nn.Module):
    """Chunked local attention with a relative position term (Transformer-XL's "bd", shifted)."""

    def __init__(self, args: AudioArgs):
        super().__init__()
        D, self.n_heads, self.head_dim = args.hidden_size, args.num_attention_heads, args.head_dim
        self.args = args
        self.chunk = args.attention_chunk_size
        self.past, self.future = args.attention_context_left - 1, args.attention_context_right
        self.context = self.chunk + self.past + self.future
        # transformers' scales: queries by head_dim^-0.5 / ln 2 and softplus(per_dim_scale), keys by log2(1 + e).
        self.q_scale = self.head_dim**-0.5 / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)
        self.q_proj, self.k_proj, self.v_proj = (ClippableLinear(D, D, args.use_clipped_linears) for _ in range(3))
        self.post = ClippableLinear(D, D, args.use_clipped_linears)
        self.relative_k_proj = nn.Linear(D, D, bias=False)
        self.per_dim_scale = mx.zeros((self.head_dim,))

    def _contexts(self, x: mx.array) -> mx.array:
        """[B, T, N, H] -> [B, U, C, N, H]: for chunk u, frames u W - past ... u W + W + future - 1 (zeros outside)."""
        B, T = x.shape[:2]
        U = -(-T // self.chunk)
        x = mx.pad(x, [(0, 0), (self.past, self.future + self.chunk - 1), (0, 0), (0, 0)])
        index = mx.arange(U)[:, None] * self.chunk + mx.arange(self.context)[None, :]  # [U, C]
        return mx.take(x, index.reshape(-1), axis=1).reshape(B, U, self.context, *x.shape[2:])

    def _shift(self, bd: mx.array) -> mx.array:
        """[B, N, U, W, P] position scores -> [B, N, U, W, C] context scores (Transformer-XL's shift,
        as transformers' `_rel_shift`: pad to C + 1, flatten, cut, reshape)."""
        B, N, U, W, P = bd.shape
        bd = mx.pad(bd, [(0, 0)] * 4 + [(0, self.context + 1 - P)])
        bd = bd.reshape(B, N, U, W * (self.context + 1))[..., : W * self.context]
        return bd.reshape(B, N, U, W, self.context)

    def __call__(self, x: mx.array, positions: mx.array, mask: mx.array) -> mx.array:
        # x [B, T, D], positions [P, D], mask [B, 1, U, W, C] -> [B, T, D]
        B, T, _ = x.shape
        shape = (B, T, self.n_heads, self.head_dim)
        q = self.q_proj(x).astype(mx.float32).reshape(shape) * self.q_scale * nn.softplus(self.per_dim_scale)
        k = self.k_proj(x).astype(mx.float32).reshape(shape) * self.k_scale
        v = self.v_proj(x).astype(mx.float32).reshape(shape)
        U, W = -(-T // self.chunk), self.chunk
        q = mx.pad(q, [(0, 0), (0, U * W - T), (0, 0), (0, 0)]).reshape(B, U, W, self.n_heads, self.head_dim)
        q = q.transpose(0, 3, 1, 2, 4)  # [B, N, U, W, H]
        k = self._contexts(k).transpose(0, 3, 1, 4, 2)  # [B, N, U, H, C]
        v = self._contexts(v).transpose(0, 3, 1, 2, 4)  # [B, N, U, C, H]
        rel = self.relative_k_proj(positions).reshape(-1, self.n_heads, self.head_dim).astype(q.dtype)
        bd = q.reshape(B, self.n_heads, U * W, self.head_dim) @ rel.transpose(1, 2, 0)  # [B, N, U W, P]
        logits = q @ k + self._shift(bd.reshape(B, self.n_heads, U, W, -1))  # [B, N, U, W, C]
        cap = self.args.attention_logit_cap
        logits = mx.tanh(logits / cap) * cap
        logits = mx.where(mask, logits, self.args.attention_invalid_logits_value)
        out = mx.softmax(logits, axis=-1, precise=True) @ v  # [B, N, U, W, H]
        out = out.transpose(0, 2, 3, 1, 4).reshape(B, U * W, -1)[:, :T]
        return self.post(out.astype(x.dtype))


class FeedForward(nn.Module):
    """x + residual_weight * norm(W2 act(W1 norm(clamp(x)))), clamped (a conformer half-step)."""

    def __init__(self, args: AudioArgs):
        super().__init__()
        self.ffw_layer_1 = ClippableLinear(args.hidden_size, 4 * args.hidden_size, args.use_clipped_linears)
        self.ffw_layer_2 = ClippableLinear(4 * args.hidden_size, args.hidden_size, args.use_clipped_linears)
        # transformers builds these two with the default epsilon 1e-6, not rms_norm_eps.
        self.pre_layer_norm = RMSNorm(args.hidden_size, 1e-6)
        self.post_layer_norm = RMSNorm(args.hidden_size, 1e-6)
        self.act = ACTIVATIONS[args.hidden_act]
        self.limit, self.scale = args.gradient_clipping, args.residual_weight

    def __call__(self, x: mx.array) -> mx.array:
        h = self.pre_layer_norm(clamp(x, self.limit))
        h = self.ffw_layer_2(self.act(self.ffw_layer_1(h)))
        return x + self.post_layer_norm(clamp(h, self.limit)) * self.scale


class LightConv(nn.Module):
    """x + W_end act(norm(clamp(causal depthwise conv(GLU(W_start norm(x))))))."""

    def __init__(self, args: AudioArgs):
        super().__init__()
        D = args.hidden_size
        self.linear_start = ClippableLinear(D, 2 * D, args.use_clipped_linears)
        self.linear_end = ClippableLinear(D, D, args.use_clipped_linears)
        # Depthwise: weight [D, K, 1] (torch: [D, 1, K]); causal: K - 1 frames of zeros in front.
        self.depthwise_conv1d = nn.Conv1d(D, D, args.conv_kernel_size, groups=D, bias=False)
        self.pre_layer_norm = RMSNorm(D, args.rms_norm_eps)
        self.conv_norm = RMSNorm(D, args.rms_norm_eps)
        self.act = ACTIVATIONS[args.hidden_act]
        self.limit, self.left = args.gradient_clipping, args.conv_kernel_size - 1

    def __call__(self, x: mx.array) -> mx.array:
        a, gate = mx.split(self.linear_start(self.pre_layer_norm(x)), 2, axis=-1)
        h = a * mx.sigmoid(gate)  # GLU over the last axis: first half gated by the second
        h = self.depthwise_conv1d(mx.pad(h, [(0, 0), (self.left, 0), (0, 0)]))
        h = self.conv_norm(clamp(h, self.limit))
        return x + self.linear_end(self.act(h))


class ConformerLayer(nn.Module):
    def __init__(self, args: AudioArgs):
        super().__init__()
        self.feed_forward1 = FeedForward(args)
        self.feed_forward2 = FeedForward(args)
        self.self_attn = Attention(args)
        self.lconv1d = LightConv(args)
        # transformers builds the layer's three norms with the default epsilon 1e-6.
        self.norm_pre_attn = RMSNorm(args.hidden_size, 1e-6)
        self.norm_post_attn = RMSNorm(args.hidden_size, 1e-6)
        self.norm_out = RMSNorm(args.hidden_size, 1e-6)
        self.limit = args.gradient_clipping

    def __call__(self, x: mx.array, positions: mx.array, mask: mx.array) -> mx.array:
        x = self.feed_forward1(x)
        h = self.self_attn(self.norm_pre_attn(clamp(x, self.limit)), positions, mask)
        x = x + self.norm_post_attn(clamp(h, self.limit))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(clamp(x, self.limit))


# ----- the tower and its embedder ------------------------------------------------------------


class AudioModel(nn.Module):
    """Log-mel features [B, T, n_mels] and their frame mask [B, T] (True: real audio)
    -> soft tokens [B, T', output_proj_dims] and their mask [B, T'], T' = ceil(ceil(T / 2) / 2).

    Tokens at masked positions are computed (as transformers does) but mean nothing: the
    multimodal model keeps only the valid ones.
    """

    def __init__(self, args: AudioArgs):
        super().__init__()
        self.args = args
        self.subsample_conv_projection = SubSampleConvProjection(args)
        self.layers = [ConformerLayer(args) for _ in range(args.num_hidden_layers)]
        self.output_proj = nn.Linear(args.hidden_size, args.output_proj_dims, bias=True)

    def __call__(self, features: mx.array, mask: mx.array | None = None) -> tuple[mx.array, mx.array]:
        if features.ndim != 3 or (mask is not None and tuple(mask.shape) != tuple(features.shape[:2])):
            raise AudioError("input_features", f"features must be [B, T, n_mels] with a [B, T] mask, got "
                             f"{tuple(features.shape)} and {None if mask is None else tuple(mask.shape)}")
        if features.shape[1] == 0:
            raise AudioError("input_features", "no frames")
        mask = mx.ones(features.shape[:2], dtype=mx.bool_) if mask is None else mask.astype(mx.bool_)
        x, mask = self.subsample_conv_projection(features, mask)
        positions = relative_positions(self.args).astype(x.dtype)
        attention_mask = block_mask(mask, self.args)
        for layer in self.layers:
            x = layer(x, positions, attention_mask)
        return self.output_proj(x), mask

    def sanitize(self, weights: dict[str, mx.array], prefix: str = "") -> dict[str, mx.array]:
        """Hugging Face's layout -> ours: conv kernels to channels-last (already-MLX kernels pass)."""
        c0, _ = self.args.subsampling_conv_channels
        out = {}
        for key, v in weights.items():
            name = key[len(prefix):] if key.startswith(prefix) else None
            if name in ("subsample_conv_projection.layer0.conv.weight", "subsample_conv_projection.layer1.conv.weight"):
                channels_in = 1 if "layer0" in name else c0
                if v.ndim == 4 and v.shape[1] == channels_in and v.shape[3] != channels_in:
                    v = v.transpose(0, 2, 3, 1)  # torch [out, in, kh, kw] -> MLX [out, kh, kw, in]
            elif name is not None and name.endswith("depthwise_conv1d.weight"):
                if v.ndim == 3 and v.shape[1] == 1 and v.shape[2] != 1:
                    v = v.transpose(0, 2, 1)  # torch [D, 1, K] -> MLX [D, K, 1]
            out[key] = v
        return out


class AudioEmbedder(nn.Module):
    """Soft tokens [..., output_proj_dims] -> text embeddings [..., text hidden]: a scale-free
    RMSNorm (epsilon: the audio config's) then a bias-free linear (transformers'
    Gemma4MultimodalEmbedder)."""

    def __init__(self, args: AudioArgs, text_hidden_size: int):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(args.output_proj_dims, args.rms_norm_eps, scaled=False)
        self.embedding_projection = nn.Linear(args.output_proj_dims, text_hidden_size, bias=False)

    def __call__(self, tokens: mx.array) -> mx.array:
        return self.embedding_projection(self.embedding_pre_projection_norm(tokens))
