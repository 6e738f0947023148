"""The converter: Hugging Face, Keras and GGUF checkpoints to MLX folders.

    python -m mlx_gemma.convert --hf-path google/gemma-2-2b-it --mlx-path gemma-2-2b-it-4bit -q

One reader per source format hands over an HF-style config and HF-named
weights; the model is built and loaded strictly from them (so a bad
checkpoint fails here, not at the user's first generation), optionally
quantized, and written atomically in the mlx-community layout, which mlx-lm
also loads as it is.  A tower-less multimodal folder (`gemma3` / `gemma4` with only a
`text_config`) is written as its text model; Gemma 4's config also gets the keys
mlx-lm 0.32 reads and its experts mlx-lm's names (`as_mlx_lm_folder`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from mlx.utils import tree_flatten

from ..cli import run_command
from ..errors import MlxGemmaError
from ..loading import is_encoder_config, load_encoder, load_model_from
from ..models import gemma4
from ..models.gemma4_mm import mlx_vlm_quantization
from ..models.moe import to_mlx_lm_layout, to_mlx_lm_quantization
from ..progress import Progress
from .checkpoint import DTYPES, as_mx
from .encoder import encoder_files
from .gguf import read_gguf
from .hf import PROCESSOR_FILES, read_hf
from .keras import read_keras_preset
from .quantize import BITS, GROUP_SIZES, RECIPES, dequantize_model, quantize_model
from .writer import write_model_folder


# A multimodal config without towers is written as its text model (mlx-lm reads these names).
_TEXT_MODELS = {"gemma3": ("gemma3_text", "Gemma3ForCausalLM"), "gemma4": ("gemma4_text", "Gemma4ForCausalLM")}


def _text_only(config: dict) -> dict:
    """A multimodal `gemma3` / `gemma4` config without a `vision_config`, written as the text model we converted."""
    if config.get("model_type") not in _TEXT_MODELS:
        return config
    model_type, architecture = _TEXT_MODELS[config["model_type"]]
    kept = {k: v for k, v in config.items() if k in ("quantization", "quantization_config", "torch_dtype")}
    return {**config["text_config"], **kept, "model_type": model_type, "architectures": [architecture]}


def mlx_lm_compatible(config: dict) -> dict:
    """Also spell the settings the way mlx-lm (0.32) reads them; both describe the same model.

    Gemma 3: transformers 5's `rope_parameters` the pre-5.0 way.  Gemma 4: see `_gemma4_for_mlx_lm`;
    with towers, `_gemma4_for_mlx_vlm`.
    """
    if config.get("model_type") == "gemma4_text":
        return _gemma4_for_mlx_lm(config)
    if config.get("model_type") == "gemma4" and isinstance(config.get("text_config"), dict):
        return _gemma4_for_mlx_vlm(config)
    rope = config.get("rope_parameters")
    if config.get("model_type") != "gemma3_text" or not isinstance(rope, dict):
        return config
    out = dict(config)
    full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    if "rope_theta" in full:
        out["rope_theta"] = full["rope_theta"]
    if "rope_theta" in local:
        out["rope_local_base_freq"] = local["rope_theta"]
    scaling = {k: v for k, v in full.items() if k != "rope_theta"}
    out["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    return out


# Settings mlx-lm 0.32's gemma4_text reads whose defaults there differ from transformers' (e.g. its
# num_kv_shared_layers 20, use_double_wide_mlp True, final_logit_softcapping 30): always written out.
_GEMMA4_EXPLICIT = ("layer_types", "rope_parameters", "num_kv_shared_layers", "use_double_wide_mlp",
                    "final_logit_softcapping", "hidden_size_per_layer_input", "vocab_size_per_layer_input",
                    "num_key_value_heads", "head_dim", "sliding_window", "attention_k_eq_v", "enable_moe_block",
                    "tie_word_embeddings")


def _gemma4_for_mlx_lm(config: dict) -> dict:
    """A gemma4_text config with what mlx-lm 0.32 reads: transformers saves the global layers' shape
    in `per_layer_config` only (Gemma4TextConfig pops global_head_dim), mlx-lm reads `global_head_dim` /
    `num_global_key_value_heads`; per-layer quantization of the experts also under mlx-lm's names."""
    args = gemma4.ModelArgs.from_dict(config)  # the settings as we run them (defaults filled, last layer global)
    out = {**config, **{k: getattr(args, k) for k in _GEMMA4_EXPLICIT}}
    heads, dim = args.layer_shape(args.layer_types.index(gemma4.FULL))
    out["global_head_dim"] = dim
    if args.attention_k_eq_v:
        out["num_global_key_value_heads"] = heads
    for key in ("quantization", "quantization_config"):
        if isinstance(out.get(key), dict):  # ours for mlx_gemma, mlx-lm's switch_glu names beside them
            out[key] = {**out[key], **to_mlx_lm_quantization(out[key])}
    return out


