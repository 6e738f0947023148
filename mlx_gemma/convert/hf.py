"""Read a Hugging Face (or MLX) model folder or hub id into converter pieces.

The weights stay as MLX arrays (memory-mapped by `mx.load`); the config is the
folder's own, so every key the source had travels to the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import ConfigError
from ..json_input import all_finite, json_type, read_json
from ..loading import MAX_CONFIG_BYTES, load_config, model_args, resolve_model_path
from ..model_folder import load_weights_from_folder


@dataclass
class Checkpoint:
    """What every reader hands the converter."""

    config: dict[str, Any]  # Hugging Face-style config.json
    weights: dict[str, Any]  # HF tensor name -> mx.array or numpy array
    tokenizer_model: bytes | Path | None  # tokenizer.model bytes or a file to copy
    generation_config: dict[str, Any] | None
    source: Path | None = None  # the folder or file read (never a destination)


def read_hf(path_or_repo, revision: str | None = None) -> Checkpoint:
    folder = resolve_model_path(path_or_repo, revision)
    config = load_config(folder)
    model_args(config, folder / "config.json")  # refuse a bad config naming its file, before reading weights
    generation_config = None
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        # Copied to the output as it is, so only its shape matters here.
        generation_config = all_finite(read_json(gen_path, MAX_CONFIG_BYTES), gen_path)
        if not isinstance(generation_config, dict):
            raise ConfigError(gen_path, f"must hold a JSON object, found {json_type(generation_config)}")
    tokenizer = folder / "tokenizer.model"
    return Checkpoint(
        config=config,
        weights=load_weights_from_folder(folder),
        tokenizer_model=tokenizer if tokenizer.is_file() else None,
        generation_config=generation_config,
        source=folder,
    )


def as_mx(weights: dict[str, Any]) -> dict[str, mx.array]:
    return {k: v if isinstance(v, mx.array) else mx.array(v) for k, v in weights.items()}


def generation_config(bos: int, eos: int, pad: int, *extra_stops: int | None) -> dict[str, Any]:
    """generation_config.json for readers that rebuild it: eos first, then any
    further stop ids (e.g. `<end_of_turn>`), without repeats."""
    eos_ids = [eos]
    for stop in extra_stops:
        if stop is not None and stop not in eos_ids:
            eos_ids.append(stop)
    return {"bos_token_id": bos, "eos_token_id": eos_ids, "pad_token_id": pad}
