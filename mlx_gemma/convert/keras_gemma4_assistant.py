"""Read a keras-hub `Gemma4AssistantCausalLM` task preset (the `gemma4_instruct_*_assistant` drafters)
into HF-format pieces: a transformers `Gemma4AssistantConfig` (`gemma4_assistant`,
models/gemma4_assistant.py) and `Gemma4AssistantForCausalLM`'s weight names.

What keras-hub 0.32 writes (`keras_hub/src/models/gemma4/gemma4_assistant_causal_lm.py`; its HF -> Keras
map `keras_hub/src/utils/transformers/convert_gemma4_assistant.py`), checked against keras-hub's
`call_with_cache` by tests/test_convert_keras_gemma4_assistant.py:

* config.json: its `Gemma4Backbone`, every layer KV-shared (`num_kv_shared_layers == num_layers`): the
  blocks have no key / value weights and read the target's; read as keras_gemma4.py reads a text
  backbone (the drafter's `text_config`).
* task.json: `Gemma4AssistantCausalLM` with `backbone_hidden_size` (the target's width),
  `use_ordered_embeddings`, `num_centroids`, `centroid_intermediate_top_k` (transformers' names);
  `num_speculative_tokens` and its `sampler` are keras-hub's generation settings, not the model's.
* model.weights.h5: the backbone, as keras_gemma4.py maps it (`model.*`); task.weights.h5 (Keras shape
  -> HF name), B the target's width, H the drafter's:

      pre_projection/vars/0   [2B,H]  pre_projection.weight [H,2B]
      post_projection/vars/0  [H,B]   post_projection.weight [B,H]
      centroids/vars/0        [H,C]   masked_embedding.centroids.weight [C,H]   (ordered embeddings)
      vars/0                  [V]     masked_embedding.token_ordering (stored as float32; ids)

  plus the optimizer's variables, skipped.  The head is the tied embedding (transformers' too).
* A drafter has no tokenizer of its own (it speaks its target's): none is written; the special ids in
  its text config are Gemma's (pad 0, eos 1, bos 2), unused by the drafter.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import ConfigError, UnsupportedModelError
from ..models import DRAFTERS
from .checkpoint import Checkpoint
from .keras_common import backbone_header, bool_setting, int_setting
from .keras_gemma4 import _to_hf, gemma4_text_config, gemma4_variables
from .keras_h5 import read_json, read_task_variables, read_variables

TASK_FILE = "task.json"
TASK_CLASS = "Gemma4AssistantCausalLM"
_SPECIALS = {"pad": 0, "eos": 1, "bos": 2}  # Gemma's; a drafter's config carries them unused


def is_assistant_backbone(keras_cfg: dict) -> bool:
    """Whether a Gemma4Backbone's settings are a drafter's: every layer reads another model's K/V."""
    if not isinstance(keras_cfg, dict):
        return False
    layers, shared = keras_cfg.get("num_layers"), keras_cfg.get("num_kv_shared_layers")
    return isinstance(layers, int) and layers > 0 and shared == layers


def _task_settings(folder: str) -> tuple[str, dict]:
    """(task.json's path, the Gemma4AssistantCausalLM settings); a typed error for anything else."""
    path = os.path.join(folder, TASK_FILE)
    if not os.path.isfile(path):
        raise UnsupportedModelError(os.path.join(folder, "config.json"), "num_kv_shared_layers equals num_layers: "
                                    "an MTP assistant drafter, whose settings and projections are in its task preset "
                                    f"({TASK_FILE}, task.weights.h5), which this folder lacks")
    top = read_json(path, TASK_FILE, ConfigError)
    names = {top.get("class_name"), top.get("registered_name")} if isinstance(top, dict) else set()
    if not names & {TASK_CLASS, f"keras_hub>{TASK_CLASS}"} or not isinstance(top.get("config"), dict):
        raise UnsupportedModelError(path, f"expected a {TASK_CLASS} task beside a backbone whose every layer is "
                                          "KV-shared (an assistant drafter)")
    return path, top["config"]


def assistant_config(keras_cfg: dict, config_path, task: dict, task_path) -> dict:
    """HF `gemma4_assistant` config: the backbone as its text stack, the task's head and projections."""
    text = gemma4_text_config(keras_cfg, config_path, _SPECIALS, drafter=True)
    ordered = bool_setting(task_path, task, "use_ordered_embeddings", True)
    return {
        "architectures": ["Gemma4AssistantForCausalLM"], "model_type": "gemma4_assistant",
        "backbone_hidden_size": int_setting(task_path, task, "backbone_hidden_size", limit=1 << 16),
        "use_ordered_embeddings": ordered,
        "num_centroids": int_setting(task_path, task, "num_centroids", 2048, limit=1 << 22),
        "centroid_intermediate_top_k": int_setting(task_path, task, "centroid_intermediate_top_k", 32, limit=1 << 22),
        "tie_word_embeddings": True,
        "text_config": {k: v for k, v in text.items() if k not in ("architectures", "torch_dtype")},
        "torch_dtype": "float32",
    }


def task_variables(cfg: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """task.weights.h5's dataset paths -> (HF name, Keras shape)."""
    b, h, v = cfg["backbone_hidden_size"], cfg["text_config"]["hidden_size"], cfg["text_config"]["vocab_size"]
    out = {"pre_projection/vars/0": ("pre_projection.weight", (2 * b, h)),
           "post_projection/vars/0": ("post_projection.weight", (h, b))}
    if cfg["use_ordered_embeddings"]:
        out["centroids/vars/0"] = ("masked_embedding.centroids.weight", (h, cfg["num_centroids"]))
        out["vars/0"] = ("masked_embedding.token_ordering", (v,))
    return out


def read_gemma4_assistant_preset(
    folder: str, top: dict, *, progress: Callable[[int, int, str], None] | None = None
) -> Checkpoint:
    """Read an assistant task preset folder whose parsed config.json (its backbone) is `top`."""
    config_path, keras_cfg, _ = backbone_header(folder, top)
    task_path, task = _task_settings(folder)
    cfg = assistant_config(keras_cfg, config_path, task, task_path)
    DRAFTERS[cfg["model_type"]].ModelArgs.from_dict(cfg, task_path)  # refuse what the model would refuse

    expected = gemma4_variables(cfg["text_config"])
    names = {k: hf for k, (hf, _) in expected.items()}
    variables, dtypes = read_variables(
        folder, {k: shape for k, (_, shape) in expected.items()}, "Gemma 4 assistant",
        None if progress is None else (lambda done, total, name: progress(done, total, names[name])))
    weights = {names[k]: np.asarray(_to_hf(names[k], v), order="C") for k, v in variables.items()}
    del variables
    own = task_variables(cfg)
    for key, a in read_task_variables(folder, {k: shape for k, (_, shape) in own.items()}, TASK_CLASS).items():
        name = own[key][0]
        if name.endswith("token_ordering"):
            if not np.array_equal(np.sort(a), np.arange(a.size)):
                raise ConfigError(os.path.join(folder, "task.weights.h5"),
                                  "token_ordering must hold every token id once")
            weights[name] = a.astype(np.int32)
        else:
            weights[name] = np.ascontiguousarray(a.T)  # Keras Dense kernels are [in, out]
    source = next(iter(dtypes)) if len(dtypes) == 1 else "float32"
    return Checkpoint(cfg, weights, None, None, source=Path(folder), source_dtype=source, metadata=keras_cfg)