def _gemma4_for_mlx_vlm(config: dict) -> dict:
    """A gemma4 config with towers as mlx-vlm 0.7.10 reads it (and mlx-lm 0.32's gemma4, for the text): the
    text settings as `_gemma4_for_mlx_lm` spells them (mlx-vlm's gemma4 config.py has the same defaults),
    the vocabulary also at the top level (mlx-lm's gemma4.py ModelArgs writes its own 262144 default over
    text_config's), per-layer quantization under their module paths (gemma4_mm.mlx_vlm_quantization)."""
    text = _gemma4_for_mlx_lm(config["text_config"])
    out = {**config, "text_config": text, "vocab_size": text["vocab_size"]}
    for key in ("quantization", "quantization_config"):
        if isinstance(out.get(key), dict):
            out[key] = mlx_vlm_quantization(out[key])
    return out


def mlx_lm_weights(config: dict, weights: dict) -> dict:
    """The weights under the names mlx-lm and mlx-vlm read: Gemma 4's experts as their switch_glu halves
    (mlx-lm 0.32's gemma4.py splits only bare `gate_up_proj` tensors; mlx_gemma reads both, moe.sanitize_experts)."""
    return to_mlx_lm_layout(weights) if config.get("model_type") in ("gemma4_text", "gemma4") else weights


def as_mlx_lm_folder(config: dict, weights: dict) -> tuple[dict, dict]:
    """The config and weights of a text model as we write its folder (fuse, full fine-tunes too):
    a tower-less multimodal config as its text model, in the spellings and names mlx-lm reads."""
    config = mlx_lm_compatible(_text_only(config))
    return config, mlx_lm_weights(config, weights)


