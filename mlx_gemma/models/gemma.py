"""Gemma 1 (2B MQA, 7B MHA; also 1.1, CodeGemma, and PaliGemma 1's language model).

A pre-norm decoder: RMSNorm(1 + w), GeGLU MLP, RoPE, attention scaled by
head_dim ** -0.5, embeddings scaled by sqrt(hidden) and tied to the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import ConfigError
from .config import parse_config, rope_settings
from .decoder import CausalLM
from .layers import GeGLU, RMSNorm, attention, gelu_for, residual_add


@dataclass
class ModelArgs:
    hidden_size: int  # width of the residual stream (2048 for 2B, 3072 for 7B)
    num_hidden_layers: int  # decoder blocks
    intermediate_size: int  # GeGLU inner width
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # 1 for 2B (multi-query), = heads for 7B
    head_dim: int = 256  # independent of hidden_size / heads
    vocab_size: int = 256_000
    model_type: str = "gemma"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    rope_parameters: dict | None = None  # transformers>=5 spelling of the RoPE settings
    hidden_activation: str | None = None  # wins over hidden_act when set
    hidden_act: str = "gelu_pytorch_tanh"  # legacy configs say "gelu" (see below)
    attention_bias: bool = False
    max_position_embeddings: int = 8192  # context length
    tie_word_embeddings: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # keys we keep but do not interpret

    # Gemma 1 caps neither scores nor logits.  Plain class attributes, not fields: the
    # contract (base.GemmaArgs) names them, but a Gemma config never sets them.
    attn_logit_softcapping = None
    final_logit_softcapping = None

    @classmethod
    def from_dict(cls, config: dict, path=None, where: str = "") -> "ModelArgs":
        args = parse_config(cls, config, path, where)
        # Gemma 1 configs shipped `hidden_act: "gelu"` but were trained with the
        # tanh approximation; transformers maps that legacy value to it, so do we.
        # An explicit `hidden_activation` is taken as written.
        activation = args.hidden_activation or args.hidden_act
        if args.hidden_activation is None and activation == "gelu":
            activation = "gelu_pytorch_tanh"
        try:
            gelu_for(activation)
        except ValueError as e:
            raise ConfigError(path, f"{where}hidden_activation: {e}") from e
        args.hidden_activation = activation
        rope = rope_settings(args.rope_parameters, path, where + "rope_parameters")
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(path, f"unsupported RoPE type {rope['rope_type']!r:.80} for Gemma")
        args.rope_theta = float(rope.get("rope_theta", args.rope_theta))
        return args


class Attention(nn.Module):
    """Multi-head (7B) or multi-query (2B) attention with RoPE on queries and keys."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
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
        out = attention(q, k, v, self.scale, mask)  # [B, heads, T, head_dim]
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))  # [B, T, hidden]


class TransformerBlock(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.window = None  # Gemma 1 attends globally in every layer (base.Block)
        self.self_attn = Attention(args)
        self.mlp = GeGLU(args.hidden_size, args.intermediate_size, args.hidden_activation)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, x: mx.array, mask, cache=None) -> mx.array:  # [B, T, hidden] -> [B, T, hidden]
        x = residual_add(x, self.self_attn(self.input_layernorm(x), mask, cache))
        return residual_add(x, self.mlp(self.post_attention_layernorm(x)))


class Model(CausalLM):
    """Gemma causal LM: token ids -> logits [B, T, vocab] (the contract: base.GemmaModel)."""

    prefix_lm = False  # causal throughout: a prompt may be prefilled in chunks
    float_prefixes = ()  # the converter may quantize every linear layer
    image_input = None  # text only

    def __init__(self, args: ModelArgs):
        super().__init__(args, TransformerBlock)
