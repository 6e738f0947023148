"""LoRA, QLoRA and DoRA adapters: wrap linears, enable them on a model, fuse them
back, save and load them.

A LoRA layer adds a trainable low-rank update to a frozen linear (plain, or
quantized for QLoRA: the base stays 4/8-bit, the adapters train in float):

    y = base(x) + scale * dropout(x) @ A @ B        A: [in, r], B: [r, out], B = 0 at start

Adapter folders use mlx-lm's layout so adapters move between the two
libraries: `adapters.safetensors` holds `model.layers.N.<path>.lora_a` /
`.lora_b` (and `.m`, DoRA's magnitudes), `adapter_config.json` holds
`fine_tune_type` ("lora" | "dora"), `num_layers` (the last N blocks) and
`lora_parameters` = {rank, scale, dropout, keys}, keys relative to a block
(e.g. "self_attn.q_proj").  We add `base_model` (the base's shapes) to refuse
an adapter trained for another model with a clear error.

Gemma 4's blocks differ: KV-shared blocks have no k_proj / v_proj, `attention_k_eq_v`
global blocks no v_proj, MoE blocks carry experts.  A key goes on every block that has
it (mlx-lm does the same, so its adapters carry the same names); the experts and the
router take no adapters (models/moe.py): adapters train the attention and the dense
MLP, and the gradient flows through the frozen experts.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..cpu_spread import prepare_for_device
from ..errors import AdapterError
from ..json_input import expect, field, json_type, number_in, read_json
from ..tensorfile import atomic_write_bytes, load_file, save_file

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
# The projections of a Gemma block, by short name.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# keras-hub's `enable_lora` adapts the query and value projections.
DEFAULT_TARGETS = ("q_proj", "v_proj")
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")
# The base-model settings an adapter must agree with.
# A real adapter_config.json is a few hundred bytes; a rank above this is no low-rank update.
MAX_CONFIG_BYTES = 1 << 20
MAX_RANK = 1 << 16
MAX_SCALE = 1e6  # mlx-lm's default is 20; a scale like 1e300 only turns the logits into inf
BASE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
             "num_attention_heads", "num_key_value_heads", "head_dim")


def dense_weight(linear: nn.Module) -> mx.array:
    """The [out, in] weight of a plain or quantized linear, in float."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(linear.weight, linear.scales, linear.biases, group_size=linear.group_size,
                             bits=linear.bits, mode=linear.mode)
    return linear.weight


def _dims(linear: nn.Module) -> tuple[int, int]:
    """(in, out) of a plain or quantized linear."""
    out_dims = linear.weight.shape[0]
    if isinstance(linear, nn.QuantizedLinear):
        return linear.scales.shape[-1] * linear.group_size, out_dims  # packed weight: count groups
    return linear.weight.shape[1], out_dims


def _as_linear(weight: mx.array, like: nn.Module, dequantize: bool) -> nn.Module:
    """A plain linear with `weight` (and `like`'s bias), re-quantized as `like` unless told not to."""
    out_dims, in_dims = weight.shape
    bias = "bias" in like
    layer = nn.Linear(in_dims, out_dims, bias=bias)
    layer.weight = weight
    if bias:
        layer.bias = like.bias
    if isinstance(like, nn.QuantizedLinear) and not dequantize:
        layer = nn.QuantizedLinear.from_linear(layer, like.group_size, like.bits, mode=like.mode)
    return layer


