"""Read a Keras / keras-hub (Kaggle) Gemma preset folder into Hugging Face-format pieces.

`read_keras_preset(folder)` returns a `Checkpoint` (checkpoint.py):

* `config`            -- a Hugging Face-style `config.json` dict (`gemma` or
                         `gemma2`, with `architectures`; `paligemma` from
                         keras_paligemma.py; `gemma3_text`, or `gemma3` with
                         images, from keras_gemma3.py; `gemma4_text` from
                         keras_gemma4.py), loadable by
                         `mlx_gemma.loading.load_model_from` and transformers;
* `weights`           -- `{hf_name: float32 numpy array}` in HF layout ([out, in]);
* `tokenizer_model`   -- the bytes of `assets/tokenizer/vocabulary.spm` (a
                         SentencePiece model: HF's `tokenizer.model`);
* `generation_config` -- `bos_token_id`, `eos_token_id` (a list that includes
                         `<end_of_turn>` when the vocabulary has it; for a Gemma 4
                         vocabulary `<turn|>` and `<|tool_response>`), `pad_token_id`.

A preset folder (what `keras_hub.models.Backbone.save_to_preset` writes and
Kaggle serves) holds `config.json` (`{"class_name": "GemmaBackbone",
"registered_name": "keras_hub>GemmaBackbone" or "keras_nlp>GemmaBackbone",
"config": {...}}`), `model.weights.h5` -- or, for big models,
`model.weights.json` (`{"weight_map": {"/layers/.../vars": "model_00000.weights.h5"}}`)
plus its shards --, `tokenizer.json`, `assets/tokenizer/vocabulary.spm` and
`metadata.json`.  Nothing is imported from Keras and nothing in the preset is
executed: the JSON is read as data, the weights with `h5py`.

What keras-hub does, and how we undo it (keras-hub 0.32, read from
`keras_hub/src/models/gemma/gemma_backbone.py`, `gemma_decoder_block.py`,
`gemma_attention.py`, `rms_normalization.py`, and its own HF <-> Keras weight
maps `keras_hub/src/utils/transformers/convert_gemma.py` and
`keras_hub/src/utils/transformers/export/gemma.py`; checked numerically
against keras-hub by tests/test_convert_keras.py):

* HDF5: see `keras_h5.py` (how Keras 3 lays out and stores variables).
* Variables of block i (Keras shape -> HF name, HF shape), N query heads,
  K key/value heads, D head_dim, H hidden, F = intermediate_dim / 2:

      pre_attention_norm/vars/0        [H]       input_layernorm
      attention/query_dense/vars/0     [N,H,D]   self_attn.q_proj [N*D, H]  (transpose 0,2,1)
      attention/key_dense/vars/0       [K,H,D]   self_attn.k_proj [K*D, H]
      attention/value_dense/vars/0     [K,H,D]   self_attn.v_proj [K*D, H]
      attention/output_dense/vars/0    [N,D,H]   self_attn.o_proj [H, N*D]  (transpose 2,0,1)
      post_attention_norm/vars/0       [H]       post_attention_layernorm     (Gemma 2)
      pre_ffw_norm/vars/0              [H]       post_attention_layernorm     (Gemma 1)
                                                 pre_feedforward_layernorm    (Gemma 2)
      gating_ffw/vars/0                [H,F]     mlp.gate_proj [F, H]  (gets the GELU)
      gating_ffw_2/vars/0              [H,F]     mlp.up_proj   [F, H]
      ffw_linear/vars/0                [F,H]     mlp.down_proj [H, F]
      post_ffw_norm/vars/0             [H]       post_feedforward_layernorm   (Gemma 2)

  `GemmaDecoderBlock.call` computes `gelu(gating_ffw(x), approximate=True) *
  gating_ffw_2(x)`, hence gate/up above and `gelu_pytorch_tanh`.  RMSNorm is
  `x * rsqrt(mean(x^2) + eps) * (1 + scale)` in float32, as HF's: the scales
  are copied unchanged.  The embedding is tied (`ReversibleEmbedding(tie_weights=True)`),
  scaled by sqrt(hidden), and the output logits are soft-capped by
  `final_logit_soft_cap` in the reverse projection.  keras-hub's RoPE
  (`RotaryEmbedding(max_wavelength=10000)` then an interleaving permutation
  applied equally to q and k) leaves q.k unchanged, so the kernels need no
  permutation and rope_theta is 10000.
* Config: `intermediate_dim` is twice HF's `intermediate_size` (keras-hub's
  converter writes `intermediate_size * 2`).  Gemma 2 is the backbone with
  `use_post_attention_norm` and `use_post_ffw_norm`; its sliding window
  (`use_sliding_window_attention`, `sliding_window_size`) applies to even
  layers (`i % 2 == 0`), as HF's `layer_types`; keras-hub's band mask lets a
  query see the `sliding_window_size` positions ending at itself, as HF's
  `sliding_window`.  `query_head_dim_normalize` True scales queries by
  head_dim ** -0.5, False by (hidden / heads) ** -0.5 (Gemma 2 27B): we write
  HF's `query_pre_attn_scalar` from it.  Keras presets record no context
  length: `max_position_embeddings` is 8192, the value Gemma 1/2 were trained
  with and what keras-hub's own HF exporter writes.

Two keras-hub 0.32 quirks we do *not* copy, because they contradict the config
the preset records (and HF's reading of the same weights): `GemmaDecoderBlock`
hands its attention `query_head_dim_normalize=True` whatever the config says
(so keras-hub itself scales Gemma 2 27B queries by 1/sqrt(128), not
1/sqrt(144)), and `GemmaBackbone` gives `layer_norm_epsilon` only to the final
norm (the block norms keep 1e-6).  All published presets use eps 1e-6, and the
27B one is the only preset where the scale flag matters.

Hostile input: see `keras_h5.py`; config.json is size-capped JSON read as data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError, ModelFileError, UnsupportedModelError
from ..json_input import json_type
from ..models import MODELS
from .checkpoint import Checkpoint, generation_config
from .keras_common import (
    CONFIG_FILE,
    DEFAULT_MAX_POSITION_EMBEDDINGS,
    decoder_variables,
    dtype_name,
    int_setting,
    keras_config_to_hf,
    read_tokenizer,
    stop_ids,
    to_hf_layout,
)
from .keras_h5 import read_json, read_variables
from .keras_gemma3 import read_gemma3_preset
from .keras_gemma4 import read_gemma4_preset
from .keras_gemma4_assistant import is_assistant_backbone, read_gemma4_assistant_preset
from .keras_paligemma import read_paligemma_preset

__all__ = [
    "read_keras_preset",
    "keras_config_to_hf",
    "SUPPORTED_CLASSES",
    "DEFAULT_MAX_POSITION_EMBEDDINGS",
]

# PaliGemmaBackbone: keras_paligemma.py; Gemma3Backbone (text, or with images): keras_gemma3.py;
# Gemma4Backbone (text): keras_gemma4.py.
SUPPORTED_CLASSES = ("GemmaBackbone", "PaliGemmaBackbone", "Gemma3Backbone", "Gemma4Backbone")
_REGISTERED = {"keras_hub>GemmaBackbone", "keras_nlp>GemmaBackbone"}
_PALIGEMMA = {"keras_hub>PaliGemmaBackbone", "keras_nlp>PaliGemmaBackbone"}
_GEMMA3 = {"keras_hub>Gemma3Backbone"}
_GEMMA4 = {"keras_hub>Gemma4Backbone"}
# Gemma-family Keras classes we know of but cannot read yet.
_LATER = {
    "Gemma3nBackbone",
    "RecurrentGemmaBackbone", "T5GemmaBackbone", "ShieldGemmaBackbone",
}
_TASK_CLASSES = {"GemmaCausalLM", "Gemma3CausalLM", "Gemma4CausalLM", "PaliGemmaCausalLM"}



def _check_class(path: str, top: Any) -> dict:
    if not isinstance(top, dict):
        raise ConfigError(path, f"must hold a JSON object, found {json_type(top)}")
    class_name = top.get("class_name")
    registered = top.get("registered_name")
    names = [n for n in (class_name, registered) if n is not None]
    if not names:
        raise ConfigError(path, "has no class_name: not a Keras preset config")
    for n in names:
        if not isinstance(n, str):
            raise ConfigError(path, f"class name {n!r:.80} is not a string")
    short = {n.rsplit(">", 1)[-1] for n in names}
    if short != {"GemmaBackbone"} or (registered is not None and registered not in _REGISTERED):
        shown = registered or class_name
        cls = next(iter(short - {"GemmaBackbone"}), shown)
        if cls in _LATER:
            raise UnsupportedModelError(
                path, f"Keras class {shown!r:.80} is not yet supported (only {', '.join(SUPPORTED_CLASSES)})")
        if cls in _TASK_CLASSES:
            raise UnsupportedModelError(
                path, f"Keras class {shown!r:.80} is a task, not a backbone: point at a preset folder "
                "whose config.json describes the GemmaBackbone"
            )
        raise UnsupportedModelError(
            path, f"Keras class {shown!r:.80} is not a Gemma backbone (supported: {', '.join(SUPPORTED_CLASSES)})")
    cfg = top.get("config")
    if not isinstance(cfg, dict):
        raise ConfigError(path, "has no 'config' object with the backbone's settings")
    return cfg


def _validate_with_model_args(cfg: dict, path: str) -> None:
    """Refuse what our model classes would refuse, before any weight is read."""
    MODELS[cfg["model_type"]].ModelArgs.from_dict(cfg, path)


def read_keras_preset(
    folder: str | os.PathLike, *, progress: Callable[[int, int, str], None] | None = None
) -> Checkpoint:
    """Read a keras-hub / Kaggle Gemma preset folder into HF-format pieces.

    `progress(done, total, hf_name)` is called after each tensor, if given.
    Raises `ModelFileError` (or a subclass) naming the file on any problem.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ModelFileError(folder, "expected a Keras preset folder (config.json, model.weights.h5, assets/)")
    config_path = os.path.join(folder, CONFIG_FILE)
    top = read_json(config_path, "config.json", ConfigError)
    registered = top.get("registered_name") if isinstance(top, dict) else None
    # A registered_name that is not a string is left to _check_class to refuse.
    if isinstance(top, dict) and top.get("class_name") == "PaliGemmaBackbone" and (
            registered is None or (isinstance(registered, str) and registered in _PALIGEMMA)):
        return read_paligemma_preset(folder, top, progress=progress)
    if isinstance(top, dict) and top.get("class_name") == "Gemma3Backbone" and (
            registered is None or (isinstance(registered, str) and registered in _GEMMA3)):
        return read_gemma3_preset(folder, top, progress=progress)
    if isinstance(top, dict) and top.get("class_name") == "Gemma4Backbone" and (
            registered is None or (isinstance(registered, str) and registered in _GEMMA4)):
        if is_assistant_backbone(top.get("config")):  # every layer KV-shared: a drafter's task preset
            return read_gemma4_assistant_preset(folder, top, progress=progress)
        return read_gemma4_preset(folder, top, progress=progress)
    keras_cfg = _check_class(config_path, top)
    # The vocabulary size bounds the tokenizer check; validate it first.
    vocab = int_setting(config_path, keras_cfg, "vocabulary_size", limit=1 << 22)
    tokenizer_model, specials, _ = read_tokenizer(folder, vocab)
    cfg = keras_config_to_hf(keras_cfg, config_path, special_ids=specials)
    _validate_with_model_args(cfg, config_path)

    expected = decoder_variables(cfg)
    shapes = {name: shape for name, (_, shape) in expected.items()}
    names = {name: hf for name, (hf, _) in expected.items()}
    variables, dtypes = read_variables(
        folder, shapes, cfg["model_type"],
        None if progress is None else (lambda done, total, name: progress(done, total, names[name])))
    weights = {names[k]: np.ascontiguousarray(to_hf_layout(names[k], v)) for k, v in variables.items()}
    del variables

    generation = generation_config(specials["bos"], specials["eos"], specials["pad"], *stop_ids(tokenizer_model))
    source = dtype_name(keras_cfg)
    if len(dtypes) == 1:
        source = next(iter(dtypes))
    elif source is None:
        source = "float32"
    return Checkpoint(cfg, weights, tokenizer_model, generation, source=Path(folder), source_dtype=source,
                      metadata=keras_cfg)
