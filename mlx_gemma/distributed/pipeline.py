"""Pipeline parallelism: each rank runs a contiguous range of the decoder's layers.

`pipeline(model, group, start, end)` cuts a built (not yet loaded) model down to one rank's
share in place and `PipelineModel` wraps it with the model contract (models/base.py), so the one
decode engine runs unchanged on every rank:

- the decoder stack (decoder.DecoderStack, gemma4.Gemma4Stack) is replaced by a `Stage` that
  keeps only layers start..end-1 (the others are None in the list, so weight names stay
  `layers.<i>.*`); rank 0 embeds (and, for images, runs the towers), the others `recv` the
  hidden states from the rank before, and every rank but the last `send`s its output on;
- the last rank applies the final norm and the head; `PipelineModel.logits` shares its logits
  with an `all_sum` in which the other ranks add zeros (exact: x + 0 = x), so every rank samples
  the same token from the same numbers and runs the same engine loop;
- each rank's caches hold only its layers (`make_cache`).

What travels: [B, T, hidden] per call, plus, for Gemma 4 with per-layer inputs (E2B / E4B),
rank 0's embedded hidden state h0 [B, T, hidden]: each rank holds its own layers' columns of the
per-layer table and rows of its projection (per_layer_split.py) and computes its layers' inputs
from the ids and h0.  (Sending the later layers' inputs instead took (L - start) * P features per
position: E2B split at layer 13, the last cut its KV sharing allows, 1536 + 22 * 256 = 7168
against 2 * 1536 = 3072 now.)
Then [B, vocab] logits (or [B, T, vocab] for a full-sequence call).

Gemma 4's KV-shared layers read the keys and values of an earlier "store" layer in the forward
pass.  We never send K/V: the split points are constrained (sharded_loading.allowed_cuts) so a
shared layer sits on the rank of its store layer.

Hidden states (`model.model(...)`) are the real normed states on the last rank only (the others
get their stage's output); what reads hidden states beyond the head (contrastive search, score, Gemma 4's
assistant drafter) refuses a pipeline of several ranks, on every rank, before anything runs
(`share.hidden_states`, models/base.py).  The ranks also agree, when the model is built, whether any
of them holds quantized layers (`share.quantized`): the default prefill chunk is chosen from it, so a
rank holding only float layers feeds the same chunks as one holding quantized ones (the send / recv
sequence would part otherwise).  A non-last rank's send is made a dependency of its caches, so the
engine's evaluation of the caches between prefill chunks also sends (mlx-lm does the same).
"""

from __future__ import annotations

import inspect

import mlx.core as mx
import mlx.nn as nn

from ..models import gemma4
from ..models.decoder import DecoderStack, layer_mask
from ..models.image_blocks import with_image_blocks
from ..models.base import RankShare
from ..models.kv_cache import KVCacheOptions, SharedKVCache, make_layer_caches
from .watchdog import beat, watch

# Inputs only rank 0 reads (its towers turn them into embeddings); later ranks drop them.
MEDIA_INPUTS = ("pixel_values", "image_positions", "audio_features", "audio_mask")
# Modules of the multimodal wrappers that only rank 0 runs.
TOWERS = ("vision_tower", "multi_modal_projector", "embed_vision", "audio_tower", "embed_audio")


