"""PaliGemma 1 and 2: SigLIP + a linear projector + a Gemma (1) or Gemma 2 (2) decoder.

The image's patch features, projected to the decoder's width, replace the
embeddings of the `<image>` placeholder tokens (as many as patches), and the
decoder runs as a prefix-LM: the prompt (image tokens, `<bos>`, the text and
its "\\n") attends to itself in both directions, generated tokens causally.

Weight names follow Hugging Face's current layout (`model.vision_tower...`,
`model.multi_modal_projector.linear`, `model.language_model.layers...`,
`lm_head`); `sanitize` also takes the original `language_model.model...` layout
(mlx-vlm's too) and transformers 5's, whose vision tower lacks `vision_model.`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import ConfigError
from . import gemma, gemma2
from ..json_input import json_type
from .base import ImageInput
from .config import parse_config
from .decoder import DecoderStack
from .image_blocks import embed_with_images
from .image_text import ImageTextLM, canonical_key  # noqa: F401  (canonical_key: PaliGemma's names, re-exported)
from .siglip import VisionArgs, VisionModel

# text_config.model_type -> the decoder that PaliGemma generation uses.
TEXT_MODELS = {"gemma": gemma, "gemma2": gemma2}

# transformers' PaliGemmaConfig fills these into a text_config that omits them
# (PaliGemma 1 3B's Gemma 2B); So400m's vision defaults live in VisionArgs.
TEXT_DEFAULTS = {
    "model_type": "gemma", "hidden_size": 2048, "num_hidden_layers": 18, "intermediate_size": 16384,
    "num_attention_heads": 8, "num_key_value_heads": 1, "vocab_size": 257152,
}

@dataclass
class ModelArgs:
    text_config: dict[str, Any] = field(default_factory=dict)
    vision_config: dict[str, Any] = field(default_factory=dict)
    model_type: str = "paligemma"
    image_token_index: int = 256000  # the `<image>` placeholder's id (alias: image_token_id)
    projection_dim: int | None = None  # must equal the decoder's width
    tie_word_embeddings: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # keys we keep but do not interpret

    @classmethod
    def from_dict(cls, config: dict, path=None, where: str = "") -> "ModelArgs":
        for key in ("text_config", "vision_config") if isinstance(config, dict) else ():
            if config.get(key) is not None and not isinstance(config[key], dict):
                raise ConfigError(path, f"a paligemma config needs text_config and vision_config objects; "
                                        f"{key} is {json_type(config[key])}")
        args = parse_config(cls, config, path, where)
        if "image_token_id" in args.extra and "image_token_index" not in config:
            args.image_token_index = args.extra["image_token_id"]  # transformers' attribute_map alias
        text = {**TEXT_DEFAULTS, **args.text_config, "tie_word_embeddings": args.tie_word_embeddings}
        if not isinstance(text["model_type"], str) or text["model_type"] not in TEXT_MODELS:
            raise ConfigError(
                path, f"text_config.model_type {text['model_type']!r} is not a PaliGemma decoder; "
                f"expected one of {sorted(TEXT_MODELS)}"
            )
        # Set after construction, not dataclass fields: parse_config must never fill them.
        args.text_module = TEXT_MODELS[text["model_type"]]
        args.text = args.text_module.ModelArgs.from_dict(text, path, "text_config.")
        args.vision = VisionArgs.from_dict(args.vision_config, path)
        width = args.projection_dim or args.vision_config.get("projection_dim") or args.text.hidden_size
        if width != args.text.hidden_size:
            raise ConfigError(
                path, f"projection_dim {width} differs from text_config.hidden_size {args.text.hidden_size}: "
                "image features could not replace token embeddings"
            )
        ti = args.image_token_index
        if isinstance(ti, bool) or not isinstance(ti, int) or not 0 <= ti < 1 << 31:
            raise ConfigError(path, f"image_token_index must be a non-negative integer, got {ti!r}")
        return args

    # The contract's fields (base.GemmaArgs) that belong to the decoder, delegated to it.
    vocab_size = property(lambda self: self.text.vocab_size)
    max_position_embeddings = property(lambda self: self.text.max_position_embeddings)
    hidden_size = property(lambda self: self.text.hidden_size)
    head_dim = property(lambda self: self.text.head_dim)
    attn_logit_softcapping = property(lambda self: self.text.attn_logit_softcapping)
    final_logit_softcapping = property(lambda self: self.text.final_logit_softcapping)

    @property
    def num_image_tokens(self) -> int:
        """`<image>` placeholders per image: one per SigLIP patch."""
        return self.vision.num_patches


class Projector(nn.Module):
    """SigLIP width -> decoder width (transformers' PaliGemmaMultiModalProjector)."""

    def __init__(self, vision_width: int, text_width: int):
        super().__init__()
        self.linear = nn.Linear(vision_width, text_width)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x)


