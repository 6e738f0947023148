"""`PaliGemmaBackbone`: keras-hub's PaliGemma backbone interface over an mlx_gemma PaliGemma model.

Built from keras-hub's arguments it makes a randomly initialised model of that
shape (the decoder a Gemma, or with post norms a Gemma 2); `from_preset` loads
weights; `from_model` wraps a loaded one.  Calling it gives keras-hub's output:
the final-normed hidden states of the image tokens followed by the text tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..convert.keras_paligemma import paligemma_config_to_hf
from ..errors import MlxGemmaError
from ..loading import load_config, load_model
from ..models import GemmaModel
from .backbone import as_dtype, random_model
from .pali_gemma_presets import pali_handle
from .presets import is_keras_preset, keras_backbone_config, resolve_preset


class PaliGemmaBackbone:
    """keras_hub.models.PaliGemmaBackbone's constructor (keras-hub 0.32's arguments), random weights.

    `dtype` defaults to float32, keras' default policy; `dropout` is kept, inference never drops.
    """

    def __init__(self, vocabulary_size: int, image_size: int, num_layers: int, num_query_heads: int,
                 num_key_value_heads: int, hidden_dim: int, intermediate_dim: int, head_dim: int,
                 vit_patch_size: int, vit_num_heads: int, vit_hidden_dim: int, vit_num_layers: int,
                 vit_intermediate_dim: int | None = None, vit_pooling=None, vit_classifier_activation=None,
                 vit_name=None, query_head_dim_normalize: bool = True, use_post_ffw_norm: bool = False,
                 use_post_attention_norm: bool = False, attention_logit_soft_cap: float | None = None,
                 final_logit_soft_cap: float | None = None, use_sliding_window_attention: bool = False,
                 sliding_window_size: int = 4096, layer_norm_epsilon: float = 1e-6, dropout: float = 0.0,
                 dtype=None):
        arguments = {k: v for k, v in locals().items() if k not in ("self", "dtype", "vit_name")}  # keras' names
        # No "<image>" piece in the vocabulary: its placeholder id is the first one past it,
        # as the converter gives keras-hub presets (keras-hub itself needs none).
        config = paligemma_config_to_hf(arguments, None, {}, image_token_id=vocabulary_size)  # typed errors
        self.model = random_model(config, dtype)

    @classmethod
    def from_model(cls, model) -> PaliGemmaBackbone:
        """Wrap a loaded mlx_gemma PaliGemma model (e.g. from `mlx_gemma.load`)."""
        if not isinstance(model, GemmaModel) or model.image_input is None:
            raise MlxGemmaError(f"not a PaliGemma model: {type(model).__name__} (use GemmaBackbone for text models)")
        backbone = cls.__new__(cls)
        backbone.model = model
        return backbone

    @classmethod
    def from_preset(cls, preset: str | os.PathLike, load_weights: bool = True, dtype=None) -> PaliGemmaBackbone:
        """A preset name, hf:// or kaggle:// handle, or folder; `load_weights=False`: random
        weights of a named preset's shape (of a folder's config for folders), nothing downloaded."""
        entry, handle = pali_handle(preset)
        if load_weights:
            return cls.from_model(load_model(resolve_preset(handle), dtype=as_dtype(dtype)))
        if entry is not None:
            return cls.from_model(random_model(entry.config, dtype))
        if isinstance(handle, (str, os.PathLike)) and _path(handle).is_dir() and is_keras_preset(_path(handle)):
            return cls(**keras_backbone_config(_path(handle)), dtype=dtype)  # from its arguments: no conversion
        return cls.from_model(random_model(load_config(resolve_preset(handle)), dtype))

    # ----- keras-hub's attributes, read from the model's config -------------------------

    @property
    def args(self):
        return self.model.args

    vocabulary_size = property(lambda self: self.args.vocab_size)
    image_size = property(lambda self: self.args.vision.image_size)
    image_sequence_length = property(lambda self: self.args.num_image_tokens)
    num_layers = property(lambda self: self.args.text.num_hidden_layers)
    num_query_heads = property(lambda self: self.args.text.num_attention_heads)
    num_key_value_heads = property(lambda self: self.args.text.num_key_value_heads)
    hidden_dim = property(lambda self: self.args.text.hidden_size)
    intermediate_dim = property(lambda self: 2 * self.args.text.intermediate_size)  # keras-hub's convention
    head_dim = property(lambda self: self.args.text.head_dim)
    vit_patch_size = property(lambda self: self.args.vision.patch_size)
    vit_num_heads = property(lambda self: self.args.vision.num_attention_heads)
    vit_hidden_dim = property(lambda self: self.args.vision.hidden_size)
    vit_num_layers = property(lambda self: self.args.vision.num_hidden_layers)
    vit_intermediate_dim = property(lambda self: self.args.vision.intermediate_size)
    token_embedding = property(lambda self: self.model.decoder.embed_tokens)
    transformer_layers = property(lambda self: self.model.layers)
    layer_norm = property(lambda self: self.model.decoder.norm)

    @property
    def dtype(self) -> mx.Dtype:
        return self.token_embedding.weight.dtype

    def count_params(self) -> int:
        # Shapes only: nothing is evaluated, so this is free even for unrealised random weights.
        return sum(v.size for _, v in tree_flatten(self.model.parameters()))

    def __call__(self, inputs: dict) -> mx.array:
        """{"images" [B, S, S, 3] in [-1, 1], "token_ids" [B, T], "padding_mask" [B, T], optional
        "response_mask" [B, T]} -> final-normed hidden states [B, image tokens + T, hidden].

        As keras-hub: image, and prompt tokens (padding_mask and not response_mask) are seen
        by every query; response tokens causally.  Without a response_mask the padding is
        seen causally too (keras-hub's mask is prompt-or-causal).
        """
        if not isinstance(inputs, dict) or any(k not in inputs for k in ("images", "token_ids", "padding_mask")):
            raise MlxGemmaError("PaliGemmaBackbone takes a dict with 'images', 'token_ids' and 'padding_mask'")
        ids = mx.array(inputs["token_ids"]).astype(mx.int32)
        valid = mx.array(inputs["padding_mask"]).astype(mx.bool_)
        pixels = mx.array(inputs["images"]).astype(mx.float32)
        if ids.ndim != 2 or valid.shape != ids.shape or pixels.ndim != 4 or pixels.shape[0] != ids.shape[0]:
            raise MlxGemmaError(f"token_ids {ids.shape} and padding_mask {valid.shape} must be [B, T] and images "
                                f"{pixels.shape} [B, S, S, 3]")
        B, N = ids.shape[0], self.image_sequence_length
        slots = mx.full((B, N), self.args.image_token_index, dtype=mx.int32)
        full_ids = mx.concatenate([slots, ids], axis=1)
        response = inputs.get("response_mask")
        if response is None:
            prefix = N + valid.astype(mx.int32).sum(axis=1)
            return self.model.model(full_ids, pixel_values=pixels, prefix_length=prefix)
        response = mx.array(response).astype(mx.bool_)
        prefix = N + (valid & ~response).astype(mx.int32).sum(axis=1)  # the prompt leads each row
        key_valid = mx.concatenate([mx.ones((B, N), dtype=mx.bool_), valid], axis=1)
        return self.model.model(full_ids, padding_mask=key_valid, pixel_values=pixels, prefix_length=prefix)


def _path(handle):
    return Path(handle).expanduser()
