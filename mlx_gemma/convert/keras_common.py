"""What the keras-hub preset readers share (`keras.py`: GemmaBackbone, `keras_paligemma.py`:
PaliGemmaBackbone): typed settings of a backbone config, keras-hub's Gemma decoder config ->
a Hugging Face config, its variable map and kernel layouts, and the preset's SentencePiece
vocabulary.  How keras-hub lays out a Gemma decoder, and how we undo it: `keras.py`'s docstring.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import numpy as np

from ..arguments import is_integer
from ..chat_template import GEMMA4_STOP_PIECES
from ..errors import ConfigError, TokenizerError, UnsupportedModelError
from ..tokenizer import GemmaTokenizer

CONFIG_FILE = "config.json"
VOCAB_FILE = os.path.join("assets", "tokenizer", "vocabulary.spm")
MAX_VOCAB_BYTES = 64 << 20  # Gemma's vocabulary.spm is ~4 MB
DEFAULT_MAX_POSITION_EMBEDDINGS = 8192  # Keras presets do not record it (see keras.py's docstring)
ROPE_THETA = 10_000.0  # CachedGemmaAttention: RotaryEmbedding(max_wavelength=10_000.0)


# --------------------------------------------------------------------------- config


def int_setting(path, cfg, key, default=None, *, minimum=1, limit=1 << 31) -> int:
    """cfg[key] (or `default`) as an int in [minimum, limit]; a float with no fraction counts."""
    v = cfg.get(key, default)
    if v is None:
        raise ConfigError(path, f"config is missing {key!r}")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not is_integer(v) or not minimum <= v <= limit:
        raise ConfigError(path, f"{key} must be an integer in [{minimum}, {limit}], got {v!r:.80}")
    return int(v)


def bool_setting(path, cfg, key, default: bool) -> bool:
    """cfg[key] as a bool; absent or null is `default`."""
    v = cfg.get(key, default)
    if v is None:
        v = default
    if not isinstance(v, bool):
        raise ConfigError(path, f"{key} must be true or false, got {v!r:.80}")
    return v


def float_setting(path, cfg, key, default=None, *, optional=False) -> float | None:
    """cfg[key] (or `default`) as a positive finite float; None when null and `optional`."""
    v = cfg.get(key, default)
    if v is None:
        if optional:
            return None
        raise ConfigError(path, f"config is missing {key!r}")
    number = None
    if (is_integer(v) or isinstance(v, float)) and abs(v) <= 1e300:  # a JSON integer can be huge
        number = float(v)
    if number is None or not math.isfinite(number) or number <= 0:
        raise ConfigError(path, f"{key} must be a positive number{' or null' if optional else ''}, got {v!r:.80}")
    return number


def dtype_name(cfg: dict) -> str | None:
    """The dtype policy a backbone config was saved with (a name), or None."""
    d = cfg.get("dtype")
    if isinstance(d, dict):  # {"class_name": "DTypePolicy", "config": {"name": "bfloat16"}}
        d = (d.get("config") or {}).get("name") if isinstance(d.get("config"), dict) else None
    return d if isinstance(d, str) else None


def keras_config_to_hf(keras_config: dict, path=None, *, special_ids: dict | None = None) -> dict:
    """HF config dict for a GemmaBackbone's `config` object (see keras.py's docstring)."""
    path = None if path is None else os.fspath(path)
    if not isinstance(keras_config, dict):
        raise ConfigError(path, "the backbone config must be a JSON object")
    s = _decoder_settings(path, keras_config)
    if s.post_ffw != s.post_attn:
        raise UnsupportedModelError(
            path, f"use_post_attention_norm={s.post_attn} with use_post_ffw_norm={s.post_ffw} matches neither "
            "Gemma (both false) nor Gemma 2 (both true)"
        )
    gemma2 = s.post_ffw and s.post_attn
    query_scalar = s.head_dim if s.q_head_dim else s.hidden / s.heads
    if isinstance(query_scalar, float) and query_scalar.is_integer():
        query_scalar = int(query_scalar)
    _check_hf_equivalent(path, s, gemma2, query_scalar)

    ids = {"bos": 2, "eos": 1, "pad": 0, **(special_ids or {})}
    cfg: dict[str, Any] = {
        "architectures": ["Gemma2ForCausalLM" if gemma2 else "GemmaForCausalLM"],
        "model_type": "gemma2" if gemma2 else "gemma",
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "intermediate_size": s.inter // 2,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": DEFAULT_MAX_POSITION_EMBEDDINGS,
        "rms_norm_eps": s.eps,
        "rope_theta": ROPE_THETA,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "tie_word_embeddings": True,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "torch_dtype": "float32",
    }
    if gemma2:
        cfg.update(
            query_pre_attn_scalar=query_scalar,
            attn_logit_softcapping=s.attn_cap,
            final_logit_softcapping=s.final_cap,
            sliding_window=s.window,
            layer_types=[
                "sliding_attention" if s.sliding and i % 2 == 0 else "full_attention" for i in range(s.layers)
            ],
            cache_implementation="hybrid",
        )
    return cfg


class _DecoderSettings(NamedTuple):
    """A GemmaBackbone config's settings, typed and range-checked."""

    vocab: int
    layers: int
    heads: int
    kv_heads: int
    hidden: int
    inter: int
    head_dim: int
    eps: float
    q_head_dim: bool
    post_ffw: bool
    post_attn: bool
    attn_cap: float | None
    final_cap: float | None
    sliding: bool
    window: int


