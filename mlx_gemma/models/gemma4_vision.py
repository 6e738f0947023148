"""Gemma 4's vision tower and its embedder into the text model: patches -> soft tokens -> text width.

As transformers 5.25's `Gemma4VisionModel` and `Gemma4MultimodalEmbedder` (modeling_gemma4.py):
flat patches (`mlx_gemma.gemma4_images`) are projected, given learned x and y position embeddings,
run through bidirectional encoder layers (sandwich RMSNorms, q/k/v norms, 2-D axial RoPE,
attention scale 1, a gated GELU MLP; every projection optionally clamped to stored bounds), then
each k x k window of patches is averaged into one soft token, scaled by sqrt(hidden) and optionally
standardized.  Padding patches (position (-1, -1)) are masked as keys and dropped from the output.

Weight names are Hugging Face's under `model.vision_tower.` and `model.embed_vision.` (mlx-vlm 0.7.10
drops the `model.` prefix: `vision_tower.encoder.layers.N.self_attn.q_proj.linear.weight`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..arguments import is_integer
from ..errors import ConfigError, ImageError
from ..json_input import expect
from .config import parse_config
from .layers import gelu_for


@dataclass
class Gemma4VisionArgs:
    hidden_size: int = 768  # the tower's width (its soft tokens' width before the embedder)
    intermediate_size: int = 3072  # MLP width
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12  # fewer than the heads: grouped-query attention
    head_dim: int = 64  # a multiple of 4: half the channels rotate by x, half by y
    hidden_activation: str = "gelu_pytorch_tanh"  # of the MLP's gate
    rms_norm_eps: float = 1e-6  # every norm's, the embedder's too
    max_position_embeddings: int = 131072  # unused by the tower (positions come from the patch grid)
    attention_bias: bool | None = False  # transformers' vision projections have no bias whatever this says
    rope_parameters: dict | None = None  # {"rope_type": "axial" (or "default"), "rope_theta": 100}
    pooling_kernel_size: int = 3  # k: each k x k window of patches becomes one soft token
    patch_size: int = 16  # pixels per patch side; a patch is 3 * patch^2 values
    position_embedding_size: int = 10240  # rows of the x and y position tables (the longest grid side)
    use_clipped_linears: bool = False  # clamp each projection's input and output to stored bounds
    standardize: bool = False  # (soft token - std_bias) * std_scale after pooling
    model_type: str = "gemma4_vision"
    extra: dict[str, Any] = field(default_factory=dict)  # keys we keep but do not interpret

    @classmethod
    def from_dict(cls, config: dict, path=None, where: str = "vision_config.") -> "Gemma4VisionArgs":
        args = parse_config(cls, config, path, where)
        for key in ("intermediate_size", "pooling_kernel_size", "patch_size", "position_embedding_size"):
            v = getattr(args, key)
            if not is_integer(v) or not 0 < v <= 1 << 20:
                raise ConfigError(path, f"{where}{key} must be a positive integer, got {v!r}")
        if args.head_dim % 4:
            raise ConfigError(path, f"{where}head_dim {args.head_dim} is not a multiple of 4 (2-D RoPE halves)")
        if args.num_attention_heads % args.num_key_value_heads:
            raise ConfigError(path, f"{where}num_attention_heads is not a multiple of num_key_value_heads")
        rope = args.rope_parameters or {}
        expect(rope, dict, path, f"{where}rope_parameters")
        # transformers reads an old "default" as "axial" (modeling_rope_utils `standardize_rope_params`).
        if rope.get("rope_type", "axial") not in ("axial", "default"):
            raise ConfigError(path, f"{where}rope_parameters.rope_type must be 'axial', got {rope['rope_type']!r}")
        theta = rope.get("rope_theta", 100.0)
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not 0 < theta < math.inf:
            raise ConfigError(path, f"{where}rope_parameters.rope_theta must be a positive number, got {theta!r}")
        try:
            gelu_for(args.hidden_activation)
        except ValueError as e:
            raise ConfigError(path, f"{where}{e}") from e
        return args

    @property
    def rope_theta(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", 100.0))  # Gemma4VisionConfig.default_theta


# ----- layers ------------------------------------------------------------------------


class VisionRMSNorm(nn.Module):
    """x / rms(x), times `weight` itself (not 1 + w: Gemma4RMSNorm), in float32, rounded once;
    `scaled=False` has no weight (the v norm, the embedder's norm)."""

    def __init__(self, dims: int, eps: float, scaled: bool = True):
        super().__init__()
        self.eps = eps
        if scaled:
            self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight.astype(mx.float32) if "weight" in self else None
        return mx.fast.rms_norm(x.astype(mx.float32), w, self.eps).astype(x.dtype)


class ClippableLinear(nn.Module):
    """A bias-free projection whose input and output are clamped to stored scalar bounds when the
    config asks (Gemma4ClippableLinear; the bounds are checkpoint buffers, +-inf until loaded)."""

    def __init__(self, dims_in: int, dims_out: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(dims_in, dims_out, bias=False)
        self.clipped = clipped
        if clipped:
            self.input_min, self.input_max = mx.array(-math.inf), mx.array(math.inf)
            self.output_min, self.output_max = mx.array(-math.inf), mx.array(math.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if not self.clipped:
            return self.linear(x)
        # Bounds in the activations' dtype: float32 bounds must not promote a bf16 tower to float32.
        y = self.linear(mx.clip(x, self.input_min.astype(x.dtype), self.input_max.astype(x.dtype)))
        return mx.clip(y, self.output_min.astype(y.dtype), self.output_max.astype(y.dtype))


def axial_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x [B, N, H, D]: the first D/2 channels rotate by the x position, the last D/2 by y, each
    half as rotate-half RoPE (modeling_gemma4.py `apply_multidimensional_rope`).
    cos, sin: [B, N, 1, D] (the x angles twice, then the y angles twice)."""
    half = x.shape[-1] // 2
    parts = []
    for lo in (0, half):
        xp = x[..., lo:lo + half]
        x1, x2 = xp[..., : half // 2], xp[..., half // 2:]
        rotated = mx.concatenate([-x2, x1], axis=-1)
        parts.append(xp * cos[..., lo:lo + half] + rotated * sin[..., lo:lo + half])
    return mx.concatenate(parts, axis=-1)


def rope_tables(positions: mx.array, head_dim: int, theta: float, dtype) -> tuple[mx.array, mx.array]:
    """cos, sin [B, N, 1, head_dim] for patch positions [B, N, 2] (Gemma4VisionRotaryEmbedding:
    head_dim / 4 frequencies over a spatial dim of head_dim / 2, angles in float32, cast to `dtype`)."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (mx.arange(0, spatial, 2, dtype=mx.float32) / spatial))
    angles = positions[..., None].astype(mx.float32) * inv_freq  # [B, N, 2, D/4]
    ax, ay = angles[:, :, 0], angles[:, :, 1]
    full = mx.concatenate([ax, ax, ay, ay], axis=-1)[:, :, None]  # [B, N, 1, D]
    return mx.cos(full).astype(dtype), mx.sin(full).astype(dtype)


class VisionAttention(nn.Module):
    def __init__(self, args: Gemma4VisionArgs):
        super().__init__()
        D, hd, clip = args.hidden_size, args.head_dim, args.use_clipped_linears
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, hd
        self.q_proj = ClippableLinear(D, self.n_heads * hd, clip)
        self.k_proj = ClippableLinear(D, self.n_kv_heads * hd, clip)
        self.v_proj = ClippableLinear(D, self.n_kv_heads * hd, clip)
        self.o_proj = ClippableLinear(self.n_heads * hd, D, clip)
        self.q_norm = VisionRMSNorm(hd, args.rms_norm_eps)
        self.k_norm = VisionRMSNorm(hd, args.rms_norm_eps)
        self.v_norm = VisionRMSNorm(hd, args.rms_norm_eps, scaled=False)

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array], mask: mx.array) -> mx.array:
        B, N, _ = x.shape  # x [B, N, hidden]; mask [B, 1, 1, N], True where a key is a real patch
        q = axial_rope(self.q_norm(self.q_proj(x).reshape(B, N, self.n_heads, -1)), *rope)
        k = axial_rope(self.k_norm(self.k_proj(x).reshape(B, N, self.n_kv_heads, -1)), *rope)
        v = self.v_norm(self.v_proj(x).reshape(B, N, self.n_kv_heads, -1))
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        # Scale 1: the q and k norms set the logits' size (Gemma4VisionAttention.scaling = 1.0).
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, N, -1))


