"""From a folder (or hub id) to a ready model: validate, build, load strictly.

Accepted folders: Hugging Face checkpoints (`config.json` + safetensors, one
file or sharded, plain or nested `text_config`) and MLX folders as
mlx-community publishes them (`"quantization": {"group_size", "bits"}` with
per-layer overrides, packed `weight/scales/biases`).  Nothing a checkpoint
names is ever imported or executed: the architecture comes from the registry
in `models/`, weights only from safetensors.  Adapters (`adapter_path`) go on
in `api.py`, above both this module and `tuner/`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .cpu_spread import prepare_for_device
from .errors import ConfigError, ModelFileError, UnsafeCheckpointError, UnsupportedModelError, WeightsMismatchError
from .embedding_folder import (
    embedding_settings, encoder_settings, is_mlx_embeddings_layout, is_sentence_transformers_folder,
    mlx_embeddings_settings,
)
from .json_input import all_finite, expect, field, json_type, read_json
from .models import DRAFTERS, ENCODERS, MODELS, TEXT_PART_OF, supported_model_types
from .models.gemma4 import readable_quantization
from .model_folder import load_weights_from_folder
from .tokenizer import GemmaTokenizer, check_vocab_fits

# What `load` fetches from the hub: configs, safetensors and the tokenizer,
# never code or pickles.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "assets/tokenizer/*"]
MAX_CONFIG_BYTES = 4 << 20  # a real config.json is a few KB
# Config keys that ask a loader to import or run code; we refuse the checkpoint.
CODE_KEYS = ("auto_map", "model_file")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(path_or_repo: str | os.PathLike, revision: str | None = None) -> Path:
    """A local model folder for a path or a hub repo id (the packaged default model, for
    None, is chosen above this layer: `mlx_gemma.load` in api.py)."""
    if path_or_repo is None:
        raise ModelFileError(None, "no model given: pass a model folder or hub id "
                                   "(mlx_gemma.load() with none loads the packaged default model)")
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelFileError(path, "expected a model folder (with config.json), got a file")
        return path
    if isinstance(path_or_repo, str) and _REPO_ID.match(path_or_repo):
        return _download(path_or_repo, revision)
    raise ModelFileError(path, "no such folder, and not a Hugging Face repo id like 'google/gemma-2-2b-it'")


def _download(repo_id: str, revision: str | None) -> Path:
    """Fetch (or find in the normal cache, honouring HF_HUB_OFFLINE) a hub snapshot."""
    # deferred: huggingface_hub is a heavy import, needed only for a hub id
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise ModelFileError(
            repo_id, "not in the local Hugging Face cache and the hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1); download it once while online"
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise ModelFileError(repo_id, f"could not download from the Hugging Face hub: {e}") from e


def load_config(folder: str | os.PathLike) -> dict[str, Any]:
    """`config.json` as a dict, refused if missing, malformed or asking to run code."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(path, "missing: a model folder needs a config.json")
    config = all_finite(read_json(path, MAX_CONFIG_BYTES), path)
    if not isinstance(config, dict):
        raise ConfigError(path, f"must hold a JSON object, found {json_type(config)}")
    nested = field(config, "text_config", dict, path, default={})
    for key in CODE_KEYS:
        if key in config or key in nested:
            raise UnsafeCheckpointError(
                path, f"asks to load custom code through {key!r}; mlx_gemma never runs code "
                "from a checkpoint. Remove the key if the weights are a standard Gemma."
            )
    return config


def text_config(config: dict[str, Any], path=None) -> dict[str, Any]:
    """The settings to build from: the config itself, or the `text_config` of a multimodal
    config without a `vision_config` or `audio_config` (with one, a `gemma3` config builds the
    vision-language model, a `gemma4` config the model with its towers: models/gemma4_mm.py)."""
    model_type = config.get("model_type")
    if model_type is None:
        raise ConfigError(path, "config has no model_type")
    expect(model_type, str, path, "model_type")
    towers = config.get("vision_config") is not None or config.get("audio_config") is not None
    if model_type in TEXT_PART_OF and not towers:  # no tower: the text model
        nested = config.get("text_config")
        if not isinstance(nested, dict):
            raise ConfigError(path, f"a {model_type!r} config needs a text_config object")
        return {**nested, "model_type": TEXT_PART_OF[model_type]}
    if model_type not in MODELS and model_type not in DRAFTERS:
        raise UnsupportedModelError(
            path, f"model_type {model_type!r:.80} is not supported; supported: {', '.join(supported_model_types())}"
        )
    return config


