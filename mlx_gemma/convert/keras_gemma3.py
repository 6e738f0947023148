"""Read a keras-hub `Gemma3Backbone` preset (Gemma 3 text, or with its `Gemma3VisionEncoder`) into HF-format pieces.

What keras-hub 0.32 does (`keras_hub/src/models/gemma3/gemma3_backbone.py`,
`gemma3_decoder_block.py`, `gemma3_attention.py`, `gemma3_vision_encoder.py`,
`gemma3_layers.py`; its HF <-> Keras map `keras_hub/src/utils/transformers/convert_gemma3.py`),
checked numerically against keras-hub by tests/test_convert_keras_gemma3_vlm.py:

* The decoder is keras.py's Gemma 2 mapping under `gemma3_decoder_block[_i]`, plus
  `attention/query_norm`, `attention/key_norm` -> `self_attn.q_norm`, `k_norm` (RMSNorm `1 + w`).
  Unlike Gemma 1/2, `intermediate_dim` *is* HF's `intermediate_size` (`gate_dim_reduction=1`).
* Layer kinds and RoPE are fixed in the backbone, not in the config: layer i is local when
  `use_sliding_window_attention and i % 6 < 5` (base 10,000, `local_rope_scaling_factor`),
  else global (base 1,000,000, `global_rope_scaling_factor`); a factor divides the positions
  (`RotaryEmbedding(scaling_factor=...)`), HF's "linear" RoPE.  We write them as
  `layer_types` and `rope_parameters`.  The band |q - k| < window is HF's `sliding_window`.
* `query_head_dim_normalize` True scales queries by head_dim ** -0.5, False by
  (hidden // heads) ** -0.5 (`Gemma3Attention._compute_attention`): HF's `query_pre_attn_scalar`.
  keras-hub 0.32 itself ignores the flag (`Gemma3DecoderBlock` hands its attention
  `query_head_dim_normalize=True`), as for Gemma 2 (keras.py): we follow the config, which is
  Google's training code (the `gemma` package's Gemma3_27B uses
  `BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS`, 1/sqrt(5376 // 32); keras-hub's own converter
  from Google's checkpoints writes the flag false for it) and transformers (query_pre_attn_scalar
  168).  So a 27B preset's logits differ from keras-hub's (which uses 1/sqrt(128)); the other
  Gemma 3 sizes (270M to 12B, query_pre_attn_scalar == head_dim) set the flag true and agree.
* keras-hub vs transformers on the *same HF weights* (keras-hub's `convert_gemma3.py` loading
  an HF folder): it drops `layer_types` / `sliding_window_pattern` (the backbone fixes i % 6 < 5),
  `rope_theta` / `rope_local_base_freq` (fixed 1M / 10k) and the pooling (`pool_size=4`, right
  only for a 64 x 64 patch grid).  Published checkpoints have exactly those values, so they
  agree; tiny test configs do not: on tests' tiny Gemma 3 VLM (layers s,s,f,s, a 4 x 4 grid
  pooled to 4) keras-hub's logits differ from transformers' by 65% of the largest logit, 9%
  with our layer kinds set to keras-hub's (the rest: one pooled token per image instead of 4).
  We read a Keras preset as keras-hub builds it (these fixed values) and an HF folder as
  transformers does; where they meet on real weights, both agree with Google's `gemma` package.
* Vision (`layers/gemma3_vision_encoder/layers/...`), Keras shape -> HF name [HF shape]:

      gemma3_vision_encoder_block/vision_embeddings/patch_embedding/vars/0,1  [P,P,C,D] HWIO -> [D,C,P,P]
      .../position_embedding/vars/0                     [N,D]  position_embedding
      .../resblocks/gemma3_vision_encoder_layer[_i]/attn/{query,key,value,out}_proj  [in,out] -> [out,in]
      .../layer_norm_1, layer_norm_2, mlp_dense_1, mlp_dense_2   -> layer_norm1/2, mlp.fc1/fc2
      gemma3_vision_encoder_block/encoder_layer_norm    -> post_layernorm
      gemma3_vision_output/vision_soft_embedding_norm   -> multi_modal_projector.mm_soft_emb_norm
      gemma3_vision_output/vision_input_projection      [D,H] -> mm_input_projection_weight [D,H] (as is:
                                                         HF multiplies by the bare matrix, x @ W)

  keras-hub average-pools the patch grid by `pool_size` (stride = size) to
  ((image // patch) // pool) ** 2 soft tokens: HF's `mm_tokens_per_image`.  Its ViT layer
  norms are fixed at eps 1e-6; the encoder's `layer_norm_epsilon` reaches only the soft
  embedding norm, while HF gives `layer_norm_eps` to both, so only 1e-6 is accepted.
* Image features replace keras-hub's `<img>` placeholder embeddings unscaled (the text
  embeddings are scaled by sqrt(hidden) before `Gemma3InterleaveEmbeddings` scatters them in);
  each image's placeholders attend to one another both ways, as transformers' token_type_ids
  mask and Google's `gemma` package: our `gemma3_vlm` model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConfigError, TokenizerError, UnsupportedModelError
from ..models import MODELS
from ..tokenizer import GemmaTokenizer
from .checkpoint import Checkpoint, generation_config
from .keras_common import (
    backbone_header,
    DEFAULT_MAX_POSITION_EMBEDDINGS, bool_setting, decoder_variables, dtype_name, float_setting, int_setting,
    read_tokenizer, to_hf_layout,
)
from .keras_h5 import read_variables

LOCAL_BASE, GLOBAL_BASE = 10_000.0, 1_000_000.0  # Gemma3Backbone: rope_wavelength by layer kind
_ENCODER = "layers/gemma3_vision_encoder/layers"
_TOWER = "model.vision_tower.vision_model"
_TEXT = "model.language_model"
_VISION_CLASS = "Gemma3VisionEncoder"


def _rope(base: float, factor: float) -> dict:
    return {"rope_type": "default", "rope_theta": base} if factor == 1 else \
        {"rope_type": "linear", "rope_theta": base, "factor": factor}


def gemma3_text_config(c: dict, path) -> dict:
    """HF `gemma3_text` config for a Gemma3Backbone's `config` object (see the module docstring)."""
    for key in ("use_bidirectional_attention", "is_embedding_model"):
        if bool_setting(path, c, key, False):
            raise UnsupportedModelError(path, f"{key}=true: an embedding backbone (EmbeddingGemma), not a causal LM")
    for key in ("use_post_ffw_norm", "use_post_attention_norm", "use_query_key_norm"):
        if not bool_setting(path, c, key, key == "use_query_key_norm"):
            raise UnsupportedModelError(path, f"{key}=false: Gemma 3 as HF defines it has this norm")
    layers = int_setting(path, c, "num_layers", limit=1024)
    heads = int_setting(path, c, "num_query_heads", limit=1024)
    kv_heads = int_setting(path, c, "num_key_value_heads", limit=1024)
    hidden = int_setting(path, c, "hidden_dim", limit=1 << 16)
    head_dim = int_setting(path, c, "head_dim", limit=4096)
    if heads % kv_heads:
        raise ConfigError(path, f"num_query_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    sliding = bool_setting(path, c, "use_sliding_window_attention", False)
    local = float_setting(path, c, "local_rope_scaling_factor", 1.0)
    global_ = float_setting(path, c, "global_rope_scaling_factor", 1.0)
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": int_setting(path, c, "vocabulary_size", limit=1 << 22),
        "hidden_size": hidden,
        "intermediate_size": int_setting(path, c, "intermediate_dim", limit=1 << 21),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": DEFAULT_MAX_POSITION_EMBEDDINGS,
        "rms_norm_eps": float_setting(path, c, "layer_norm_epsilon", 1e-6),
        # Gemma3Attention: 1/sqrt(head_dim), or 1/sqrt(hidden // heads) when the flag is off.
        "query_pre_attn_scalar": head_dim if bool_setting(path, c, "query_head_dim_normalize", True)
        else hidden // heads,
        "attn_logit_softcapping": float_setting(path, c, "attention_logit_soft_cap", None, optional=True),
        "final_logit_softcapping": float_setting(path, c, "final_logit_soft_cap", None, optional=True),
        "sliding_window": int_setting(path, c, "sliding_window_size", 1024, limit=1 << 31),
        "layer_types": ["sliding_attention" if sliding and i % 6 < 5 else "full_attention" for i in range(layers)],
        "rope_theta": GLOBAL_BASE,
        "rope_local_base_freq": LOCAL_BASE,
        "rope_parameters": {"full_attention": _rope(GLOBAL_BASE, global_),
                            "sliding_attention": _rope(LOCAL_BASE, local)},
        "attention_bias": False,
        "use_bidirectional_attention": False,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def _vision_settings(c: dict, path) -> tuple[dict, int] | None:
    """(HF `siglip_vision_model` config, soft tokens per image) of the backbone's vision encoder, or None."""
    enc = c.get("vision_encoder")
    if enc is None:
        return None
    if not isinstance(enc, dict) or not isinstance(enc.get("config"), dict):
        raise ConfigError(path, "vision_encoder must be null or a serialized Gemma3VisionEncoder")
    name = enc.get("class_name")
    if name != _VISION_CLASS:
        raise UnsupportedModelError(path, f"vision_encoder class {name!r:.80} is not {_VISION_CLASS}")
    v = enc["config"]
    size = int_setting(path, v, "image_size", limit=1 << 14)
    patch = int_setting(path, v, "patch_size", limit=1 << 14)
    pool = int_setting(path, v, "pool_size", 14, limit=1 << 14)
    if size % patch or (size // patch) % pool:
        raise UnsupportedModelError(
            path, f"image_size {size}, patch_size {patch}, pool_size {pool}: the patch grid must divide "
            "exactly (HF pools the whole grid; keras-hub's valid pooling would drop the remainder)")
    if float_setting(path, v, "layer_norm_epsilon", 1e-6) != 1e-6:
        raise UnsupportedModelError(path, "vision layer_norm_epsilon other than 1e-6 has no HF equivalent "
                                    "(keras-hub gives it to the soft embedding norm only)")
    if c.get("image_size") not in (None, size):
        raise ConfigError(path, f"image_size {c.get('image_size')!r:.80} differs from the vision encoder's {size}")
    hidden = int_setting(path, v, "hidden_dim", limit=1 << 16)
    if int_setting(path, v, "output_dim", limit=1 << 16) != int_setting(path, c, "hidden_dim", limit=1 << 16):
        raise ConfigError(path, "the vision encoder's output_dim must equal the decoder's hidden_dim")
    vision = {
        "model_type": "siglip_vision_model", "hidden_size": hidden,
        "intermediate_size": int_setting(path, v, "intermediate_dim", limit=1 << 20),
        "num_hidden_layers": int_setting(path, v, "num_layers", limit=1024),
        "num_attention_heads": int_setting(path, v, "num_heads", limit=1024),
        "image_size": size, "patch_size": patch, "num_channels": 3, "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6, "vision_use_head": False,
    }
    return vision, ((size // patch) // pool) ** 2


def _image_ids(tokenizer: GemmaTokenizer, path) -> dict[str, int]:
    """`<start_of_image>`, `<end_of_image>` and the placeholder: keras-hub's `<img>` (Gemma3Tokenizer)."""
    ids = {}
    for key, pieces in (("boi_token_index", ("<start_of_image>",)), ("eoi_token_index", ("<end_of_image>",)),
                        ("image_token_index", ("<img>", "<image_soft_token>"))):
        found = [i for i in map(tokenizer.piece_to_id, pieces) if i is not None]
        if not found:
            raise TokenizerError(path, f"the vocabulary has no {pieces[0]} piece: this preset cannot take images")
        ids[key] = found[0]
    return ids


def gemma3_config_to_hf(c: dict, path, specials: dict, tokenizer: GemmaTokenizer, tokenizer_path) -> dict:
    """HF config: `gemma3_text`, or `gemma3` (Gemma3ForConditionalGeneration) with a vision encoder."""
    text = gemma3_text_config(c, path)
    ids = {"bos_token_id": specials["bos"], "eos_token_id": specials["eos"], "pad_token_id": specials["pad"]}
    vision = _vision_settings(c, path)
    if vision is None:
        return {**text, **ids}
    vision_cfg, soft_tokens = vision
    return {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {k: v for k, v in text.items() if k not in ("architectures", "torch_dtype")},
        "vision_config": vision_cfg, "mm_tokens_per_image": soft_tokens,
        **_image_ids(tokenizer, tokenizer_path), "tie_word_embeddings": True, **ids, "torch_dtype": "float32",
    }


def _decoder_expected(text: dict, prefix: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Keras dataset path -> (HF name, Keras shape): keras_common's Gemma 2 map under keras-hub's
    `gemma3_decoder_block[_i]` and HF's `prefix`, plus the query / key norms."""
    out = {
        k.replace("layers/gemma_decoder_block", "layers/gemma3_decoder_block", 1): (prefix + hf[len("model"):], shape)
        for k, (hf, shape) in decoder_variables({**text, "model_type": "gemma2"}).items()
    }
    for i in range(text["num_hidden_layers"]):
        keras_block = "layers/gemma3_decoder_block" + (f"_{i}" if i else "")
        for keras_norm, hf in (("query_norm", "q_norm"), ("key_norm", "k_norm")):
            out[f"{keras_block}/attention/{keras_norm}/vars/0"] = (f"{prefix}.layers.{i}.self_attn.{hf}.weight",
                                                                  (text["head_dim"],))
    return out


def _vision_expected(vision: dict, text_hidden: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Keras dataset path -> (HF name, Keras shape) for the SigLIP tower and the projector."""
    d, f, p = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    enc, out_layer = f"{_ENCODER}/gemma3_vision_encoder_block", f"{_ENCODER}/gemma3_vision_output"
    out = {
        f"{enc}/vision_embeddings/patch_embedding/vars/0": (f"{_TOWER}.embeddings.patch_embedding.weight",
                                                            (p, p, 3, d)),
        f"{enc}/vision_embeddings/patch_embedding/vars/1": (f"{_TOWER}.embeddings.patch_embedding.bias", (d,)),
        f"{enc}/vision_embeddings/position_embedding/vars/0": (
            f"{_TOWER}.embeddings.position_embedding.weight", ((vision["image_size"] // p) ** 2, d)),
        f"{enc}/encoder_layer_norm/vars/0": (f"{_TOWER}.post_layernorm.weight", (d,)),
        f"{enc}/encoder_layer_norm/vars/1": (f"{_TOWER}.post_layernorm.bias", (d,)),
        f"{out_layer}/vision_soft_embedding_norm/vars/0": ("model.multi_modal_projector.mm_soft_emb_norm.weight",
                                                           (d,)),
        f"{out_layer}/vision_input_projection/vars/0": ("model.multi_modal_projector.mm_input_projection_weight",
                                                        (d, text_hidden)),
    }
    block = {"attn/query_proj": ("self_attn.q_proj", (d, d)), "attn/key_proj": ("self_attn.k_proj", (d, d)),
             "attn/value_proj": ("self_attn.v_proj", (d, d)), "attn/out_proj": ("self_attn.out_proj", (d, d)),
             "layer_norm_1": ("layer_norm1", (d,)), "layer_norm_2": ("layer_norm2", (d,)),
             "mlp_dense_1": ("mlp.fc1", (d, f)), "mlp_dense_2": ("mlp.fc2", (f, d))}
    for i in range(vision["num_hidden_layers"]):
        layer = f"{enc}/resblocks/gemma3_vision_encoder_layer" + (f"_{i}" if i else "")
        for sub, (hf, shape) in block.items():
            out[f"{layer}/{sub}/vars/0"] = (f"{_TOWER}.encoder.layers.{i}.{hf}.weight", shape)
            out[f"{layer}/{sub}/vars/1"] = (f"{_TOWER}.encoder.layers.{i}.{hf}.bias", (shape[-1],))
    return out


def _to_hf(hf_name: str, a: np.ndarray) -> np.ndarray:
    if hf_name.startswith(_TOWER):
        if a.ndim == 4:
            return a.transpose(3, 2, 0, 1)  # Keras HWIO -> torch OIHW (the model's sanitize makes it OHWI)
        return a.T if a.ndim == 2 and "position_embedding" not in hf_name else a  # Dense: [in, out]
    if hf_name.startswith("model.multi_modal_projector"):
        return a  # HF's mm_input_projection_weight is [vision, text], as the Keras kernel
    return to_hf_layout(hf_name, a)


def read_gemma3_preset(
    folder: str, top: dict, *, progress: Callable[[int, int, str], None] | None = None
) -> Checkpoint:
    """Read a Gemma3Backbone preset folder whose parsed config.json is `top`."""
    config_path, keras_cfg, vocab = backbone_header(folder, top)
    tokenizer_model, specials, end_of_turn = read_tokenizer(folder, vocab)
    cfg = gemma3_config_to_hf(keras_cfg, config_path, specials, GemmaTokenizer(tokenizer_model),
                              os.path.join(folder, "assets", "tokenizer", "vocabulary.spm"))
    MODELS[cfg["model_type"]].ModelArgs.from_dict(cfg, config_path)  # refuse what the model would refuse

    multimodal = cfg["model_type"] == "gemma3"
    text = cfg["text_config"] if multimodal else cfg
    expected = _decoder_expected(text, _TEXT if multimodal else "model")
    if multimodal:
        expected.update(_vision_expected(cfg["vision_config"], text["hidden_size"]))
    names = {k: hf for k, (hf, _) in expected.items()}
    variables, dtypes = read_variables(
        folder, {k: shape for k, (_, shape) in expected.items()}, "Gemma 3",
        None if progress is None else (lambda done, total, name: progress(done, total, names[name])))
    weights = {names[k]: np.ascontiguousarray(_to_hf(names[k], v)) for k, v in variables.items()}
    del variables
    generation = generation_config(specials["bos"], specials["eos"], specials["pad"], end_of_turn)
    source = next(iter(dtypes)) if len(dtypes) == 1 else (dtype_name(keras_cfg) or "float32")
    return Checkpoint(cfg, weights, tokenizer_model, generation, source=Path(folder), source_dtype=source,
                      metadata=keras_cfg)
