"""Read a llama.cpp GGUF file of a Gemma model into Hugging Face-format pieces.

`read_gguf(path)` returns a `GGUFCheckpoint`:

* `config`            -- a Hugging Face-style `config.json` dict (`gemma`, `gemma2`
                         or `gemma3_text`), loadable by transformers and mlx-lm;
* `weights`           -- `{hf_name: float32 numpy array}` in HF layout ([out, in]);
* `tokenizer_model`   -- a SentencePiece `ModelProto` (bytes) rebuilt from the
                         vocabulary stored in the GGUF metadata;
* `generation_config` -- `bos_token_id`, `eos_token_id` (a list that includes
                         `<end_of_turn>` when the vocabulary has it), `pad_token_id`.

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
* Tokenizer (`TextModel._create_vocab_sentencepiece`): SentencePiece pieces keep
  their text, score and type, except that every HF *added* token is rewritten:
  a special one becomes CONTROL (type 3), score -1000 -- this is why `<unk>`,
  `<start_of_turn>` and the `<unusedN>` pieces are CONTROL in a GGUF -- and a
  non-special one becomes USER_DEFINED (type 4) with its `▁` replaced by spaces.
  We map back: the bos/eos/pad pieces stay CONTROL, the unk piece is UNKNOWN,
  every other CONTROL piece becomes USER_DEFINED (so `<start_of_turn>` typed in
  text encodes to its id, as with the original tokenizer.model and HF), and
  spaces in USER_DEFINED pieces become `▁` again.

Hostile input: the header, metadata and tensor table are parsed here with
Python ints and every count, length and offset is checked against the real
file size before it is trusted (the `gguf` package's reader trusts them, and
its `np.prod` over uint64 dims can overflow).  Only dequantization is left to
`gguf.quants.dequantize`, whose exceptions are wrapped.  Every failure is a
`ModelFileError` (or a subclass) whose message starts with the file's path.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import (
    ModelFileError,
    TokenizerError,
    UnsupportedModelError,
    WeightsMismatchError,
)

__all__ = [
    "GGUFCheckpoint",
    "read_gguf",
    "read_gguf_metadata",
    "gguf_tensor_to_hf_name",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TENSOR_TYPES",
]

SUPPORTED_ARCHITECTURES = ("gemma", "gemma2", "gemma3")

# ggml type name -> we can dequantize it with gguf.quants (numpy).
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ4_NL", "IQ4_XS",
)

_GGUF_MAGIC = b"GGUF"
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_DEPTH = 3
_DEFAULT_ALIGNMENT = 32

# GGUF metadata value types (gguf-py constants.GGUFValueType)
_T_UINT8, _T_INT8, _T_UINT16, _T_INT16, _T_UINT32, _T_INT32 = 0, 1, 2, 3, 4, 5
_T_FLOAT32, _T_BOOL, _T_STRING, _T_ARRAY, _T_UINT64, _T_INT64, _T_FLOAT64 = 6, 7, 8, 9, 10, 11, 12
_SCALAR_FORMATS = {
    _T_UINT8: "B", _T_INT8: "b", _T_UINT16: "H", _T_INT16: "h", _T_UINT32: "I",
    _T_INT32: "i", _T_FLOAT32: "f", _T_BOOL: "?", _T_UINT64: "Q", _T_INT64: "q",
    _T_FLOAT64: "d",
}
_NUMPY_DTYPES = {
    _T_UINT8: "<u1", _T_INT8: "<i1", _T_UINT16: "<u2", _T_INT16: "<i2", _T_UINT32: "<u4",
    _T_INT32: "<i4", _T_FLOAT32: "<f4", _T_BOOL: "<u1", _T_UINT64: "<u8", _T_INT64: "<i8",
    _T_FLOAT64: "<f8",
}

# llama.cpp token types (SentencePieceTokenTypes / gguf.TokenType)
_TOK_NORMAL, _TOK_UNKNOWN, _TOK_CONTROL, _TOK_USER_DEFINED, _TOK_UNUSED, _TOK_BYTE = 1, 2, 3, 4, 5, 6

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


# --------------------------------------------------------------------------- data types


@dataclass
class GGUFTensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the fastest-varying dimension
    type_code: int
    type_name: str
    offset: int  # absolute offset of the data in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy / HF order (ggml's ne reversed)."""
        return tuple(reversed(self.ne))


