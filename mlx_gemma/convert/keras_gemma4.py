"""Read a keras-hub `Gemma4Backbone` preset (Gemma 4 text: dense, per-layer inputs, KV sharing, K = V, MoE;
with its `Gemma4VisionEncoder` and / or `Gemma4AudioEncoder`) into HF-format pieces: a transformers
`Gemma4TextConfig` (`gemma4_text`), or with an encoder a `Gemma4Config` (`gemma4`, models/gemma4_mm.py),
and HF weight names.

What keras-hub 0.32 does (`keras_hub/src/models/gemma4/gemma4_backbone.py`, `gemma4_decoder_block.py`,
`gemma4_attention.py`, `gemma4_layers.py`, `gemma4_moe.py`; its HF -> Keras map
`keras_hub/src/utils/transformers/convert_gemma4.py`), checked numerically against keras-hub by
tests/test_convert_keras_gemma4.py:

* Variables (Keras shape -> HF name), N query heads, K KV heads, D head dim (a global layer's own),
  H hidden, F intermediate (doubled on KV-shared layers with use_double_wide_mlp), P per-layer width,
  E experts, I expert width; block i is `layers/gemma4_text_decoder_block[_i]`:

      reversible_embedding/vars/0          [V,H]    model.embed_tokens
      embedding/vars/0                     [V',L*P] model.embed_tokens_per_layer          (P > 0)
      dense/vars/0                         [H,L*P]  model.per_layer_model_projection [L*P,H]
      rms_normalization[_1]/vars/0         [P], [H] model.per_layer_projection_norm, model.norm
      block/vars/0                         []       layer_scalar [1]
      block/{pre,post}_attention_norm      [H]      input_layernorm, post_attention_layernorm
      block/{pre,post}_ffw_norm            [H]      pre_feedforward_layernorm, post_feedforward_layernorm
      block/attention/query_dense          [N,H,D]  self_attn.q_proj [N*D,H] (as keras.py's Gemma)
      block/attention/{key,value}_dense    [K,H,D]  k_proj, v_proj (none on KV-shared layers; no value
                                                    on global layers with num_global_key_value_heads)
      block/attention/output_dense         [N,D,H]  o_proj [H,N*D]
      block/attention/{query,key}_norm     [D]      q_norm, k_norm (the v norm has no weight)
      block/gating_ffw, gating_ffw_2       [H,F]    mlp.gate_proj, mlp.up_proj [F,H]
      block/ffw_linear                     [F,H]    mlp.down_proj [H,F]
      block/per_layer_input_gate           [H,P]    per_layer_input_gate [P,H]
      block/per_layer_up_proj              [P,H]    per_layer_projection [H,P]
      block/post_per_layer_input_norm      [H]      post_per_layer_input_norm
      block/post_ffw_norm_dense, pre_ffw_norm_moe, post_ffw_norm_moe_path
                                           [H]      post_feedforward_layernorm_1, pre_/post_feedforward_layernorm_2
      block/moe_router/vars/0, proj/vars/0 [H], [H,E]  router.scale, router.proj [E,H]
      block/moe_expert_bank/vars/0..3      gate [E,H,I], up [E,H,I], down [E,I,H], scale [E]
                                                    experts.gate_up_proj [E,2I,H] (gate rows first),
                                                    experts.down_proj [E,H,I], router.per_expert_scale

  Gemma 4's RMSNorm multiplies by the stored scale (`RMSNormalization`), as HF's: scales are copied.
* Config: keras-hub fixes what HF configs spell out.  Layer kinds: `layer_types`, else global when
  `i % sliding_window_pattern == pattern - 1`.  RoPE: local layers rotate fully at
  `local_rope_wavelength` (10k), global ones the first `global_rope_partial_rotary_factor` of each
  half at `global_rope_wavelength` (1M) with exponents over the whole head dim
  (`RotaryEmbedding(denominator_dim=head_dim)`): HF's "proportional" RoPE; a scaling factor divides
  the positions, HF's `factor`.  `num_global_key_value_heads` turns on K = V on global layers
  (HF's `attention_k_eq_v`).  A KV-shared layer reads the last earlier non-shared layer of its kind,
  as HF's.  The preset records no context length: we write 131,072 (E2B / E4B; Gemma 4's default).
  `query_head_dim_normalize` is unused by Gemma 4 (attention is unscaled in both).
* Vision (`layers/gemma4_vision_encoder/layers/...`; keras-hub's `gemma4_vision_encoder.py`), Keras
  shape -> HF name under `model.vision_tower.` (D tower width, d its head dim):

      gemma4_vision_encoder_block/patch_embedder/input_proj [3p^2,D]  patch_embedder.input_proj [D,3p^2]
      gemma4_vision_encoder_block/patch_embedder/vars/0     [2,S,D]   patch_embedder.position_embedding_table
      .../encoder_blocks/gemma4_vision_decoder_block[_i]/   -> encoder.layers.i.: the text block's norms
          attention/{query,key,value,output}_dense/dense     self_attn.{q,k,v,o}_proj.linear (as the text's)
          gating_ffw, gating_ffw_2, ffw_linear /dense        mlp.{gate,up,down}_proj.linear [out,in]
          <each of those>/vars/0..3  []                      .input_min, .input_max, .output_min, .output_max
      gemma4_vision_output/vars/0, 1 (standardize)          std_bias, std_scale
      gemma4_vision_output/vision_input_projection [D,H]    model.embed_vision.embedding_projection [H,D]

  Patches arrive flat in [0, 1] and are mapped to [-1, 1] inside (both); the output norm is
  weightless (HF's embedder pre-projection norm).  keras-hub's image placeholders are
  `<|image>` `<|image|>`... `<image|>`, transformers' boi / image / eoi ids.  Where keras-hub's
  vision encoder differs from transformers' (read, not met by one image): it pools with the
  pooled-grid width of the batch's widest image (`Gemma4VisionAveragePooling`; HF uses each image's
  own) and keeps every pooled slot, padding ones included.  Images are preprocessed by the model's
  own image code (mlx_gemma.gemma4_images, transformers' processor), not by keras-hub's converter.
* Audio (E2B / E4B's `Gemma4AudioEncoder`): keras_gemma4_audio.py maps it to `model.audio_tower.` /
  `model.embed_audio.` and the preset's audio_converter.json to processor_config.json.  keras-hub's
  audio placeholders are `<|audio>` `<|audio|>`... `<audio|>`, transformers' boa / audio / eoa ids.
* Refused (typed errors naming the field): what HF's Gemma 4 model cannot express or our model
  does not run -- a last layer that is not global (transformers forces it global; keras-hub does
  not), `use_sliding_window_attention=false`, an attention soft-cap, embedding backbones.  KV sharing
  over every layer is an MTP assistant drafter's backbone: keras_gemma4_assistant.py reads its task preset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError, TokenizerError, UnsupportedModelError
from ..models import MODELS
from ..tokenizer import GemmaTokenizer
from .checkpoint import Checkpoint, generation_config
from .keras_common import (
    backbone_header,
    bool_setting, dtype_name, float_setting, int_setting, read_tokenizer, stop_ids, to_hf_layout,
)
from .keras_gemma4_audio import (
    audio_config, audio_to_hf, audio_variables, encoder_settings, feature_extractor, is_audio_weight,
)
from .keras_h5 import read_variables

FULL, SLIDING = "full_attention", "sliding_attention"
MAX_POSITION_EMBEDDINGS = 131_072  # not in Keras presets; Gemma4TextConfig's default (E2B / E4B)
_BLOCK = "layers/gemma4_text_decoder_block"
_VISION = "layers/gemma4_vision_encoder/layers"


def _int(path, c: dict, key: str, default: int, **limits) -> int:
    """int_setting where a null counts as absent (keras-hub writes its optional settings as null)."""
    return int_setting(path, {key: default} if c.get(key) is None else c, key, **limits)


def _layer_types(c: dict, path, layers: int) -> list[str]:
    """Each layer's kind as keras-hub builds it; the last must be global (transformers forces it)."""
    kinds = c.get("layer_types")
    if kinds is None:
        pattern = _int(path, c, "sliding_window_pattern", 6, limit=1024)
        kinds = [FULL if i % pattern == pattern - 1 else SLIDING for i in range(layers)]
    if not isinstance(kinds, list) or len(kinds) != layers or any(k not in (FULL, SLIDING) for k in kinds):
        raise ConfigError(path, f"layer_types must list {layers} of {FULL!r} / {SLIDING!r}")
    if kinds[-1] != FULL:
        raise UnsupportedModelError(path, "layer_types: the last layer is local; transformers' Gemma 4 makes "
                                          "it global, so keras-hub and HF would read this preset differently")
    return list(kinds)


