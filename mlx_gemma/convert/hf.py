"""Read a Hugging Face (or MLX) model folder or hub id into converter pieces.

The weights stay as MLX arrays (memory-mapped by `mx.load`); the config is the
folder's own, so every key the source had travels to the output.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..json_input import all_finite, json_type, read_json
from ..loading import MAX_CONFIG_BYTES, load_config, model_args, resolve_model_path
from ..model_folder import load_weights_from_folder
from .checkpoint import Checkpoint


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