class PaliGemmaModel(nn.Module):
    """Token ids (+ pixels) -> the decoder's normed last hidden state [B, T, hidden]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.vision_tower = VisionModel(args.vision)
        self.multi_modal_projector = Projector(args.vision.hidden_size, args.text.hidden_size)
        self.language_model = DecoderStack(args.text, args.text_module.TransformerBlock)

    def image_features(self, pixel_values: mx.array) -> mx.array:  # [N, H, W, C] -> [N, patches, hidden]
        # Not multiplied by the text embedding scale: transformers 5 scales inside the
        # embedding layer (GemmaTextScaledWordEmbedding) and scatters the features in after.
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed(self, input_ids: mx.array, pixel_values: mx.array | None = None) -> mx.array:
        """Scaled token embeddings with the image features at the `<image>` positions."""
        return embed_with_images(self.language_model, input_ids, self.args.image_token_index, self.image_features,
                                 pixel_values, "<image>")

    def __call__(
        self,
        input_ids: mx.array,  # [B, T], with `<image>` placeholders where the patches go
        cache=None,
        padding_mask: mx.array | None = None,  # bool [B, T], True = real token; no cache
        pixel_values: mx.array | None = None,  # [N, H, W, C] in [-1, 1]
        prefix_length: mx.array | int | None = None,  # leading tokens attending bidirectionally
    ) -> mx.array:
        B, T = input_ids.shape
        h = self.embed(input_ids, pixel_values)
        if prefix_length is None and (cache is None or cache[0].offset == 0):
            # A call that starts a sequence holds the prompt: all of it is prefix (the
            # reference processor gives the prompt token_type_ids 0); later calls are suffix.
            prefix_length = T
        if isinstance(prefix_length, int):
            prefix_length = mx.full((B,), prefix_length, dtype=mx.int32)
        # transformers numbers PaliGemma's positions from 1, we from 0: RoPE scores depend
        # only on relative positions, so the logits agree.
        return self.language_model(
            None, cache, padding_mask=padding_mask, input_embeddings=h, prefix_length=prefix_length
        )


class Model(ImageTextLM):
    """PaliGemma: `model(input_ids, pixel_values=None, cache=None, padding_mask=None) -> logits [B, T, V]`.

    The contract (base.GemmaModel) over a Gemma / Gemma 2 decoder that also takes images.

    `pixel_values` are NHWC in [-1, 1] (see `mlx_gemma.vision`).  Without
    `prefix_length`, the first call of a sequence is all prefix (the prompt) and
    later cached calls are causal (generated text); give it to score a prompt and
    an answer in one call.
    """

    # The converter quantizes the language model only: the vision tower is a small
    # part (0.4B of 3B-28B weights), its MLP width 4304 is no multiple of 64-wide
    # groups, and its rounding error would reach all 256-4096 image tokens of every prompt.
    float_prefixes = ("model.vision_tower.", "model.multi_modal_projector.")
    prefix_lm = True  # generation must prefill the whole prompt in one call

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type: str = args.model_type
        self.path = None  # set by `loading.load_model` to the folder it read
        self.image_input = ImageInput(args.vision.image_size, args.num_image_tokens, args.image_token_index)
        self.model = PaliGemmaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.text.hidden_size, args.text.vocab_size, bias=False)

    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        cache=None,
        padding_mask: mx.array | None = None,
        prefix_length: mx.array | int | None = None,
    ) -> mx.array:
        return self.logits(self.model(input_ids, cache, padding_mask, pixel_values, prefix_length))
