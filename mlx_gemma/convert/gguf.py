"""Read a llama.cpp GGUF file of a Gemma model into Hugging Face-format pieces.

`read_gguf(path)` returns a `Checkpoint` (checkpoint.py):

* `config`            -- a Hugging Face-style `config.json` dict (`gemma`, `gemma2`
                         or `gemma3_text`), loadable by transformers and mlx-lm;
* `weights`           -- `{hf_name: float32 numpy array}` in HF layout ([out, in]);
* `tokenizer_model`   -- a SentencePiece `ModelProto` (bytes) rebuilt from the
                         vocabulary stored in the GGUF metadata;
* `generation_config` -- `bos_token_id`, `eos_token_id` (a list that includes
                         `<end_of_turn>` when the vocabulary has it; for a Gemma 4
                         vocabulary `<turn|>` and `<|tool_response>`), `pad_token_id`.

Gemma 4 GGUF files (`general.architecture` "gemma4") are refused with a typed error
naming the architecture: their weights (per-layer embeddings, KV-shared blocks,
per-layer head sizes, the experts) are not mapped here; convert the Hugging Face folder.

What llama.cpp does to a Gemma checkpoint, and what we undo (read from
llama.cpp's `convert_hf_to_gguf.py`, classes `GemmaModel`, `Gemma2Model`,
`Gemma3Model`, and `gguf-py/gguf/constants.py` + `tensor_mapping.py`):

* Every tensor whose HF name ends in `norm.weight` gets `+ 1` (HF's Gemma
  RMSNorm stores w and computes x * (1 + w); llama.cpp folds the 1 in).  For
  Gemma 3 that includes `self_attn.q_norm` / `self_attn.k_norm` and the final
  `model.norm`.  We subtract 1 from all of them.
* Tensor names (`MODEL_TENSOR` -> GGUF name -> HF name):
  TOKEN_EMBD `token_embd` -> `model.embed_tokens`; OUTPUT_NORM `output_norm` ->
  `model.norm`; OUTPUT `output` -> `lm_head`; ATTN_NORM `blk.N.attn_norm` ->
  `input_layernorm`; ATTN_Q/K/V/OUT `attn_q/attn_k/attn_v/attn_output` ->
  `self_attn.{q,k,v,o}_proj`; ATTN_Q_NORM/ATTN_K_NORM `attn_q_norm/attn_k_norm`
  -> `self_attn.{q,k}_norm`; ATTN_POST_NORM `post_attention_norm` ->
  `post_attention_layernorm`; FFN_GATE/UP/DOWN `ffn_gate/ffn_up/ffn_down` ->
  `mlp.{gate,up,down}_proj`; FFN_POST_NORM `post_ffw_norm` ->
  `post_feedforward_layernorm`.  `blk.N.ffn_norm` is FFN_NORM for `gemma`
  (HF `post_attention_layernorm`, the pre-MLP norm of Gemma 1) but
  FFN_PRE_NORM for `gemma2`/`gemma3` (HF `pre_feedforward_layernorm`): both
  enums serialise to the same GGUF name.
* Gemma 3's token embedding is cut to the tokenizer's real size (OOV rows
  dropped), so `vocab_size` is the embedding's row count, not HF's 262208.
* Hyper-parameters llama.cpp does not store (from `llama-model.cpp`'s
  `load_hparams`): Gemma 2 alternates sliding/global layers starting with a
  sliding one (`set_swa_pattern(2)`); Gemma 3 uses 5 sliding : 1 global
  (`set_swa_pattern(6)`), local RoPE base 10000, and only when
  `attention.sliding_window` is present; the attention scale is
  1/sqrt(head_dim) except for the 27B models (Gemma 2 with 46 layers, Gemma 3
  with 62), where it is 1/sqrt(hidden / heads) -- HF's `query_pre_attn_scalar`.
  Gemma 2's soft-caps default to 50 (attention) and 30 (final) when absent.
* The tokenizer: see `gguf_tokenizer.py`.  The container (header, metadata,
  tensor table, dequantization): see `gguf_file.py`.
"""

