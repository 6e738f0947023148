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

* HDF5 layout (Keras 3 `saving_lib`): a layer's variables are datasets
  `<path>/vars/0`, `<path>/vars/1`, ...; a functional model's layers are
  `layers/<snake_case(class name)>[_k]` in layer order, sub-layers by attribute
  name.  So `layers/reversible_embedding/vars/0` is the token embedding,
  `layers/gemma_decoder_block[_i]/...` is decoder block i, and
  `layers/rms_normalization/vars/0` the final norm (`final_normalization`).
  bfloat16 variables are stored as 2-byte opaque values (`|V2`, attribute
  `dtype="bfloat16"`): the top half of a float32, which is how we decode them.
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

Hostile input: config.json and model.weights.json are size-capped JSON; shard
names must be plain file names inside the folder; the HDF5 tree is walked by
hand following hard links only (soft/external links, external or virtual
datasets and filtered datasets -- which could make HDF5 load a plugin -- are
refused); every variable's path, shape and dtype is checked against the config
before any data is read; h5py errors (truncated or corrupt files) are wrapped.
Every failure is a `ModelFileError` (or a subclass) whose message starts with
the offending file's path.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import (
    ConfigError,
    ModelFileError,
    TokenizerError,
    UnsupportedModelError,
    WeightsMismatchError,
)

__all__ = [
    "KerasCheckpoint",
    "read_keras_preset",
    "keras_config_to_hf",
    "SUPPORTED_CLASSES",
    "DEFAULT_MAX_POSITION_EMBEDDINGS",
]

SUPPORTED_CLASSES = ("GemmaBackbone",)
_REGISTERED = {"keras_hub>GemmaBackbone", "keras_nlp>GemmaBackbone"}
# Gemma-family Keras classes we know of but cannot read yet.
_LATER = {
    "PaliGemmaBackbone", "Gemma3Backbone", "Gemma3nBackbone", "Gemma4Backbone",
    "RecurrentGemmaBackbone", "T5GemmaBackbone", "ShieldGemmaBackbone",
}
_TASK_CLASSES = {"GemmaCausalLM", "Gemma3CausalLM", "PaliGemmaCausalLM"}

DEFAULT_MAX_POSITION_EMBEDDINGS = 8192  # Keras presets do not record it (see docstring)
_ROPE_THETA = 10_000.0  # CachedGemmaAttention: RotaryEmbedding(max_wavelength=10_000.0)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
SHARDED_INDEX_FILE = "model.weights.json"
VOCAB_FILE = os.path.join("assets", "tokenizer", "vocabulary.spm")

MAX_JSON_BYTES = 4 << 20  # config.json is ~1 KB; a shard index a few KB
MAX_VOCAB_BYTES = 64 << 20  # Gemma's vocabulary.spm is ~4 MB
MAX_SHARDS = 4096
_MAX_H5_DEPTH = 12
_MAX_H5_OBJECTS = 200_000

_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.weights\.h5$")


@dataclass
class KerasCheckpoint:
    config: dict
    weights: dict[str, np.ndarray]
    tokenizer_model: bytes
    generation_config: dict
    keras_config: dict = field(default_factory=dict)  # the backbone's "config" object as saved
    source_dtype: str = "float32"  # how the weights were stored: float32 / bfloat16 / float16
    path: str = ""


# --------------------------------------------------------------------------- JSON


def _read_json(path: str, what: str, error=ModelFileError) -> Any:
    if not os.path.isfile(path):
        raise error(path, f"missing: a Keras preset needs its {what}")
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        raise error(path, f"is {size} bytes; a {what} is a few KB")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise error(path, f"not valid JSON: {e}") from None


# --------------------------------------------------------------------------- config


def _check_class(path: str, top: Any) -> dict:
    if not isinstance(top, dict):
        raise ConfigError(path, f"must hold a JSON object, found {type(top).__name__}")
    class_name = top.get("class_name")
    registered = top.get("registered_name")
    names = [n for n in (class_name, registered) if n is not None]
    if not names:
        raise ConfigError(path, "has no class_name: not a Keras preset config")
    for n in names:
        if not isinstance(n, str):
            raise ConfigError(path, f"class name {n!r} is not a string")
    short = {n.rsplit(">", 1)[-1] for n in names}
    if short != {"GemmaBackbone"} or (registered is not None and registered not in _REGISTERED):
        shown = registered or class_name
        cls = next(iter(short - {"GemmaBackbone"}), shown)
        if cls in _LATER:
            raise UnsupportedModelError(path, f"Keras class {shown!r} is not yet supported (only GemmaBackbone)")
        if cls in _TASK_CLASSES:
            raise UnsupportedModelError(
                path, f"Keras class {shown!r} is a task, not a backbone: point at a preset folder "
                "whose config.json describes the GemmaBackbone"
            )
        raise UnsupportedModelError(path, f"Keras class {shown!r} is not a Gemma backbone (supported: GemmaBackbone)")
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
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(path, f"{key} must be a positive number{' or null' if optional else ''}, got {v!r:.80}")
    return float(v)


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


