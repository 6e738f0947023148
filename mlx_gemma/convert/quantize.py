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
folders of both libraries hold the same layers.
"""

from __future__ import annotations

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

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or path.startswith(float_prefixes):
            return False
        router = path.endswith("router.proj")  # mlx-lm 0.32 gemma4_text.py quant_predicate: 8 bits, group 64
        if module.weight.shape[-1] % (ROUTER_QUANTIZATION["group_size"] if router else group_size):
            return False  # MLX quantizes along the input width, in whole groups
        if router:
            settings[path] = dict(ROUTER_QUANTIZATION)
            return settings[path]
        if recipe and _sensitive(path, num_layers):
            settings[path] = {"group_size": group_size, "bits": high}
            return settings[path]
        return True

    nn.quantize(model, group_size=group_size, bits=low, class_predicate=predicate)
    prepare_for_device(model)  # the new quantized layers are plain ones
    return {**config, "quantization": settings, "quantization_config": settings}


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