from __future__ import annotations

import mmap
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .checkpoint import Checkpoint, generation_config
from .gguf_file import (
    SUPPORTED_TENSOR_TYPES,
    GGUFTensorInfo,
    dequantize_tensor,
    open_gguf,
    read_gguf_metadata,
)
from .gguf_tokenizer import build_tokenizer, stop_ids
from ..arguments import is_integer, is_real
from ..errors import (
    ModelFileError,
    UnsupportedModelError,
    WeightsMismatchError,
)

__all__ = [
    "read_gguf",
    "read_gguf_metadata",
    "gguf_tensor_to_hf_name",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TENSOR_TYPES",
]

SUPPORTED_ARCHITECTURES = ("gemma", "gemma2", "gemma3")

# ggml type name -> we can dequantize it with gguf.quants (numpy).

_MODEL_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
_HF_ARCHITECTURES = {
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}

# Per-block GGUF suffix -> HF suffix, per architecture.
_BLOCK_COMMON = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAMES = {
    "gemma": {**_BLOCK_COMMON, "ffn_norm": "post_attention_layernorm"},
    "gemma2": {
        **_BLOCK_COMMON,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "gemma3": {
        **_BLOCK_COMMON,
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(0|[1-9][0-9]{0,5})\.([a-z_]+)\.weight$")


# --------------------------------------------------------------------------- names


def gguf_tensor_to_hf_name(name: str, arch: str) -> str | None:
    """HF name for a GGUF tensor name of `arch`, or None when it has none."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _BLOCK_RE.match(name)
    if m:
        hf = _BLOCK_NAMES[arch].get(m.group(2))
        if hf is not None:
            return f"model.layers.{int(m.group(1))}.{hf}.weight"
    return None


# --------------------------------------------------------------------------- config


def _as_int(path, key, v) -> int:
    if not is_integer(v):
        if isinstance(v, np.ndarray) and v.ndim == 1 and v.size and np.all(v == v[0]):
            return _as_int(path, key, v[0].item())  # per-layer array with one value
        raise ModelFileError(path, f"metadata {key!r} should be an integer, got {v!r:.80}")
    v = int(v)
    if not 0 < v < 1 << 31:
        raise ModelFileError(path, f"metadata {key!r} = {v} is out of range")
    return v


def _as_float(path, key, v) -> float:
    if not (is_integer(v) or isinstance(v, (float, np.floating))):
        raise ModelFileError(path, f"metadata {key!r} should be a number, got {v!r:.80}")
    v = float(v)
    if not np.isfinite(v):
        raise ModelFileError(path, f"metadata {key!r} = {v} is not finite")
    return v


def _as_text(path, key, v) -> str | None:
    """A GGUF string value as text; None when absent.  Anything else (a number, an array:
    numpy arrays have no truth value to compare with) is refused."""
    if v is None:
        return None
    if not isinstance(v, bytes):
        raise ModelFileError(path, f"metadata {key!r} should be a string, got {type(v).__name__} {v!r:.80}")
    return v.decode("utf-8", "replace")


def _is_zero(v) -> bool:
    """True for a scalar 0 / 0.0, which llama.cpp writes to mean "none"."""
    return is_real(v) and v == 0


def _f32_clean(x: float) -> float:
    """GGUF stores float32: print 1e-06, not 9.999999974752427e-07."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-")) if x else 0.0


def _build_config(path: str, meta: dict, arch: str, infos: dict[str, GGUFTensorInfo], specials: dict) -> dict:
    """The HF config.json dict of the model this file holds, with what llama.cpp leaves out filled in."""
    m = _ArchMeta(path, meta, arch)
    cfg = _base_config(m, infos, specials)
    rope_scaling = _rope_scaling(m)
    full_rope = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}

    if arch == "gemma":
        cfg["rope_parameters"] = full_rope
        if rope_scaling:
            cfg["rope_scaling"] = rope_scaling
            cfg["rope_parameters"] = {**full_rope, **rope_scaling}
        return cfg

    n_layers, n_heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    is_27b = (arch == "gemma2" and n_layers == 46) or (arch == "gemma3" and n_layers == 62)
    cfg["query_pre_attn_scalar"] = cfg["hidden_size"] // n_heads if is_27b else cfg["head_dim"]
    if arch == "gemma2":
        cfg.update(_gemma2_settings(m, n_layers, full_rope, rope_scaling))
    else:
        cfg.update(_gemma3_settings(m, n_layers, cfg["max_position_embeddings"], full_rope, rope_scaling))
    return cfg


