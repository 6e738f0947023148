"""Reading a sentence-transformers folder (EmbeddingGemma): its modules, their configs and weights.

`SentenceTransformer.save` lays a model out as `modules.json` (the module chain),
the Transformer module in the root (config.json, model.safetensors, the tokenizer),
`1_Pooling/config.json`, `2_Dense/{config.json, model.safetensors}` (and more Dense
layers), `4_Normalize/`, plus `config_sentence_transformers.json` (the task `prompts`,
`default_prompt_name`) and `sentence_bert_config.json` (`max_seq_length`).  This
module turns those into (1) the `"sentence_transformers"` settings the model's
`ModelArgs` reads, (2) the Dense weights under the model's names, and (3) an
`EmbeddingSettings` (prompts, special tokens, length) for `embed`.  Every malformed
file is a ConfigError (or WeightsMismatchError) naming it; nothing is imported or run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Any

import mlx.core as mx

from .errors import ConfigError, WeightsMismatchError
from .json_input import expect, field, read_json
from .models.embedding_gemma import ACTIVATIONS, POOLING_MODES
from .tensorfile import load_file

MAX_JSON_BYTES = 1 << 20  # module configs are a few hundred bytes
MAX_TOKENIZER_JSON_BYTES = 64 << 20  # a real Gemma tokenizer.json is about 33 MB
# Legacy Pooling keys (sentence-transformers < 5.2) -> the mode they turn on.
LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken",
}


@dataclass
class EmbeddingSettings:
    """What `embed` needs besides the model: the task prompts and how texts become ids."""

    prompts: dict[str, str] = dataclass_field(default_factory=dict)  # name -> prefix ("query" -> "task: ...")
    default_prompt_name: str | None = None
    add_bos: bool = True  # EmbeddingGemma's tokenizer wraps each text in <bos> ... <eos>
    add_eos: bool = True
    max_seq_length: int | None = None  # longer texts are cut (special tokens kept), as the HF tokenizer


def is_sentence_transformers_folder(folder: Path) -> bool:
    return (Path(folder) / "modules.json").is_file()


def read_modules(folder: Path) -> list[tuple[str, Path]]:
    """(kind, folder) per module, in order: kind is the class name ("Transformer", "Pooling", ...)."""
    path = Path(folder) / "modules.json"
    modules = expect(read_json(path, MAX_JSON_BYTES), list, path, "modules")
    out = []
    for i, m in enumerate(modules):
        m = expect(m, dict, path, f"[{i}]")
        kind = field(m, "type", str, path).rsplit(".", 1)[-1]
        sub = field(m, "path", str, path)
        if Path(sub).is_absolute() or ".." in Path(sub).parts:
            raise ConfigError(path, f"module {i} path {sub!r:.80} leaves the model folder")
        out.append((kind, Path(folder) / sub))
    return out


# mlx-embeddings (0.1, models/gemma3_text.py) saves EmbeddingGemma as one root file: the backbone
# as `model.*` and the two Dense layers as `dense.0.weight` (hidden -> 4 * hidden) and
# `dense.1.weight` (back), no bias, quantized with the rest under -q; its convert copies only the
# root JSON files, so the Pooling / Dense subfolders are gone.  Its model hard-codes the chain:
# mean pooling, those two Dense layers without activation, then L2 normalization.
MLX_EMBEDDINGS_DENSE = re.compile(r"dense\.(\d+)\.(weight|scales|biases)")


def is_mlx_embeddings_layout(weight_names) -> bool:
    """Root weights holding the Dense layers as `dense.<i>.weight` (mlx-embeddings' layout)."""
    return any(MLX_EMBEDDINGS_DENSE.fullmatch(name) for name in weight_names)


def mlx_embeddings_settings(hidden_size: int) -> dict[str, Any]:
    """The `"sentence_transformers"` settings of mlx-embeddings' fixed EmbeddingGemma chain."""
    identity = "torch.nn.modules.linear.Identity"
    dense = [{"in_features": hidden_size, "out_features": 4 * hidden_size, "bias": False,
              "activation_function": identity},
             {"in_features": 4 * hidden_size, "out_features": hidden_size, "bias": False,
              "activation_function": identity}]
    return {"pooling_mode": "mean", "dense": dense, "normalize": True}


def encoder_settings(folder: Path) -> tuple[dict[str, Any], dict[str, mx.array]]:
    """The `"sentence_transformers"` config settings and the Dense weights (`dense.<i>.linear.*`)."""
    modules = read_modules(folder)
    kinds = [kind for kind, _ in modules]
    if kinds[:2] != ["Transformer", "Pooling"]:
        raise ConfigError(Path(folder) / "modules.json",
                          f"expected a Transformer then a Pooling module, found {kinds[:2]}")
    unknown = sorted(set(kinds) - {"Transformer", "Pooling", "Dense", "Normalize"})
    if unknown:
        raise ConfigError(Path(folder) / "modules.json", f"modules not supported: {', '.join(unknown)}")
    dense, weights = [], {}
    for kind, sub in modules:
        if kind == "Dense":
            i = len(dense)
            dense.append(_dense_config(sub / "config.json"))
            if i and dense[i]["in_features"] != dense[i - 1]["out_features"]:
                raise ConfigError(sub / "config.json", f"in_features {dense[i]['in_features']} does not match "
                                                       f"the {dense[i - 1]['out_features']} the Dense layer before gives")
            weights.update({f"dense.{i}.{k}": v for k, v in _dense_weights(sub).items()})
    settings = {"pooling_mode": _pooling_mode(modules[1][1] / "config.json"), "dense": dense,
                "normalize": kinds[-1] == "Normalize"}
    return settings, weights


def _pooling_mode(path: Path) -> str:
    """The one pooling mode of a Pooling config (new `pooling_mode` key or legacy booleans)."""
    config = expect(read_json(path, MAX_JSON_BYTES), dict, path, "Pooling config")
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else expect(modes, list, path, "pooling_mode")
    else:
        modes = [mode for key, mode in LEGACY_POOLING.items() if field(config, key, bool, path, default=False)]
    if len(modes) != 1 or not isinstance(modes[0], str):
        raise ConfigError(path, f"exactly one pooling mode is supported, found {modes!r:.120}")
    if modes[0] not in POOLING_MODES:
        raise ConfigError(path, f"pooling mode {modes[0]!r:.80} is not supported (supported: {', '.join(POOLING_MODES)})")
    if not field(config, "include_prompt", bool, path, default=True):
        raise ConfigError(path, "include_prompt: false (prompt tokens left out of pooling) is not supported")
    return modes[0]


def _dense_config(path: Path) -> dict[str, Any]:
    config = expect(read_json(path, MAX_JSON_BYTES), dict, path, "Dense config")
    out = {"in_features": field(config, "in_features", int, path),
           "out_features": field(config, "out_features", int, path),
           "bias": field(config, "bias", bool, path, default=True),
           "activation_function": field(config, "activation_function", str, path,
                                        default="torch.nn.modules.activation.Tanh")}
    if out["activation_function"] not in ACTIVATIONS:
        raise ConfigError(path, f"activation_function {out['activation_function']!r:.120} is not supported "
                                f"(supported: {', '.join(ACTIVATIONS)})")
    if field(config, "use_residual", bool, path, default=False):
        raise ConfigError(path, "use_residual Dense layers are not supported")
    for key in ("in_features", "out_features"):
        if not 0 < out[key] <= 1 << 20:
            raise ConfigError(path, f"{key} must be a positive width, found {out[key]}")
    return out


def _dense_weights(sub: Path) -> dict[str, mx.array]:
    """A Dense layer's `linear.weight` (and bias) from its safetensors; pickles are refused."""
    path = sub / "model.safetensors"
    if not path.is_file():
        other = "; its pytorch_model.bin (a pickle) is never read" if (sub / "pytorch_model.bin").is_file() else ""
        raise WeightsMismatchError(path, f"missing: the Dense layer's weights{other}")
    return load_file(path)


def embedding_settings(folder: Path, max_positions: int) -> EmbeddingSettings:
    """Prompts (config_sentence_transformers.json), special tokens and length (tokenizer files)."""
    folder = Path(folder)
    settings = EmbeddingSettings()
    path = folder / "config_sentence_transformers.json"
    if path.is_file():
        config = expect(read_json(path, MAX_JSON_BYTES), dict, path, "config")
        prompts = field(config, "prompts", dict, path, default={})
        for name, prompt in prompts.items():
            expect(prompt, str, path, f"prompts.{name}")
        settings.prompts = dict(prompts)
        settings.default_prompt_name = field(config, "default_prompt_name", (str, type(None)), path, default=None)
        if settings.default_prompt_name is not None and settings.default_prompt_name not in prompts:
            raise ConfigError(path, f"default_prompt_name {settings.default_prompt_name!r:.80} is not in prompts")
    settings.add_bos, settings.add_eos = _special_tokens(folder)
    settings.max_seq_length = min(_max_seq_length(folder) or max_positions, max_positions)
    return settings


def _special_tokens(folder: Path) -> tuple[bool, bool]:
    """(add <bos>, add <eos>) as the HF tokenizer adds them: tokenizer.json's post-processor
    when there is one (it is what the fast tokenizer runs), else tokenizer_config.json's
    add_bos_token / add_eos_token, else EmbeddingGemma's <bos> ... <eos>."""
    path = folder / "tokenizer.json"
    if path.is_file():
        post = expect(read_json(path, MAX_TOKENIZER_JSON_BYTES), dict, path, "tokenizer").get("post_processor")
        if isinstance(post, dict) and post.get("type") == "TemplateProcessing":
            single = expect(post.get("single"), list, path, "post_processor.single")
            tokens = [expect(p, dict, path, "post_processor.single[]") for p in single]
            names = [p["SpecialToken"].get("id") if "SpecialToken" in p else "$A" for p in tokens]
            if names not in (["$A"], ["<bos>", "$A"], ["$A", "<eos>"], ["<bos>", "$A", "<eos>"]):
                raise ConfigError(path, f"post_processor template {names!r:.120} is not supported")
            return names[0] == "<bos>", names[-1] == "<eos>"
    path = folder / "tokenizer_config.json"
    config = expect(read_json(path, MAX_JSON_BYTES), dict, path, "config") if path.is_file() else {}
    return (field(config, "add_bos_token", bool, path, default=True),
            field(config, "add_eos_token", bool, path, default=True))


def _max_seq_length(folder: Path) -> int | None:
    """sentence_bert_config.json's max_seq_length, else the tokenizer's model_max_length."""
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        path = folder / name
        if path.is_file():
            config = expect(read_json(path, MAX_JSON_BYTES), dict, path, "config")
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                if value < 3:
                    raise ConfigError(path, f"{key} {value} leaves no room for a text")
                return value
    return None