@dataclass
class GGUFCheckpoint:
    config: dict
    weights: dict[str, np.ndarray]
    tokenizer_model: bytes
    generation_config: dict
    metadata: dict = field(default_factory=dict)  # scalar GGUF metadata (no big arrays)
    path: str = ""


# --------------------------------------------------------------------------- parsing


class _Truncated(Exception):
    pass


class _Reader:
    """Bounds-checked little-endian reader over a read-only mmap."""

    def __init__(self, buf, size: int):
        self.buf = buf
        self.size = size
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated(
                f"{what} at byte {self.pos} needs {n} bytes but the file has only "
                f"{max(self.size - self.pos, 0)} left (truncated or corrupt)"
            )

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return out[0] if len(out) == 1 else out

    def raw(self, n: int, what: str) -> bytes:
        self.need(n, what)
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def string(self, what: str) -> bytes:
        n = self.unpack("Q", what + " length")
        return self.raw(n, what)


def _value(r: _Reader, vtype: int, what: str, depth: int = 0):
    if vtype == _T_STRING:
        return r.string(what)
    if vtype in _SCALAR_FORMATS:
        return r.unpack(_SCALAR_FORMATS[vtype], what)
    if vtype == _T_ARRAY:
        if depth >= _MAX_ARRAY_DEPTH:
            raise ValueError(f"{what}: arrays nested deeper than {_MAX_ARRAY_DEPTH}")
        etype = r.unpack("I", what + " element type")
        count = r.unpack("Q", what + " element count")
        if etype in _NUMPY_DTYPES:
            size = np.dtype(_NUMPY_DTYPES[etype]).itemsize
            data = np.frombuffer(r.raw(count * size, what), dtype=_NUMPY_DTYPES[etype])
            return data.astype(bool) if etype == _T_BOOL else data
        if etype == _T_STRING:
            # each string takes >= 8 bytes: check the claimed count before looping
            r.need(count * 8, what)
            out = []
            for _ in range(count):
                out.append(r.string(what))
            return out
        if etype == _T_ARRAY:
            r.need(count * 12, what)
            return [_value(r, _T_ARRAY, what, depth + 1) for _ in range(count)]
        raise ValueError(f"{what}: unknown array element type {etype}")
    raise ValueError(f"{what}: unknown metadata value type {vtype}")


def _ggml_types():
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading GGUF files needs the `gguf` package: pip install 'mlx_gemma[gguf]'") from e
    return GGMLQuantizationType, GGML_QUANT_SIZES


