"""The public load entry points: a model folder, a hub id, or nothing (the packaged model).

`mlx_gemma.load` / `mlx_gemma.load_model` and the command lines come here.  The
default-model choice lives at this layer, above both the converter (which
`default_model.py` runs once on the packaged GGUF file) and `loading.py` (which
only ever sees a folder or a hub id).  Adapters (`adapter_path`) go on here too, so the
loading room stays below the fine-tuning one (`tuner/`).
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from . import loading
from .distributed import load_pipeline, load_tensor_parallel
from .errors import DistributedError
from .default_model import default_model_path
from .tokenizer import GemmaTokenizer
from .tuner.lora import load_adapters


def _folder_or_default(path_or_repo: str | os.PathLike | None) -> str | os.PathLike:
    return default_model_path() if path_or_repo is None else path_or_repo


def _with_adapters(model: nn.Module, adapter_path: str | os.PathLike | None, lazy: bool) -> nn.Module:
    """`model` (loaded lazily) with the adapters of `adapter_path` on top, evaluated unless `lazy`."""
    if adapter_path is not None:
        load_adapters(model, adapter_path)
    if not lazy:
        mx.eval(model.parameters())
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
    model = loading.load_model(_folder_or_default(path_or_repo), dtype=dtype, lazy=True, revision=revision)
    return _with_adapters(model, adapter_path, lazy)


def load(
    path_or_repo: str | os.PathLike | None = None,
    *,
    dtype: mx.Dtype | None = None,
    lazy: bool = False,
    revision: str | None = None,
    adapter_path: str | os.PathLike | None = None,
    group: mx.distributed.Group | None = None,
    strategy: str = "pipeline",
) -> tuple[nn.Module, GemmaTokenizer]:
    """(model, tokenizer) for a folder, a hub repo id, or None for the packaged default model.

    `adapter_path`: a LoRA adapter folder to apply on top (see `load_model`).
    `group` (e.g. `mx.distributed.init()` in a process `mlx.launch` started): this rank's share of
    the model, by `strategy` "pipeline" (a range of layers per rank; mlx_gemma.distributed) or
    "tensor" (heads, widths and experts split across ranks).  Every rank then runs the same
    generation calls and gets the same tokens.
    """
    if group is not None:
        return _load_distributed(_folder_or_default(path_or_repo), group, strategy, dtype, revision, adapter_path)
    model, tokenizer = loading.load(_folder_or_default(path_or_repo), dtype=dtype, lazy=True, revision=revision)
    return _with_adapters(model, adapter_path, lazy), tokenizer


STRATEGIES = ("pipeline", "tensor")


def _load_distributed(path_or_repo, group, strategy, dtype, revision, adapter_path):
    if strategy not in STRATEGIES:
        raise DistributedError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r:.40}")
    if adapter_path is not None:
        raise DistributedError("adapter_path with a distributed group: fuse the adapters into the model first "
                               "(python -m mlx_gemma.fuse) and load the fused folder")
    if strategy == "pipeline":
        return load_pipeline(path_or_repo, group, dtype=dtype, revision=revision)
    return load_tensor_parallel(path_or_repo, group, dtype=dtype, revision=revision)
