"""What the image-and-text models share (PaliGemma, Gemma 3 with images): weight names in
every layout found on the hub, and the contract's methods (base.GemmaModel) over a wrapper whose
`model` holds the decoder stack as `language_model` and SigLIP as `vision_tower`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .base import Block
from .decoder import DecoderStack
from .kv_cache import KVCacheOptions, make_layer_caches
from .layers import softcap

# Weight-name prefixes of the other layouts -> ours (first match wins).  Original
# checkpoints and mlx-vlm say `language_model.model.`; transformers 5 writes the
# vision tower without SigLIP's `vision_model.` level.
LAYOUT_PREFIXES = (
    ("model.language_model.", "model.language_model."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("language_model.", "model.language_model."),
    ("model.vision_tower.vision_model.", "model.vision_tower.vision_model."),
    ("model.vision_tower.", "model.vision_tower.vision_model."),
    ("vision_tower.vision_model.", "model.vision_tower.vision_model."),
    ("vision_tower.", "model.vision_tower.vision_model."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def canonical_key(key: str) -> str:
    """A weight name in any Hugging Face / mlx-vlm layout -> ours."""
    for old, new in LAYOUT_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


class ImageTextLM(nn.Module):
    """The contract's methods shared by the image-and-text models; each subclass sets `args`
    (with `tie_word_embeddings`, `final_logit_softcapping`, `head_dim`), `model` and, untied, `lm_head`."""

    audio_input = None  # images only, no audio tower (base.GemmaModel)
    share = None  # the whole model in this process (base.GemmaModel; mlx_gemma.distributed sets a rank's)

    def logits(self, hidden: mx.array) -> mx.array:
        """Output logits for hidden states [..., hidden] (a final soft-cap where the decoder has one)."""
        if self.args.tie_word_embeddings:
            out = self.model.language_model.embed_tokens.as_linear(hidden)
        else:
            out = self.lm_head(hidden)
        return softcap(out, self.args.final_logit_softcapping)

    @property
    def decoder(self) -> DecoderStack:
        return self.model.language_model

    @property
    def layers(self) -> list[Block]:
        return self.model.language_model.layers

    @property
    def windows(self) -> list[int | None]:
        return [layer.window for layer in self.layers]

    def make_cache(self, left_padding: mx.array | None = None, options: KVCacheOptions | None = None, **kv):
        """Per-layer KV caches, shaped by `options` (or its fields as keywords: max_kv_size=...)."""
        return make_layer_caches(self.windows, left_padding, KVCacheOptions.of(options, **kv), self.args.head_dim)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Any Hugging Face / mlx-vlm layout -> ours; drop what we recompute or share."""
        out = {canonical_key(k): v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)  # the same tensor as the embedding
        return self.model.vision_tower.sanitize(out, prefix="model.vision_tower.")