class _ArchMeta:
    """The `<arch>.*` metadata of one file, read as typed values whose errors name the file and the key."""

    def __init__(self, path: str, meta: dict, arch: str):
        self.path, self.meta, self.arch = path, meta, arch

    def key(self, key: str) -> str:
        return f"{self.arch}.{key}"

    def get(self, key: str, default=None, required: bool = False):
        """The raw value, `default` when absent (or an error when `required`)."""
        k = self.key(key)
        if k not in self.meta:
            if required:
                raise ModelFileError(self.path, f"metadata {k!r} is missing")
            return default
        return self.meta[k]

    def int(self, key: str, default=None) -> int:
        """A positive int32; required when there is no default."""
        return _as_int(self.path, self.key(key), self.get(key, default, required=default is None))

    def float(self, key: str, default: float) -> float:
        return _as_float(self.path, self.key(key), self.get(key, default))


def _base_config(m: _ArchMeta, infos: dict[str, GGUFTensorInfo], specials: dict) -> dict[str, Any]:
    """The config keys every Gemma generation has."""
    arch = m.arch
    sizes = _sizes(m, infos)
    eps = m.float("attention.layer_norm_rms_epsilon", 1e-6)
    rope_theta = m.float("rope.freq_base", 1_000_000.0 if arch == "gemma3" else 10_000.0)
    emb = infos.get("token_embd.weight")
    if emb is None:
        raise WeightsMismatchError(m.path, "tensor 'token_embd.weight' is missing")
    return {
        "architectures": [_HF_ARCHITECTURES[arch]],
        "model_type": _MODEL_TYPES[arch],
        "vocab_size": emb.shape[0],
        **sizes,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": _f32_clean(eps),
        "rope_theta": _f32_clean(rope_theta),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "tie_word_embeddings": "output.weight" not in infos,
        "bos_token_id": specials["bos"],
        "eos_token_id": specials["eos"],
        "pad_token_id": specials["pad"],
    }


