"""Gemma 4 text model (`gemma4_text`, and the language half of `gemma4` checkpoints): dense and MoE.

As transformers 5.25's `modeling_gemma4.py` defines it.  What differs from Gemma 3:
- global layers have their own head dim (and, with `attention_k_eq_v`, their own KV-head
  count, and values that are the keys' projection); attention is unscaled (1.0), with
  q/k norms and a scale-free v norm;
- RMSNorm multiplies by the stored weight itself (not `1 + w`);
- global layers use "proportional" RoPE: only the first `partial_rotary_factor` of each
  head's frequency pairs rotate;
- per-layer input embeddings (PLE, E2B/E4B): a packed table of one small embedding per
  layer, mixed with a projection of the token embedding, gated into each block after its MLP;
- KV sharing: the last `num_kv_shared_layers` blocks have no K/V weights and attend with
  the keys and values of the last earlier block of their kind.  The stack hands those along
  in the forward pass; their caches are `kv_cache.SharedKVCache` entries that hold nothing.
  Nothing a shared block computes is stored, so in a chunked prefill (the engine evaluates only
  the caches between chunks) MLX runs the shared blocks for the last chunk alone; transformers
  instead cuts their positions to the kept logits (`_maybe_slice_kv_shared_inputs`);
- with `enable_moe_block` (26B-A4B) a mixture of experts (moe.py) runs beside each block's MLP;
- each block ends by multiplying by its `layer_scalar`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..arguments import is_integer
from ..errors import ConfigError, GenerationError
from .config import finite_or_none, layer_types_from, parse_config, rope_settings
from .decoder import layer_mask
from .image_blocks import with_image_blocks
from .kv_cache import KVCacheOptions, make_layer_caches
from .layers import GeGLU, attention, embedding_scale, gelu_for, residual_add, softcap
from .moe import Experts, Router, sanitize_experts, sanitize_quantization

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass
class ModelArgs:
    hidden_size: int  # width of the residual stream (1536 for E2B, 5376 for 31B)
    num_hidden_layers: int  # decoder blocks
    intermediate_size: int  # GeGLU inner width (doubled on KV-shared blocks with use_double_wide_mlp)
    num_attention_heads: int  # query heads, every layer
    num_key_value_heads: int  # key/value heads of sliding layers (and of global ones unless overridden)
    head_dim: int = 256  # head width of sliding layers
    global_head_dim: int = 512  # head width of global layers (transformers reads it into per_layer_config)
    num_global_key_value_heads: int | None = None  # KV heads of global layers; only with attention_k_eq_v
    per_layer_config: dict | None = None  # {"layer index": {"head_dim", "num_key_value_heads"}}, as transformers saves
    vocab_size: int = 262_144
    model_type: str = "gemma4_text"
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512  # sliding layers see this many positions (self included)
    layer_types: list[str] | None = None  # "sliding_attention" / "full_attention" per layer; None: 5 local : 1 global
    rope_parameters: dict | None = None  # per layer kind: {"rope_type", "rope_theta", "partial_rotary_factor", ...}
    hidden_activation: str = "gelu_pytorch_tanh"
    final_logit_softcapping: float | None = None  # cap on output logits (30 in Google's checkpoints)
    attn_logit_softcapping: float | None = None  # Gemma 4 has none; kept for the contract (base.GemmaArgs)
    attention_bias: bool = False
    attention_k_eq_v: bool = False  # global layers use the key projection as values (no v_proj)
    num_kv_shared_layers: int = 0  # the last this many layers reuse earlier layers' keys/values
    vocab_size_per_layer_input: int = 262_144  # rows of the packed per-layer embedding table
    hidden_size_per_layer_input: int | None = 256  # per-layer input width; 0 / None: no per-layer inputs
    use_double_wide_mlp: bool = False  # KV-shared layers' MLP is twice as wide
    use_bidirectional_attention: str | None = None  # "vision": image tokens both ways (text stays causal); "all": refused
    enable_moe_block: bool = False  # every block also runs a mixture of experts beside its MLP (26B-A4B)
    num_experts: int | None = None  # MoE: experts per block
    top_k_experts: int | None = None  # MoE: experts each token uses
    moe_intermediate_size: int | None = None  # MoE: each expert's GeGLU inner width
    max_position_embeddings: int = 131_072  # context length
    tie_word_embeddings: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # keys we keep but do not interpret
    rope: dict = field(default_factory=dict)  # derived: layer kind -> RoPE periods [head_dim / 2] or base

    @classmethod
    def from_dict(cls, config: dict, path=None, where: str = "") -> "ModelArgs":
        args = parse_config(cls, config, path, where)
        try:
            gelu_for(args.hidden_activation)
        except ValueError as e:
            raise ConfigError(path, f"{where}hidden_activation: {e}") from None
        _check_features(args, path, where)
        args.layer_types = layer_types_from(args.layer_types, 6, args.num_hidden_layers, path)
        # transformers forces the last layer global (Gemma4TextConfig.__post_init__, with a warning)
        args.layer_types[-1] = FULL
        args.final_logit_softcapping = finite_or_none(args.final_logit_softcapping, path,
                                                      where + "final_logit_softcapping")
        _check_layer_overrides(args, path, where)
        _check_sharing(args, path, where)
        args.rope = {kind: _rope_for(args, kind, path, where) for kind in (FULL, SLIDING)}
        return args

    def layer_shape(self, i: int) -> tuple[int, int]:
        """(KV heads, head dim) of layer i: global layers as overridden (per_layer_config, or
        global_head_dim / num_global_key_value_heads as transformers reads them)."""
        if self.per_layer_config is not None:
            o = self.per_layer_config.get(str(i), {})
            return o.get("num_key_value_heads", self.num_key_value_heads), o.get("head_dim", self.head_dim)
        if self.layer_types[i] != FULL:
            return self.num_key_value_heads, self.head_dim
        heads = self.num_global_key_value_heads if self.attention_k_eq_v else None  # k_eq_v gates it
        return heads or self.num_key_value_heads, self.global_head_dim

    @property
    def first_shared(self) -> int:
        """Index of the first KV-shared layer (num_hidden_layers when none is)."""
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_sources(self) -> list[int | None]:
        """Per layer: None, or the earlier layer whose keys and values it attends with
        (the last non-shared layer of its kind: transformers' `kv_sharing_modes` "store")."""
        last = {kind: i for i, kind in enumerate(self.layer_types[: self.first_shared])}
        return [None if i < self.first_shared else last[kind] for i, kind in enumerate(self.layer_types)]


def _check_features(args: ModelArgs, path, where: str) -> None:
    """Refuse what this module does not run, naming the field."""
    if args.enable_moe_block:
        for key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            v = getattr(args, key)
            if not is_integer(v) or not 0 < v <= 1 << 20:
                raise ConfigError(path, f"{where}{key} must be a positive integer with enable_moe_block, got {v!r}")
        if args.top_k_experts > args.num_experts:
            raise ConfigError(path, f"{where}top_k_experts ({args.top_k_experts}) exceeds num_experts "
                                    f"({args.num_experts})")
    if args.use_bidirectional_attention not in (None, "vision"):
        raise ConfigError(path, f"{where}use_bidirectional_attention {args.use_bidirectional_attention!r:.40}: "
                                "only 'vision' (image tokens) runs as a causal LM; 'all' is an encoder")
    if args.attn_logit_softcapping is not None:
        raise ConfigError(path, f"{where}attn_logit_softcapping: Gemma 4 has no attention soft-cap")
    for key in ("global_head_dim", "vocab_size_per_layer_input"):
        if not 0 < getattr(args, key) <= 1 << 22:
            raise ConfigError(path, f"{where}{key} must be a positive integer, got {getattr(args, key)!r}")
    for key, low in (("num_global_key_value_heads", 1), ("hidden_size_per_layer_input", 0)):  # 0: no PLE
        v = getattr(args, key)
        if v is not None and not low <= v <= 1 << 16:
            raise ConfigError(path, f"{where}{key} must be an integer in [{low}, {1 << 16}], got {v!r}")


def _check_layer_overrides(args: ModelArgs, path, where: str) -> None:
    """per_layer_config: layer indices -> head_dim / num_key_value_heads only, each a positive
    integer; every layer's KV heads divide the query heads."""
    if args.per_layer_config is not None:  # keyed by the layer index as text, as JSON writes it
        args.per_layer_config = {str(k): v for k, v in args.per_layer_config.items()}
        for key, o in args.per_layer_config.items():
            name = f"{where}per_layer_config.{key}"
            if not (key.isdigit() and int(key) < args.num_hidden_layers) or not isinstance(o, dict):
                raise ConfigError(path, f"{name}: expected a layer index below {args.num_hidden_layers} "
                                        "mapped to an object")
            unknown = sorted(set(o) - {"head_dim", "num_key_value_heads"})
            if unknown:
                raise ConfigError(path, f"{name}: unsupported per-layer settings {unknown[:3]}")
            if any(not is_integer(v) or not 0 < v <= 4096 for v in o.values()):
                raise ConfigError(path, f"{name}: head_dim / num_key_value_heads must be positive integers")
    for i in range(args.num_hidden_layers):
        heads, dim = args.layer_shape(i)
        if args.num_attention_heads % heads or dim % 2:
            raise ConfigError(path, f"{where}layer {i}: {args.num_attention_heads} query heads over {heads} "
                                    f"KV heads of width {dim} (heads must divide, widths be even)")


def _check_sharing(args: ModelArgs, path, where: str) -> None:
    """Each kind a shared layer reads must be stored by an earlier, non-shared layer."""
    n = args.num_kv_shared_layers
    if not is_integer(n) or not 0 <= n < args.num_hidden_layers:
        raise ConfigError(path, f"{where}num_kv_shared_layers must be in [0, {args.num_hidden_layers}), got {n!r}")
    stored = set(args.layer_types[: args.first_shared])
    if set(args.layer_types[args.first_shared:]) - stored:
        raise ConfigError(path, f"{where}num_kv_shared_layers: a shared layer's kind has no earlier layer "
                                "to read keys and values from")


def _rope_for(args: ModelArgs, kind: str, path, where: str) -> mx.array | float:
    """The RoPE of `kind` layers: a base (default RoPE) or, for proportional RoPE, the period of
    each of the head's dim / 2 frequency pairs (inf: the pair does not rotate)."""
    defaults = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}
    params = (args.rope_parameters or defaults).get(kind) or defaults[kind]
    key = f"{where}rope_parameters.{kind}"
    params = rope_settings(params, path, key)
    base = float(params.get("rope_theta", defaults[kind]["rope_theta"]))
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        return base  # every pair rotates; partial_rotary_factor is not read (transformers' default RoPE)
    if rope_type != "proportional":
        raise ConfigError(path, f"{key}: unsupported RoPE type {rope_type!r:.80}")
    dims = {args.layer_shape(i)[1] for i, k in enumerate(args.layer_types) if k == kind} or {args.head_dim}
    if len(dims) > 1:  # transformers makes one RoPE table per layer kind
        raise ConfigError(path, f"{key}: {kind} layers of different head dims {sorted(dims)} cannot share a RoPE")
    dim = dims.pop()
    fraction = params.get("partial_rotary_factor", 1.0)
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction <= 1:
        raise ConfigError(path, f"{key}.partial_rotary_factor must be in [0, 1], got {fraction!r:.40}")
    # transformers' _compute_proportional_rope_parameters: int(fraction * dim // 2) pairs rotate,
    # with exponents over the whole head dim; the rest get frequency 0; all divided by `factor`.
    rotated = int(fraction * dim // 2)
    inv = 1.0 / (base ** (mx.arange(0, 2 * rotated, 2, dtype=mx.float32) / dim)) / float(params.get("factor", 1.0))
    periods = mx.concatenate([1.0 / inv, mx.full((dim // 2 - rotated,), math.inf)])  # mx.fast.rope takes periods
    return periods


class RMSNorm(nn.Module):
    """Gemma 4's RMSNorm: scaled by the stored weight itself (transformers' Gemma4RMSNorm, init 1),
    in float32 and rounded once; `with_scale=False` is the v norm's, which has no weight."""

    def __init__(self, dims: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        if with_scale:
            self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight.astype(mx.float32) if "weight" in self else None
        return mx.fast.rms_norm(x.astype(mx.float32), w, self.eps).astype(x.dtype)


def _rope(x: mx.array, rope, offset: int) -> mx.array:
    """RoPE on [B, heads, T, head_dim] in transformers' half-split layout (not interleaved)."""
    if isinstance(rope, float):
        return mx.fast.rope(x, x.shape[-1], traditional=False, base=rope, scale=1.0, offset=offset)
    return mx.fast.rope(x, x.shape[-1], traditional=False, base=None, scale=1.0, offset=offset, freqs=rope)


class Attention(nn.Module):
    """Grouped-query attention, unscaled, with q/k norms and a scale-free v norm; a KV-shared
    layer has only its queries and output and attends with the keys/values it is handed."""

    def __init__(self, args: ModelArgs, i: int):
        super().__init__()
        kind = args.layer_types[i]
        self.n_heads = args.num_attention_heads
        self.n_kv_heads, self.head_dim = args.layer_shape(i)
        self._rope = args.rope[kind]  # underscored: a constant, not a parameter
        self.shared = args.kv_sources()[i] is not None
        self.k_eq_v = args.attention_k_eq_v and kind == FULL  # values are the keys' projection
        bias, hidden = args.attention_bias, args.hidden_size
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        if not self.shared:
            self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
            if not self.k_eq_v:
                self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
            self.v_norm = RMSNorm(self.head_dim, args.rms_norm_eps, with_scale=False)

    def __call__(self, x: mx.array, mask, cache, offset: int, shared_kv=None) -> tuple[mx.array, tuple]:
        B, T, _ = x.shape  # x: [B, T, hidden]
        q = self.q_proj(x).reshape(B, T, self.n_heads, -1)
        q = _rope(self.q_norm(q).transpose(0, 2, 1, 3), self._rope, offset)  # [B, heads, T, head_dim]
        if self.shared:
            k, v = shared_kv  # the store layer's, as it attended with them
        else:
            k = self.k_proj(x).reshape(B, T, self.n_kv_heads, -1)  # [B, T, kv_heads, head_dim]
            v = k if self.k_eq_v else self.v_proj(x).reshape(B, T, self.n_kv_heads, -1)
            k = _rope(self.k_norm(k).transpose(0, 2, 1, 3), self._rope, offset)  # [B, kv_heads, T, head_dim]
            v = self.v_norm(v).transpose(0, 2, 1, 3)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)  # [B, kv_heads, S, head_dim]: cached + new
        out = attention(q, k, v, 1.0, mask)  # [B, heads, T, head_dim]; scaling 1.0 (transformers)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1)), (k, v)


class DecoderLayer(nn.Module):
    """Sandwich-normed attention and MLP, then the per-layer input gate, then `layer_scalar`."""

    def __init__(self, args: ModelArgs, i: int):
        super().__init__()
        self.kind = args.layer_types[i]
        self.window = args.sliding_window if self.kind == SLIDING else None  # None: global (base.Block)
        self.self_attn = Attention(args, i)
        wide = 2 if args.use_double_wide_mlp and self.self_attn.shared else 1  # Gemma4TextMLP
        self.mlp = GeGLU(args.hidden_size, args.intermediate_size * wide, args.hidden_activation)
        eps, hidden = args.rms_norm_eps, args.hidden_size
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)
        self.layer_scalar = mx.ones((1,))
        self.per_layer = bool(args.hidden_size_per_layer_input)
        if self.per_layer:
            self.act = gelu_for(args.hidden_activation)
            self.per_layer_input_gate = nn.Linear(hidden, args.hidden_size_per_layer_input, bias=False)
            self.per_layer_projection = nn.Linear(args.hidden_size_per_layer_input, hidden, bias=False)
            self.post_per_layer_input_norm = RMSNorm(hidden, eps)
        self.moe = args.enable_moe_block
        if self.moe:  # beside the dense MLP (transformers' Gemma4TextDecoderLayer); moe.py runs it
            self.router = Router(hidden, args.num_experts, args.top_k_experts, eps)
            self.experts = Experts(args.num_experts, hidden, args.moe_intermediate_size, args.hidden_activation)
            self.post_feedforward_layernorm_1 = RMSNorm(hidden, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(hidden, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(hidden, eps)

    def feed_forward(self, x: mx.array) -> mx.array:
        """The MLP's output, or with MoE the normed sum of the MLP's and the experts' (both read x)."""
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if not self.moe:
            return h
        flat = x.reshape(-1, x.shape[-1])  # [B*T, hidden]: the router reads the residual before any norm
        weights, indices = self.router(flat)
        experts = self.experts(self.pre_feedforward_layernorm_2(flat), indices, weights).reshape(x.shape)
        return self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(experts)

    def __call__(self, x: mx.array, mask, cache=None, offset: int = 0, per_layer_input=None,
                 shared_kv=None) -> tuple[mx.array, tuple]:  # x: [B, T, hidden]; per_layer_input: [B, T, P]
        h, kv = self.self_attn(self.input_layernorm(x), mask, cache, offset, shared_kv)
        x = residual_add(x, self.post_attention_layernorm(h))
        x = residual_add(x, self.post_feedforward_layernorm(self.feed_forward(x)))
        if self.per_layer:
            gate = self.act(self.per_layer_input_gate(x)) * per_layer_input  # [B, T, P]
            x = residual_add(x, self.post_per_layer_input_norm(self.per_layer_projection(gate)))
        return x * self.layer_scalar.astype(x.dtype), kv


class Gemma4Stack(nn.Module):
    """Token ids -> normed last hidden state [B, T, hidden]: Gemma 4's own stack (per-layer
    inputs, per-layer head dims and shared keys/values do not fit decoder.DecoderStack)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.per_layer = args.hidden_size_per_layer_input or 0  # P
        if self.per_layer:
            width = args.num_hidden_layers * self.per_layer  # the table packs every layer's P columns
            self.embed_tokens_per_layer = nn.Embedding(args.vocab_size_per_layer_input, width)
            self.per_layer_model_projection = nn.Linear(args.hidden_size, width, bias=False)
            self.per_layer_projection_norm = RMSNorm(self.per_layer, args.rms_norm_eps)

    def embed(self, input_ids: mx.array) -> mx.array:
        """Scaled token embeddings, as the first block receives them."""
        h = self.embed_tokens(input_ids)
        return h * embedding_scale(self.args.hidden_size, h.dtype)

    def per_layer_inputs(self, input_ids: mx.array, h: mx.array) -> mx.array:
        """[B, T, layers, P]: each layer's token embedding mixed with a projection of the
        scaled token embedding `h` (transformers' get_ / project_per_layer_inputs).  Every layer's
        P columns are computed alone, so a table holding some layers' columns gives those layers'
        inputs (a pipeline rank's, distributed/per_layer_split.py)."""
        shape = (*input_ids.shape, -1, self.per_layer)
        token = self.embed_tokens_per_layer(input_ids)
        token = (token * embedding_scale(self.per_layer, token.dtype)).reshape(shape)
        projected = self.per_layer_model_projection(h) * (self.args.hidden_size ** -0.5)
        projected = self.per_layer_projection_norm(projected.reshape(shape))
        return (projected + token) * (2.0 ** -0.5)

    def __call__(
        self,
        input_ids: mx.array | None,  # [B, T]
        cache=None,  # list of per-layer caches (make_cache), or None for a full-sequence call
        padding_mask: mx.array | None = None,  # bool [B, T], True = real token; no cache
        input_embeddings: mx.array | None = None,  # [B, T, hidden], already scaled (e.g. with image features)
        intercept=None,  # fn(h, i) -> h, called with i = -1 after embedding, then 0..L-1
        image_blocks: mx.array | None = None,  # [B, T]: image block id per token (-1: text); gemma4_mm
    ) -> mx.array:
        # With per-layer inputs the ids are read even beside `input_embeddings`: their token half
        # comes from the ids (transformers gives media placeholders the pad id), their projected
        # half from the embeddings as given.
        if self.per_layer and input_ids is None:
            raise GenerationError("Gemma 4's per-layer inputs need the token ids, also beside input_embeddings")
        h = self.embed(input_ids) if input_embeddings is None else input_embeddings
        per_layer = self.per_layer_inputs(input_ids, h) if self.per_layer else None
        cache = cache or [None] * len(self.layers)
        offset = 0 if cache[0] is None else cache[0].offset  # every layer's, before this call's update
        masks, shared = {}, {}  # one mask per window; the last keys/values of each layer kind
        if intercept is not None:
            h = intercept(h, -1)
        for i, (layer, layer_cache) in enumerate(zip(self.layers, cache)):
            if layer.window not in masks:  # made from a storing layer's cache, before its update
                masks[layer.window] = layer_mask(h.shape[1], layer_cache, layer.window, padding_mask)
                # An image's tokens see each other on sliding layers only; global layers stay causal
                # (transformers 5.25's create_masks_for_vision_model).
                if image_blocks is not None and layer.window is not None:
                    masks[layer.window] = with_image_blocks(masks[layer.window], image_blocks, layer.window, offset)
            p = None if per_layer is None else per_layer[:, :, i, :]
            h, kv = layer(h, masks[layer.window], layer_cache, offset, p, shared.get(layer.kind))
            if not layer.self_attn.shared:
                shared[layer.kind] = kv
            if intercept is not None:
                h = intercept(h, i)
        return self.norm(h)


class Model(nn.Module):
    """Gemma 4 causal LM: token ids -> logits [B, T, vocab] (the contract: base.GemmaModel)."""

    prefix_lm = False  # causal throughout: a prompt may be prefilled in chunks
    share = None  # the whole model in this process (base.GemmaModel; mlx_gemma.distributed sets a rank's)
    float_prefixes = ()  # the converter may quantize every linear layer
    image_input = None  # text only (a multimodal checkpoint loads as its language half)
    audio_input = None  # text only

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type: str = args.model_type
        self.path = None  # set by `loading.load_model` to the folder it read
        self.model = Gemma4Stack(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, input_ids: mx.array, cache=None, **kwargs) -> mx.array:
        return self.logits(self.model(input_ids, cache, **kwargs))

    def logits(self, hidden: mx.array) -> mx.array:
        """Output logits for hidden states [..., hidden] (final soft-cap included)."""
        out = self.model.embed_tokens.as_linear(hidden) if self.args.tie_word_embeddings else self.lm_head(hidden)
        return softcap(out, self.args.final_logit_softcapping)

    @property
    def decoder(self) -> Gemma4Stack:
        return self.model

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    @property
    def windows(self) -> list[int | None]:
        """Each layer's attention window (None for global layers)."""
        return [layer.window for layer in self.layers]

    def make_cache(self, left_padding: mx.array | None = None, options: KVCacheOptions | None = None, **kv):
        """Per-layer KV caches; KV-shared layers get entries that hold nothing (kv_cache.SharedKVCache)."""
        shapes = [self.args.layer_shape(i) for i in range(len(self.layers))]
        return make_layer_caches(self.windows, left_padding, KVCacheOptions.of(options, **kv),
                                 shared_from=self.args.kv_sources(), kv_shapes=shapes)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Our names from a `Gemma4ForCausalLM` (`model.*`), a `Gemma4ForConditionalGeneration`
        (`model.language_model.*`) or an mlx-lm `gemma4` (`language_model.model.*`) checkpoint;
        the vision and audio towers, RoPE buffers, the tied head and the K/V weights of
        KV-shared layers (transformers ignores them too) dropped; MoE experts as moe.py names them."""
        sources = self.args.kv_sources()
        shared = tuple(f"model.layers.{i}.self_attn.{n}." for i, s in enumerate(sources) if s is not None
                       for n in ("k_proj", "v_proj", "k_norm", "v_norm"))
        out = {}
        for name, w in weights.items():
            for old, new in _TEXT_PREFIXES:
                if name.startswith(old):
                    name = new + name[len(old):]
                    break
            if name.startswith(_OTHER_PREFIXES) or "rotary_emb." in name or name.startswith(shared):
                continue
            out[name] = w
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)  # the same tensor as the embedding
        return sanitize_experts(out)  # HF's expert tensors (or mlx-lm's switch_glu halves) under our names


_TEXT_PREFIXES = (
    ("model.language_model.", "model."),  # transformers' Gemma4ForConditionalGeneration
    ("language_model.model.", "model."),  # mlx-lm / mlx-vlm gemma4
    ("language_model.lm_head.", "lm_head."),
)
# mlx-vlm 0.7.10's module paths -> gemma4_mm's (its gemma4.py sanitize drops `model.` and puts the text
# under `language_model.model.`); transformers' own `model.*` paths are gemma4_mm's already.
_MM_PREFIXES = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")) + tuple(
    (n, "model." + n) for n in ("vision_tower.", "audio_tower.", "embed_vision.", "embed_audio."))
# What a multimodal checkpoint holds besides the language model (towers and their embedders).
_OTHER_PREFIXES = tuple(p + n for p in ("", "model.") for n in (
    "vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.", "multi_modal_projector."))


def readable_quantization(config: dict) -> dict:
    """A Gemma 4 config with its per-layer quantization settings under our text model's module paths,
    so an mlx-community folder's mixed-precision layers load: mlx-lm 0.32 and mlx-vlm write them under
    `language_model.model.` (their gemma4 sanitize), the experts under switch_glu names (moe.py;
    a typed error if gate and up differ).  A config with a tower builds gemma4_mm: mlx-vlm's names go
    under its paths (`model.language_model.`, `model.vision_tower.`, ...).  Other configs come back as they are."""
    inner = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    towers = config.get("vision_config") is not None or config.get("audio_config") is not None
    if inner.get("model_type", config.get("model_type")) not in ("gemma4", "gemma4_text"):
        return config
    prefixes = _MM_PREFIXES if towers else _TEXT_PREFIXES
    out = dict(config)
    for key in ("quantization", "quantization_config"):
        if isinstance(out.get(key), dict):
            renamed = {}
            for name, value in out[key].items():  # module paths: matched with a trailing dot
                old, new = next(((o, n) for o, n in prefixes if f"{name}.".startswith(o)), ("", ""))
                renamed[(new + f"{name}."[len(old):])[:-1]] = value
            out[key] = sanitize_quantization(renamed)
    return out