def _parse(path: str, buf, size: int) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    GGMLQuantizationType, GGML_QUANT_SIZES = _ggml_types()
    r = _Reader(buf, size)
    magic = r.raw(4, "magic")
    if magic != _GGUF_MAGIC:
        raise ModelFileError(path, f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
    version = r.unpack("I", "version")
    if version & 0xFFFF == 0 and version != 0:
        raise UnsupportedModelError(path, "big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise UnsupportedModelError(path, f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = r.unpack("QQ", "tensor/metadata counts")
    # Smallest possible entries: a metadata pair 8+1+4+1 bytes, a tensor info 8+1+4+8+4+8.
    if n_kv * 14 + n_tensors * 33 > size - r.pos:
        raise ModelFileError(
            path,
            f"header claims {n_tensors} tensors and {n_kv} metadata entries, which cannot "
            f"fit in a {size}-byte file (corrupt or truncated)",
        )

    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key_raw = r.string("metadata key")
        try:
            key = key_raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFileError(path, f"metadata key {key_raw[:64]!r} is not UTF-8") from None
        vtype = r.unpack("I", f"type of metadata {key!r}")
        if key in meta:
            raise ModelFileError(path, f"metadata key {key!r} appears twice")
        meta[key] = _value(r, vtype, f"metadata {key!r}")

    alignment = meta.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
        raise ModelFileError(path, f"general.alignment {alignment!r} is not a power of two")

    infos_raw = []
    seen: set[str] = set()
    for _ in range(n_tensors):
        name_raw = r.string("tensor name")
        try:
            name = name_raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFileError(path, f"tensor name {name_raw[:64]!r} is not UTF-8") from None
        if name in seen:
            raise ModelFileError(path, f"tensor {name!r} appears twice")
        seen.add(name)
        n_dims = r.unpack("I", f"tensor {name!r} rank")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ModelFileError(path, f"tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
        ne = tuple(int(d) for d in (r.unpack("Q", f"tensor {name!r} dims") for _ in range(n_dims)))
        type_code = r.unpack("I", f"tensor {name!r} type")
        offset = r.unpack("Q", f"tensor {name!r} offset")
        infos_raw.append((name, ne, type_code, offset))

    data_start = -(-r.pos // alignment) * alignment
    infos = []
    for name, ne, type_code, offset in infos_raw:
        try:
            qtype = GGMLQuantizationType(type_code)
        except ValueError:
            raise UnsupportedModelError(path, f"tensor {name!r} has unknown ggml type code {type_code}") from None
        if qtype.name not in SUPPORTED_TENSOR_TYPES:
            raise UnsupportedModelError(
                path,
                f"tensor {name!r} is stored as {qtype.name}, which mlx_gemma cannot dequantize "
                f"(supported: {', '.join(SUPPORTED_TENSOR_TYPES)})",
            )
        if any(d <= 0 for d in ne):
            raise ModelFileError(path, f"tensor {name!r} has an empty dimension {ne}")
        n_elements = 1
        for d in ne:
            n_elements *= d  # Python ints: no overflow
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if ne[0] % block_size:
            raise ModelFileError(
                path,
                f"tensor {name!r}: row length {ne[0]} is not a multiple of the {qtype.name} "
                f"block size {block_size}",
            )
        nbytes = n_elements // block_size * type_size
        if offset % alignment:
            raise ModelFileError(path, f"tensor {name!r}: data offset {offset} is not {alignment}-aligned")
        start = data_start + offset
        if start + nbytes > size:
            raise ModelFileError(
                path,
                f"truncated: tensor {name!r} ({qtype.name} {list(ne)}) needs bytes {start}..{start + nbytes} "
                f"but the file has {size} bytes",
            )
        infos.append(GGUFTensorInfo(name, ne, type_code, qtype.name, start, nbytes))
    return meta, infos


def _open(path) -> tuple[str, int]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(path, "no such GGUF file")
    size = os.path.getsize(path)
    if size < 24:
        raise ModelFileError(path, f"file is {size} bytes: too small to be a GGUF file (empty or truncated)")
    return path, size


def read_gguf_metadata(path) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """Parse and validate the header: (metadata dict, tensor infos).  No weights are read."""
    path, size = _open(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        try:
            return _parse(path, mm, size)
        except _Truncated as e:
            raise ModelFileError(path, str(e)) from None
        except (ValueError, OverflowError, struct.error, MemoryError) as e:
            if isinstance(e, ModelFileError):
                raise
            raise ModelFileError(path, f"corrupt GGUF header: {e}") from None


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
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        if isinstance(v, np.ndarray) and v.ndim == 1 and v.size and np.all(v == v[0]):
            return _as_int(path, key, v[0].item())  # per-layer array with one value
        raise ModelFileError(path, f"metadata {key!r} should be an integer, got {v!r:.80}")
    v = int(v)
    if not 0 < v < 1 << 31:
        raise ModelFileError(path, f"metadata {key!r} = {v} is out of range")
    return v


def _as_float(path, key, v) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ModelFileError(path, f"metadata {key!r} should be a number, got {v!r:.80}")
    v = float(v)
    if not np.isfinite(v):
        raise ModelFileError(path, f"metadata {key!r} = {v} is not finite")
    return v


def _f32_clean(x: float) -> float:
    """GGUF stores float32: print 1e-06, not 9.999999974752427e-07."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-")) if x else 0.0


def _build_config(path: str, meta: dict, arch: str, infos: dict[str, GGUFTensorInfo], specials: dict) -> dict:
    def get(key, default=None, required=False):
        k = f"{arch}.{key}"
        if k not in meta:
            if required:
                raise ModelFileError(path, f"metadata {k!r} is missing")
            return default
        return meta[k]

    hidden = _as_int(path, f"{arch}.embedding_length", get("embedding_length", required=True))
    n_layers = _as_int(path, f"{arch}.block_count", get("block_count", required=True))
    n_heads = _as_int(path, f"{arch}.attention.head_count", get("attention.head_count", required=True))
    n_kv = _as_int(path, f"{arch}.attention.head_count_kv", get("attention.head_count_kv", n_heads))
    head_dim = _as_int(path, f"{arch}.attention.key_length", get("attention.key_length", hidden // n_heads))
    v_len = _as_int(path, f"{arch}.attention.value_length", get("attention.value_length", head_dim))
    if v_len != head_dim:
        raise UnsupportedModelError(path, f"value_length {v_len} != key_length {head_dim}")
    if n_heads % n_kv:
        raise ModelFileError(path, f"{n_heads} attention heads are not a multiple of {n_kv} KV heads")
    ffn = _as_int(path, f"{arch}.feed_forward_length", get("feed_forward_length", required=True))
    ctx = _as_int(path, f"{arch}.context_length", get("context_length", 8192 if arch != "gemma3" else 131072))
    eps = _as_float(path, "rms eps", get("attention.layer_norm_rms_epsilon", 1e-6))
    default_theta = 1_000_000.0 if arch == "gemma3" else 10_000.0
    rope_theta = _as_float(path, f"{arch}.rope.freq_base", get("rope.freq_base", default_theta))

    emb = infos.get("token_embd.weight")
    if emb is None:
        raise WeightsMismatchError(path, "tensor 'token_embd.weight' is missing")
    vocab = emb.shape[0]

    # RoPE scaling (global layers only on Gemma 3, as in llama.cpp's rope_freq_scale_train vs _swa)
    scaling_type = get("rope.scaling.type")
    factor = get("rope.scaling.factor")
    if factor is None and get("rope.scale_linear") is not None:  # older key
        scaling_type, factor = "linear", get("rope.scale_linear")
    rope_scaling = None
    if isinstance(scaling_type, bytes):
        scaling_type = scaling_type.decode("utf-8", "replace")
    if scaling_type not in (None, "none", "linear"):
        raise UnsupportedModelError(path, f"RoPE scaling type {scaling_type!r} is not supported (only linear)")
    if factor is not None:
        factor = _as_float(path, f"{arch}.rope.scaling.factor", factor)
        if scaling_type in (None, "linear") and factor not in (0.0, 1.0):
            rope_scaling = {"rope_type": "linear", "factor": factor}

    cfg: dict[str, Any] = {
        "architectures": [_HF_ARCHITECTURES[arch]],
        "model_type": _MODEL_TYPES[arch],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": ctx,
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
    full_rope = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}

    if arch == "gemma":
        cfg["rope_parameters"] = full_rope
        if rope_scaling:
            cfg["rope_scaling"] = rope_scaling
            cfg["rope_parameters"] = {**full_rope, **rope_scaling}
        return cfg

    is_27b = (arch == "gemma2" and n_layers == 46) or (arch == "gemma3" and n_layers == 62)
    cfg["query_pre_attn_scalar"] = hidden // n_heads if is_27b else head_dim
    softcap_final = get("final_logit_softcapping")
    if arch == "gemma2":
        attn_cap = _as_float(path, "attn softcap", get("attn_logit_softcapping", 50.0))
        final_cap = _as_float(path, "final softcap", softcap_final if softcap_final is not None else 30.0)
        sw = get("attention.sliding_window")
        sw = _as_int(path, f"{arch}.attention.sliding_window", sw) if sw is not None else 4096
        cfg.update(
            attn_logit_softcapping=_f32_clean(attn_cap),
            final_logit_softcapping=_f32_clean(final_cap),
            sliding_window=sw,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)],
            cache_implementation="hybrid",
        )
        cfg["rope_parameters"] = {**full_rope, **(rope_scaling or {})}
        if rope_scaling:
            cfg["rope_scaling"] = rope_scaling
        return cfg

    # gemma3
    sw = get("attention.sliding_window")
    if sw is not None and sw != 0:
        sw = _as_int(path, f"{arch}.attention.sliding_window", sw)
        pattern = 6
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    else:  # llama.cpp: no sliding window key -> every layer global
        sw, pattern = ctx, 1
        layer_types = ["full_attention"] * n_layers
    local_theta = 10_000.0
    cfg.update(
        rope_local_base_freq=local_theta,
        rope_scaling=rope_scaling,
        sliding_window=sw,
        sliding_window_pattern=pattern,
        layer_types=layer_types,
        final_logit_softcapping=(
            _f32_clean(_as_float(path, "final softcap", softcap_final)) if softcap_final else None
        ),
        attn_logit_softcapping=None,
        rope_parameters={
            "full_attention": {**full_rope, **(rope_scaling or {})},
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        },
    )
    return cfg


# --------------------------------------------------------------------------- tokenizer


def _special_ids(path: str, meta: dict, n_tokens: int) -> dict:
    out = {}
    for key, gguf_key, default in (
        ("bos", "tokenizer.ggml.bos_token_id", 2),
        ("eos", "tokenizer.ggml.eos_token_id", 1),
        ("unk", "tokenizer.ggml.unknown_token_id", 3),
        ("pad", "tokenizer.ggml.padding_token_id", 0),
    ):
        v = meta.get(gguf_key, default)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < n_tokens:
            raise TokenizerError(path, f"{gguf_key} = {v!r} is not a token id (vocabulary has {n_tokens})")
        out[key] = int(v)
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if isinstance(eot, (int, np.integer)) and not isinstance(eot, bool) and 0 <= int(eot) < n_tokens:
        out["eot"] = int(eot)
    return out


def _build_tokenizer(path: str, meta: dict) -> tuple[bytes, dict, list[str]]:
    from sentencepiece import sentencepiece_model_pb2 as spm

    model = meta.get("tokenizer.ggml.model")
    if model != b"llama":
        raise TokenizerError(
            path,
            f"tokenizer.ggml.model is {model!r}: only SentencePiece vocabularies ('llama') can be "
            "rebuilt into a tokenizer.model",
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, bytes) for t in tokens):
        raise TokenizerError(path, "tokenizer.ggml.tokens is missing or not a list of strings")
    n = len(tokens)
    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, np.ndarray) or scores.shape != (n,) or scores.dtype.kind != "f":
        raise TokenizerError(path, f"tokenizer.ggml.scores is missing or not {n} floats")
    if not np.all(np.isfinite(scores)):
        raise TokenizerError(path, "tokenizer.ggml.scores contains NaN or infinity")
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        types = np.full(n, _TOK_NORMAL, dtype=np.int32)
    if not isinstance(types, np.ndarray) or types.shape != (n,) or types.dtype.kind not in "iu":
        raise TokenizerError(path, f"tokenizer.ggml.token_type is not {n} integers")
    specials = _special_ids(path, meta, n)

    try:
        pieces = [t.decode("utf-8") for t in tokens]
    except UnicodeDecodeError as e:
        raise TokenizerError(path, f"a token is not valid UTF-8: {e}") from None

    P = spm.ModelProto.SentencePiece
    control_ids = {specials["bos"], specials["eos"], specials["pad"]}
    proto = spm.ModelProto()
    n_bytes = 0
    seen: set[str] = set()
    types_list = types.tolist()
    scores_list = scores.astype(np.float32).tolist()
    for i, (piece, ttype, score) in enumerate(zip(pieces, types_list, scores_list)):
        if i == specials["unk"]:
            ptype = P.UNKNOWN
        elif i in control_ids:
            ptype = P.CONTROL
        elif ttype in (_TOK_CONTROL, _TOK_USER_DEFINED, _TOK_UNKNOWN):
            # llama.cpp writes HF added tokens as CONTROL (special) or USER_DEFINED with
            # '▁' turned into ' '; SentencePiece matches USER_DEFINED pieces in text.
            ptype = P.USER_DEFINED
            piece = piece.replace(" ", "\u2581")
        elif ttype == _TOK_BYTE:
            ptype = P.BYTE
            if not re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
                raise TokenizerError(path, f"byte token {i} is {piece!r}, expected <0xXX>")
            n_bytes += 1
        elif ttype == _TOK_UNUSED:
            ptype = P.UNUSED
        elif ttype == _TOK_NORMAL:
            ptype = P.NORMAL
        else:
            raise TokenizerError(path, f"token {i} ({piece!r}) has unknown token type {ttype}")
        if not piece:
            raise TokenizerError(path, f"token {i} is empty")
        if piece in seen:
            raise TokenizerError(path, f"token {piece!r} (id {i}) appears twice")
        seen.add(piece)
        sp = proto.pieces.add()
        sp.piece, sp.score, sp.type = piece, score, ptype
        pieces[i] = piece

    ts = proto.trainer_spec
    ts.model_type = ts.BPE
    ts.vocab_size = n
    ts.byte_fallback = n_bytes == 256
    ts.split_digits = True
    ts.allow_whitespace_only_pieces = True
    ts.split_by_whitespace = True
    ts.treat_whitespace_as_suffix = False
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = specials["unk"], specials["bos"], specials["eos"], specials["pad"]
    ts.unk_piece, ts.bos_piece = pieces[specials["unk"]], pieces[specials["bos"]]
    ts.eos_piece, ts.pad_piece = pieces[specials["eos"]], pieces[specials["pad"]]
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    data = proto.SerializeToString()

    # Make sure SentencePiece accepts what we built.
    import sentencepiece

    sp_proc = sentencepiece.SentencePieceProcessor()
    try:
        sp_proc.LoadFromSerializedProto(data)
    except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError
        raise TokenizerError(path, f"rebuilt tokenizer.model is rejected by sentencepiece: {e}") from None
    return data, specials, pieces


# --------------------------------------------------------------------------- weights


def _dequantize(path: str, info: GGUFTensorInfo, raw: bytes) -> np.ndarray:
    from gguf.quants import dequantize

    GGMLQuantizationType, GGML_QUANT_SIZES = _ggml_types()
    qtype = GGMLQuantizationType(info.type_code)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    row_bytes = info.ne[0] // block_size * type_size
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, row_bytes)
    try:
        out = dequantize(rows, qtype)
    except Exception as e:  # noqa: BLE001 - wrap whatever the gguf package raises
        raise ModelFileError(path, f"cannot dequantize tensor {info.name!r} ({info.type_name}): {e}") from None
    out = np.asarray(out, dtype=np.float32).reshape(info.shape)
    if not out.flags.writeable:  # F32/F16 paths can return a view of the read-only bytes
        out = out.copy()
    if not np.isfinite(out).all():
        raise ModelFileError(path, f"tensor {info.name!r} contains NaN or infinite values")
    return out


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


def read_gguf(path, *, progress: Callable[[int, int, str], None] | None = None) -> GGUFCheckpoint:
    """Read a Gemma / Gemma 2 / Gemma 3 (text) GGUF file into HF-format pieces.

    `progress(done, total, tensor_name)` is called after each tensor, if given.
    Raises `ModelFileError` (or a subclass) naming the file on any problem.
    """
    path, size = _open(path)
    meta, tensor_list = read_gguf_metadata(path)

    arch = meta.get("general.architecture")
    if isinstance(arch, bytes):
        arch = arch.decode("utf-8", "replace")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            path, f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    tokenizer_model, specials, pieces = _build_tokenizer(path, meta)
    infos = {t.name: t for t in tensor_list}
    cfg = _build_config(path, meta, arch, infos, specials)
    if len(pieces) > cfg["vocab_size"]:
        raise WeightsMismatchError(
            path, f"the vocabulary has {len(pieces)} tokens but token_embd.weight only {cfg['vocab_size']} rows"
        )

    # Name mapping (strict both ways) and shape checks before reading any data.
    expected = _expected_shapes(cfg, arch)
    hf_of: dict[str, str] = {}
    unknown = []
    for t in tensor_list:
        hf = gguf_tensor_to_hf_name(t.name, arch)
        if hf is None or hf not in expected:
            unknown.append(t.name)
        else:
            hf_of[t.name] = hf
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:10])
        shown += f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise WeightsMismatchError(path, f"tensors with no {arch} counterpart: {shown}")
    missing = sorted(set(expected) - set(hf_of.values()))
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise WeightsMismatchError(path, f"missing tensors: {shown}")
    for t in tensor_list:
        want = expected[hf_of[t.name]]
        if t.shape != want:
            raise WeightsMismatchError(
                path, f"tensor {t.name!r} has shape {list(t.shape)}, expected {list(want)} for this config"
            )

    weights: dict[str, np.ndarray] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if len(mm) != size:
            raise ModelFileError(path, "file changed size while being read")
        for i, t in enumerate(tensor_list):
            raw = mm[t.offset : t.offset + t.nbytes]  # a copy: nothing keeps the mmap exported
            arr = _dequantize(path, t, raw)
            del raw
            hf = hf_of[t.name]
            if hf.endswith("norm.weight"):
                arr -= np.float32(1.0)  # llama.cpp stored 1 + w (see module docstring)
            weights[hf] = arr
            if progress is not None:
                progress(i + 1, len(tensor_list), hf)

    from .hf import generation_config as make_generation_config

    generation_config = make_generation_config(
        specials["bos"], specials["eos"], specials["pad"], specials.get("eot"), _piece_id(pieces, "<end_of_turn>")
    )
    scalars = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
               for k, v in meta.items() if not isinstance(v, (list, np.ndarray))}
    return GGUFCheckpoint(cfg, weights, tokenizer_model, generation_config, scalars, path)


def _piece_id(pieces: list[str], piece: str) -> int | None:
    try:
        return pieces.index(piece)
    except ValueError:
        return None
