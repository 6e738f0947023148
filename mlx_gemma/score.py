"""`score()`: per-token logits or losses for given token ids, with an optional
intervention after the embeddings and after each block (keras-hub's
`GemmaCausalLM.score`).

Gradients flow through it, e.g. of the losses with respect to the
embeddings (keras-hub's TensorFlow example, in MLX):

    def loss_of(delta):  # delta: [B, T, hidden], added to the token embeddings
        fn = lambda x, i: x + delta if i == -1 else x
        return score(model, ids, scoring_mode="loss", target_ids=targets, layer_intercept_fn=fn).sum()

    grads = mx.grad(loss_of)(mx.zeros((B, T, model.args.hidden_size)))
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from .errors import MlxGemmaError
from .models.decoder import DecoderStack
from .models.layers import embedding_scale
from .tuner.trainer import token_cross_entropy

SCORING_MODES = ("logits", "loss")


def score(
    model: nn.Module,
    token_ids: mx.array,  # int [B, T]
    padding_mask: mx.array | None = None,  # bool/int [B, T], 1 = real token; None: all real
    scoring_mode: str = "logits",
    layer_intercept_fn: Callable[[mx.array, int], mx.array] | None = None,
    target_ids: mx.array | None = None,  # int [B, T], needed for "loss"
) -> mx.array:
    """Logits [B, T, vocab] ("logits") or per-token cross-entropy [B, T] float32 ("loss").

    `layer_intercept_fn(x, i)` is called with i = -1 on the token embeddings
    (before the sqrt(hidden) scaling, as keras-hub calls it) and with
    i = 0..L-1 on each block's output; its return value is what the model uses
    next.  (keras-hub uses the return value for blocks but drops it for i = -1;
    we use it there too, so an intervention on the embeddings takes effect.)
    Loss at position t is CE(logits[t], target_ids[t]): pass the ids shifted
    left by one for next-token losses.
    """
    if scoring_mode not in SCORING_MODES:
        raise MlxGemmaError(f"unsupported scoring_mode {scoring_mode!r}; must be one of 'logits' or 'loss'")
    if scoring_mode == "loss" and target_ids is None:
        raise MlxGemmaError("cannot compute the loss without targets: pass target_ids ([batch, tokens] token ids)")
    token_ids = mx.array(token_ids)
    if token_ids.ndim != 2:
        raise MlxGemmaError(f"token_ids must be [batch, tokens], got shape {tuple(token_ids.shape)}")
    for name, value in (("padding_mask", padding_mask), ("target_ids", target_ids)):
        if value is not None and tuple(mx.array(value).shape) != tuple(token_ids.shape):
            raise MlxGemmaError(f"{name} has shape {tuple(mx.array(value).shape)}, token_ids {tuple(token_ids.shape)}")
    mask = None if padding_mask is None else mx.array(padding_mask).astype(mx.bool_)

    stack = model.model
    if not isinstance(stack, DecoderStack):
        raise MlxGemmaError(f"score() takes a Gemma text model, not a {model.model_type!r} model")
    x = stack.embed_tokens(token_ids)  # [B, T, hidden], unscaled
    if layer_intercept_fn is not None:
        x = layer_intercept_fn(x, -1)
    x = x * embedding_scale(stack.args.hidden_size, x.dtype)
    blocks_fn = None if layer_intercept_fn is None else (lambda h, i: h if i == -1 else layer_intercept_fn(h, i))
    logits = model.logits(stack(None, padding_mask=mask, input_embeddings=x, intercept=blocks_fn))
    if scoring_mode == "logits":
        return logits
    return token_cross_entropy(logits, mx.array(target_ids).astype(mx.int32))