def _sizes(m: _ArchMeta, infos: dict[str, GGUFTensorInfo]) -> dict[str, int]:
    """The model's dimensions, checked against each other and against the number of tensors."""
    path, arch = m.path, m.arch
    hidden = m.int("embedding_length")
    n_layers = m.int("block_count")
    n_heads = m.int("attention.head_count")
    n_kv = m.int("attention.head_count_kv", n_heads)
    head_dim = m.int("attention.key_length", hidden // n_heads)
    v_len = m.int("attention.value_length", head_dim)
    if v_len != head_dim:
        raise UnsupportedModelError(path, f"value_length {v_len} != key_length {head_dim}")
    if n_heads % n_kv:
        raise ModelFileError(path, f"{n_heads} attention heads are not a multiple of {n_kv} KV heads")
    ffn = m.int("feed_forward_length")
    ctx = m.int("context_length", 8192 if arch != "gemma3" else 131072)
    # Each layer has at least 9 tensors: a larger block_count would have us build
    # per-layer tables for layers the file cannot hold.
    if n_layers * 9 > len(infos):
        raise WeightsMismatchError(path, f"{arch}.block_count is {n_layers} but the file has only {len(infos)} "
                                         f"tensors (each layer needs at least 9)")
    return {
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": ctx,
    }


def _rope_scaling(m: _ArchMeta) -> dict | None:
    """HF's `rope_scaling` for the file's RoPE scaling, None when there is none.

    It applies to the global layers only on Gemma 3, as llama.cpp's rope_freq_scale_train vs _swa."""
    scaling_type = _as_text(m.path, m.key("rope.scaling.type"), m.get("rope.scaling.type"))
    factor = m.get("rope.scaling.factor")
    if factor is None and m.get("rope.scale_linear") is not None:  # older key
        scaling_type, factor = "linear", m.get("rope.scale_linear")
    if scaling_type not in (None, "none", "linear"):
        raise UnsupportedModelError(m.path, f"RoPE scaling type {scaling_type!r} is not supported (only linear)")
    if factor is None:
        return None
    factor = _as_float(m.path, m.key("rope.scaling.factor"), factor)
    if scaling_type in (None, "linear") and factor not in (0.0, 1.0):
        return {"rope_type": "linear", "factor": factor}
    return None


def _gemma2_settings(m: _ArchMeta, n_layers: int, full_rope: dict, rope_scaling: dict | None) -> dict:
    """Gemma 2's soft-caps, sliding window and layer pattern (llama.cpp's defaults where absent)."""
    attn_cap = m.float("attn_logit_softcapping", 50.0)
    final_cap = m.float("final_logit_softcapping", 30.0)
    settings = dict(
        attn_logit_softcapping=_f32_clean(attn_cap),
        final_logit_softcapping=_f32_clean(final_cap),
        sliding_window=m.int("attention.sliding_window", 4096),
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)],
        cache_implementation="hybrid",
        rope_parameters={**full_rope, **(rope_scaling or {})},
    )
    if rope_scaling:
        settings["rope_scaling"] = rope_scaling
    return settings


def _gemma3_settings(m: _ArchMeta, n_layers: int, ctx: int, full_rope: dict, rope_scaling: dict | None) -> dict:
    """Gemma 3's sliding window and 5:1 layer pattern, local RoPE base and final soft-cap."""
    softcap_final = m.get("final_logit_softcapping")
    sw = m.get("attention.sliding_window")
    if sw is not None and not _is_zero(sw):
        sw = _as_int(m.path, m.key("attention.sliding_window"), sw)
        pattern = 6
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    else:  # llama.cpp: no sliding window key -> every layer global
        sw, pattern = ctx, 1
        layer_types = ["full_attention"] * n_layers
    local_theta = 10_000.0
    return dict(
        rope_local_base_freq=local_theta,
        rope_scaling=rope_scaling,
        sliding_window=sw,
        sliding_window_pattern=pattern,
        layer_types=layer_types,
        final_logit_softcapping=(
            _f32_clean(_as_float(m.path, m.key("final_logit_softcapping"), softcap_final))
            if softcap_final is not None and not _is_zero(softcap_final) else None
        ),
        attn_logit_softcapping=None,
        rope_parameters={
            "full_attention": {**full_rope, **(rope_scaling or {})},
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        },
    )


# --------------------------------------------------------------------------- weights


def _expected_shapes(cfg: dict, arch: str) -> dict[str, tuple[int, ...]]:
    h, ffn, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    per_layer = {
        "input_layernorm": (h,),
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (ffn, h),
        "mlp.up_proj": (ffn, h),
        "mlp.down_proj": (h, ffn),
        "post_attention_layernorm": (h,),
    }
    if arch in ("gemma2", "gemma3"):
        per_layer.update(pre_feedforward_layernorm=(h,), post_feedforward_layernorm=(h,))
    if arch == "gemma3":
        per_layer.update({"self_attn.q_norm": (hd,), "self_attn.k_norm": (hd,)})
    for i in range(cfg["num_hidden_layers"]):
        for k, s in per_layer.items():
            shapes[f"model.layers.{i}.{k}.weight"] = s
    return shapes


