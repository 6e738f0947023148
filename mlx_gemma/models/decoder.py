"""The decoder stack and LM head every Gemma text model shares.

A model file supplies its config and its `TransformerBlock` (a `base.Block`: it
declares its attention `window`); this module runs embeddings -> blocks -> final
norm -> tied (or separate) output projection, with one attention mask per window
size, an optional per-block intercept (a hook to read or change the hidden
states; `score` runs its own keras-hub-masked pass), and the cache factory.  `CausalLM` is the shared half of
every text model's `Model`; each model file's subclass declares the rest of the
contract (`base.GemmaModel`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .base import Block
from .image_blocks import with_image_blocks
from .kv_cache import KVCacheOptions, make_layer_caches
from .layers import RMSNorm, build_mask, embedding_scale, softcap


class DecoderStack(nn.Module):
    """Token ids (or embeddings) -> normed last hidden state [B, T, hidden]."""

    def __init__(self, args, block_class):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers: list[Block] = [block_class(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def embed(self, input_ids: mx.array) -> mx.array:
        """Scaled token embeddings, as the first block receives them."""
        h = self.embed_tokens(input_ids)
        return h * embedding_scale(self.args.hidden_size, h.dtype)

    def __call__(
        self,
        input_ids: mx.array | None,  # [B, T]
        cache=None,  # list of per-layer caches, or None for a full-sequence call
        padding_mask: mx.array | None = None,  # bool [B, T], True = real token; no cache
        input_embeddings: mx.array | None = None,  # [B, T, hidden], already scaled
        prefix_length: mx.array | None = None,  # [B]: leading tokens attending bidirectionally
        intercept=None,  # fn(h, i) -> h, called with i = -1 after embedding, then 0..L-1
        image_blocks: mx.array | None = None,  # [B, T]: image block id per token (-1: text); Gemma 3
    ) -> mx.array:
        h = self.embed(input_ids) if input_embeddings is None else input_embeddings
        cache = cache or [None] * len(self.layers)
        masks = {}  # layers with the same window share one mask
        if intercept is not None:
            h = intercept(h, -1)
        for i, (layer, layer_cache) in enumerate(zip(self.layers, cache)):
            window = layer.window  # the block's declared window (base.Block), None: global
            if window not in masks:
                masks[window] = layer_mask(h.shape[1], layer_cache, window, padding_mask, prefix_length)
                if image_blocks is not None:  # each image's tokens also see their whole image
                    offset = 0 if layer_cache is None else layer_cache.offset
                    masks[window] = with_image_blocks(masks[window], image_blocks, window, offset)
            h = layer(h, masks[window], layer_cache)
            if intercept is not None:
                h = intercept(h, i)
        return self.norm(h)


def layer_mask(
    T: int,
    cache,
    window: int | None,
    padding_mask: mx.array | None = None,
    prefix_length: mx.array | None = None,
):
    """The mask for a layer with this `window` (None: global) over T new tokens.

    With a cache, the cache builds it (it knows its key order and padding);
    without one, keys are the T tokens themselves.  Trivial cases return None or
    "causal" so MLX's fused attention can take its fast path.
    """
    if cache is not None:
        if padding_mask is not None:
            raise ValueError(
                "padding_mask goes with a full-sequence call; with a cache, "
                "give the cache its left_padding (model.make_cache(left_padding=...))"
            )
        return cache.make_mask(T, window=window, prefix_length=prefix_length)
    if padding_mask is None and prefix_length is None:
        if T == 1:
            return None
        if window is None or window >= T:
            return "causal"
    positions = mx.arange(T)
    return build_mask(
        positions, positions, window=window, key_valid=padding_mask, prefix_length=prefix_length
    )


class CausalLM(nn.Module):
    """A Gemma causal LM: token ids -> logits [B, T, vocab].

    `model.model` is the decoder stack (the weight names start with `model.`,
    as in Hugging Face and mlx-lm checkpoints); `lm_head` exists only when the
    output projection is not tied to the embedding.
    """

    audio_input = None  # no audio tower (base.GemmaModel)
    share = None  # the whole model in this process (base.GemmaModel; mlx_gemma.distributed sets a rank's)

    def __init__(self, args, block_class):
        super().__init__()
        self.args = args
        self.model_type: str = args.model_type
        self.path = None  # set by `loading.load_model` to the folder it read
        self.model = DecoderStack(args, block_class)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, input_ids: mx.array, cache=None, **kwargs) -> mx.array:
        return self.logits(self.model(input_ids, cache, **kwargs))

    def logits(self, hidden: mx.array) -> mx.array:
        """Output logits for hidden states [..., hidden] (final soft-cap included)."""
        if self.args.tie_word_embeddings:
            out = self.model.embed_tokens.as_linear(hidden)
        else:
            out = self.lm_head(hidden)
        return softcap(out, self.args.final_logit_softcapping)

    @property
    def decoder(self) -> DecoderStack:
        return self.model

    @property
    def layers(self) -> list[Block]:
        return self.model.layers

    @property
    def windows(self) -> list[int | None]:
        """Each layer's attention window (None for global layers)."""
        return [layer.window for layer in self.layers]

    def make_cache(self, left_padding: mx.array | None = None, options: KVCacheOptions | None = None, **kv):
        """Per-layer KV caches, shaped by `options` (or its fields as keywords: max_kv_size=...)."""
        return make_layer_caches(self.windows, left_padding, KVCacheOptions.of(options, **kv), self.args.head_dim)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop what Hugging Face checkpoints carry but we recompute or share."""
        out = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)  # the same tensor as the embedding
        return out