def convert(
    hf_path: str | os.PathLike | None = None,
    *,
    keras_path: str | os.PathLike | None = None,
    gguf_path: str | os.PathLike | None = None,
    mlx_path: str | os.PathLike = "mlx_model",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    quant_recipe: str | None = None,
    dtype: str | None = None,
    dequantize: bool = False,
    overwrite: bool = False,
    revision: str | None = None,
    progress: bool | None = None,
) -> Path:
    """Convert one checkpoint into an MLX folder at `mlx_path`; returns its path.

    `dtype` defaults to the checkpoint's own float type (bfloat16 for GGUF,
    whose 4-8-bit weights gain nothing from float32).  `progress=None` shows
    bars only on a terminal.
    """
    _check_options((hf_path, keras_path, gguf_path), quantize, dequantize, dtype)
    enabled = None if progress is None else bool(progress)
    checkpoint = _read_checkpoint(hf_path, keras_path, gguf_path, revision, enabled)
    if gguf_path is not None:
        dtype = dtype or "bfloat16"

    config = gemma4.readable_quantization(dict(checkpoint.config))  # as loading reads them; written so
    target = DTYPES[dtype] if dtype else None
    encoder = checkpoint.source is not None and hf_path is not None and is_encoder_config(config)
    if encoder:  # EmbeddingGemma: the backbone and its sentence-transformers modules (Dense weights)
        model = load_encoder(checkpoint.source, config, target)
    else:
        model = load_model_from(config, as_mx(checkpoint.weights), path=checkpoint.source, dtype=target)
    if dequantize:
        config = dequantize_model(model, config)
    if quantize:
        config = quantize_model(model, config, q_bits, q_group_size, quant_recipe)
    if model.image_input is not None or model.audio_input is not None:  # towers kept: mlx-vlm's spellings
        config = mlx_lm_compatible(config)
    if dtype:
        config["torch_dtype"] = dtype
    extra = dict(checkpoint.extra_files)
    towerless = model.image_input is None and model.audio_input is None
    if towerless:  # processor files serve images and audio only
        extra = {k: v for k, v in extra.items() if k not in PROCESSOR_FILES}
    if towerless and not encoder:  # a gemma3/gemma4 config without a tower: its text model
        config = mlx_lm_compatible(_text_only(config))

    weights = mlx_lm_weights(config, dict(tree_flatten(model.parameters())))
    bar = Progress("writing", 1, " files", enabled=enabled)
    with tempfile.TemporaryDirectory(prefix="mlx_gemma_convert_") as scratch:
        if encoder:
            weights, modules = encoder_files(checkpoint.source, weights, Path(scratch), checkpoint.weights)
            extra.update(modules)
        dest = write_model_folder(
            mlx_path, config, weights, checkpoint.tokenizer_model, checkpoint.generation_config,
            overwrite=overwrite, extra_files=extra, source=checkpoint.source, progress=bar,
        )
    bar.close(f"{dest}")
    return dest


def _check_options(sources: tuple, quantize: bool, dequantize: bool, dtype: str | None) -> None:
    """Refuse option combinations `convert` cannot honour, before anything is read."""
    if len([s for s in sources if s is not None]) != 1:
        raise MlxGemmaError("give exactly one of --hf-path, --keras-path, --gguf-path")
    if quantize and dequantize:
        raise MlxGemmaError("--quantize and --dequantize exclude each other")
    if dtype is not None and dtype not in DTYPES:
        raise MlxGemmaError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _read_checkpoint(hf_path, keras_path, gguf_path, revision: str | None, enabled: bool | None):
    """The checkpoint from whichever one source was given (a bar while a GGUF file is read)."""
    if gguf_path is not None:
        bar = Progress("reading GGUF", 1, " tensors", enabled=enabled)
        checkpoint = read_gguf(gguf_path, progress=bar)
        bar.close()
        return checkpoint
    if keras_path is not None:
        return read_keras_preset(keras_path)
    return read_hf(hf_path, revision)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma.convert", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-path", help="Hugging Face model folder or hub repo id")
    src.add_argument("--keras-path", help="keras-hub / Kaggle preset folder")
    src.add_argument("--gguf-path", help="llama.cpp GGUF file")
    p.add_argument("--mlx-path", default="mlx_model", help="output folder (default: mlx_model)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--q-bits", type=int, default=4, choices=BITS)
    p.add_argument("--q-group-size", type=int, default=64, choices=GROUP_SIZES)
    p.add_argument("--quant-predicate", dest="quant_recipe", choices=sorted(RECIPES),
                   help="mixed-precision recipe: more bits for the sensitive layers")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="float type of unquantized weights")
    p.add_argument("-d", "--dequantize", action="store_true", help="turn a quantized MLX folder back into floats")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: convert(
        args.hf_path, keras_path=args.keras_path, gguf_path=args.gguf_path, mlx_path=args.mlx_path,
        quantize=args.quantize or bool(args.quant_recipe), q_bits=args.q_bits,
        q_group_size=args.q_group_size, quant_recipe=args.quant_recipe, dtype=args.dtype,
        dequantize=args.dequantize, overwrite=args.overwrite, revision=args.revision,
    ), "nothing was written")
