"""Gemma 3 with images (`model_type: "gemma3"` with a `vision_config`; transformers'
`Gemma3ForConditionalGeneration`): SigLIP + a pooling projector + the Gemma 3 text stack.

Each image goes through SigLIP (896 px, 14 px patches: a 64 x 64 grid in the released
models), its patch grid is average-pooled to `mm_tokens_per_image` soft tokens (16 x 16),
normed (Gemma RMSNorm, `1 + w`) and projected by a bare matrix to the text width.  The
features replace the embeddings of the `<image_soft_token>` placeholders, which the
prompt holds as `"\\n\\n<start_of_image>"`, the soft tokens, `"<end_of_image>\\n\\n"`
(see `mlx_gemma.vision`).  The decoder is Gemma 3's, causal with its sliding windows,
and the soft tokens of one image also attend to each other both ways (models/image_blocks.py).

Without images this is exactly the Gemma 3 text model, so a multimodal checkpoint also
serves text prompts.  Weight names: Hugging Face's current layout (`model.language_model.*`,
`model.vision_tower.vision_model.*`, `model.multi_modal_projector.*`, `lm_head`); `sanitize`
also takes the original `language_model.model.*` / `vision_tower.*` / `multi_modal_projector.*`
layout, which mlx-vlm's Gemma 3 folders use too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..arguments import is_integer
from ..errors import ConfigError, ImageError
from ..json_input import json_type
from . import gemma3
from .base import ImageInput
from .config import parse_config
from .decoder import DecoderStack
from .image_blocks import embed_with_images, image_block_ids
from .image_text import ImageTextLM
from .layers import RMSNorm
from .siglip import VisionArgs, VisionModel

# transformers' Gemma3Config aliases (attribute_map): a config may spell the ids either way.
ALIASES = {"image_token_id": "image_token_index", "boi_token_id": "boi_token_index", "eoi_token_id": "eoi_token_index"}


@dataclass
class ModelArgs:
    text_config: dict[str, Any] = field(default_factory=dict)  # the language model's settings (gemma3_text)
    vision_config: dict[str, Any] = field(default_factory=dict)  # SigLIP's settings (siglip_vision_model)
    model_type: str = "gemma3"  # as config.json names the architecture
    mm_tokens_per_image: int = 256  # soft tokens per image after pooling: a square (16 x 16)
    boi_token_index: int = 255_999  # `<start_of_image>`, before each image's soft tokens
    eoi_token_index: int = 256_000  # `<end_of_image>`, after them
    image_token_index: int = 262_144  # `<image_soft_token>`: the placeholder the features replace
    tie_word_embeddings: bool | None = None  # None: as text_config says (default True, no lm_head)
    extra: dict[str, Any] = field(default_factory=dict)  # keys we keep but do not interpret

    @classmethod
    def from_dict(cls, config: dict, path=None, where: str = "") -> "ModelArgs":
        for key in ("text_config", "vision_config") if isinstance(config, dict) else ():
            if not isinstance(config.get(key), dict):
                raise ConfigError(path, f"a gemma3 vision-language config needs text_config and vision_config "
                                        f"objects; {key} is {json_type(config.get(key))}")
        args = parse_config(cls, config, path, where)
        for alias, name in ALIASES.items():
            if alias in args.extra and name not in config:
                setattr(args, name, args.extra[alias])
        if args.tie_word_embeddings is None:
            args.tie_word_embeddings = bool(args.text_config.get("tie_word_embeddings", True))
        text = {**args.text_config, "model_type": "gemma3_text", "tie_word_embeddings": args.tie_word_embeddings}
        # Set after construction, not dataclass fields: parse_config must never fill them.
        args.text = gemma3.ModelArgs.from_dict(text, path, "text_config.")
        args.vision = VisionArgs.from_dict(args.vision_config, path)
        args.check(path)
        return args

    def check(self, path) -> None:
        """Refuse ids and pooling shapes the model could not use."""
        for name in ("image_token_index", "boi_token_index", "eoi_token_index"):
            v = getattr(self, name)
            if not is_integer(v) or not 0 <= v < 1 << 31:
                raise ConfigError(path, f"{name} must be a non-negative integer, got {v!r:.80}")
        n = self.mm_tokens_per_image
        side = math.isqrt(n) if is_integer(n) and n > 0 else 0
        grid = self.vision.image_size // self.vision.patch_size
        if side * side != n or grid % side:
            raise ConfigError(path, f"mm_tokens_per_image must be a square whose side divides the patch grid "
                                    f"({grid} x {grid}); got {n!r:.80}")

    # The contract's fields (base.GemmaArgs) that belong to the decoder, delegated to it.
    vocab_size = property(lambda self: self.text.vocab_size)
    max_position_embeddings = property(lambda self: self.text.max_position_embeddings)
    hidden_size = property(lambda self: self.text.hidden_size)
    head_dim = property(lambda self: self.text.head_dim)
    num_key_value_heads = property(lambda self: self.text.num_key_value_heads)  # a prompt cache's shape
    attn_logit_softcapping = property(lambda self: self.text.attn_logit_softcapping)
    final_logit_softcapping = property(lambda self: self.text.final_logit_softcapping)


class Projector(nn.Module):
    """SigLIP patches [N, grid^2, Dv] -> soft tokens [N, mm_tokens_per_image, Dt]
    (transformers' Gemma3MultiModalProjector): average pooling, RMSNorm(1 + w), a bare matrix."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.grid = args.vision.image_size // args.vision.patch_size  # patches per side
        self.side = math.isqrt(args.mm_tokens_per_image)  # soft tokens per side
        self.mm_soft_emb_norm = RMSNorm(args.vision.hidden_size, args.vision.layer_norm_eps)
        self.mm_input_projection_weight = mx.zeros((args.vision.hidden_size, args.text.hidden_size))

    def __call__(self, x: mx.array) -> mx.array:
        N, _, D = x.shape
        k = self.grid // self.side  # pooling kernel = stride (AvgPool2d)
        # Row-major patches, as the reference's reshape to [N, D, grid, grid]; mean over each k x k cell.
        pooled = x.reshape(N, self.side, k, self.side, k, D).mean(axis=(2, 4))
        normed = self.mm_soft_emb_norm(pooled.reshape(N, self.side * self.side, D))
        return (normed @ self.mm_input_projection_weight).astype(x.dtype)


class Gemma3VLModel(nn.Module):
    """Token ids (+ pixels) -> the decoder's normed last hidden state [B, T, hidden].

    The soft tokens of an image attend to each other within one call: a caller that feeds a
    prompt in chunks itself keeps each image in one chunk (engine.prefill does), since tokens
    already cached cannot see the later tokens of their image.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.vision_tower = VisionModel(args.vision)
        self.multi_modal_projector = Projector(args)
        self.language_model = DecoderStack(args.text, gemma3.TransformerBlock)

    def image_features(self, pixel_values: mx.array) -> mx.array:  # [N, H, W, C] -> [N, soft tokens, hidden]
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed(self, input_ids: mx.array, pixel_values: mx.array | None = None) -> mx.array:
        """Scaled token embeddings with the image features at the `<image_soft_token>` positions.

        The features are not multiplied by sqrt(hidden): transformers scales inside the
        embedding layer (Gemma3TextScaledWordEmbedding) and scatters the features in after,
        as Google's gemma package merges them after `Embedder.encode`.
        """
        return embed_with_images(self.language_model, input_ids, self.args.image_token_index, self.image_features,
                                 pixel_values, "<image_soft_token>")

    def __call__(
        self,
        input_ids: mx.array,  # [B, T], with `<image_soft_token>` placeholders where the images go
        cache=None,
        padding_mask: mx.array | None = None,  # bool [B, T], True = real token; no cache
        pixel_values: mx.array | None = None,  # [N, H, W, C] in [-1, 1], one per image in the ids
        input_embeddings: mx.array | None = None,  # [B, T, hidden] from `embed` (a prefill chunk's slice)
        intercept=None,  # as DecoderStack's
    ) -> mx.array:
        blocks = None
        if input_ids.shape[1] > 1:
            is_image = input_ids == self.args.image_token_index
            if is_image.any().item():
                if input_embeddings is None and pixel_values is None:
                    raise ImageError("pixel_values", f"input_ids hold {int(is_image.sum().item())} "
                                     "<image_soft_token> tokens but no images were given")
                blocks = image_block_ids(is_image)
        h = self.embed(input_ids, pixel_values) if input_embeddings is None else input_embeddings
        return self.language_model(None, cache, padding_mask=padding_mask, input_embeddings=h,
                                   intercept=intercept, image_blocks=blocks)


class Model(ImageTextLM):
    """Gemma 3 with images: `model(input_ids, pixel_values=None, cache=None, padding_mask=None) -> logits`.

    The contract (base.GemmaModel).  Causal: a prompt may be prefilled in chunks; the engine
    keeps each image's soft tokens in one chunk (engine.prefill), so chunked prefill and
    cached decoding give what one full call gives.
    """

    # The converter quantizes the language model only, as for PaliGemma: the SigLIP tower
    # (0.4B of 4B-27B) and the projector stay float; their rounding error would reach every
    # soft token of every image, and the tower's MLP width 4304 is no multiple of 64.
    float_prefixes = ("model.vision_tower.", "model.multi_modal_projector.")
    prefix_lm = False  # causal throughout; image blocks are kept whole by the engine instead

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type: str = args.model_type
        self.path = None  # set by `loading.load_model` to the folder it read
        self.image_input = ImageInput(args.vision.image_size, args.mm_tokens_per_image, args.image_token_index,
                                      start_id=args.boi_token_index, end_id=args.eoi_token_index)
        self.model = Gemma3VLModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.text.hidden_size, args.text.vocab_size, bias=False)

    def __call__(self, input_ids: mx.array, pixel_values: mx.array | None = None, cache=None,
                 padding_mask: mx.array | None = None) -> mx.array:
        return self.logits(self.model(input_ids, cache, padding_mask, pixel_values))

    def text_model(self) -> gemma3.Model:
        """The language half as a Gemma 3 text model sharing these weights (no copy): what keras-hub's
        text-only presets of the multimodal checkpoints (gemma3_4b_text, ...) are."""
        text = gemma3.Model(self.args.text)  # its fresh random weights stay lazy: replaced before use
        text.model = self.model.language_model
        if not self.args.tie_word_embeddings:
            text.lm_head = self.lm_head
        text.path = self.path
        return text
