"""Gemma 2 (2B, 9B, 27B; also the language model of PaliGemma 2).

Differences from Gemma 1: norms before *and* after attention and MLP,
soft-capped attention scores (50) and output logits (30), a query scale of
`query_pre_attn_scalar ** -0.5` (27B uses 144, not head_dim), and sliding-window
attention (4096) on every other layer, starting with the first.  mlx-lm drops
the window; we keep it, in full-sequence calls and in the cache.
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
    hidden_size: int  # width of the residual stream (2304 for 2B)
    num_hidden_layers: int  # decoder blocks
    intermediate_size: int  # GeGLU inner width
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads (grouped-query attention)
    head_dim: int = 256  # independent of hidden_size / heads
    vocab_size: int = 256_000
    model_type: str = "gemma2"
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256  # attention scores are scaled by this ** -0.5
    attn_logit_softcapping: float | None = 50.0  # cap * tanh(scores / cap)
    final_logit_softcapping: float | None = 30.0  # cap * tanh(logits / cap)
    sliding_window: int = 4096  # local layers see this many positions (self included)
    layer_types: list[str] | None = None  # "sliding_attention" / "full_attention" per layer
    rope_theta: float = 10_000.0
    rope_parameters: dict | None = None  # transformers>=5 spelling of the RoPE settings
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    max_position_embeddings: int = 8192  # context length
    tie_word_embeddings: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # keys we keep but do not interpret

    @classmethod
    def from_dict(cls, config: dict, path=None, where: str = "") -> "ModelArgs":
        args = parse_config(cls, config, path, where)
        try:
            gelu_for(args.hidden_activation)
        except ValueError as e:  # refused here, naming the file, not when the MLP is built
            raise ConfigError(path, f"{where}hidden_activation: {e}") from None
        # Layer 0 is local, layer 1 global, and so on (transformers' Gemma2Config).
        args.layer_types = layer_types_from(args.layer_types, 2, args.num_hidden_layers, path)
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            setattr(args, key, finite_or_none(getattr(args, key), path, where + key))
        rope = rope_settings(args.rope_parameters, path, where + "rope_parameters")
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(path, f"unsupported RoPE type {rope['rope_type']!r:.80} for Gemma 2")
        args.rope_theta = float(rope.get("rope_theta", args.rope_theta))
        return args


class Attention(nn.Module):
    """Grouped-query attention with RoPE and soft-capped scores."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.query_pre_attn_scalar**-0.5  # not head_dim: 27B's scalar is 144
        self.logit_softcap = args.attn_logit_softcapping
        self.rope_base = args.rope_theta
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=bias)

    def __call__(self, x: mx.array, mask, cache=None) -> mx.array:
        B, T, _ = x.shape  # x: [B, T, hidden]
        q = self.q_proj(x).reshape(B, T, self.n_heads, -1).transpose(0, 2, 1, 3)  # [B, heads, T, head_dim]
        k = self.k_proj(x).reshape(B, T, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # [B, kv_heads, T, head_dim]
        v = self.v_proj(x).reshape(B, T, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # [B, kv_heads, T, head_dim]
        offset = 0 if cache is None else cache.offset  # new tokens follow the cached ones
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # [B, kv_heads, S, head_dim]: cached + new
        out = attention(q, k, v, self.scale, mask, self.logit_softcap)  # [B, heads, T, head_dim]
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))  # [B, T, hidden]


class TransformerBlock(nn.Module):
    """Sandwich norms: x + norm(attn(norm(x))), then x + norm(mlp(norm(x)))."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        local = args.layer_types[layer_idx] == "sliding_attention"
        self.window = args.sliding_window if local else None  # None: global (base.Block)
        self.self_attn = Attention(args)
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
    """Gemma 2 causal LM: token ids -> logits [B, T, vocab] (the contract: base.GemmaModel)."""

    prefix_lm = False  # causal throughout: a prompt may be prefilled in chunks
    float_prefixes = ()  # the converter may quantize every linear layer
    image_input = None  # text only

    def __init__(self, args: ModelArgs):
        super().__init__(args, TransformerBlock)
