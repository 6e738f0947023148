"""Turn a Hugging Face `config.json` dict into a model's config dataclass, strictly.

Known keys fill the dataclass; keys that only describe the file (versions,
token ids, dtype) are listed in `FILE_KEYS` and set aside; any other key is kept
in `extra` (never silently dropped) so a writer can put it back and a reader can
see what this library did not interpret.  Impossible values are refused before
anything is allocated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

from ..arguments import is_integer, is_real
from ..errors import ConfigError
from ..json_input import expect, json_type, number_in

# Keys of an HF config that say nothing about the network's shape or numerics.
FILE_KEYS = frozenset(
    {
        "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
        "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
        "attention_dropout", "cache_implementation", "quantization", "quantization_config",
        "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id",
        "tokenizer_class", "task_specific_params", "problem_type", "chunk_size_feed_forward",
        "is_encoder_decoder", "tie_encoder_decoder", "_attn_implementation_autoset",
    }
)

# Refused outright rather than trusted: bounds no real Gemma comes near.
LIMITS = {
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "vocab_size": 1 << 22,
}
MAX_PARAMETERS = 2 * 10**12

# Dataclass fields that the parser fills itself, never from the file.
DERIVED = frozenset({"extra", "rope"})

T = TypeVar("T")


def parse_config(cls: type[T], config: dict[str, Any], path=None, where: str = "") -> T:
    """Build `cls` (a dataclass with an `extra` dict field) from an HF config dict.

    `where` prefixes key names in messages for a nested config (`"vision_config."`).
    """
    if not isinstance(config, dict):
        raise ConfigError(path, f"{where.rstrip('.') or 'config'} must be a JSON object, found {json_type(config)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in DERIVED}
    required = [
        name for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [where + name for name in required if config.get(name) is None]
    if missing:
        raise ConfigError(path, f"config is missing required keys: {', '.join(missing)}")
    # An explicit null means "none" for fields that allow it (e.g. Gemma 2's
    # `attn_logit_softcapping: null` is no cap, not the default of 50); for
    # the others it means "not given".
    known = {
        k: v for k, v in config.items()
        if k in fields and (v is not None or type(None) in _kinds(fields[k]))
    }
    extra = {k: v for k, v in config.items() if k not in fields and k not in FILE_KEYS}
    _check_values(known, path, where)
    for key, value in known.items():
        _check_kind(value, fields[key], path, where + key)
    try:
        args = cls(**known, extra=extra)
    except (TypeError, ValueError) as e:
        raise ConfigError(path, f"invalid config: {e}") from e
    return args


# The annotations' names for JSON's kinds (the modules use `from __future__ import annotations`).
_ANNOTATION_KINDS = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict, "list": list,
                     "None": type(None), "Any": object}


def _kinds(f: dataclasses.Field) -> tuple[type, ...]:
    """JSON kinds a dataclass field accepts, from its annotation ("list[str] | None" -> (list, None))."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return tuple(_ANNOTATION_KINDS[part.strip().split("[")[0]] for part in text.split("|"))


def _check_kind(value: Any, f: dataclasses.Field, path, key: str) -> None:
    """A config value of the kind its field declares: a string where a number belongs, or an
    array where an object belongs, must fail here, not as a TypeError deep in the model."""
    kinds = _kinds(f)
    if object in kinds:
        return
    expect(value, kinds, path, key)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(path, f"{key} must be a finite number, got {value!r}")
    if isinstance(value, list) and "list[str]" in str(f.type):
        for i, item in enumerate(value):
            expect(item, str, path, f"{key}[{i}]")


def _check_values(values: dict[str, Any], path, where: str = "") -> None:
    for key, limit in LIMITS.items():
        if key not in values:
            continue
        v = values[key]
        if not is_integer(v) or not 0 < v <= limit:
            raise ConfigError(path, f"{where}{key} must be a positive integer <= {limit}, got {v!r}")
    heads, kv_heads = values.get("num_attention_heads"), values.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise ConfigError(
            path, f"{where}num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
        )
    for key in ("rms_norm_eps", "layer_norm_eps", "query_pre_attn_scalar", "rope_theta", "rope_local_base_freq"):
        v = values.get(key)
        if v is not None and (not is_real(v) or v <= 0):
            raise ConfigError(path, f"{where}{key} must be a positive number, got {v!r}")
    for key in ("sliding_window", "max_position_embeddings", "sliding_window_pattern"):
        v = values.get(key)
        if v is not None and (not is_integer(v) or v <= 0):
            raise ConfigError(path, f"{where}{key} must be a positive integer, got {v!r}")
    hidden, layers = values.get("hidden_size", 0), values.get("num_hidden_layers", 0)
    approx = values.get("vocab_size", 0) * hidden + layers * (
        4 * hidden * values.get("head_dim", 1) * values.get("num_attention_heads", 1)
        + 3 * hidden * values.get("intermediate_size", 0)
    )
    if approx > MAX_PARAMETERS:
        raise ConfigError(path, f"config describes ~{approx:.3g} parameters; refusing to build it")


def layer_types_from(
    layer_types: list[str] | None, pattern: int, num_layers: int, path=None
) -> list[str]:
    """Per-layer attention kind: the config's `layer_types`, else every
    `pattern`-th layer global (transformers' legacy `sliding_window_pattern`)."""
    if layer_types is None:
        return [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(num_layers)
        ]
    allowed = {"full_attention", "sliding_attention"}
    if len(layer_types) != num_layers or not set(layer_types) <= allowed:
        raise ConfigError(
            path,
            f"layer_types must list {num_layers} entries from {sorted(allowed)}, got {layer_types!r:.200}",
        )
    return list(layer_types)


def finite_or_none(value: float | None, path=None, key: str = "soft-cap") -> float | None:
    """Soft-cap values: null/absent means none; guard against 0 or NaN."""
    if value is None:
        return None
    return float(number_in(value, float, path, key, above=0))


def rope_settings(params: Any, path, key: str) -> dict:
    """A RoPE settings object (`rope_parameters`, `rope_scaling`, or one layer kind's entry):
    an object whose `rope_theta` and `factor`, when present, are positive finite numbers."""
    if params is None:
        return {}
    expect(params, dict, path, key)
    for name in ("rope_theta", "factor"):
        if name in params:
            number_in(params[name], float, path, f"{key}.{name}", above=0)
    return params
