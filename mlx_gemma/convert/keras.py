"""Read a Keras / keras-hub (Kaggle) Gemma preset folder into Hugging Face-format pieces.

`read_keras_preset(folder)` returns a `KerasCheckpoint`:

* `config`            -- a Hugging Face-style `config.json` dict (`gemma` or
                         `gemma2`, with `architectures`), loadable by
                         `mlx_gemma.loading.load_model_from` and transformers;
* `weights`           -- `{hf_name: float32 numpy array}` in HF layout ([out, in]);
* `tokenizer_model`   -- the bytes of `assets/tokenizer/vocabulary.spm` (a
                         SentencePiece model: HF's `tokenizer.model`);
* `generation_config` -- `bos_token_id`, `eos_token_id` (a list that includes
                         `<end_of_turn>` when the vocabulary has it), `pad_token_id`.

A preset folder (what `keras_hub.models.Backbone.save_to_preset` writes and
Kaggle serves) holds `config.json` (`{"class_name": "GemmaBackbone",
"registered_name": "keras_hub>GemmaBackbone" or "keras_nlp>GemmaBackbone",
"config": {...}}`), `model.weights.h5` -- or, for big models,
`model.weights.json` (`{"weight_map": {"/layers/.../vars": "model_00000.weights.h5"}}`)
plus its shards --, `tokenizer.json`, `assets/tokenizer/vocabulary.spm` and
`metadata.json`.  Nothing is imported from Keras and nothing in the preset is
executed: the JSON is read as data, the weights with `h5py`.

What keras-hub does, and how we undo it (keras-hub 0.32, read from
`keras_hub/src/models/gemma/gemma_backbone.py`, `gemma_decoder_block.py`,
`gemma_attention.py`, `rms_normalization.py`, and its own HF <-> Keras weight
maps `keras_hub/src/utils/transformers/convert_gemma.py` and
`keras_hub/src/utils/transformers/export/gemma.py`; checked numerically
against keras-hub by tests/test_convert_keras.py):

* HDF5: see `keras_h5.py` (how Keras 3 lays out and stores variables).
* Variables of block i (Keras shape -> HF name, HF shape), N query heads,
  K key/value heads, D head_dim, H hidden, F = intermediate_dim / 2:

      pre_attention_norm/vars/0        [H]       input_layernorm
      attention/query_dense/vars/0     [N,H,D]   self_attn.q_proj [N*D, H]  (transpose 0,2,1)
      attention/key_dense/vars/0       [K,H,D]   self_attn.k_proj [K*D, H]
      attention/value_dense/vars/0     [K,H,D]   self_attn.v_proj [K*D, H]
      attention/output_dense/vars/0    [N,D,H]   self_attn.o_proj [H, N*D]  (transpose 2,0,1)
      post_attention_norm/vars/0       [H]       post_attention_layernorm     (Gemma 2)
      pre_ffw_norm/vars/0              [H]       post_attention_layernorm     (Gemma 1)
                                                 pre_feedforward_layernorm    (Gemma 2)
      gating_ffw/vars/0                [H,F]     mlp.gate_proj [F, H]  (gets the GELU)
      gating_ffw_2/vars/0              [H,F]     mlp.up_proj   [F, H]
      ffw_linear/vars/0                [F,H]     mlp.down_proj [H, F]
      post_ffw_norm/vars/0             [H]       post_feedforward_layernorm   (Gemma 2)

  `GemmaDecoderBlock.call` computes `gelu(gating_ffw(x), approximate=True) *
  gating_ffw_2(x)`, hence gate/up above and `gelu_pytorch_tanh`.  RMSNorm is
  `x * rsqrt(mean(x^2) + eps) * (1 + scale)` in float32, as HF's: the scales
  are copied unchanged.  The embedding is tied (`ReversibleEmbedding(tie_weights=True)`),
  scaled by sqrt(hidden), and the output logits are soft-capped by
  `final_logit_soft_cap` in the reverse projection.  keras-hub's RoPE
  (`RotaryEmbedding(max_wavelength=10000)` then an interleaving permutation
  applied equally to q and k) leaves q.k unchanged, so the kernels need no
  permutation and rope_theta is 10000.
* Config: `intermediate_dim` is twice HF's `intermediate_size` (keras-hub's
  converter writes `intermediate_size * 2`).  Gemma 2 is the backbone with
  `use_post_attention_norm` and `use_post_ffw_norm`; its sliding window
  (`use_sliding_window_attention`, `sliding_window_size`) applies to even
  layers (`i % 2 == 0`), as HF's `layer_types`; keras-hub's band mask lets a
  query see the `sliding_window_size` positions ending at itself, as HF's
  `sliding_window`.  `query_head_dim_normalize` True scales queries by
  head_dim ** -0.5, False by (hidden / heads) ** -0.5 (Gemma 2 27B): we write
  HF's `query_pre_attn_scalar` from it.  Keras presets record no context
  length: `max_position_embeddings` is 8192, the value Gemma 1/2 were trained
  with and what keras-hub's own HF exporter writes.

Two keras-hub 0.32 quirks we do *not* copy, because they contradict the config
the preset records (and HF's reading of the same weights): `GemmaDecoderBlock`
hands its attention `query_head_dim_normalize=True` whatever the config says
(so keras-hub itself scales Gemma 2 27B queries by 1/sqrt(128), not
1/sqrt(144)), and `GemmaBackbone` gives `layer_norm_epsilon` only to the final
norm (the block norms keep 1e-6).  All published presets use eps 1e-6, and the
27B one is the only preset where the scale flag matters.

Hostile input: see `keras_h5.py`; config.json is size-capped JSON read as data.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .keras_h5 import read_json, read_variables
from ..json_input import json_type
from ..errors import (
    ConfigError,
    ModelFileError,
    TokenizerError,
    UnsupportedModelError,
)

__all__ = [
    "KerasCheckpoint",
    "read_keras_preset",
    "keras_config_to_hf",
    "SUPPORTED_CLASSES",
    "DEFAULT_MAX_POSITION_EMBEDDINGS",
]

SUPPORTED_CLASSES = ("GemmaBackbone", "PaliGemmaBackbone")  # the latter: keras_paligemma.py
_REGISTERED = {"keras_hub>GemmaBackbone", "keras_nlp>GemmaBackbone"}
_PALIGEMMA = {"keras_hub>PaliGemmaBackbone", "keras_nlp>PaliGemmaBackbone"}
# Gemma-family Keras classes we know of but cannot read yet.
_LATER = {
    "Gemma3Backbone", "Gemma3nBackbone", "Gemma4Backbone",
    "RecurrentGemmaBackbone", "T5GemmaBackbone", "ShieldGemmaBackbone",
}
_TASK_CLASSES = {"GemmaCausalLM", "Gemma3CausalLM", "PaliGemmaCausalLM"}

DEFAULT_MAX_POSITION_EMBEDDINGS = 8192  # Keras presets do not record it (see docstring)
_ROPE_THETA = 10_000.0  # CachedGemmaAttention: RotaryEmbedding(max_wavelength=10_000.0)

CONFIG_FILE = "config.json"
VOCAB_FILE = os.path.join("assets", "tokenizer", "vocabulary.spm")

MAX_VOCAB_BYTES = 64 << 20  # Gemma's vocabulary.spm is ~4 MB


@dataclass
class KerasCheckpoint:
    config: dict
    weights: dict[str, np.ndarray]
    tokenizer_model: bytes
    generation_config: dict
    keras_config: dict = field(default_factory=dict)  # the backbone's "config" object as saved
    source_dtype: str = "float32"  # how the weights were stored: float32 / bfloat16 / float16
    path: str = ""


# --------------------------------------------------------------------------- config


def _check_class(path: str, top: Any) -> dict:
    if not isinstance(top, dict):
        raise ConfigError(path, f"must hold a JSON object, found {json_type(top)}")
    class_name = top.get("class_name")
    registered = top.get("registered_name")
    names = [n for n in (class_name, registered) if n is not None]
    if not names:
        raise ConfigError(path, "has no class_name: not a Keras preset config")
    for n in names:
        if not isinstance(n, str):
            raise ConfigError(path, f"class name {n!r:.80} is not a string")
    short = {n.rsplit(">", 1)[-1] for n in names}
    if short != {"GemmaBackbone"} or (registered is not None and registered not in _REGISTERED):
        shown = registered or class_name
        cls = next(iter(short - {"GemmaBackbone"}), shown)
        if cls in _LATER:
            raise UnsupportedModelError(path, f"Keras class {shown!r:.80} is not yet supported (only GemmaBackbone)")
        if cls in _TASK_CLASSES:
            raise UnsupportedModelError(
                path, f"Keras class {shown!r:.80} is a task, not a backbone: point at a preset folder "
                "whose config.json describes the GemmaBackbone"
            )
        raise UnsupportedModelError(path, f"Keras class {shown!r:.80} is not a Gemma backbone (supported: GemmaBackbone)")
    cfg = top.get("config")
    if not isinstance(cfg, dict):
        raise ConfigError(path, "has no 'config' object with the backbone's settings")
    return cfg


def _int(path, cfg, key, default=None, *, minimum=1, limit=1 << 31) -> int:
    v = cfg.get(key, default)
    if v is None:
        raise ConfigError(path, f"config is missing {key!r}")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= limit:
        raise ConfigError(path, f"{key} must be an integer in [{minimum}, {limit}], got {v!r:.80}")
    return v


def _bool(path, cfg, key, default: bool) -> bool:
    v = cfg.get(key, default)
    if v is None:
        v = default
    if not isinstance(v, bool):
        raise ConfigError(path, f"{key} must be true or false, got {v!r:.80}")
    return v


def _float(path, cfg, key, default=None, *, optional=False) -> float | None:
    v = cfg.get(key, default)
    if v is None:
        if optional:
            return None
        raise ConfigError(path, f"config is missing {key!r}")
    number = None
    if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= 1e300:  # a JSON integer can be huge
        number = float(v)
    if number is None or not math.isfinite(number) or number <= 0:
        raise ConfigError(path, f"{key} must be a positive number{' or null' if optional else ''}, got {v!r:.80}")
    return number


def _dtype_name(cfg: dict) -> str | None:
    d = cfg.get("dtype")
    if isinstance(d, dict):  # {"class_name": "DTypePolicy", "config": {"name": "bfloat16"}}
        d = (d.get("config") or {}).get("name") if isinstance(d.get("config"), dict) else None
    return d if isinstance(d, str) else None


def keras_config_to_hf(keras_config: dict, path=None, *, special_ids: dict | None = None) -> dict:
    """HF config dict for a GemmaBackbone's `config` object (see module docstring)."""
    path = None if path is None else os.fspath(path)
    c = keras_config
    if not isinstance(c, dict):
        raise ConfigError(path, "the backbone config must be a JSON object")
    vocab = _int(path, c, "vocabulary_size", limit=1 << 22)
    layers = _int(path, c, "num_layers", limit=1024)
    heads = _int(path, c, "num_query_heads", limit=1024)
    kv_heads = _int(path, c, "num_key_value_heads", limit=1024)
    hidden = _int(path, c, "hidden_dim", limit=1 << 16)
    inter = _int(path, c, "intermediate_dim", limit=1 << 21)
    head_dim = _int(path, c, "head_dim", limit=4096)
    if heads % kv_heads:
        raise ConfigError(path, f"num_query_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    if inter % 2:
        raise ConfigError(path, f"intermediate_dim ({inter}) must be even: Keras stores twice HF's intermediate_size")
    eps = _float(path, c, "layer_norm_epsilon", 1e-6)
    q_head_dim = _bool(path, c, "query_head_dim_normalize", True)
    post_ffw = _bool(path, c, "use_post_ffw_norm", False)
    post_attn = _bool(path, c, "use_post_attention_norm", False)
    attn_cap = _float(path, c, "attention_logit_soft_cap", None, optional=True)
    final_cap = _float(path, c, "final_logit_soft_cap", None, optional=True)
    sliding = _bool(path, c, "use_sliding_window_attention", False)
    window = _int(path, c, "sliding_window_size", 4096, limit=1 << 31)

    if post_ffw != post_attn:
        raise UnsupportedModelError(
            path, f"use_post_attention_norm={post_attn} with use_post_ffw_norm={post_ffw} matches neither "
            "Gemma (both false) nor Gemma 2 (both true)"
        )
    gemma2 = post_ffw and post_attn
    query_scalar = head_dim if q_head_dim else hidden / heads
    if isinstance(query_scalar, float) and query_scalar.is_integer():
        query_scalar = int(query_scalar)
    if not gemma2:
        odd = [k for k, bad in (
            ("attention_logit_soft_cap", attn_cap is not None),
            ("final_logit_soft_cap", final_cap is not None),
            ("use_sliding_window_attention", sliding),
            ("query_head_dim_normalize=false", query_scalar != head_dim),
        ) if bad]
        if odd:
            raise UnsupportedModelError(
                path, f"a Gemma 1 style backbone (no post norms) with {', '.join(odd)} has no Hugging Face "
                "equivalent"
            )
    elif attn_cap is None or final_cap is None:
        # Our loader (and older transformers) would read a null cap as the default 50 / 30.
        raise UnsupportedModelError(
            path, "a Gemma 2 style backbone without attention_logit_soft_cap and final_logit_soft_cap "
            "is not supported"
        )

    ids = {"bos": 2, "eos": 1, "pad": 0, **(special_ids or {})}
    model_type = "gemma2" if gemma2 else "gemma"
    cfg: dict[str, Any] = {
        "architectures": ["Gemma2ForCausalLM" if gemma2 else "GemmaForCausalLM"],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter // 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": DEFAULT_MAX_POSITION_EMBEDDINGS,
        "rms_norm_eps": eps,
        "rope_theta": _ROPE_THETA,
        "rope_parameters": {"rope_type": "default", "rope_theta": _ROPE_THETA},
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
            attn_logit_softcapping=attn_cap,
            final_logit_softcapping=final_cap,
            sliding_window=window,
            layer_types=[
                "sliding_attention" if sliding and i % 2 == 0 else "full_attention" for i in range(layers)
            ],
            cache_implementation="hybrid",
        )
    return cfg


def _validate_with_model_args(cfg: dict, path: str) -> None:
    """Refuse what our model classes would refuse, before any weight is read."""
    from ..models import MODELS

    MODELS[cfg["model_type"]].ModelArgs.from_dict(cfg, path)


# --------------------------------------------------------------------------- tokenizer


def _read_tokenizer(folder: str, vocab_size: int) -> tuple[bytes, dict, int | None]:
    path = os.path.join(folder, VOCAB_FILE)
    if not os.path.isfile(path):
        raise TokenizerError(path, "missing: a Keras Gemma preset keeps its SentencePiece model here")
    size = os.path.getsize(path)
    if not 0 < size <= MAX_VOCAB_BYTES:
        raise TokenizerError(path, f"is {size} bytes: not a SentencePiece model")
    from ..tokenizer import GemmaTokenizer

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


# --------------------------------------------------------------------------- variable map


def _expected(cfg: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
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


def _to_hf_layout(hf_name: str, a: np.ndarray) -> np.ndarray:
    if hf_name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
        heads, hidden, hd = a.shape  # [heads, hidden, head_dim] -> [heads * head_dim, hidden]
        return a.transpose(0, 2, 1).reshape(heads * hd, hidden)
    if hf_name.endswith("o_proj.weight"):
        heads, hd, hidden = a.shape  # [heads, head_dim, hidden] -> [hidden, heads * head_dim]
        return a.transpose(2, 0, 1).reshape(hidden, heads * hd)
    if a.ndim == 2 and ".mlp." in hf_name:
        return a.T  # Keras Dense kernels are [in, out]
    return a


# --------------------------------------------------------------------------- entry point


def read_keras_preset(
    folder: str | os.PathLike, *, progress: Callable[[int, int, str], None] | None = None
) -> KerasCheckpoint:
    """Read a keras-hub / Kaggle Gemma preset folder into HF-format pieces.

    `progress(done, total, hf_name)` is called after each tensor, if given.
    Raises `ModelFileError` (or a subclass) naming the file on any problem.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ModelFileError(folder, "expected a Keras preset folder (config.json, model.weights.h5, assets/)")
    config_path = os.path.join(folder, CONFIG_FILE)
    top = read_json(config_path, "config.json", ConfigError)
    registered = top.get("registered_name") if isinstance(top, dict) else None
    # A registered_name that is not a string is left to _check_class to refuse.
    if isinstance(top, dict) and top.get("class_name") == "PaliGemmaBackbone" and (
            registered is None or (isinstance(registered, str) and registered in _PALIGEMMA)):
        from .keras_paligemma import read_paligemma_preset

        return read_paligemma_preset(folder, top, progress=progress)
    keras_cfg = _check_class(config_path, top)
    # The vocabulary size bounds the tokenizer check; validate it first.
    vocab = _int(config_path, keras_cfg, "vocabulary_size", limit=1 << 22)
    tokenizer_model, specials, end_of_turn = _read_tokenizer(folder, vocab)
    cfg = keras_config_to_hf(keras_cfg, config_path, special_ids=specials)
    _validate_with_model_args(cfg, config_path)

    expected = _expected(cfg)
    shapes = {name: shape for name, (_, shape) in expected.items()}
    names = {name: hf for name, (hf, _) in expected.items()}
    variables, dtypes = read_variables(
        folder, shapes, cfg["model_type"],
        None if progress is None else (lambda done, total, name: progress(done, total, names[name])))
    weights = {names[k]: np.ascontiguousarray(_to_hf_layout(names[k], v)) for k, v in variables.items()}
    del variables

    from .hf import generation_config as make_generation_config

    generation_config = make_generation_config(specials["bos"], specials["eos"], specials["pad"], end_of_turn)
    source = _dtype_name(keras_cfg)
    if len(dtypes) == 1:
        source = next(iter(dtypes))
    elif source is None:
        source = "float32"
    return KerasCheckpoint(cfg, weights, tokenizer_model, generation_config, keras_cfg, source, folder)