class Stage(nn.Module):
    """One rank's part of a decoder stack: ids (or embeddings, or the previous rank's states) ->
    its layers -> the next rank (or, on the last rank, the final norm)."""

    def __init__(self, stack: nn.Module, group, start: int, end: int, tied: bool):
        super().__init__()
        self.args = stack.args
        object.__setattr__(self, "_group", group)
        self.rank, self.size = group.rank(), group.size()
        self.start, self.end = start, end
        self.first, self.last = self.rank == 0, self.rank == self.size - 1
        self.gemma4 = isinstance(stack, gemma4.Gemma4Stack)
        self.layers = [layer if start <= i < end else None for i, layer in enumerate(stack.layers)]
        self.per_layer = stack.per_layer if self.gemma4 else 0  # P: Gemma 4's per-layer input width
        if self.first or (self.last and tied):  # the input embedding, and the tied head
            self.embed_tokens = stack.embed_tokens
        if self.last:
            self.norm = stack.norm
        if self.per_layer:  # this rank's layers' columns of the table and rows of the projection (unloaded yet)
            width = (end - start) * self.per_layer
            self.embed_tokens_per_layer = nn.Embedding(stack.embed_tokens_per_layer.weight.shape[0], width)
            self.per_layer_model_projection = nn.Linear(self.args.hidden_size, width, bias=False)
            self.per_layer_projection_norm = stack.per_layer_projection_norm
        self.dtype = None  # the activations' dtype, agreed by the ranks after loading (sharded_loading)

    @property
    def local_layers(self) -> list:
        return self.layers[self.start:self.end]

    def embed(self, input_ids: mx.array) -> mx.array:
        """Scaled token embeddings on rank 0; elsewhere a stand-in of their shape that the stage never reads."""
        if self.first:
            return (gemma4.Gemma4Stack if self.gemma4 else DecoderStack).embed(self, input_ids)
        return mx.zeros((*input_ids.shape, self.args.hidden_size), self.dtype or mx.float32)

    def message_width(self) -> int:
        """Features per position sent between ranks: the hidden state, plus (Gemma 4 with per-layer
        inputs) rank 0's embedded hidden state, from which each rank computes its layers' inputs."""
        return self.args.hidden_size * (2 if self.per_layer else 1)

    def __call__(self, input_ids: mx.array | None, cache=None, padding_mask: mx.array | None = None,
                 input_embeddings: mx.array | None = None, prefix_length: mx.array | None = None,
                 intercept=None, image_blocks: mx.array | None = None) -> mx.array:
        beat()  # a forward pass is progress (watchdog.py)
        B, T = input_ids.shape if input_ids is not None else input_embeddings.shape[:2]
        per_layer = h0 = None  # [B, T, this rank's layers, P]; rank 0's embedded state
        if self.first:
            h = h0 = self.embed(input_ids) if input_embeddings is None else input_embeddings
        else:
            got = mx.distributed.recv((B, T, self.message_width()), self.dtype, self.rank - 1, group=self._group)
            h = got[..., : self.args.hidden_size]
            h0 = got[..., self.args.hidden_size:]
        if self.per_layer:  # from this rank's columns / rows of the table and projection (per_layer_split.py)
            per_layer = gemma4.Gemma4Stack.per_layer_inputs(self, input_ids, h0)
        cache = cache or [None] * (self.end - self.start)
        if intercept is not None and self.first:
            h = intercept(h, -1)
        h = self._layers(h, cache, padding_mask, prefix_length, image_blocks, per_layer, intercept)
        if self.last:
            return self.norm(h)
        out = h
        if self.per_layer:  # h0 goes along: every later rank computes its layers' inputs from it
            out = mx.concatenate([h, h0.astype(h.dtype)], axis=-1)
        sent = mx.distributed.send(out, self.rank + 1, group=self._group)
        _tie(cache, sent)
        return sent[..., : self.args.hidden_size]

    def _layers(self, h, cache, padding_mask, prefix_length, image_blocks, per_layer, intercept):
        """This rank's layers over h, each with its window's mask (made once per window, as the stacks do)."""
        masks, shared = {}, {}  # Gemma 4: the last keys/values stored per layer kind
        offset = 0 if cache[0] is None else cache[0].offset  # every local layer's, before this call's update
        for j, (layer, layer_cache) in enumerate(zip(self.local_layers, cache)):
            i = self.start + j
            window = layer.window
            if window not in masks:
                if self.gemma4:
                    masks[window] = layer_mask(h.shape[1], layer_cache, window, padding_mask)
                    # gemma4.Gemma4Stack: an image's tokens see each other on sliding layers only
                    if image_blocks is not None and window is not None:
                        masks[window] = with_image_blocks(masks[window], image_blocks, window, offset)
                else:
                    masks[window] = layer_mask(h.shape[1], layer_cache, window, padding_mask, prefix_length)
                    if image_blocks is not None:  # decoder.DecoderStack: each image's tokens see all of it
                        masks[window] = with_image_blocks(masks[window], image_blocks, window, offset)
            if self.gemma4:
                p = None if per_layer is None else per_layer[:, :, j, :]
                h, kv = layer(h, masks[window], layer_cache, offset, p, shared.get(layer.kind))
                if not layer.self_attn.shared:
                    shared[layer.kind] = kv
            else:
                h = layer(h, masks[window], layer_cache)
            if intercept is not None:
                h = intercept(h, i)
        return h


def _tie(cache: list, sent: mx.array) -> None:
    """Make the last storing cache's arrays depend on `sent`, so evaluating the caches sends."""
    for c in reversed(cache):
        if c is not None and not isinstance(c, SharedKVCache) and c.keys is not None:
            c.keys = tuple(mx.depends(list(c.keys), [sent]))
            return