class VisionMLP(nn.Module):
    def __init__(self, args: Gemma4VisionArgs):
        super().__init__()
        D, F, clip = args.hidden_size, args.intermediate_size, args.use_clipped_linears
        self.gate_proj = ClippableLinear(D, F, clip)
        self.up_proj = ClippableLinear(D, F, clip)
        self.down_proj = ClippableLinear(F, D, clip)
        self.act = gelu_for(args.hidden_activation)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionEncoderLayer(nn.Module):
    """x + post_norm(attn(pre_norm(x))), then the same around the MLP (Gemma4VisionEncoderLayer)."""

    def __init__(self, args: Gemma4VisionArgs):
        super().__init__()
        D, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = VisionAttention(args)
        self.mlp = VisionMLP(args)
        self.input_layernorm = VisionRMSNorm(D, eps)
        self.post_attention_layernorm = VisionRMSNorm(D, eps)
        self.pre_feedforward_layernorm = VisionRMSNorm(D, eps)
        self.post_feedforward_layernorm = VisionRMSNorm(D, eps)

    def __call__(self, x: mx.array, rope, mask: mx.array) -> mx.array:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionEncoder(nn.Module):
    def __init__(self, args: Gemma4VisionArgs):
        super().__init__()
        self.layers = [VisionEncoderLayer(args) for _ in range(args.num_hidden_layers)]

    def __call__(self, x: mx.array, rope, mask: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x, rope, mask)
        return x