def _rope(c: dict, path, kind: str, head_dim: int) -> dict:
    """HF rope_parameters of one layer kind (keras-hub's RotaryEmbedding settings, see the docstring)."""
    local = kind == SLIDING
    base = float_setting(path, c, "local_rope_wavelength" if local else "global_rope_wavelength",
                         optional=True) or (10_000.0 if local else 1_000_000.0)
    factor = float_setting(path, c, "local_rope_scaling_factor" if local else "global_rope_scaling_factor", 1.0)
    fraction = 1.0 if local else float_setting(path, c, "global_rope_partial_rotary_factor", 1.0)
    if fraction > 1:
        raise ConfigError(path, f"global_rope_partial_rotary_factor must be at most 1, got {fraction}")
    raw = int(fraction * head_dim)
    if max(2, raw - raw % 2) // 2 != int(fraction * head_dim // 2):  # Gemma4TextAttention's rotary_dim vs HF's
        raise UnsupportedModelError(path, f"global_rope_partial_rotary_factor {fraction} of head dim {head_dim}: "
                                          "keras-hub and transformers rotate different numbers of pairs")
    if local and factor == 1:
        return {"rope_type": "default", "rope_theta": base}
    out = {"rope_type": "proportional", "partial_rotary_factor": fraction, "rope_theta": base}
    return out if factor == 1 else {**out, "factor": factor}


