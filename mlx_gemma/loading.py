"""From a folder (or hub id) to a ready model: validate, build, load strictly.

Accepted folders: Hugging Face checkpoints (`config.json` + safetensors, one
file or sharded, plain or nested `text_config`) and MLX folders as
mlx-community publishes them (`"quantization": {"group_size", "bits"}` with
per-layer overrides, packed `weight/scales/biases`).  Nothing a checkpoint
names is ever imported or executed: the architecture comes from the registry
in `models/`, weights only from safetensors.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .cpu_spread import spread_matmuls
from .errors import ConfigError, ModelFileError, UnsafeCheckpointError, UnsupportedModelError, WeightsMismatchError
from .json_input import field
from .models import MODELS, TEXT_PART_OF, supported_model_types
from .tensorfile import load_weights_from_folder

# What `load` fetches from the hub: configs, safetensors and the tokenizer,
# never code or pickles.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "assets/tokenizer/*"]
MAX_CONFIG_BYTES = 4 << 20  # a real config.json is a few KB
# Config keys that ask a loader to import or run code; we refuse the checkpoint.
CODE_KEYS = ("auto_map", "model_file")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(path_or_repo: str | os.PathLike | None, revision: str | None = None) -> Path:
    """A local model folder for a path, a hub repo id, or None (the default model)."""
    if path_or_repo is None:
        from .default_model import default_model_path

        return default_model_path()
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
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(path, f"is {path.stat().st_size} bytes; a config is a few KB")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(path, f"not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ConfigError(path, f"must hold a JSON object, found {type(config).__name__}")
    nested = field(config, "text_config", dict, path, default={})
    for key in CODE_KEYS:
        if key in config or key in nested:
            raise UnsafeCheckpointError(
                path, f"asks to load custom code through {key!r}; mlx_gemma never runs code "
                "from a checkpoint. Remove the key if the weights are a standard Gemma."
            )
    return config


def text_config(config: dict[str, Any], path=None) -> dict[str, Any]:
    """The language model's settings: the config itself, or its `text_config`."""
    model_type = config.get("model_type")
    if model_type is None:
        raise ConfigError(path, "config has no model_type")
    if model_type in TEXT_PART_OF:
        nested = config.get("text_config")
        if not isinstance(nested, dict):
            raise ConfigError(path, f"a {model_type!r} config needs a text_config object")
        return {**nested, "model_type": TEXT_PART_OF[model_type]}
    if model_type not in MODELS:
        raise UnsupportedModelError(
            path, f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        )
    return config


def build_model(config: dict[str, Any], path=None) -> nn.Module:
    """An un-loaded model (random weights) for a config dict."""
    config = text_config(config, path)
    module = MODELS[config["model_type"]]
    return module.Model(module.ModelArgs.from_dict(config, path))


def quantize_like(model: nn.Module, config: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """Make the model's layers quantized wherever the checkpoint's are.

    mlx-community configs carry `"quantization": {"group_size", "bits"[, "mode"]}`
    and may override single layers by path (`{"model.layers.0.mlp.down_proj":
    {"bits": 8, ...}}` or `false`); a layer is quantized when its `.scales`
    tensor is present, as mlx-lm decides.
    """
    q = config.get("quantization") or config.get("quantization_config")
    if not q:
        return
    defaults = {k: q[k] for k in ("group_size", "bits", "mode") if k in q}

    def predicate(path: str, module: nn.Module):
        if path in q:
            return q[path]  # a per-layer dict of settings, or False
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(model, **defaults, class_predicate=predicate)


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
    config: dict[str, Any], weights: dict[str, mx.array], *, path=None, dtype: mx.Dtype | None = None
) -> nn.Module:
    """A model built from a config dict and its weights (already in memory)."""
    model = build_model(config, path)
    weights = model.sanitize(weights)
    quantize_like(model, config, weights)
    check_weights(model, weights, path)
    if dtype is not None:
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
        }
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    return model


def load_model(
    path_or_repo: str | os.PathLike | None = None,
    *,
    dtype: mx.Dtype | None = None,
    lazy: bool = False,
    revision: str | None = None,
    adapter_path: str | os.PathLike | None = None,
) -> nn.Module:
    """The model of a folder or hub id (None: the packaged default), weights loaded strictly.

    `dtype` casts floating-point weights (default: as stored, e.g. bf16 for a
    bf16 checkpoint).  `lazy=True` leaves the weights unevaluated (memory-mapped
    work happens on first use).  `adapter_path`: a LoRA adapter folder
    (ours or mlx-lm's) to apply on top.
    """
    folder = resolve_model_path(path_or_repo, revision)
    model = load_model_from(load_config(folder), load_weights_from_folder(folder), path=folder, dtype=dtype)
    if adapter_path is not None:
        from .lora import load_adapters  # lora imports tensorfile only; import it when asked

        load_adapters(model, adapter_path)
    if not lazy:
        mx.eval(model.parameters())
    spread_matmuls(model)  # on the CPU: each large product over several cores (cpu_spread.py)
    model.path = folder
    return model


def load(
    path_or_repo: str | os.PathLike | None = None,
    *,
    dtype: mx.Dtype | None = None,
    lazy: bool = False,
    revision: str | None = None,
    adapter_path: str | os.PathLike | None = None,
):
    """(model, tokenizer) for a folder, a hub repo id, or None for the packaged default model.

    `adapter_path`: a LoRA adapter folder to apply on top (see `load_model`).
    """
    from .tokenizer import GemmaTokenizer, check_vocab_fits

    folder = resolve_model_path(path_or_repo, revision)
    model = load_model(folder, dtype=dtype, lazy=lazy, adapter_path=adapter_path)
    tokenizer = GemmaTokenizer.from_folder(folder)
    check_vocab_fits(tokenizer, model.args.vocab_size, tokenizer.path or folder)
    return model, tokenizer