def read_gguf(path, *, progress: Callable[[int, int, str], None] | None = None) -> Checkpoint:
    """Read a Gemma / Gemma 2 / Gemma 3 (text) GGUF file into HF-format pieces.

    `progress(done, total, tensor_name)` is called after each tensor, if given.
    Raises `ModelFileError` (or a subclass) naming the file on any problem.
    """
    path, size = open_gguf(path)
    meta, tensor_list = read_gguf_metadata(path)

    arch = _as_text(path, "general.architecture", meta.get("general.architecture"))
    if arch == "gemma4":
        raise UnsupportedModelError(
            path, "GGUF architecture 'gemma4' (Gemma 4) is not supported: its weights are not mapped from "
                  "GGUF; convert the Hugging Face folder instead (convert.py --hf-path)")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            path, f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    tokenizer_model, specials, pieces = build_tokenizer(path, meta)
    infos = {t.name: t for t in tensor_list}
    cfg = _build_config(path, meta, arch, infos, specials)
    if len(pieces) > cfg["vocab_size"]:
        raise WeightsMismatchError(
            path, f"the vocabulary has {len(pieces)} tokens but token_embd.weight only {cfg['vocab_size']} rows"
        )

    hf_of = _hf_names(path, arch, tensor_list, _expected_shapes(cfg, arch))
    weights = _read_weights(path, size, tensor_list, hf_of, progress)
    eos, *stops = stop_ids(pieces, specials)
    generation = generation_config(specials["bos"], eos, specials["pad"], *stops)
    scalars = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
               for k, v in meta.items() if not isinstance(v, (list, np.ndarray))}
    return Checkpoint(cfg, weights, tokenizer_model, generation, source=Path(path), metadata=scalars)


def _hf_names(path: str, arch: str, tensor_list: list[GGUFTensorInfo],
              expected: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """{GGUF name: HF name}, strict both ways, with every shape checked before any data is read."""
    hf_of: dict[str, str] = {}
    unknown = []
    for t in tensor_list:
        hf = gguf_tensor_to_hf_name(t.name, arch)
        if hf is None or hf not in expected:
            unknown.append(t.name)
        else:
            hf_of[t.name] = hf
    if unknown:
        raise WeightsMismatchError(path, f"tensors with no {arch} counterpart: {_first_ten([repr(u) for u in unknown])}")
    missing = sorted(set(expected) - set(hf_of.values()))
    if missing:
        raise WeightsMismatchError(path, f"missing tensors: {_first_ten(missing)}")
    for t in tensor_list:
        want = expected[hf_of[t.name]]
        if t.shape != want:
            raise WeightsMismatchError(
                path, f"tensor {t.name!r} has shape {list(t.shape)}, expected {list(want)} for this config"
            )
    return hf_of


def _first_ten(names: list[str]) -> str:
    """The first ten names, comma-separated, and how many more there are."""
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _read_weights(path: str, size: int, tensor_list: list[GGUFTensorInfo], hf_of: dict[str, str],
                  progress) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32 under its HF name, the norms' folded-in 1 taken back out."""
    weights: dict[str, np.ndarray] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if len(mm) != size:
            raise ModelFileError(path, "file changed size while being read")
        for i, t in enumerate(tensor_list):
            raw = mm[t.offset : t.offset + t.nbytes]  # a copy: nothing keeps the mmap exported
            arr = dequantize_tensor(path, t, raw)
            del raw
            hf = hf_of[t.name]
            if hf.endswith("norm.weight"):
                arr -= np.float32(1.0)  # llama.cpp stored 1 + w (see module docstring)
            weights[hf] = arr
            if progress is not None:
                progress(i + 1, len(tensor_list), hf)
    return weights
