"""Read a keras-hub `PaliGemmaBackbone` preset (PaliGemma 1 and 2) into Hugging Face-format pieces.

The decoder is keras-hub's Gemma decoder under other names, so its config and
variables go through the Gemma mapping (`keras_common.py`, described in `keras.py`); this file adds the ViT and the
projector.  What keras-hub 0.32 does (`keras_hub/src/models/pali_gemma/
pali_gemma_backbone.py`, `pali_gemma_vit.py`, `pali_gemma_decoder_block.py`),
checked numerically against keras-hub by tests/test_convert_keras_paligemma.py:

* The backbone concatenates the ViT's output (after the `image_classifier`
  Dense: the projector) *before* the scaled token embeddings; the Hugging Face
  layout of the same sequence puts `<image>` placeholders there.  Image
  embeddings are not scaled, as in transformers.
* HDF5 variables (Keras 3 names them by class: the projector is
  `pali_gemma_vit/layers/dense`), Keras shape -> HF name [HF shape]:

      .../vision_embeddings/patch_embedding/vars/0,1   [P,P,C,D] (HWIO) -> patch_embedding [D,C,P,P]
      .../vision_embeddings/position_embedding/vars/0  [N,D]   position_embedding
      .../pali_gemma_vit_encoder_block[_i]/attn/{query,key,value,out}_proj/vars/0,1
                                                       [D,D] (in, out) -> self_attn.{q,k,v,out}_proj [out, in]
      .../layer_norm_1, layer_norm_2 /vars/0,1         gamma, beta -> layer_norm1/2 weight, bias
      .../mlp_dense_1, mlp_dense_2 /vars/0,1           -> mlp.fc1, mlp.fc2 (transposed)
      .../encoder_layer_norm/vars/0,1                  -> post_layernorm
      pali_gemma_vit/layers/dense/vars/0,1             [D,H] -> multi_modal_projector.linear [H,D]
      pali_gemma_decoder_block[_i]/...                 as keras.py's gemma_decoder_block[_i]

* The ViT: attention scaled by head_dim ** -0.5, tanh-approximate GELU, LayerNorm
  eps 1e-6 everywhere (hard-coded), as SigLIP.  `vit_pooling` and
  `vit_classifier_activation` must be null (PaliGemma feeds every patch through
  a linear projector); `vit_intermediate_dim` null means 4304, as keras-hub reads it.
* Prefix-LM: keras-hub lets every query see the prompt (image + text) and the
  response causally; its Gemma 2 sliding window is a band |q - k| < window laid
  over that mask, as `models/layers.build_mask` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UnsupportedModelError
from ..models.paligemma import ModelArgs
from ..tokenizer import GemmaTokenizer
from .checkpoint import Checkpoint, generation_config
from .keras_common import (
    backbone_header,
    decoder_variables, dtype_name, int_setting, keras_config_to_hf, read_tokenizer, to_hf_layout,
)
from .keras_h5 import read_variables

_TEXT_KEYS_DROPPED = ("architectures", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype")
_VIT = "layers/pali_gemma_vit/layers/pali_gemma_vit_encoder"
_TOWER = "model.vision_tower.vision_model"


def paligemma_config_to_hf(c: dict, path, special_ids: dict, image_token_id: int) -> dict:
    """HF PaliGemma config dict for a PaliGemmaBackbone's `config` object."""
    text = keras_config_to_hf(c, path, special_ids=special_ids)
    for key in ("vit_pooling", "vit_classifier_activation"):
        if c.get(key) is not None:
            raise UnsupportedModelError(
                path, f"{key}={c[key]!r:.80}: PaliGemma's ViT has no pooling and a linear projector")
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": int_setting(path, c, "vit_hidden_dim", limit=1 << 16),
        "intermediate_size": int_setting(path, c, "vit_intermediate_dim", 4304, limit=1 << 20),  # keras-hub: null -> 4304
        "num_hidden_layers": int_setting(path, c, "vit_num_layers", limit=1024),
        "num_attention_heads": int_setting(path, c, "vit_num_heads", limit=1024),
        "image_size": int_setting(path, c, "image_size", limit=1 << 14),
        "patch_size": int_setting(path, c, "vit_patch_size", limit=1 << 14),
        "num_channels": 3,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "projection_dim": text["hidden_size"],
        "vision_use_head": False,
    }
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "model_type": "paligemma",
        "text_config": {k: v for k, v in text.items() if k not in _TEXT_KEYS_DROPPED},
        "vision_config": vision,
        "image_token_index": image_token_id,
        "projection_dim": text["hidden_size"],
        "hidden_size": text["hidden_size"],
        "vocab_size": text["vocab_size"],
        "tie_word_embeddings": True,
        "bos_token_id": text["bos_token_id"],
        "eos_token_id": text["eos_token_id"],
        "pad_token_id": text["pad_token_id"],
        "torch_dtype": "float32",
    }


