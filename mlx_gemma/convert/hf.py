"""Read a Hugging Face (or MLX) model folder or hub id into converter pieces.

The weights stay as MLX arrays (memory-mapped by `mx.load`); the config is the
folder's own, so every key the source had travels to the output.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..hf_tokenizer import model_proto_from_tokenizer_json
from ..json_input import all_finite, json_type, read_json
from ..loading import MAX_CONFIG_BYTES, is_encoder_config, load_config, model_args, resolve_model_path
from ..model_folder import load_weights_from_folder
from .checkpoint import Checkpoint


def read_hf(path_or_repo, revision: str | None = None) -> Checkpoint:
    folder = resolve_model_path(path_or_repo, revision)
    config = load_config(folder)
    if not is_encoder_config(config):  # an encoder's config is checked with its modules (load_encoder)
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
        tokenizer_model=tokenizer if tokenizer.is_file() else _rebuilt_tokenizer(folder),
        generation_config=generation_config,
        source=folder,
        extra_files=read_side_files(folder),
    )


def _rebuilt_tokenizer(folder: Path) -> bytes | None:
    """A folder with only tokenizer.json (Gemma 4's hub folders) gets the tokenizer.model it describes,
    written beside it, so that loading the output need not rebuild it (seconds for a real vocabulary)."""
    path = folder / "tokenizer.json"
    return model_proto_from_tokenizer_json(path) if path.is_file() else None


# The small files beside the weights that tokenizers, processors and chat templates live in,
# with the most each may hold: a real Gemma 3 tokenizer_config.json is about 1.2 MB (its
# added_tokens_decoder), its tokenizer.json about 33 MB.  transformers 5 saves a processor as
# processor_config.json (the image processor nested) + chat_template.jinja; older hub folders
# (google/gemma-3-4b-it) as preprocessor_config.json + processor_config.json + chat_template.json
# and a chat template inside tokenizer_config.json, which is copied whole.
SIDE_FILES = {
    "tokenizer_config.json": 16 << 20, "tokenizer.json": 64 << 20, "special_tokens_map.json": 1 << 20,
    "added_tokens.json": 16 << 20, "chat_template.json": 4 << 20, "chat_template.jinja": 4 << 20,
    "processor_config.json": 4 << 20, "preprocessor_config.json": 4 << 20,
}
# Files only a model that takes images uses (a text conversion of a multimodal folder drops them).
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def read_side_files(folder: Path) -> dict[str, bytes]:
    """Each side file the folder has, as bytes checked to be what its name says (JSON, or
    UTF-8 text for a .jinja template); a malformed one is a ConfigError naming it, raised
    before anything is written."""
    out = {}
    for name, limit in SIDE_FILES.items():
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".json"):
            read_json(path, limit)  # size-capped; raises naming the file
        out[name] = read_text_bytes(path, limit)
    return out


def read_text_bytes(path: Path, limit: int) -> bytes:
    """The file's bytes, if it is at most `limit` of them and decodes as UTF-8."""
    try:
        if path.stat().st_size > limit:
            raise ConfigError(path, f"is more than the {limit} bytes such a file can need")
        data = path.read_bytes()
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, f"not UTF-8 text: {e}") from None
    except OSError as e:
        raise ConfigError(path, f"cannot be read: {e}") from None
    return data
