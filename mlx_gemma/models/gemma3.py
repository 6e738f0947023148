"""Gemma 3 text model (`gemma3_text`, and the language half of `gemma3` checkpoints).

Differences from Gemma 2: q/k RMSNorm on each head, a 5 local : 1 global layer
pattern, separate RoPE bases for local (10k) and global (1M, optionally
linearly scaled) layers, and no soft-capping by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import ConfigError
from .config import finite_or_none, layer_types_from, parse_config, rope_settings
from .decoder import CausalLM
from .layers import GeGLU, RMSNorm, attention, gelu_for, residual_add


@dataclass
class ModelArgs:
    hidden_size: int  # width of the residual stream (640 for 270M, 2560 for 4B)
    num_hidden_layers: int  # decoder blocks
    intermediate_size: int  # GeGLU inner width
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads (grouped-query attention)
    head_dim: int = 256  # independent of hidden_size / heads
    vocab_size: int = 262_144
    model_type: str = "gemma3_text"
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256  # attention scores are scaled by this ** -0.5
    sliding_window: int = 4096  # local layers see this many positions (self included)
    layer_types: list[str] | None = None  # "sliding_attention" / "full_attention" per layer
    sliding_window_pattern: int = 6  # legacy form: every 6th layer is global
    rope_theta: float = 1_000_000.0  # RoPE base of global layers
    rope_local_base_freq: float = 10_000.0  # RoPE base of local layers
    rope_scaling: dict | None = None  # {"rope_type": "linear", "factor": 8} for global layers
    rope_parameters: dict | None = None  # transformers>=5: {"full_attention": {...}, "sliding_attention": {...}}
    hidden_activation: str = "gelu_pytorch_tanh"
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    attention_bias: bool = False
    use_bidirectional_attention: bool = False  # EmbeddingGemma only; refused below
    max_position_embeddings: int = 131_072  # context length
    tie_word_embeddings: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # keys we keep but do not interpret
    rope: dict = field(default_factory=dict)  # derived: layer kind -> (base, position scale)

    @classmethod
    def from_dict(cls, config: dict, path=None, where: str = "") -> "ModelArgs":
        args = parse_config(cls, config, path, where)
        try:
            gelu_for(args.hidden_activation)
        except ValueError as e:  # refused here, naming the file, not when the MLP is built
            raise ConfigError(path, f"{where}hidden_activation: {e}") from None
        if args.use_bidirectional_attention:
            raise ConfigError(path, "bidirectional Gemma 3 (EmbeddingGemma) is not a causal LM")
        args.layer_types = layer_types_from(
            args.layer_types, args.sliding_window_pattern, args.num_hidden_layers, path
        )
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            setattr(args, key, finite_or_none(getattr(args, key), path, where + key))
        args.rope = {kind: _rope_for(args, kind, path, where) for kind in ("full_attention", "sliding_attention")}
        return args


def _rope_for(args: ModelArgs, kind: str, path, where: str = "") -> tuple[float, float]:
    """(base, position scale) of the RoPE used by layers of `kind`."""
    if args.rope_parameters and args.rope_parameters.get(kind):
        params = rope_settings(args.rope_parameters[kind], path, f"{where}rope_parameters.{kind}")
    elif kind == "full_attention":
        params = {"rope_theta": args.rope_theta, **rope_settings(args.rope_scaling, path, where + "rope_scaling")}
    else:
        params = {"rope_theta": args.rope_local_base_freq}
    default_base = args.rope_theta if kind == "full_attention" else args.rope_local_base_freq
    base = float(params.get("rope_theta", default_base))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return base, 1.0
    if rope_type == "linear":
        if "factor" not in params:
            raise ConfigError(path, f"{where}linear RoPE for {kind} layers needs a 'factor'")
        return base, 1.0 / float(params["factor"])  # positions divided by the factor
    raise ConfigError(path, f"{where}unsupported RoPE type {rope_type!r:.80} for {kind} layers")


class Attention(nn.Module):
    """Grouped-query attention with per-head q/k norms and the RoPE of its layer kind."""

    def __init__(self, args: ModelArgs, kind: str):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.query_pre_attn_scalar**-0.5
        self.logit_softcap = args.attn_logit_softcapping
        self.rope_base, self.rope_scale = args.rope[kind]  # local and global layers differ
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)

    def __call__(self, x: mx.array, mask, cache=None) -> mx.array:
        B, T, _ = x.shape  # x: [B, T, hidden]
        q = self.q_proj(x).reshape(B, T, self.n_heads, -1).transpose(0, 2, 1, 3)  # [B, heads, T, head_dim]
        k = self.k_proj(x).reshape(B, T, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # [B, kv_heads, T, head_dim]
        v = self.v_proj(x).reshape(B, T, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # [B, kv_heads, T, head_dim]
        q, k = self.q_norm(q), self.k_norm(k)  # per head, before RoPE
        offset = 0 if cache is None else cache.offset  # new tokens follow the cached ones
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_base, scale=self.rope_scale, offset=offset)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_base, scale=self.rope_scale, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # [B, kv_heads, S, head_dim]: cached + new
        out = attention(q, k, v, self.scale, mask, self.logit_softcap)  # [B, heads, T, head_dim]
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))  # [B, T, hidden]


class TransformerBlock(nn.Module):
    """Sandwich norms, as Gemma 2: x + norm(attn(norm(x))), then x + norm(mlp(norm(x)))."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        kind = args.layer_types[layer_idx]  # "sliding_attention" or "full_attention"
        self.window = args.sliding_window if kind == "sliding_attention" else None  # None: global (base.Block)
        self.self_attn = Attention(args, kind)
        self.mlp = GeGLU(args.hidden_size, args.intermediate_size, args.hidden_activation)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, x: mx.array, mask, cache=None) -> mx.array:  # [B, T, hidden] -> [B, T, hidden]
        h = self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), mask, cache))
        x = residual_add(x, h)
        h = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return residual_add(x, h)


class Model(CausalLM):
    """Gemma 3 causal LM: token ids -> logits [B, T, vocab] (the contract: base.GemmaModel)."""

    prefix_lm = False  # causal throughout: a prompt may be prefilled in chunks
    float_prefixes = ()  # the converter may quantize every linear layer
    image_input = None  # text only (a multimodal checkpoint loads as its language half)

    def __init__(self, args: ModelArgs):
        super().__init__(args, TransformerBlock)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Also accept the language half of a multimodal `gemma3` checkpoint.

        It keeps the text model under `language_model.model.*` (transformers
        < 4.52) or `model.language_model.*` (newer); loading it as a text model
        drops the vision tower and the projector.
        """
        text = {}
        for name, w in weights.items():
            if name.startswith(_VISION_PREFIXES):
                continue
            for old, new in _TEXT_PREFIXES:
                if name.startswith(old):
                    name = new + name[len(old):]
                    break
            text[name] = w
        return super().sanitize(text)


_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
_TEXT_PREFIXES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