# --------------------------------------------------------------------------- HDF5


@dataclass
class _Var:
    file: str  # the .h5 file holding it
    name: str  # dataset path inside the file
    shape: tuple[int, ...]
    dtype: str  # "float32" / "bfloat16" / "float16" / "float64"


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


def _h5():
    try:
        import h5py
    except ImportError:
        raise ImportError(
            "reading Keras presets needs h5py: pip install h5py  (or pip install 'mlx_gemma[keras]')"
        ) from None
    return h5py


def _open_h5(path: str):
    h5py = _h5()
    if not os.path.isfile(path):
        raise ModelFileError(path, "missing weights file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head != b"\x89HDF\r\n\x1a\n":
        raise ModelFileError(path, "not an HDF5 file (bad signature)")
    try:
        return h5py.File(path, "r", locking=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelFileError(path, f"cannot open HDF5 file (truncated or corrupt): {e}") from None


def _dataset_dtype(path: str, name: str, dset) -> str:
    dt = dset.dtype
    declared = dset.attrs.get("dtype") if "dtype" in dset.attrs else None
    if isinstance(declared, bytes):
        declared = declared.decode("utf-8", "replace")
    if dt.kind == "V" and dt.itemsize == 2 and dt.names is None and dt.subdtype is None:
        kind = "bfloat16"
    elif dt.kind == "u" and dt.itemsize == 2:
        kind = "bfloat16"  # raw bf16 bits written as uint16
    elif dt.kind == "f" and dt.itemsize in (2, 4, 8):
        kind = {2: "float16", 4: "float32", 8: "float64"}[dt.itemsize]
    elif dt.kind in "iu" and dt.itemsize == 1:
        raise UnsupportedModelError(
            path, f"variable {name!r} is stored as {dt} (a quantized preset): only float weights are supported"
        )
    else:
        raise ModelFileError(path, f"variable {name!r} has unsupported dtype {dt}")
    if declared is not None and declared != kind:
        raise ModelFileError(path, f"variable {name!r} is stored as {dt} but declares dtype {declared!r}")
    return kind


def _walk(path: str, f, found: dict[str, _Var]) -> None:
    """Collect every dataset of `f`, hard links only, checking what reading it would do."""
    h5py = _h5()
    file_size = os.path.getsize(path)
    count = 0
    stack = [("", f, 0)]
    while stack:
        prefix, group, depth = stack.pop()
        if depth > _MAX_H5_DEPTH:
            raise ModelFileError(path, f"HDF5 groups nested deeper than {_MAX_H5_DEPTH} at {prefix!r}")
        for key in group.keys():
            count += 1
            if count > _MAX_H5_OBJECTS:
                raise ModelFileError(path, f"more than {_MAX_H5_OBJECTS} HDF5 objects: not a Gemma preset")
            name = f"{prefix}{key}"
            link = group.get(key, getlink=True)
            if not isinstance(link, h5py.HardLink):
                raise ModelFileError(path, f"{name!r} is a {type(link).__name__}: links are not followed")
            obj = group.get(key)
            if isinstance(obj, h5py.Group):
                stack.append((name + "/", obj, depth + 1))
                continue
            if not isinstance(obj, h5py.Dataset):
                raise ModelFileError(path, f"{name!r} is neither a group nor a dataset")
            if name in found:
                raise WeightsMismatchError(path, f"variable {name!r} is also in {found[name].file}")
            if obj.is_virtual:
                raise ModelFileError(path, f"variable {name!r} is a virtual dataset (refused)")
            if obj.external:
                raise ModelFileError(path, f"variable {name!r} keeps its data in external files (refused)")
            plist = obj.id.get_create_plist()
            if plist.get_nfilters():
                raise ModelFileError(path, f"variable {name!r} is compressed or filtered; Keras writes plain data")
            shape = tuple(int(d) for d in obj.shape)
            dtype = _dataset_dtype(path, name, obj)
            nbytes = math.prod(shape) * obj.dtype.itemsize
            stored = obj.id.get_storage_size()
            if stored != nbytes or stored > file_size:
                raise ModelFileError(
                    path, f"variable {name!r} ({obj.dtype} {list(shape)}) should hold {nbytes} bytes of data "
                    f"but {stored} are stored (truncated or corrupt)"
                )
            found[name] = _Var(path, name, shape, dtype)


def _weight_files(folder: str) -> list[str]:
    single = os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(single):
        return [single]  # keras-hub prefers the single file when both exist
    index_path = os.path.join(folder, SHARDED_INDEX_FILE)
    if not os.path.exists(index_path):
        raise ModelFileError(single, f"missing: a Keras preset needs {WEIGHTS_FILE} (or {SHARDED_INDEX_FILE} + shards)")
    index = _read_json(index_path, "shard index")
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise ModelFileError(index_path, "has no 'weight_map' object")
    names: set[str] = set()
    for key, v in wmap.items():
        for name in v if isinstance(v, list) else [v]:
            if not isinstance(name, str):
                raise ModelFileError(index_path, f"weight_map[{key!r}] names {name!r:.80}, not a file name")
            names.add(name)
    if len(names) > MAX_SHARDS:
        raise ModelFileError(index_path, f"lists {len(names)} shard files (at most {MAX_SHARDS})")
    files = []
    for name in sorted(names):
        if (
            not _SHARD_NAME.match(name)
            or os.path.basename(name) != name
            or name in (".", "..")
            or os.path.isabs(name)
        ):
            raise ModelFileError(
                index_path, f"shard {name!r:.120} is not a plain '*.weights.h5' file name in the preset folder"
            )
        shard = os.path.join(folder, name)
        if not os.path.isfile(shard):
            raise ModelFileError(shard, f"missing: {SHARDED_INDEX_FILE} lists this shard")
        files.append(shard)
    return files


def _decode(path: str, var: _Var, raw: np.ndarray) -> np.ndarray:
    if var.dtype == "bfloat16":
        bits = np.ascontiguousarray(raw).view("<u2") if raw.dtype.kind == "V" else raw.astype("<u2", copy=False)
        out = (bits.astype(np.uint32) << 16).view(np.float32)
    else:
        out = raw.astype(np.float32)
    out = np.ascontiguousarray(out.reshape(var.shape))
    if not np.isfinite(out).all():
        raise ModelFileError(path, f"variable {var.name!r} contains NaN or infinite values")
    return out


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
    keras_cfg = _check_class(config_path, _read_json(config_path, "config.json", ConfigError))
    # The vocabulary size bounds the tokenizer check; validate it first.
    vocab = _int(config_path, keras_cfg, "vocabulary_size", limit=1 << 22)
    tokenizer_model, specials, end_of_turn = _read_tokenizer(folder, vocab)
    cfg = keras_config_to_hf(keras_cfg, config_path, special_ids=specials)
    _validate_with_model_args(cfg, config_path)

    files = _weight_files(folder)
    expected = _expected(cfg)
    weights: dict[str, np.ndarray] = {}
    handles = []
    try:
        found: dict[str, _Var] = {}
        for file in files:
            handles.append(_open_h5(file))
            try:
                _walk(file, handles[-1], found)
            except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
                if isinstance(e, ModelFileError):
                    raise
                raise ModelFileError(file, f"corrupt HDF5 structure: {e}") from None
        where = files[0] if len(files) == 1 else os.path.join(folder, SHARDED_INDEX_FILE)
        unexpected = sorted(set(found) - set(expected))
        if unexpected:
            shown = ", ".join(repr(u) for u in unexpected[:8]) + (
                f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
            raise WeightsMismatchError(where, f"variables with no {cfg['model_type']} counterpart: {shown}")
        missing = sorted(set(expected) - set(found))
        if missing:
            shown = ", ".join(repr(m) for m in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise WeightsMismatchError(where, f"missing variables: {shown}")
        dtypes = set()
        for name, (hf, shape) in expected.items():
            var = found[name]
            if var.shape != shape:
                raise WeightsMismatchError(
                    var.file, f"variable {name!r} has shape {list(var.shape)}, expected {list(shape)} for this config"
                )
            dtypes.add(var.dtype)

        by_file = {file: h for file, h in zip(files, handles)}
        for i, (name, (hf, _)) in enumerate(expected.items()):
            var = found[name]
            try:
                raw = by_file[var.file][name][()]
            except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
                raise ModelFileError(var.file, f"cannot read variable {name!r} (truncated or corrupt): {e}") from None
            if tuple(raw.shape) != var.shape:
                raise ModelFileError(var.file, f"variable {name!r} read back with shape {list(raw.shape)}")
            weights[hf] = np.ascontiguousarray(_to_hf_layout(hf, _decode(var.file, var, raw)))
            del raw
            if progress is not None:
                progress(i + 1, len(expected), hf)
    finally:
        for h in handles:
            try:
                h.close()
            except Exception:  # noqa: BLE001 - closing a corrupt file must not hide the real error
                pass

    from .hf import generation_config as make_generation_config

    generation_config = make_generation_config(specials["bos"], specials["eos"], specials["pad"], end_of_turn)
    source = _dtype_name(keras_cfg)
    if len(dtypes) == 1:
        source = next(iter(dtypes))
    elif source is None:
        source = "float32"
    return KerasCheckpoint(cfg, weights, tokenizer_model, generation_config, keras_cfg, source, folder)