class LoRALinear(nn.Module):
    """A frozen linear (plain or quantized) plus a trainable low-rank update."""

    def __init__(self, linear: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        super().__init__()
        in_dims, out_dims = _dims(linear)
        linear.freeze()
        self.linear = linear
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        # A uniform in +-1/sqrt(in) (mlx-lm's and PEFT's Kaiming-uniform bound), B zero so
        # the adapted model starts as the base.
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def update_term(self, x: mx.array) -> mx.array:  # [..., out]
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return (self.scale * z).astype(x.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x) + self.update_term(x)

    def delta(self) -> mx.array:
        """The update as a dense [out, in] weight: scale * (A @ B).T."""
        return (self.scale * self.lora_b.T) @ self.lora_a.T

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """A plain linear (re-quantized like the base unless `dequantize`) equal to this layer."""
        w = dense_weight(self.linear)
        return _as_linear(w + self.delta().astype(w.dtype), self.linear, dequantize)


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024): the LoRA-updated weight's rows renormalised to learned magnitudes m.

    y = m / ||W + dW||_row * (x @ (W + dW).T) + bias, the norm treated as a
    constant in the backward pass (the paper's section 4.3, as PEFT and mlx-lm do).
    """

    def __init__(self, linear: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        super().__init__(linear, rank, scale, dropout)
        self.m = mx.linalg.norm(dense_weight(linear).astype(mx.float32), axis=1)  # [out]

    def __call__(self, x: mx.array) -> mx.array:
        w = dense_weight(self.linear)
        y = x @ w.T + self.update_term(x)
        norm = mx.stop_gradient(mx.linalg.norm(w + self.delta().astype(w.dtype), axis=1))
        y = (self.m / norm).astype(x.dtype) * y
        return y + self.linear.bias if "bias" in self.linear else y

    def fuse(self, dequantize: bool = False) -> nn.Module:
        w = dense_weight(self.linear)
        adapted = w + self.delta().astype(w.dtype)
        adapted = (self.m / mx.linalg.norm(adapted, axis=1))[:, None].astype(w.dtype) * adapted
        return _as_linear(adapted, self.linear, dequantize)


def _resolve_keys(blocks, target_names, required: bool = True) -> list[str]:
    """Block-relative module paths for short names ("q_proj") or paths ("self_attn.q_proj"), over
    every block: blocks may differ (Gemma 4's KV-shared blocks have no k/v projections, its
    k_eq_v global blocks no v_proj).  A name no block has is an error when `required`."""
    linears = []
    for block in blocks:
        modules = dict(block.named_modules())
        adapted = {p for p, m in modules.items() if isinstance(m, LoRALinear)}
        linears += [p for p, m in modules.items() if isinstance(m, (nn.Linear, nn.QuantizedLinear, LoRALinear))
                    and p.rpartition(".")[0] not in adapted and p not in linears]  # an adapter's own base is not a target
    keys = []
    for name in target_names:
        found = [p for p in linears if p == name or p.endswith("." + name)]
        if not found and required:
            raise AdapterError(None, f"no projection named {name!r} in a block; choose from {', '.join(TARGETS)}")
        keys += [p for p in found if p not in keys]
    return keys


def lora_config(model: nn.Module, rank: int = 8, target_names=DEFAULT_TARGETS, num_layers: int | None = None,
                scale: float | None = None, alpha: float | None = None, dropout: float = 0.0,
                dora: bool = False) -> dict:
    """The adapter_config.json dict for these settings, validated against `model`."""
    n_blocks = len(model.layers)
    if num_layers is None or num_layers == -1:  # -1: all blocks, as mlx-lm spells it
        num_layers = n_blocks
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(None, f"rank must be a positive integer, got {rank!r}")
    if not isinstance(num_layers, int) or not 1 <= num_layers <= n_blocks:
        raise AdapterError(None, f"num_layers must be between 1 and {n_blocks} (the model's blocks), got {num_layers!r}")
    if not 0.0 <= dropout < 1.0:
        raise AdapterError(None, f"dropout must be in [0, 1), got {dropout!r}")
    if scale is not None and alpha is not None:
        raise AdapterError(None, "give scale or alpha (scale = alpha / rank), not both")
    if isinstance(target_names, str):
        target_names = (target_names,)
    # mlx-lm's default scale is 20; alpha is PEFT's and keras-hub's spelling (scale = alpha / rank).
    scale = float(alpha) / rank if alpha is not None else 20.0 if scale is None else float(scale)
    keys = _resolve_keys(model.layers, target_names or DEFAULT_TARGETS)
    args = model.args
    return {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": float(dropout), "keys": keys},
        "base_model": {k: getattr(args, k) for k in BASE_KEYS if hasattr(args, k)},
    }


def apply_lora(model: nn.Module, config: dict) -> None:
    """Freeze `model` and wrap the linears `config` names in LoRA/DoRA layers, in place.

    A block without one of the named projections (a Gemma 4 KV-shared block has no k_proj / v_proj)
    is left without that adapter, as mlx-lm does; mlx-lm's adapters then carry the same names."""
    params = config["lora_parameters"]
    layer_class = DoRALinear if config.get("fine_tune_type") == "dora" else LoRALinear
    model.freeze()
    count = 0
    for block in model.layers[-config["num_layers"]:]:
        modules = dict(block.named_modules())
        wrapped = []
        for key in params["keys"]:
            base = modules.get(key)
            if isinstance(base, LoRALinear):
                raise AdapterError(None, f"{key} already has an adapter; fuse or reload the model first")
            if base is None:
                continue  # absent from this block by design
            if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
                raise AdapterError(None, f"the model has no linear {key!r} to adapt")
            wrapped.append((key, layer_class(base, params["rank"], params["scale"], params.get("dropout", 0.0))))
        block.update_modules(tree_unflatten(wrapped))
        count += len(wrapped)
    if not count:
        raise AdapterError(None, f"none of {params['keys']} is in the last {config['num_layers']} blocks")
    model.train(model.training)  # new layers start in training mode: give them the model's (dropout off in eval)


def enable_lora(model: nn.Module, rank: int = 4, target_names=DEFAULT_TARGETS, num_layers: int | None = None,
                scale: float | None = None, alpha: float | None = None, dropout: float = 0.0,
                dora: bool = False) -> dict:
    """Freeze `model` and add adapters to `target_names` in the last `num_layers` blocks (None: all).

    Returns the adapter config (pass it to `save_adapters`).  Only the adapter
    parameters are trainable afterwards.
    """
    config = lora_config(model, rank, target_names, num_layers, scale, alpha, dropout, dora)
    apply_lora(model, config)
    return config


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]


