"""SigLIP vision tower, as PaliGemma uses it: pixels -> one feature per patch.

Patch embedding (a stride-`patch` convolution), learned absolute position
embeddings, pre-LayerNorm encoder layers with biases and a tanh-approximate
GELU MLP, and a final LayerNorm.  No pooling head: PaliGemma feeds every patch's
feature to the language model (transformers' `get_image_features` takes
`last_hidden_state`).  Weight names follow Hugging Face's `SiglipVisionModel`
(`vision_model.embeddings...`, `vision_model.encoder.layers.N...`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..arguments import is_integer
from ..errors import ConfigError, ImageError
from .config import parse_config
from .layers import gelu_for


@dataclass
class VisionArgs:
    hidden_size: int = 1152  # So400m/14
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224  # square input side; 448 and 896 for the larger PaliGemmas
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    model_type: str = "siglip_vision_model"
    extra: dict[str, Any] = field(default_factory=dict)  # keys we keep but do not interpret

    @classmethod
    def from_dict(cls, config: dict, path=None, where: str = "vision_config.") -> "VisionArgs":
        args = parse_config(cls, config, path, where)
        for key in ("num_channels", "image_size", "patch_size"):
            v = getattr(args, key)
            if not is_integer(v) or not 0 < v <= 1 << 14:
                raise ConfigError(path, f"vision_config.{key} must be a positive integer, got {v!r}")
        if args.image_size % args.patch_size:
            raise ConfigError(
                path, f"vision_config.image_size {args.image_size} is not a multiple of patch_size {args.patch_size}"
            )
        if args.hidden_size % args.num_attention_heads:
            raise ConfigError(
                path, f"vision_config.hidden_size {args.hidden_size} is not a multiple of "
                f"num_attention_heads {args.num_attention_heads}"
            )
        try:
            gelu_for(args.hidden_act)
        except ValueError as e:
            raise ConfigError(path, f"vision_config: {e}") from e
        return args

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class VisionEmbeddings(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        # MLX convolutions are channels-last: weight [hidden, patch, patch, channels].
        self.patch_embedding = nn.Conv2d(
            args.num_channels, args.hidden_size, kernel_size=args.patch_size, stride=args.patch_size
        )
        self.position_embedding = nn.Embedding(args.num_patches, args.hidden_size)

    def __call__(self, pixel_values: mx.array) -> mx.array:  # [B, H, W, C] -> [B, patches, hidden]
        # transformers casts pixels to the conv weight's dtype first.
        x = self.patch_embedding(pixel_values.astype(self.patch_embedding.weight.dtype))
        B, gh, gw, D = x.shape
        # Row-major patch order, as transformers' `flatten(2).transpose(1, 2)`.
        x = x.reshape(B, gh * gw, D)
        return x + self.position_embedding.weight


class Attention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        D = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.scale = (D // self.n_heads) ** -0.5
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def __call__(self, x: mx.array) -> mx.array:
        B, N, _ = x.shape  # [B, patches, hidden]
        q, k, v = (
            proj(x).reshape(B, N, self.n_heads, -1).transpose(0, 2, 1, 3)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)  # no mask: all patches
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, N, -1))


class MLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.hidden_size, args.intermediate_size)
        self.fc2 = nn.Linear(args.intermediate_size, args.hidden_size)
        self.act = gelu_for(args.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.self_attn = Attention(args)
        self.layer_norm2 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = MLP(args)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.layers = [EncoderLayer(args) for _ in range(args.num_hidden_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.embeddings = VisionEmbeddings(args)
        self.encoder = Encoder(args)
        self.post_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


class VisionModel(nn.Module):
    """Pixels [B, H, W, C] in [-1, 1] (H = W = image_size) -> features [B, patches, hidden]."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.vision_model = VisionTransformer(args)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        a = self.args
        expected = (a.image_size, a.image_size, a.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ImageError(
                "pixel_values", f"must be [B, {a.image_size}, {a.image_size}, {a.num_channels}] (NHWC), "
                f"got {tuple(pixel_values.shape)}"
            )
        return self.vision_model(pixel_values)

    def sanitize(self, weights: dict[str, mx.array], prefix: str = "") -> dict[str, mx.array]:
        """Hugging Face's layout -> ours: the conv kernel OIHW -> OHWI; no pooling head."""
        out = {}
        key = f"{prefix}vision_model.embeddings.patch_embedding.weight"
        for k, v in weights.items():
            if k.startswith(f"{prefix}vision_model.head."):
                continue  # SigLIP's attention-pooling head: PaliGemma never uses it
            if k == key and v.ndim == 4 and v.shape[1] == self.args.num_channels and v.shape[-1] != v.shape[1]:
                v = v.transpose(0, 2, 3, 1)  # torch [out, in, kh, kw] -> MLX [out, kh, kw, in]
            out[k] = v
        return out
