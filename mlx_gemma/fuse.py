"""Merge trained adapters into a model and write a normal model folder.

    python -m mlx_gemma.fuse --model PATH --adapter-path adapters --save-path fused [--dequantize]

A quantized base is re-quantized with its own settings after the merge (or
written in float with `--dequantize`); the output is an mlx-community style
folder that mlx_gemma and mlx-lm load like any other, with the base folder's chat template,
tokenizer and processor files kept as they were.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from mlx.utils import tree_flatten

from .cli import run_command
from .convert import as_mlx_lm_folder
from .convert.checkpoint import as_mx
from .convert.hf import read_hf
from .convert.quantize import dequantize_model
from .convert.writer import write_model_folder
from .errors import UnsupportedModelError
from .loading import load_model_from
from .tuner.lora import fuse, load_adapters


def fuse_model(model_path: str | os.PathLike, adapter_path: str | os.PathLike, save_path: str | os.PathLike,
               dequantize: bool = False, overwrite: bool = False) -> Path:
    """Load `model_path`, add the adapters of `adapter_path`, merge them, write `save_path`; returns it."""
    checkpoint = read_hf(model_path)
    config = dict(checkpoint.config)
    model = load_model_from(config, as_mx(checkpoint.weights), path=checkpoint.source)
    if model.image_input is not None:  # a gemma3 / gemma4 config without towers is a text model: fused as one
        raise UnsupportedModelError(checkpoint.source, "fusing adapters into models with images (PaliGemma, "
                                    "Gemma 3 with images) is not supported yet; fuse the text model only")
    load_adapters(model, adapter_path)
    fuse(model, dequantize=dequantize)
    if dequantize:
        config = dequantize_model(model, config)  # the layers without adapters too
    config, weights = as_mlx_lm_folder(config, dict(tree_flatten(model.parameters())))  # MoE: mlx-lm's expert names
    return write_model_folder(
        save_path, config, weights, checkpoint.tokenizer_model,
        checkpoint.generation_config, overwrite=overwrite, extra_files=checkpoint.extra_files,
        source=[checkpoint.source, adapter_path])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma.fuse", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="the base model folder or hub id the adapters were trained on")
    p.add_argument("--adapter-path", default="adapters", help="folder with adapters.safetensors + adapter_config.json")
    p.add_argument("--save-path", default="fused_model", help="the folder to write")
    p.add_argument("--dequantize", "--de-quantize", action="store_true",
                   help="write float weights (default: re-quantize a quantized base as it was)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save-path folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def action():
        out = fuse_model(args.model, args.adapter_path, args.save_path, args.dequantize, args.overwrite)
        print(f"fused model written to {out}")

    return run_command(action, "nothing was written")


if __name__ == "__main__":
    sys.exit(main())