def model_args(config: dict[str, Any], path=None):
    """The model's settings for a config dict, every value checked (ConfigError naming `path`)."""
    config = text_config(config, path)
    return _BUILDERS[config["model_type"]].ModelArgs.from_dict(config, path)


def build_model(config: dict[str, Any], path=None) -> nn.Module:
    """An un-loaded model (random weights) for a config dict, prepared for the device."""
    args = model_args(config, path)
    return prepare_for_device(_BUILDERS[args.model_type].Model(args))


_BUILDERS = {**MODELS, **DRAFTERS}  # a drafter (models.DRAFTERS) loads and converts as a model does


def quantize_like(model: nn.Module, config: dict[str, Any], weights: dict[str, mx.array], path=None) -> None:
    """Make the model's layers quantized wherever the checkpoint's are.

    mlx-community configs carry `"quantization": {"group_size", "bits"[, "mode"]}`
    and may override single layers by path (`{"model.layers.0.mlp.down_proj":
    {"bits": 8, ...}}` or `false`); a layer is quantized when its `.scales`
    tensor is present, as mlx-lm decides.  A Gemma 4 folder mlx-lm or mlx-vlm wrote names those
    layers under its own module paths; they are read under ours (gemma4.readable_quantization).
    """
    try:
        config = readable_quantization(config)
    except ConfigError as e:  # moe.sanitize_quantization knows no file: name this one
        raise ConfigError(path, e.problem) from None
    key = "quantization" if config.get("quantization") else "quantization_config"
    q = config.get(key)
    if not q:
        return
    expect(q, dict, path, key)
    defaults = quantization_settings(q, path, key)

    def predicate(name: str, module: nn.Module):
        if name in q:  # a per-layer dict of settings, or False
            override = expect(q[name], (dict, bool), path, f"{key}.{name}")
            return override if isinstance(override, bool) else quantization_settings(override, path, f"{key}.{name}")
        return hasattr(module, "to_quantized") and f"{name}.scales" in weights

    try:
        nn.quantize(model, **defaults, class_predicate=predicate)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # MLX's own refusals: a group size that does not divide a layer, ...
        raise ConfigError(path, f"{key}: the model's layers cannot be quantized so: {e}") from None


# What MLX's quantization accepts; anything else is refused before MLX sees it (a
# group size of 0 kills the process with a floating-point exception, MLX 0.32).
QUANT_GROUP_SIZES = (16, 32, 64, 128)
QUANT_BITS = range(1, 9)
QUANT_MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")


def quantization_settings(q: dict, path, key: str) -> dict:
    """The `group_size` / `bits` / `mode` of a quantization object, each checked."""
    settings = {k: q[k] for k in ("group_size", "bits", "mode") if k in q}
    for name, allowed in (("group_size", QUANT_GROUP_SIZES), ("bits", QUANT_BITS), ("mode", QUANT_MODES)):
        v = settings.get(name)
        if name in settings and (isinstance(v, bool) or v not in allowed):
            raise ConfigError(path, f"{key}.{name} must be one of {list(allowed)}, found {v!r:.80}")
    return settings


def check_weights(model: nn.Module, weights: dict[str, mx.array], path) -> None:
    """Strict: every parameter present with its shape, nothing left over."""
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    misshaped = [
        f"{k} {tuple(weights[k].shape)} (expected {tuple(expected[k])})"
        for k in sorted(expected.keys() & weights.keys())
        if tuple(weights[k].shape) != tuple(expected[k])
    ]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if names:
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise WeightsMismatchError(path, "weights do not fit the config; " + "; ".join(problems))


def load_model_from(
    config: dict[str, Any], weights: dict[str, mx.array], *, path=None, dtype: mx.Dtype | None = None,
    config_path=None, shard=None,
) -> nn.Module:
    """A model built from a config dict and its weights (already in memory).

    Errors in the config name `config_path` (default: the config.json of folder `path`, else
    `path`), those in the weights `path`.  `shard(model, weights) -> weights`, when given, runs
    after the weights are sanitized: it cuts the model down to one rank's share in place and
    returns the weights that share needs (mlx_gemma.distributed), which are then checked strictly.
    """
    if config_path is None:
        in_folder = None if path is None else Path(path) / "config.json"
        config_path = in_folder if in_folder is not None and in_folder.is_file() else path
    return _fill(build_model(config, config_path), config, weights, path, dtype, config_path, shard)