class Front(nn.Module):
    """A later rank's stand-in for a multimodal wrapper (gemma3_vlm, paligemma, gemma4_mm): the
    media inputs are dropped (rank 0's towers read them) and the embeddings are stand-ins, so the
    wrapper only computes what is made from the ids (image blocks, prefix lengths, masks)."""

    def __init__(self, wrapper: nn.Module):
        super().__init__()
        self.language_model = wrapper.language_model  # weight names as the wrapper's: model.language_model.*
        object.__setattr__(self, "_wrapper", wrapper)  # not a child: its parameters are the stage's
        self._signature = inspect.signature(type(wrapper).__call__)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapper"), name)

    def embed(self, input_ids: mx.array, *args, **kwargs) -> mx.array:
        return self.language_model.embed(input_ids)

    def __call__(self, *args, **kwargs) -> mx.array:
        bound = self._signature.bind(None, *args, **kwargs)
        bound.apply_defaults()
        inputs = dict(bound.arguments)
        inputs.pop(next(iter(self._signature.parameters)))  # self
        for name in MEDIA_INPUTS:
            if name in inputs:
                inputs[name] = None
        if "input_embeddings" in inputs and inputs["input_embeddings"] is None:
            inputs["input_embeddings"] = self.embed(inputs["input_ids"])
        return self._wrapper(**inputs)


def find_stack(model: nn.Module) -> tuple[nn.Module, str]:
    """(the module holding the decoder stack, the stack's attribute name there)."""
    stack = model.decoder
    if model.model is stack:
        return model, "model"
    return model.model, "language_model"


def pipeline(model: nn.Module, group, start: int, end: int) -> Stage:
    """Cut `model` (built, weights not yet loaded) down to layers start..end-1 of rank
    `group.rank()`, in place; returns the stage now holding them."""
    rank, size = group.rank(), group.size()
    parent, name = find_stack(model)
    tied = bool(model.args.tie_word_embeddings)
    stage = Stage(parent[name], group, start, end, tied)
    parent[name] = stage
    if rank > 0 and parent is not model:  # the towers run on rank 0 only
        for tower in TOWERS:
            if tower in parent:
                del parent[tower]
    if rank < size - 1 and "lm_head" in model:
        del model["lm_head"]
    return stage


class PipelineModel(nn.Module):
    """A pipeline rank's model, with the contract of models/base.py (GemmaModel): its `model`
    and `lm_head` are the cut model's (same weight names), `logits` are the last rank's on every rank."""

    def __init__(self, inner: nn.Module, stage: Stage):
        super().__init__()
        object.__setattr__(self, "_inner", inner)  # its children are ours; not a child itself
        self.args = inner.args
        self.model_type = inner.model_type
        self.prefix_lm = inner.prefix_lm
        self.float_prefixes = inner.float_prefixes
        self.image_input = inner.image_input
        self.audio_input = inner.audio_input
        self.path = inner.path
        object.__setattr__(self, "stage", stage)  # reached through `model`; not a second child
        self.model = inner.model if (stage.first or inner.model is stage) else Front(inner.model)
        if "lm_head" in inner:
            self.lm_head = inner.lm_head
        object.__setattr__(self, "group", stage._group)
        self.logits_dtype = None  # agreed by the ranks after loading (sharded_loading)
        self.share = RankShare("pipeline", stage.rank, stage.size, _any_rank_quantized(inner, stage._group))

    def __call__(self, *args, **kwargs) -> mx.array:
        # The architecture's own __call__ (its argument order), run with our model and head.
        return type(self._inner).__call__(self, *args, **kwargs)

    def logits(self, hidden: mx.array) -> mx.array:
        """The last rank's logits, on every rank (an all_sum the other ranks add zeros to)."""
        stage = self.stage
        if stage.last:
            out = self._inner.logits(hidden).astype(self.logits_dtype)
        else:
            out = mx.depends(mx.zeros((*hidden.shape[:-1], self.args.vocab_size), self.logits_dtype), hidden)
        return mx.distributed.all_sum(out, group=self.group)

    @property
    def decoder(self) -> Stage:
        return self.stage

    @property
    def layers(self) -> list:
        """This rank's layers only."""
        return self.stage.local_layers

    @property
    def windows(self) -> list[int | None]:
        return [layer.window for layer in self.layers]

    def make_cache(self, left_padding: mx.array | None = None, options: KVCacheOptions | None = None, **kv):
        """Caches for this rank's layers only (a KV-shared layer's source is on the same rank)."""
        options = KVCacheOptions.of(options, **kv)
        start, end = self.stage.start, self.stage.end
        if self.stage.gemma4:  # as gemma4.Model.make_cache, for layers start..end-1
            a = self.stage.args
            sources = [None if s is None else s - start for s in a.kv_sources()[start:end]]
            shapes = [a.layer_shape(i) for i in range(start, end)]
            return make_layer_caches(self.windows, left_padding, options, shared_from=sources, kv_shapes=shapes)
        return make_layer_caches(self.windows, left_padding, options, self.args.head_dim)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return self._inner.sanitize(weights)


def _any_rank_quantized(model: nn.Module, group) -> bool:
    """Whether any rank's share holds a quantized linear layer (a collective: every rank calls it)."""
    mine = any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    with watch("agreeing on the prefill chunk"):
        count = mx.distributed.all_sum(mx.array([int(mine)], mx.int32), group=group, stream=mx.cpu)
        return count.item() > 0
