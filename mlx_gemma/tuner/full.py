"""Full fine-tuning, as mlx-lm's `--fine-tune-type full`: every weight of the last N blocks
trains; the result is saved as a complete model folder.

mlx-lm (0.32, `mlx_lm/lora.py`) freezes the model and unfreezes the last `num_layers`
blocks whole (-1: all of them): the embedding (Gemma ties it to the output head) and
the final norm stay frozen, so the loss takes the frozen-head path (tuner/losses.py).
mlx-lm saves the trained blocks' weights as `adapters.safetensors` for `--adapter-path`
to load onto the base; we write the whole trained model as a model folder there instead
(config, weights, tokenizer, generation config), atomically, through the converter's
writer, so it loads anywhere with no base model and no fuse step.  Resuming takes our
folder, mlx-lm's full-run adapters (a folder or its safetensors file) or any weights
file whose tensors are the model's own.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..convert import as_mlx_lm_folder
from ..convert.hf import read_hf
from ..convert.writer import write_model_folder
from ..errors import TrainingError
from ..model_folder import load_weights_from_folder
from ..tensorfile import load_file


def check_full_fine_tunable(model: nn.Module) -> None:
    """Refuse what a full fine-tune cannot train or save, before any work is done."""
    if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
        raise TrainingError("--fine-tune-type full trains the weights themselves, and this model is quantized; "
                            "fine-tune a float (bf16) folder, or train LoRA adapters on it (QLoRA: "
                            "--fine-tune-type lora)")
    if model.image_input is not None:
        raise TrainingError("--fine-tune-type full is for text models; PaliGemma trains with --fine-tune-type lora")
    if model.path is None:
        raise TrainingError("--fine-tune-type full saves a model folder made from the one it loaded; "
                            "this model was built in memory")


def enable_full(model: nn.Module, num_layers: int) -> dict:
    """Freeze `model` and unfreeze every parameter of its last `num_layers` blocks (-1: all), as mlx-lm."""
    blocks = len(model.layers)
    if num_layers == -1:
        num_layers = blocks
    if not 1 <= num_layers <= blocks:
        raise TrainingError(f"num_layers must be between 1 and {blocks} (the model's blocks) or -1, got {num_layers}")
    model.freeze()
    for block in model.layers[-num_layers:]:
        block.unfreeze()
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return {"fine_tune_type": "full", "num_layers": num_layers, "trainable_parameters": trainable}


def _weights_at(path: Path) -> dict[str, mx.array]:
    if path.is_dir():
        return load_weights_from_folder(path)
    if not path.is_file():
        raise TrainingError(f"{path}: no such weights file or folder to resume from")
    return load_file(path)


def load_full_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load weights to resume a full fine-tune: a model folder (ours), mlx-lm's full-run adapters
    (adapters.safetensors or its folder), or a safetensors file.  Every tensor must be one of the
    model's own with its shape (as mlx-lm checks); they take the model's dtype."""
    path = Path(path)
    weights = _weights_at(path)
    params = dict(tree_flatten(model.parameters()))
    problems = [f"{k} is not a parameter of this model" for k in sorted(weights.keys() - params.keys())]
    problems += [f"{k} has shape {tuple(weights[k].shape)}, the model's is {tuple(params[k].shape)}"
                 for k in sorted(weights.keys() & params.keys()) if weights[k].shape != params[k].shape]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise TrainingError(f"{path}: does not fit this model (trained for another base?): {shown}")
    model.load_weights([(k, v.astype(params[k].dtype)) for k, v in weights.items()], strict=False)
    mx.eval(model.parameters())
    return model


def check_save_path(path: str | os.PathLike) -> Path:
    """The folder a full fine-tune will write: new, empty, or a model folder (which it replaces).
    Anything else (an adapter folder, a folder of other files) is refused before training."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise TrainingError(f"{folder}: exists and is not a folder; the trained model is saved as a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "config.json").is_file():
        raise TrainingError(f"{folder}: holds files but no model (no config.json); a full fine-tune replaces the "
                            "folder with the trained model: name a new folder or an earlier full fine-tune's")
    return folder


def save_full_model(path: str | os.PathLike, model: nn.Module) -> Path:
    """Write the trained model as a complete folder at `path`, atomically (an earlier one is replaced):
    the source folder's config, tokenizer and generation config, the model's current weights."""
    source = read_hf(model.path)
    config, weights = as_mlx_lm_folder(dict(source.config), dict(tree_flatten(model.parameters())))
    return write_model_folder(path, config, weights, source.tokenizer_model, source.generation_config, overwrite=True,
                              extra_files=source.extra_files, source=source.source)