def _refuse_unsupported(c: dict, path) -> None:
    for key in ("use_bidirectional_attention", "is_embedding_model"):
        if bool_setting(path, c, key, False):
            raise UnsupportedModelError(path, f"{key}=true: an embedding backbone, not a causal LM")
    if not bool_setting(path, c, "use_sliding_window_attention", True):
        raise UnsupportedModelError(path, "use_sliding_window_attention=false has no Gemma 4 HF equivalent")
    if c.get("attention_logit_soft_cap") is not None:
        raise UnsupportedModelError(path, "attention_logit_soft_cap: Gemma 4 has no attention soft-cap")


def gemma4_text_config(c: dict, path, specials: dict, drafter: bool = False) -> dict:
    """HF `gemma4_text` config for a Gemma4Backbone's `config` object (see the module docstring);
    `drafter`: an assistant's stack, every layer KV-shared (keras_gemma4_assistant.py)."""
    _refuse_unsupported(c, path)
    layers = int_setting(path, c, "num_layers", limit=1024)
    head_dim = int_setting(path, c, "head_dim", limit=4096)
    global_dim = _int(path, c, "global_head_dim", head_dim, limit=4096)
    global_kv = c.get("num_global_key_value_heads")
    shared = _int(path, c, "num_kv_shared_layers", 0, minimum=0, limit=layers)
    if (shared == layers) != drafter:
        raise UnsupportedModelError(path, "num_kv_shared_layers equals num_layers: an MTP assistant drafter "
                                          "(its keys and values come from another model), read from its task "
                                          "preset (task.json)" if not drafter else
                                    "an assistant drafter's backbone must share every layer's keys and values")
    vocab = int_setting(path, c, "vocabulary_size", limit=1 << 22)
    moe = bool_setting(path, c, "enable_moe_block", False)
    per_layer = _int(path, c, "hidden_size_per_layer_input", 0, minimum=0, limit=1 << 16)
    cfg: dict[str, Any] = {
        "architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text",
        "vocab_size": vocab,
        "hidden_size": int_setting(path, c, "hidden_dim", limit=1 << 16),
        "intermediate_size": int_setting(path, c, "intermediate_dim", limit=1 << 21),
        "num_hidden_layers": layers,
        "num_attention_heads": int_setting(path, c, "num_query_heads", limit=1024),
        "num_key_value_heads": int_setting(path, c, "num_key_value_heads", limit=1024),
        "head_dim": head_dim, "global_head_dim": global_dim,
        # keras-hub: num_global_key_value_heads set <=> K = V on global layers (Gemma4TextAttention)
        "attention_k_eq_v": global_kv is not None,
        "num_global_key_value_heads": None if global_kv is None
        else int_setting(path, c, "num_global_key_value_heads", limit=1024),
        "layer_types": _layer_types(c, path, layers),
        "sliding_window": int_setting(path, c, "sliding_window_size", 512, limit=1 << 31),
        "rope_parameters": {FULL: _rope(c, path, FULL, global_dim), SLIDING: _rope(c, path, SLIDING, head_dim)},
        "final_logit_softcapping": float_setting(path, c, "final_logit_soft_cap", None, optional=True),
        "rms_norm_eps": float_setting(path, c, "layer_norm_epsilon", 1e-6),
        "hidden_activation": "gelu_pytorch_tanh",  # Gemma4TextDecoderBlock: gelu(approximate=True)
        "num_kv_shared_layers": shared,
        "hidden_size_per_layer_input": per_layer,
        "vocab_size_per_layer_input": 0 if drafter else _int(path, c, "vocab_size_per_layer_input", vocab,
                                                             limit=1 << 22),
        "use_double_wide_mlp": bool_setting(path, c, "use_double_wide_mlp", False),
        "use_bidirectional_attention": "vision" if bool_setting(path, c, "use_vision_bidirectional_attention",
                                                                False) else None,
        "enable_moe_block": moe,
        "num_experts": int_setting(path, c, "num_experts", limit=1 << 20) if moe else None,
        "top_k_experts": _int(path, c, "num_experts_per_token", 8, limit=1 << 20) if moe else None,
        "moe_intermediate_size": int_setting(path, c, "expert_intermediate_dim", limit=1 << 21) if moe else None,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "attention_bias": False, "tie_word_embeddings": True,
        "bos_token_id": specials["bos"], "eos_token_id": specials["eos"], "pad_token_id": specials["pad"],
        "torch_dtype": "float32",
    }
    return cfg