def _decoder_settings(path, c: dict) -> _DecoderSettings:
    """Read every setting of a GemmaBackbone config, refusing head and MLP sizes that do not fit together."""
    vocab = int_setting(path, c, "vocabulary_size", limit=1 << 22)
    layers = int_setting(path, c, "num_layers", limit=1024)
    heads = int_setting(path, c, "num_query_heads", limit=1024)
    kv_heads = int_setting(path, c, "num_key_value_heads", limit=1024)
    hidden = int_setting(path, c, "hidden_dim", limit=1 << 16)
    inter = int_setting(path, c, "intermediate_dim", limit=1 << 21)
    head_dim = int_setting(path, c, "head_dim", limit=4096)
    if heads % kv_heads:
        raise ConfigError(path, f"num_query_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    if inter % 2:
        raise ConfigError(path, f"intermediate_dim ({inter}) must be even: Keras stores twice HF's intermediate_size")
    return _DecoderSettings(
        vocab, layers, heads, kv_heads, hidden, inter, head_dim,
        eps=float_setting(path, c, "layer_norm_epsilon", 1e-6),
        q_head_dim=bool_setting(path, c, "query_head_dim_normalize", True),
        post_ffw=bool_setting(path, c, "use_post_ffw_norm", False),
        post_attn=bool_setting(path, c, "use_post_attention_norm", False),
        attn_cap=float_setting(path, c, "attention_logit_soft_cap", None, optional=True),
        final_cap=float_setting(path, c, "final_logit_soft_cap", None, optional=True),
        sliding=bool_setting(path, c, "use_sliding_window_attention", False),
        window=int_setting(path, c, "sliding_window_size", 4096, limit=1 << 31),
    )


def _check_hf_equivalent(path, s: _DecoderSettings, gemma2: bool, query_scalar) -> None:
    """Refuse settings a Hugging Face Gemma / Gemma 2 config cannot express."""
    if not gemma2:
        odd = [k for k, bad in (
            ("attention_logit_soft_cap", s.attn_cap is not None),
            ("final_logit_soft_cap", s.final_cap is not None),
            ("use_sliding_window_attention", s.sliding),
            ("query_head_dim_normalize=false", query_scalar != s.head_dim),
        ) if bad]
        if odd:
            raise UnsupportedModelError(
                path, f"a Gemma 1 style backbone (no post norms) with {', '.join(odd)} has no Hugging Face "
                "equivalent"
            )
    elif s.attn_cap is None or s.final_cap is None:
        # Our loader (and older transformers) would read a null cap as the default 50 / 30.
        raise UnsupportedModelError(
            path, "a Gemma 2 style backbone without attention_logit_soft_cap and final_logit_soft_cap "
            "is not supported"
        )


# --------------------------------------------------------------------------- tokenizer


def backbone_header(folder: str, top: dict) -> tuple[str, dict, int]:
    """(config.json's path, the backbone's settings, its vocabulary size) of a preset folder whose
    parsed config.json is `top`: what every backbone reader checks first."""
    config_path = os.path.join(folder, "config.json")
    keras_cfg = top.get("config")
    if not isinstance(keras_cfg, dict):
        raise ConfigError(config_path, "has no 'config' object with the backbone's settings")
    return config_path, keras_cfg, int_setting(config_path, keras_cfg, "vocabulary_size", limit=1 << 22)


def read_tokenizer(folder: str, vocab_size: int) -> tuple[bytes, dict, int | None]:
    path = os.path.join(folder, VOCAB_FILE)
    if not os.path.isfile(path):
        raise TokenizerError(path, "missing: a Keras Gemma preset keeps its SentencePiece model here")
    size = os.path.getsize(path)
    if not 0 < size <= MAX_VOCAB_BYTES:
        raise TokenizerError(path, f"is {size} bytes: not a SentencePiece model")
    # Our tokenizer parses the untrusted file in Python before SentencePiece's
    # C++ loader sees it, and checks <bos>/<eos>/<unk> are there.
    tokenizer = GemmaTokenizer.from_file(path)
    n = tokenizer.vocab_size
    if n > vocab_size:
        raise TokenizerError(
            path, f"the vocabulary has {n} pieces but the backbone's embedding only {vocab_size} rows"
        )
    if tokenizer.pad_id is None or tokenizer.pad_id < 0:
        raise TokenizerError(path, "the vocabulary has no <pad> piece (keras-hub's GemmaTokenizer needs it)")
    # keras-hub's GemmaTokenizer uses these pieces as start / end / pad tokens.
    ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    end_of_turn = tokenizer.end_of_turn_id
    with open(path, "rb") as f:
        data = f.read()
    return data, ids, end_of_turn


def stop_ids(tokenizer_model: bytes) -> tuple[int, ...]:
    """The stop ids after `<eos>` for the vocabulary's generation_config: Gemma 4's `<turn|>` and
    `<|tool_response>` (its generation_config.json), else `<end_of_turn>` where the vocabulary has it."""
    tok = GemmaTokenizer(tokenizer_model)
    pieces = GEMMA4_STOP_PIECES if tok.chat_format == "gemma4" else ("<end_of_turn>",)
    return tuple(i for i in map(tok.piece_to_id, pieces) if i is not None)


# --------------------------------------------------------------------------- variable map


def decoder_variables(cfg: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Keras dataset path -> (HF name, Keras shape)."""
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    n, k, f = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    gemma2 = cfg["model_type"] == "gemma2"
    out = {
        "layers/reversible_embedding/vars/0": ("model.embed_tokens.weight", (cfg["vocab_size"], h)),
        "layers/rms_normalization/vars/0": ("model.norm.weight", (h,)),
    }
    block = {
        "pre_attention_norm": ("input_layernorm", (h,)),
        "attention/query_dense": ("self_attn.q_proj", (n, h, hd)),
        "attention/key_dense": ("self_attn.k_proj", (k, h, hd)),
        "attention/value_dense": ("self_attn.v_proj", (k, h, hd)),
        "attention/output_dense": ("self_attn.o_proj", (n, hd, h)),
        "pre_ffw_norm": ("pre_feedforward_layernorm" if gemma2 else "post_attention_layernorm", (h,)),
        "gating_ffw": ("mlp.gate_proj", (h, f)),
        "gating_ffw_2": ("mlp.up_proj", (h, f)),
        "ffw_linear": ("mlp.down_proj", (f, h)),
    }
    if gemma2:
        block["post_attention_norm"] = ("post_attention_layernorm", (h,))
        block["post_ffw_norm"] = ("post_feedforward_layernorm", (h,))
    for i in range(cfg["num_hidden_layers"]):
        prefix = "layers/gemma_decoder_block" + (f"_{i}" if i else "")
        for sub, (hf, shape) in block.items():
            out[f"{prefix}/{sub}/vars/0"] = (f"model.layers.{i}.{hf}.weight", shape)
    return out


def to_hf_layout(hf_name: str, a: np.ndarray) -> np.ndarray:
    if hf_name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
        heads, hidden, hd = a.shape  # [heads, hidden, head_dim] -> [heads * head_dim, hidden]
        return a.transpose(0, 2, 1).reshape(heads * hd, hidden)
    if hf_name.endswith("o_proj.weight"):
        heads, hd, hidden = a.shape  # [heads, head_dim, hidden] -> [hidden, heads * head_dim]
        return a.transpose(2, 0, 1).reshape(hidden, heads * hd)
    if a.ndim == 2 and ".mlp." in hf_name:
        return a.T  # Keras Dense kernels are [in, out]
    return a