def fuse(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Merge every adapter into its base linear, in place (re-quantizing quantized bases unless `dequantize`)."""
    fused = [(p, m.fuse(dequantize)) for p, m in lora_layers(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return prepare_for_device(model)  # the fused layers are plain ones: give them the device's fast path


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The adapter parameters by their full path, as mlx-lm saves them."""
    return {f"{path}.{leaf}": layer[leaf] for path, layer in lora_layers(model)
            for leaf in ADAPTER_LEAVES if leaf in layer}


def save_adapters(path: str | os.PathLike, model: nn.Module, config: dict) -> Path:
    """Write `adapters.safetensors` and `adapter_config.json` into folder `path`, each atomically."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise AdapterError(folder, "adapter path exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    weights = adapter_weights(model)
    if not weights:
        raise AdapterError(folder, "the model has no adapters to save (call enable_lora first)")
    save_file(folder / ADAPTER_FILE, weights, metadata={"format": "mlx"})
    atomic_write_bytes(folder / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return folder


def read_adapter_config(path: str | os.PathLike) -> dict:
    """`adapter_config.json` of an adapter folder, checked for the keys we use."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise AdapterError(file, "missing: an adapter folder needs adapter_config.json and adapters.safetensors")
    config = read_json(file, MAX_CONFIG_BYTES, AdapterError)
    if not isinstance(config, dict):
        raise AdapterError(file, f"must hold a JSON object, found {json_type(config)}")
    kind = field(config, "fine_tune_type", str, file, "lora", AdapterError)
    if kind not in ("lora", "dora"):
        raise AdapterError(file, f"fine_tune_type {kind!r:.80} is not supported (only 'lora' and 'dora')")
    params = field(config, "lora_parameters", dict, file, error=AdapterError)
    where = "lora_parameters."
    number_in(field(params, "rank", int, file, error=AdapterError, where=where), int, file, where + "rank",
              low=1, high=MAX_RANK, error=AdapterError)
    number_in(field(params, "scale", float, file, error=AdapterError, where=where), float, file, where + "scale",
              low=-MAX_SCALE, high=MAX_SCALE, error=AdapterError)
    dropout = number_in(field(params, "dropout", float, file, 0.0, AdapterError, where), float, file,
                        where + "dropout", low=0, error=AdapterError)
    if dropout >= 1:
        raise AdapterError(file, f"{where}dropout must be below 1 (the share of inputs dropped), found {dropout!r}")
    keys = field(params, "keys", (list, type(None)), file, None, AdapterError, where)
    for i, key in enumerate(keys or []):
        expect(key, str, file, f"{where}keys[{i}]", AdapterError)
    number_in(field(config, "num_layers", int, file, error=AdapterError), int, file, "num_layers",
              low=-1, error=AdapterError)
    field(config, "base_model", (dict, type(None)), file, None, AdapterError)
    return config


def _check_fits(model: nn.Module, config: dict, file: Path) -> dict:
    """The config with mlx-lm's implicit values made explicit, or an error saying how it misfits."""
    n_blocks = len(model.layers)
    base = config.get("base_model") or {}
    args = model.args
    wrong = [f"{k} {v} (this model: {getattr(args, k)})" for k, v in base.items()
             if hasattr(args, k) and getattr(args, k) != v]
    if wrong:
        raise AdapterError(file, "trained for another base model: " + ", ".join(wrong))
    num_layers = n_blocks if config["num_layers"] == -1 else config["num_layers"]
    if not 1 <= num_layers <= n_blocks:
        raise AdapterError(file, f"adapts {num_layers} blocks but the model has {n_blocks}")
    params = dict(config["lora_parameters"])
    if params.get("keys") is None:  # mlx-lm's default: every linear of a block
        params["keys"] = _resolve_keys(model.layers, TARGETS, required=False)
    try:
        _resolve_keys(model.layers, params["keys"])
    except AdapterError as e:
        raise AdapterError(file, e.problem) from None
    return {**config, "num_layers": num_layers, "lora_parameters": params}


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Add the adapters of folder `path` (ours or mlx-lm's) to `model`, in place.

    Raises `AdapterError` naming the file when the adapter does not fit the
    model (other base shapes, rank, blocks or projections).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(folder, "no such adapter folder")
    config = _check_fits(model, read_adapter_config(folder), folder / CONFIG_FILE)
    if not (folder / ADAPTER_FILE).is_file():
        raise AdapterError(folder / ADAPTER_FILE, "missing: the adapter weights file")
    before = {p for p, _ in lora_layers(model)}
    try:
        apply_lora(model, config)
    except AdapterError as e:
        _remove_adapters(model, before)
        raise AdapterError(folder / CONFIG_FILE, e.problem) from None
    try:
        return load_adapter_weights(model, folder / ADAPTER_FILE)
    except Exception:
        _remove_adapters(model, before)  # a refused adapter leaves the model's layers as they were
        raise


def _remove_adapters(model: nn.Module, keep: set[str]) -> None:
    """Put the base of every adapted linear not in `keep` back in its place (undoing `apply_lora`)."""
    bases = [(p, m.linear) for p, m in lora_layers(model) if p not in keep]
    if bases:
        model.update_modules(tree_unflatten(bases))


def load_adapter_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapter weights (an adapters.safetensors file, or its folder) into the model's adapters.

    Every adapter of the model must be in the file with its shape, and nothing else.
    """
    file = Path(path)
    if file.is_dir():
        file = file / ADAPTER_FILE
    if not file.is_file():
        raise AdapterError(file, "no such adapter weights file")
    weights = load_file(file)
    expected = adapter_weights(model)
    problems = [f"{k} is {weights[k].dtype}, not floating point" for k in sorted(weights)
                if not mx.issubdtype(weights[k].dtype, mx.floating)]
    problems += [f"unexpected {k}" for k in sorted(weights.keys() - expected.keys())]
    problems += [f"missing {k}" for k in sorted(expected.keys() - weights.keys())]
    problems += [f"{k} has shape {tuple(weights[k].shape)}, the model needs {tuple(expected[k].shape)}"
                 for k in sorted(weights.keys() & expected.keys()) if weights[k].shape != expected[k].shape]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise AdapterError(file, f"does not fit this model (trained for another base or rank?): {shown}")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return model