def _block_variables(cfg: dict, i: int, shared: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Block i's Keras dataset paths -> (HF name, Keras shape)."""
    h, n, f = cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"]
    full = cfg["layer_types"][i] == FULL
    d = cfg["global_head_dim"] if full else cfg["head_dim"]
    k = cfg["num_global_key_value_heads"] if full and cfg["attention_k_eq_v"] else cfg["num_key_value_heads"]
    f *= 2 if shared and cfg["use_double_wide_mlp"] else 1
    block = {
        "vars/0": ("layer_scalar", ()),
        "pre_attention_norm/vars/0": ("input_layernorm.weight", (h,)),
        "post_attention_norm/vars/0": ("post_attention_layernorm.weight", (h,)),
        "pre_ffw_norm/vars/0": ("pre_feedforward_layernorm.weight", (h,)),
        "post_ffw_norm/vars/0": ("post_feedforward_layernorm.weight", (h,)),
        "attention/query_dense/vars/0": ("self_attn.q_proj.weight", (n, h, d)),
        "attention/query_norm/vars/0": ("self_attn.q_norm.weight", (d,)),
        "attention/output_dense/vars/0": ("self_attn.o_proj.weight", (n, d, h)),
        "gating_ffw/vars/0": ("mlp.gate_proj.weight", (h, f)),
        "gating_ffw_2/vars/0": ("mlp.up_proj.weight", (h, f)),
        "ffw_linear/vars/0": ("mlp.down_proj.weight", (f, h)),
    }
    if not shared:
        block["attention/key_dense/vars/0"] = ("self_attn.k_proj.weight", (k, h, d))
        block["attention/key_norm/vars/0"] = ("self_attn.k_norm.weight", (d,))
        if not (full and cfg["attention_k_eq_v"]):
            block["attention/value_dense/vars/0"] = ("self_attn.v_proj.weight", (k, h, d))
    p = cfg["hidden_size_per_layer_input"]
    if p:
        block["per_layer_input_gate/vars/0"] = ("per_layer_input_gate.weight", (h, p))
        block["per_layer_up_proj/vars/0"] = ("per_layer_projection.weight", (p, h))
        block["post_per_layer_input_norm/vars/0"] = ("post_per_layer_input_norm.weight", (h,))
    if cfg["enable_moe_block"]:
        e, m = cfg["num_experts"], cfg["moe_intermediate_size"]
        block.update({
            "post_ffw_norm_dense/vars/0": ("post_feedforward_layernorm_1.weight", (h,)),
            "pre_ffw_norm_moe/vars/0": ("pre_feedforward_layernorm_2.weight", (h,)),
            "post_ffw_norm_moe_path/vars/0": ("post_feedforward_layernorm_2.weight", (h,)),
            "moe_router/vars/0": ("router.scale", (h,)),
            "moe_router/proj/vars/0": ("router.proj.weight", (h, e)),
            "moe_expert_bank/vars/0": ("experts.gate", (e, h, m)),  # joined with up below
            "moe_expert_bank/vars/1": ("experts.up", (e, h, m)),
            "moe_expert_bank/vars/2": ("experts.down_proj", (e, m, h)),
            "moe_expert_bank/vars/3": ("router.per_expert_scale", (e,)),
        })
    prefix = _BLOCK + (f"_{i}" if i else "")
    return {f"{prefix}/{sub}": (f"model.layers.{i}.{hf}", shape) for sub, (hf, shape) in block.items()}


def gemma4_variables(cfg: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Keras dataset path -> (HF name, Keras shape) for the whole text backbone."""
    h, layers, p = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["hidden_size_per_layer_input"]
    out = {"layers/reversible_embedding/vars/0": ("model.embed_tokens.weight", (cfg["vocab_size"], h))}
    # keras names layers by class in creation order: the per-layer norm is made before the final one
    final_norm = "layers/rms_normalization_1/vars/0" if p else "layers/rms_normalization/vars/0"
    out[final_norm] = ("model.norm.weight", (h,))
    if p:
        out["layers/embedding/vars/0"] = ("model.embed_tokens_per_layer.weight",
                                          (cfg["vocab_size_per_layer_input"], layers * p))
        out["layers/dense/vars/0"] = ("model.per_layer_model_projection.weight", (h, layers * p))
        out["layers/rms_normalization/vars/0"] = ("model.per_layer_projection_norm.weight", (p,))
    first_shared = layers - cfg["num_kv_shared_layers"]
    for i in range(layers):
        out.update(_block_variables(cfg, i, i >= first_shared))
    return out


def _to_hf(name: str, a: np.ndarray) -> np.ndarray:
    if name.endswith("layer_scalar"):
        return a.reshape(1)  # HF's buffer is [1]; keras-hub's a scalar
    if name.endswith(("router.proj.weight", "per_layer_model_projection.weight", "per_layer_input_gate.weight",
                      "per_layer_projection.weight")):
        return a.T  # Keras Dense kernels are [in, out]
    if name.endswith(("experts.gate", "experts.up", "experts.down_proj")):
        return a.transpose(0, 2, 1)  # [E, in, out] -> HF's [E, out, in]
    return to_hf_layout(name, a)  # attention kernels and the MLP (keras_common)


def _join_experts(weights: dict[str, np.ndarray]) -> None:
    """gate [E,I,H] and up [E,I,H] -> HF's experts.gate_up_proj [E,2I,H], gate rows first."""
    for name in [k for k in weights if k.endswith(".experts.gate")]:
        base = name[: -len("gate")]
        weights[base + "gate_up_proj"] = np.concatenate([weights.pop(name), weights.pop(base + "up")], axis=1)


def _vision_config(c: dict, path) -> dict | None:
    """HF `gemma4_vision` config of the backbone's Gemma4VisionEncoder, or None without one."""
    v, where = encoder_settings(c, path, "vision_encoder", "Gemma4VisionEncoder"), f"{path} (vision_encoder)"
    if v is None:
        return None
    if int_setting(where, v, "output_dim", limit=1 << 16) != int_setting(path, c, "hidden_dim", limit=1 << 16):
        raise ConfigError(path, "the vision encoder's output_dim must equal the decoder's hidden_dim")
    heads = int_setting(where, v, "num_heads", limit=1024)
    return {
        "model_type": "gemma4_vision",
        "hidden_size": int_setting(where, v, "hidden_dim", limit=1 << 16),
        "intermediate_size": int_setting(where, v, "intermediate_dim", limit=1 << 20),
        "num_hidden_layers": int_setting(where, v, "num_layers", limit=1024),
        "num_attention_heads": heads,
        "num_key_value_heads": _int(where, v, "num_key_value_heads", heads, limit=1024),
        "head_dim": int_setting(where, v, "head_dim", limit=4096),
        "hidden_activation": "gelu_pytorch_tanh",  # Gemma4VisionDecoderBlock: gelu(approximate=True)
        "rms_norm_eps": float_setting(where, v, "layer_norm_epsilon", 1e-6),  # the output norm's too, as HF
        "rope_parameters": {"rope_type": "axial", "rope_theta": float_setting(where, v, "rope_max_wavelength", 100.0)},
        "pooling_kernel_size": int_setting(where, v, "pool_size", 3, limit=64),
        "patch_size": int_setting(where, v, "patch_size", limit=1024),
        "position_embedding_size": int_setting(where, v, "position_embedding_size", 1024, limit=1 << 20),
        "use_clipped_linears": bool_setting(where, v, "use_clipped_linears", True),
        "standardize": bool_setting(where, v, "standardize", False),
    }


# keras-hub's Gemma4Tokenizer pieces -> transformers' Gemma4Config id fields
_MEDIA_PIECES = {"image_token_id": "<|image|>", "boi_token_id": "<|image>", "eoi_token_id": "<image|>",
                 "video_token_id": "<|video|>", "audio_token_id": "<|audio|>", "boa_token_id": "<|audio>",
                 "eoa_token_index": "<audio|>"}


def gemma4_config(text: dict, vision: dict | None, audio: dict | None, tokenizer_model: bytes,
                  tokenizer_path) -> dict:
    """HF `gemma4` (Gemma4ForConditionalGeneration) config: the text config, the towers', the media ids."""
    tok = GemmaTokenizer(tokenizer_model)
    ids = {key: tok.piece_to_id(piece) for key, piece in _MEDIA_PIECES.items()}
    needed = {"images": ("image_token_id", "boi_token_id", "eoi_token_id") if vision else (),
              "audio": ("audio_token_id", "boa_token_id", "eoa_token_index") if audio else ()}
    for media, keys in needed.items():
        for key in keys:
            if ids[key] is None:
                raise TokenizerError(tokenizer_path, f"the vocabulary has no {_MEDIA_PIECES[key]} piece: this "
                                                     f"preset cannot take {media}")
    return {
        "architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
        "text_config": {k: v for k, v in text.items() if k not in ("architectures", "torch_dtype")},
        "vision_config": vision, "audio_config": audio, **{k: v for k, v in ids.items() if v is not None},
        "tie_word_embeddings": True, "torch_dtype": "float32",
    }


def vision_variables(v: dict, text_hidden: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Keras dataset path -> (HF name, Keras shape) for the vision tower and its embedder."""
    d, f, hd, p = v["hidden_size"], v["intermediate_size"], v["head_dim"], v["patch_size"]
    n, k, tower = v["num_attention_heads"], v["num_key_value_heads"], "model.vision_tower"
    enc, out = f"{_VISION}/gemma4_vision_encoder_block", f"{_VISION}/gemma4_vision_output"
    found = {
        f"{enc}/patch_embedder/input_proj/vars/0": (f"{tower}.patch_embedder.input_proj.weight", (3 * p * p, d)),
        f"{enc}/patch_embedder/vars/0": (f"{tower}.patch_embedder.position_embedding_table",
                                         (2, v["position_embedding_size"], d)),
        f"{out}/vision_input_projection/vars/0": ("model.embed_vision.embedding_projection.weight", (d, text_hidden)),
    }
    if v["standardize"]:
        found[f"{out}/vars/0"] = (f"{tower}.std_bias", (d,))
        found[f"{out}/vars/1"] = (f"{tower}.std_scale", (d,))
    dense = {"attention/query_dense": ("self_attn.q_proj", (n, d, hd)), "attention/key_dense": ("self_attn.k_proj", (k, d, hd)),
             "attention/value_dense": ("self_attn.v_proj", (k, d, hd)),
             "attention/output_dense": ("self_attn.o_proj", (n, hd, d)),
             "gating_ffw": ("mlp.gate_proj", (d, f)), "gating_ffw_2": ("mlp.up_proj", (d, f)),
             "ffw_linear": ("mlp.down_proj", (f, d))}
    norms = {"pre_attention_norm": ("input_layernorm", d), "post_attention_norm": ("post_attention_layernorm", d),
             "pre_ffw_norm": ("pre_feedforward_layernorm", d), "post_ffw_norm": ("post_feedforward_layernorm", d),
             "attention/query_norm": ("self_attn.q_norm", hd), "attention/key_norm": ("self_attn.k_norm", hd)}
    for i in range(v["num_hidden_layers"]):
        block, hf = f"{enc}/encoder_blocks/gemma4_vision_decoder_block" + (f"_{i}" if i else ""), \
            f"{tower}.encoder.layers.{i}"
        for sub, (name, width) in norms.items():
            found[f"{block}/{sub}/vars/0"] = (f"{hf}.{name}.weight", (width,))
        for sub, (name, shape) in dense.items():
            found[f"{block}/{sub}/dense/vars/0"] = (f"{hf}.{name}.linear.weight", shape)
            if v["use_clipped_linears"]:  # Gemma4ClippableEinsumDense's scalar bounds, in this order
                for j, bound in enumerate(("input_min", "input_max", "output_min", "output_max")):
                    found[f"{block}/{sub}/vars/{j}"] = (f"{hf}.{name}.{bound}", ())
    return found


def _vision_to_hf(name: str, a: np.ndarray) -> np.ndarray:
    if name.endswith(("_min", "_max")):
        return a.reshape(())  # a clip bound: a scalar, as HF's buffers
    if name.endswith(("input_proj.weight", "embedding_projection.weight")) or ".mlp." in name and a.ndim == 2:
        return a.T  # Keras kernels are [in, out]
    if name.endswith(("q_proj.linear.weight", "k_proj.linear.weight", "v_proj.linear.weight")):
        return to_hf_layout("q_proj.weight", a)  # [heads, in, head_dim] -> [heads * head_dim, in]
    if name.endswith("o_proj.linear.weight"):
        return to_hf_layout("o_proj.weight", a)  # [heads, head_dim, out] -> [out, heads * head_dim]
    return a


def read_gemma4_preset(
    folder: str, top: dict, *, progress: Callable[[int, int, str], None] | None = None
) -> Checkpoint:
    """Read a Gemma4Backbone preset folder whose parsed config.json is `top`."""
    config_path, keras_cfg, vocab = backbone_header(folder, top)
    tokenizer_model, specials, _ = read_tokenizer(folder, vocab)
    text = gemma4_text_config(keras_cfg, config_path, specials)
    vision = _vision_config(keras_cfg, config_path)
    audio = audio_config(keras_cfg, config_path, text["hidden_size"])
    cfg = text if vision is None and audio is None else gemma4_config(
        text, vision, audio, tokenizer_model, os.path.join(folder, "assets", "tokenizer", "vocabulary.spm"))
    MODELS[cfg["model_type"]].ModelArgs.from_dict(cfg, config_path)  # refuse what the model would refuse
    extra = {} if audio is None else _processor_files(folder)

    expected = gemma4_variables(text)
    if cfg is not text:  # the text model under Gemma4ForConditionalGeneration's prefix, and the towers
        expected = {k: ("model.language_model." + hf[len("model."):], shape) for k, (hf, shape) in expected.items()}
    if vision is not None:
        expected.update(vision_variables(vision, text["hidden_size"]))
    if audio is not None:
        expected.update(audio_variables(audio, text["hidden_size"]))
    names = {k: hf for k, (hf, _) in expected.items()}
    variables, dtypes = read_variables(
        folder, {k: shape for k, (_, shape) in expected.items()}, "Gemma 4",
        None if progress is None else (lambda done, total, name: progress(done, total, names[name])))
    weights = {names[k]: np.asarray(_layout(names[k])(names[k], v), order="C") for k, v in variables.items()}  # C order, 0-d kept
    del variables
    _join_experts(weights)
    generation = generation_config(specials["bos"], specials["eos"], specials["pad"], *stop_ids(tokenizer_model))
    source = next(iter(dtypes)) if len(dtypes) == 1 else (dtype_name(keras_cfg) or "float32")
    return Checkpoint(cfg, weights, tokenizer_model, generation, source=Path(folder), source_dtype=source,
                      metadata=keras_cfg, extra_files=extra)


def _layout(name: str) -> Callable[[str, np.ndarray], np.ndarray]:
    """The Keras -> HF layout function for HF weight `name`: the vision tower's, the audio tower's, the text's."""
    if ".vision_tower." in name or ".embed_vision." in name:
        return _vision_to_hf
    return audio_to_hf if is_audio_weight(name) else _to_hf


def _processor_files(folder: str) -> dict[str, bytes]:
    """processor_config.json with the preset's audio converter as transformers' feature extractor
    (none without audio_converter.json: the extractor's defaults apply), checked as loading reads it."""
    extractor = feature_extractor(folder)
    if extractor is None:
        return {}
    return {"processor_config.json": (json.dumps({"feature_extractor": extractor}, indent=2) + "\n").encode()}