class PatchEmbedder(nn.Module):
    """Flat patches in [0, 1] -> hidden, plus the x row and y row of the position tables."""

    def __init__(self, args: Gemma4VisionArgs):
        super().__init__()
        self.input_proj = nn.Linear(3 * args.patch_size**2, args.hidden_size, bias=False)
        self.position_embedding_table = mx.ones((2, args.position_embedding_size, args.hidden_size))

    def __call__(self, pixels: mx.array, positions: mx.array, padding: mx.array) -> mx.array:
        # [0, 1] -> [-1, 1] here, not in the processor (Gemma4VisionPatchEmbedder).
        w = self.input_proj.weight
        x = self.input_proj((2 * (pixels - 0.5)).astype(w.dtype))  # [B, N, hidden]
        at = mx.maximum(positions, 0)  # padding's -1 -> a valid row, zeroed below
        table = self.position_embedding_table
        pos = table[0][at[..., 0]] + table[1][at[..., 1]]
        return x + mx.where(padding[..., None], mx.zeros((), pos.dtype), pos)


# ----- the tower ---------------------------------------------------------------------


def pool_by_position(x: mx.array, positions: mx.array, k: int, length: int) -> tuple[mx.array, mx.array]:
    """Average each k x k window of patches ([B, N, hidden], padding already zero) into `length`
    slots, window (wx, wy) at wx + (grid width / k) * wy; and which slots any patch reached
    (modeling_gemma4.py `_avg_pool_by_positions`, its one-hot product in float32)."""
    at = mx.maximum(positions, 0)
    width = mx.max(at[..., 0], axis=-1, keepdims=True) + 1  # [B, 1]
    window = at // k
    slot = window[..., 0] + (width // k) * window[..., 1]  # [B, N]
    weights = (slot[..., None] == mx.arange(length)).astype(mx.float32) / (k * k)  # [B, N, length]
    pooled = weights.swapaxes(1, 2) @ x.astype(mx.float32)  # [B, length, hidden]
    return pooled.astype(x.dtype), mx.any(weights != 0, axis=1)


class Gemma4VisionModel(nn.Module):
    """Patches [B, N, 3 p^2] and positions [B, N, 2] -> soft tokens [total, hidden]: every image's
    real soft tokens, image after image (as transformers' `last_hidden_state`)."""

    def __init__(self, args: Gemma4VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embedder = PatchEmbedder(args)
        self.encoder = VisionEncoder(args)
        if args.standardize:
            self.std_bias = mx.zeros((args.hidden_size,))
            self.std_scale = mx.ones((args.hidden_size,))

    def __call__(self, pixel_values: mx.array, position_ids: mx.array) -> mx.array:
        self._check(pixel_values, position_ids)
        a, k = self.args, self.args.pooling_kernel_size
        padding = mx.all(position_ids == -1, axis=-1)  # [B, N]
        x = self.patch_embedder(pixel_values, position_ids, padding)
        rope = rope_tables(position_ids, a.head_dim, a.rope_theta, x.dtype)
        x = self.encoder(x, rope, (~padding)[:, None, None, :])
        x = mx.where(padding[..., None], mx.zeros((), x.dtype), x)
        length = x.shape[1] // (k * k)
        if k == 1:  # nothing to pool; keep the real patches (transformers would keep its padding mask)
            keep = ~padding
        else:
            x, keep = pool_by_position(x, position_ids, k, length)
        # sqrt(hidden) in float32, kept there through standardization (Gemma4VisionPooler).
        x = x.astype(mx.float32) * math.sqrt(a.hidden_size)
        rows = mx.array(np.flatnonzero(np.array(keep).reshape(-1)))
        x = x.reshape(-1, a.hidden_size)[rows]
        if a.standardize:
            x = (x - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return x.astype(self.patch_embedder.input_proj.weight.dtype)

    def _check(self, pixel_values: mx.array, position_ids: mx.array) -> None:
        a = self.args
        width, k2 = 3 * a.patch_size**2, a.pooling_kernel_size**2
        if pixel_values.ndim != 3 or pixel_values.shape[-1] != width or pixel_values.shape[1] % k2:
            raise ImageError("pixel_values", f"must be [B, patches, {width}] with patches a multiple of {k2}, "
                                             f"got {tuple(pixel_values.shape)}")
        if tuple(position_ids.shape) != (*pixel_values.shape[:2], 2):
            raise ImageError("position_ids", f"must be [B, patches, 2] = {(*pixel_values.shape[:2], 2)}, "
                                             f"got {tuple(position_ids.shape)}")
        if position_ids.size and mx.max(position_ids).item() >= a.position_embedding_size:
            raise ImageError("position_ids", f"a patch grid side reaches past the model's "
                                             f"{a.position_embedding_size} position embeddings")

    def sanitize(self, weights: dict[str, mx.array], prefix: str = "model.vision_tower.") -> dict[str, mx.array]:
        """Drop what transformers does not load: clip bounds of a config without clipping, RoPE tables."""
        out = {}
        for key, value in weights.items():
            if not self.args.use_clipped_linears and key.startswith(prefix) and key.rsplit(".", 1)[-1] in _BOUNDS:
                continue
            if ".rotary_emb." in key:
                continue
            out[key] = value
        return out


_BOUNDS = ("input_min", "input_max", "output_min", "output_max")


class MultimodalEmbedder(nn.Module):
    """Soft tokens -> the text model's width: a weightless RMSNorm, then a projection
    (Gemma4MultimodalEmbedder; HF name `model.embed_vision.embedding_projection`)."""

    def __init__(self, dims_in: int, dims_out: int, eps: float):
        super().__init__()
        self.embedding_pre_projection_norm = VisionRMSNorm(dims_in, eps, scaled=False)
        self.embedding_projection = nn.Linear(dims_in, dims_out, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


def split_vision_weights(weights: dict[str, mx.array]) -> tuple[list, list]:
    """(tower weights, embedder weights) with their prefixes removed, from Hugging Face's layout
    (`model.vision_tower.`, `model.embed_vision.`) or mlx-vlm's (the same without `model.`)."""
    tower, embedder = [], []
    for key, value in weights.items():
        name = key.removeprefix("model.")
        if name.startswith("vision_tower."):
            tower.append((name[len("vision_tower."):], value))
        elif name.startswith("embed_vision."):
            embedder.append((name[len("embed_vision."):], value))
    return tower, embedder