def _vision_expected(vision: dict, text_hidden: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Keras dataset path -> (HF name, Keras shape) for the ViT and the projector."""
    d, f, p, c = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"], vision["num_channels"]
    n = (vision["image_size"] // p) ** 2
    emb, hf_emb = f"{_VIT}/vision_embeddings", f"{_TOWER}.embeddings"
    out = {
        f"{emb}/patch_embedding/vars/0": (f"{hf_emb}.patch_embedding.weight", (p, p, c, d)),
        f"{emb}/patch_embedding/vars/1": (f"{hf_emb}.patch_embedding.bias", (d,)),
        f"{emb}/position_embedding/vars/0": (f"{hf_emb}.position_embedding.weight", (n, d)),
        f"{_VIT}/encoder_layer_norm/vars/0": (f"{_TOWER}.post_layernorm.weight", (d,)),
        f"{_VIT}/encoder_layer_norm/vars/1": (f"{_TOWER}.post_layernorm.bias", (d,)),
        "layers/pali_gemma_vit/layers/dense/vars/0": ("model.multi_modal_projector.linear.weight", (d, text_hidden)),
        "layers/pali_gemma_vit/layers/dense/vars/1": ("model.multi_modal_projector.linear.bias", (text_hidden,)),
    }
    block = {
        "attn/query_proj": ("self_attn.q_proj", (d, d)),
        "attn/key_proj": ("self_attn.k_proj", (d, d)),
        "attn/value_proj": ("self_attn.v_proj", (d, d)),
        "attn/out_proj": ("self_attn.out_proj", (d, d)),
        "layer_norm_1": ("layer_norm1", None),
        "layer_norm_2": ("layer_norm2", None),
        "mlp_dense_1": ("mlp.fc1", (d, f)),
        "mlp_dense_2": ("mlp.fc2", (f, d)),
    }
    for i in range(vision["num_hidden_layers"]):
        prefix = f"{_VIT}/resblocks/pali_gemma_vit_encoder_block" + (f"_{i}" if i else "")
        for sub, (hf, shape) in block.items():
            bias = (shape[1],) if shape else (d,)
            out[f"{prefix}/{sub}/vars/0"] = (f"{_TOWER}.encoder.layers.{i}.{hf}.weight", shape or (d,))
            out[f"{prefix}/{sub}/vars/1"] = (f"{_TOWER}.encoder.layers.{i}.{hf}.bias", bias)
    return out


def _text_expected(text: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The Gemma decoder's map (keras_common.py) under PaliGemma's names: `pali_gemma_decoder_block`, `model.language_model.`."""
    return {
        k.replace("layers/gemma_decoder_block", "layers/pali_gemma_decoder_block"):
            (hf.replace("model.", "model.language_model.", 1), shape)
        for k, (hf, shape) in decoder_variables(text).items()
    }


def _vision_to_hf_layout(hf_name: str, a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:
        return a.transpose(3, 2, 0, 1)  # Keras HWIO -> torch OIHW (the model's sanitize makes it OHWI)
    if a.ndim == 2 and "position_embedding" not in hf_name:
        return a.T  # Keras Dense kernels are [in, out]
    return a


def read_paligemma_preset(
    folder: str, top: dict, *, progress: Callable[[int, int, str], None] | None = None
) -> Checkpoint:
    """Read a PaliGemmaBackbone preset folder whose parsed config.json is `top`."""
    config_path, keras_cfg, vocab = backbone_header(folder, top)
    tokenizer_model, specials, end_of_turn = read_tokenizer(folder, vocab)
    tokenizer = GemmaTokenizer(tokenizer_model)
    # Google's PaliGemma vocabulary has no <image> piece (keras-hub needs none: it puts the
    # image embeddings first); transformers' processor appends it after the last piece.
    image_token_id = tokenizer.image_token_id
    if image_token_id is None:
        image_token_id = tokenizer.vocab_size
    cfg = paligemma_config_to_hf(keras_cfg, config_path, specials, image_token_id)
    ModelArgs.from_dict(cfg, config_path)  # refuse what the model would refuse, before reading weights

    expected = {**_text_expected(cfg["text_config"]), **_vision_expected(cfg["vision_config"], cfg["hidden_size"])}
    names = {k: hf for k, (hf, _) in expected.items()}
    variables, dtypes = read_variables(
        folder, {k: shape for k, (_, shape) in expected.items()}, "PaliGemma",
        None if progress is None else (lambda done, total, name: progress(done, total, names[name])))
    weights = {}
    for k, v in variables.items():
        hf = names[k]
        v = _vision_to_hf_layout(hf, v) if hf.startswith(("model.vision_tower", "model.multi_modal")) \
            else to_hf_layout(hf, v)
        weights[hf] = np.ascontiguousarray(v)
    del variables

    generation = generation_config(specials["bos"], specials["eos"], specials["pad"], end_of_turn)
    source = next(iter(dtypes)) if len(dtypes) == 1 else (dtype_name(keras_cfg) or "float32")
    return Checkpoint(cfg, weights, tokenizer_model, generation, source=Path(folder), source_dtype=source,
                      metadata=keras_cfg)
