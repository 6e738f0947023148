"""`score()`: per-token logits or losses for given token ids, with an optional
intervention after the embeddings and after each block (keras-hub's
`GemmaCausalLM.score`).

Gradients flow through it, e.g. of the losses with respect to the
embeddings (keras-hub's TensorFlow example, in MLX):

    def loss_of(delta):  # delta: [B, T, hidden], added to the token embeddings
        fn = lambda x, i: x + delta if i == -1 else x
        return score(model, ids, scoring_mode="loss", target_ids=targets, layer_intercept_fn=fn).sum()

    grads = mx.grad(loss_of)(mx.zeros((B, T, model.args.hidden_size)))

keras-hub pads every batch to a fixed length (XLA needs static shapes); MLX does
not, so by default the trailing columns that are padding in every row are not
computed (see `score`'s `trim_padding`).

Gemma 4 (text) is scored the same way; keras-hub 0.32's Gemma4CausalLM has no
`score`, so there the conventions are Gemma 1-3's: the intercept sees the unscaled
embeddings first (the per-layer inputs read what it returns, scaled, as transformers'
multimodal forward reads `inputs_embeds`), and padding queries attend as in the model's
own forward pass (real positions are unaffected).
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import DistributedError, MlxGemmaError
from .models.decoder import DecoderStack, layer_mask
from .models.gemma4 import Gemma4Stack
from .models.layers import build_mask, embedding_scale
from .tuner.trainer import token_cross_entropy

SCORING_MODES = ("logits", "loss")


def real_width(padding_mask) -> int:
    """Columns up to the last one that is real in some row ([B, T] mask, 1 = real); 0 if none is."""
    columns = np.flatnonzero(np.asarray(padding_mask).astype(bool).any(axis=0))
    return int(columns[-1]) + 1 if len(columns) else 0


def score(
    model: nn.Module,
    token_ids: mx.array,  # int [B, T]
    padding_mask: mx.array | None = None,  # bool/int [B, T], 1 = real token; None: all real
    scoring_mode: str = "logits",
    layer_intercept_fn: Callable[[mx.array, int], mx.array] | None = None,
    target_ids: mx.array | None = None,  # int [B, T], needed for "loss"
    *,
    trim_padding: bool = True,
) -> mx.array:
    """Logits [B, T, vocab] ("logits") or per-token cross-entropy [B, T] float32 ("loss").

    `layer_intercept_fn(x, i)` is called with i = -1 on the token embeddings
    (before the sqrt(hidden) scaling, as keras-hub calls it) and with
    i = 0..L-1 on each block's output, always [B, T, hidden]; its return value
    is what the model uses next.  (keras-hub uses the return value for blocks
    but drops it for i = -1; we use it there too, so an intervention on the
    embeddings takes effect.)  Loss at position t is CE(logits[t],
    target_ids[t]): pass the ids shifted left by one for next-token losses.

    Real positions (padding_mask 1) get keras-hub's values.  `trim_padding=True`
    (the default): the trailing columns that are padding in every row are not
    computed and come back as 0 (logits and losses; the intercept sees 0 there
    after each block); the result keeps its [B, T, ...] shape.  No real
    position can see those columns (attention is causal and skips padding
    keys), so real values, and gradients of a loss masked by padding_mask, are
    the same either way.  `trim_padding=False` computes every column at full
    cost, padding too, as keras-hub does (a padding query attends to its row's
    real keys before it), except where a query sees no real key at all
    (leading left padding): keras-hub zeroes that attention, here the query
    attends to itself.
    """
    token_ids, mask, target_ids = _checked(model, token_ids, padding_mask, scoring_mode, target_ids, trim_padding)
    T = token_ids.shape[1]
    width = T if mask is None or not trim_padding else real_width(mask)
    run = _gemma4_hidden_states if isinstance(model.model, Gemma4Stack) else _hidden_states
    hidden = run(model.model, token_ids, mask, max(width, 1), layer_intercept_fn)
    logits = model.logits(hidden)
    out = logits if scoring_mode == "logits" else token_cross_entropy(logits, target_ids[:, :hidden.shape[1]])
    if width == T:
        return out
    # Trimmed columns are not computed: they come back as 0, keeping keras-hub's [B, T, ...] shape.
    out = out[:, :width]
    return mx.pad(out, [(0, 0), (0, T - width)] + [(0, 0)] * (out.ndim - 2))


def _checked(model, token_ids, padding_mask, scoring_mode, target_ids, trim_padding):
    """(token ids, padding mask as a bool numpy array or None, int32 targets or None), or a typed error."""
    if scoring_mode not in SCORING_MODES:
        raise MlxGemmaError(f"unsupported scoring_mode {scoring_mode!r}; must be one of 'logits' or 'loss'")
    if scoring_mode == "loss" and target_ids is None:
        raise MlxGemmaError("cannot compute the loss without targets: pass target_ids ([batch, tokens] token ids)")
    if not isinstance(trim_padding, (bool, np.bool_)):
        raise MlxGemmaError(f"trim_padding must be True or False, got {trim_padding!r:.80}")
    token_ids = mx.array(token_ids)
    if token_ids.ndim != 2:
        raise MlxGemmaError(f"token_ids must be [batch, tokens], got shape {tuple(token_ids.shape)}")
    for name, value in (("padding_mask", padding_mask), ("target_ids", target_ids)):
        if value is not None and tuple(np.shape(value)) != tuple(token_ids.shape):
            raise MlxGemmaError(f"{name} has shape {tuple(np.shape(value))}, token_ids {tuple(token_ids.shape)}")
    if model.share is not None and not model.share.hidden_states:  # refused on every rank, so none waits
        raise DistributedError(f"rank {model.share.rank}: score() runs the whole layer stack (and its intercepts) in "
                               "one process; a pipeline rank holds only its layers: run it in one process or with "
                               "strategy=\"tensor\"")
    if not isinstance(model.model, (DecoderStack, Gemma4Stack)):
        raise MlxGemmaError(f"score() takes a Gemma text model, not a {model.model_type!r} model")
    mask = None if padding_mask is None else np.asarray(padding_mask).astype(bool)
    targets = None if target_ids is None else mx.array(target_ids).astype(mx.int32)
    return token_ids, mask, targets


def _hidden_states(stack: DecoderStack, token_ids, mask, width: int, intercept) -> mx.array:
    """The normed last hidden states of the first `width` columns [B, width, hidden].

    The blocks run here rather than in the stack, as keras-hub's score runs
    them, to give padding queries keras-hub's mask (`_keras_mask`) and the
    intercept full-width inputs.
    """
    T = token_ids.shape[1]
    x = stack.embed_tokens(token_ids)  # [B, T, hidden], unscaled; every column: a gather costs nothing
    if intercept is not None:
        x = intercept(x, -1)
    h = x[:, :width] if width < T else x
    h = h * embedding_scale(stack.args.hidden_size, h.dtype)
    valid = None if mask is None or mask[:, :width].all() else mx.array(mask[:, :width])
    masks = {}  # layers with the same window share one mask
    for i, layer in enumerate(stack.layers):
        if layer.window not in masks:
            masks[layer.window] = (layer_mask(width, None, layer.window) if valid is None
                                   else _keras_mask(width, layer.window, valid))
        h = layer(h, masks[layer.window], None)
        if intercept is not None:
            widened = h if width == T else mx.pad(h, [(0, 0), (0, T - width), (0, 0)])
            h = intercept(widened, i)[:, :width]
    return stack.norm(h)


def _gemma4_hidden_states(stack: Gemma4Stack, token_ids, mask, width: int, intercept) -> mx.array:
    """Gemma 4's normed last hidden states of the first `width` columns [B, width, hidden]: its own
    stack runs the blocks (per-layer inputs, shared keys/values), on the intercepted embeddings."""
    T = token_ids.shape[1]
    x = stack.embed_tokens(token_ids)  # [B, T, hidden], unscaled, as for Gemma 1-3
    if intercept is not None:
        x = intercept(x, -1)
    h = (x[:, :width] if width < T else x) * embedding_scale(stack.args.hidden_size, x.dtype)
    valid = None if mask is None or mask[:, :width].all() else mx.array(mask[:, :width])

    def blocks(h: mx.array, i: int) -> mx.array:  # the stack calls i = -1 on what it is given: done above
        if i < 0:
            return h
        widened = h if width == T else mx.pad(h, [(0, 0), (0, T - width), (0, 0)])
        return intercept(widened, i)[:, :width]

    return stack(token_ids[:, :width], padding_mask=valid, input_embeddings=h,
                 intercept=None if intercept is None else blocks)


def _keras_mask(T: int, window: int | None, valid: mx.array) -> mx.array:
    """keras-hub's attention mask: causal (within the window) over real keys only, padding queries included.

    The stack's own mask also lets every padding query see itself (`build_mask`);
    keras-hub's does not, so a right-padding query attends to its row's real
    tokens only.  A query that sees no real key at all (leading left padding)
    keras-hub gives zero attention; MLX's fused attention would average over
    every key, so it sees itself, as in the stack (no real position reads it).
    """
    positions = mx.arange(T)
    seen = build_mask(positions, positions, window=window) & valid[:, None, None, :]
    alone = mx.logical_not(seen.any(axis=-1, keepdims=True)) & (positions[:, None] == positions[None, :])
    return seen | alone
