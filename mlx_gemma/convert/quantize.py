"""Quantize a loaded model with MLX's own kernels, or turn it back into floats.

Uniform: every Linear/Embedding whose input width divides the group size is
quantized (`nn.quantize`); the others stay in float.  Mixed recipes
(`mixed_A_B`, the names mlx-lm uses) give B bits to the layers that suffer
most from rounding (the embedding / output projection, and v_proj and
down_proj in the first and last eighth of the blocks and every third block
between) and A bits to the rest.  The settings are recorded in the config the
way mlx-community folders do, so mlx-lm and mlx_gemma load them as they are.

Gemma 4's MoE experts (models/moe.py `ExpertLinear`, [E, out, in]) quantize per
expert like any other layer; its router projection always gets 8 bits at group
size 64, as mlx-lm 0.32 quantizes it (its `quant_predicate` for gemma4), so the
folders of both libraries hold the same layers.  The per-layer embedding table
(`embed_tokens_per_layer`, layers x P wide: 35 x 256 for E2B) and its projections
quantize like the other embeddings and linears.  What stays float, as in mlx-lm:
everything that is not a matrix (RMSNorm weights, `layer_scalar`, the router's
`scale` / `per_expert_scale`: a few thousand values, read by every token), and a
layer whose input width is no multiple of the group size (MLX quantizes in whole
groups along it); those are named in a warning, and the rest of the model quantizes.
"""

from __future__ import annotations

import warnings

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..cpu_spread import prepare_for_device
from ..errors import MlxGemmaError
from ..models.moe import ROUTER_QUANTIZATION, QuantizedExpertLinear

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6)}


def _sensitive(path: str, num_layers: int) -> bool:
    if "embed_tokens" in path or "lm_head" in path:
        return True
    if not ("v_proj" in path or "down_proj" in path) or ".layers." not in path:
        return False
    i = int(path.split(".layers.")[1].split(".")[0])
    edge = max(num_layers // 8, 1)
    return i < edge or i >= num_layers - edge or (i - edge) % 3 == 2


def quantize_model(model: nn.Module, config: dict, bits: int = 4, group_size: int = 64,
                   recipe: str | None = None) -> dict:
    """Quantize `model` in place; return the config with its `quantization` entry."""
    if bits not in BITS:
        raise MlxGemmaError(f"--q-bits must be one of {BITS}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise MlxGemmaError(f"--q-group-size must be one of {GROUP_SIZES}, got {group_size}")
    if recipe is not None and recipe not in RECIPES:
        raise MlxGemmaError(f"unknown quantization recipe {recipe!r}; known: {', '.join(RECIPES)}")
    low, high = RECIPES[recipe] if recipe else (bits, bits)
    num_layers = len(model.layers)
    settings = {"group_size": group_size, "bits": low, "mode": "affine"}

    float_prefixes = model.float_prefixes  # parts a model keeps in float (vision towers)
    narrow = []  # (path, input width, group size) of the layers that stay float for their width

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or path.startswith(float_prefixes):
            return False
        router = path.endswith("router.proj")  # mlx-lm 0.32 gemma4_text.py quant_predicate: 8 bits, group 64
        group = ROUTER_QUANTIZATION["group_size"] if router else group_size
        if module.weight.shape[-1] % group:
            narrow.append((path, module.weight.shape[-1], group))
            return False  # MLX quantizes along the input width, in whole groups
        if router:
            settings[path] = dict(ROUTER_QUANTIZATION)
            return settings[path]
        if recipe and _sensitive(path, num_layers):
            settings[path] = {"group_size": group_size, "bits": high}
            return settings[path]
        return True

    nn.quantize(model, group_size=group_size, bits=low, class_predicate=predicate)
    if narrow:
        _warn_float(narrow)
    prepare_for_device(model)  # the new quantized layers are plain ones
    return {**config, "quantization": settings, "quantization_config": settings}


def _warn_float(narrow: list[tuple[str, int, int]]) -> None:
    """Name the layers left in float because no whole number of groups fits their input width."""
    kinds = {}  # one entry per kind of layer: model.layers.*.mlp.gate_proj stands for every block's
    for path, width, group in narrow:
        head, sep, rest = path.partition(".layers.")
        name = f"{head}.layers.*.{rest.partition('.')[2]}" if sep and rest.partition(".")[0].isdigit() else path
        kinds.setdefault(f"{name} ({width} wide, group {group})", None)
    warnings.warn(f"{len(narrow)} layers stay float, their input width no multiple of the group size: "
                  + ", ".join(kinds), UserWarning, stacklevel=3)


def dequantize_model(model: nn.Module, config: dict) -> dict:
    """Replace quantized layers by float ones in place; return the config without quantization."""
    replacements = []
    for path, module in model.named_modules():
        if isinstance(module, QuantizedExpertLinear):
            replacements.append((path, module.dequantized()))
        elif isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weight = mx.dequantize(module.weight, module.scales, module.biases,
                                   group_size=module.group_size, bits=module.bits, mode=module.mode)
            if isinstance(module, nn.QuantizedLinear):
                bias = "bias" in module
                layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
                if bias:
                    layer.bias = module.bias
            else:
                layer = nn.Embedding(*weight.shape)
            layer.weight = weight
            replacements.append((path, layer))
    model.update_modules(tree_unflatten(replacements))
    prepare_for_device(model)
    return {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