def _fill(model: nn.Module, config: dict[str, Any], weights: dict[str, mx.array], path, dtype, config_path,
          shard=None):
    """`model` with `weights` (sanitized, quantized as the config says, strictly checked) loaded."""
    try:
        weights = model.sanitize(weights)
    except WeightsMismatchError as e:  # a model's sanitize knows no file (e.g. an expert half missing): name it
        raise WeightsMismatchError(path if e.path is None else e.path, e.problem) from None
    if shard is not None:
        weights = shard(model, weights)
    quantize_like(model, config, weights, config_path)
    check_weights(model, weights, path)
    if dtype is not None:
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
        }
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    return prepare_for_device(model)  # the device's fast path, after any quantizing (cpu_spread.py)


def is_encoder_config(config: dict[str, Any]) -> bool:
    """A bidirectional Gemma 3 (EmbeddingGemma): a sentence encoder, not a causal LM."""
    return config.get("use_bidirectional_attention") is True and config.get("model_type") in ENCODERS


def load_encoder(folder: Path, config: dict[str, Any], dtype: mx.Dtype | None = None) -> nn.Module:
    """A sentence encoder from its sentence-transformers folder: the backbone in the root,
    Pooling / Dense / Normalize in the subfolders modules.json names (embedding_folder.py)."""
    config_path = Path(folder) / "config.json"
    root = load_weights_from_folder(folder)
    if is_mlx_embeddings_layout(root):  # mlx-embeddings / mlx-community: the Dense layers in the root file
        hidden = expect(config.get("hidden_size"), int, config_path, "hidden_size")
        settings, dense_weights = mlx_embeddings_settings(hidden), {}
    elif not is_sentence_transformers_folder(folder):
        raise ConfigError(config_path, "a bidirectional Gemma 3 (EmbeddingGemma) needs its sentence-transformers "
                                       "folder (modules.json, Pooling and Dense modules); none here")
    else:
        settings, dense_weights = encoder_settings(folder)
    module = ENCODERS[config["model_type"]]
    args = module.ModelArgs.from_dict({**config, "sentence_transformers": settings}, config_path)
    model = module.Model(args)
    model = _fill(model, config, {**root, **dense_weights}, folder, dtype, config_path)
    model.embedding_settings = embedding_settings(folder, args.text.max_position_embeddings)
    return model


def load_model(
    path_or_repo: str | os.PathLike,
    *,
    dtype: mx.Dtype | None = None,
    lazy: bool = False,
    revision: str | None = None,
) -> nn.Module:
    """The model of a folder or hub id, weights loaded strictly (`mlx_gemma.load_model` also takes None).

    `dtype` casts floating-point weights (default: as stored, e.g. bf16 for a
    bf16 checkpoint).  `lazy=True` leaves the weights unevaluated (memory-mapped
    work happens on first use).  Adapters: `mlx_gemma.load_model(..., adapter_path=)`.
    """
    folder = resolve_model_path(path_or_repo, revision)
    config = load_config(folder)
    if is_encoder_config(config):
        model = load_encoder(folder, config, dtype)
    else:
        model = load_model_from(config, load_weights_from_folder(folder), path=folder, dtype=dtype)
    if not lazy:
        mx.eval(model.parameters())
    model.path = folder
    return model


_TOKENIZER_FILES = ("tokenizer.model", "assets/tokenizer/vocabulary.spm", "tokenizer.json")


def load(
    path_or_repo: str | os.PathLike,
    *,
    dtype: mx.Dtype | None = None,
    lazy: bool = False,
    revision: str | None = None,
):
    """(model, tokenizer) for a folder or a hub repo id (`mlx_gemma.load` also takes None and adapters);
    (drafter, None) for a drafter folder without a tokenizer."""
    folder = resolve_model_path(path_or_repo, revision)
    model = load_model(folder, dtype=dtype, lazy=lazy)
    if model.model_type in DRAFTERS and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return model, None  # a drafter speaks its target's tokenizer; its folder need not hold one
    tokenizer = GemmaTokenizer.from_folder(folder)
    check_vocab_fits(tokenizer, model.args.vocab_size, tokenizer.path or folder)
    return model, tokenizer
