"""The fine-tuning loss: next-token cross-entropy, chunked over the sequence so the
[batch, tokens, vocab] logits never exist at once, for a frozen or a trainable output head.

Gemma's output head is its 262,144-row embedding: the full logits of a batch of
2 x 256 tokens are 512 MiB in float32, and their gradient as much again.  So the
loss runs the head and the cross-entropy over chunks of the sequence, each chunk
made to wait for the previous one (`mx.depends`), and computes each chunk's
gradients while its logits exist:

* a frozen head (LoRA): the gradient with respect to the chunk's hidden states;
* a trainable head (a full fine-tune: the tied embedding trains): also the head
  weight's gradient, added into ONE float32 [vocab, hidden] accumulator.  Leaving
  the head to MLX's autodiff would make a dense [vocab, hidden] gradient per chunk,
  all alive until summed (16 per 256-token sequence on a CPU: 5 GB for Gemma 3
  270M's 335 MB embedding).

`full_cross_entropy` is the plain loss (all logits at once) the chunked one is
tested against.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..cpu_spread import SpreadEmbedding, SpreadLinear, streams
from ..errors import TrainingError
from ..models.layers import softcap

# Default loss chunk: as many tokens as keep one chunk's float32 logits under this size.  Each
# chunk re-reads the output head's weight (Gemma's 262k x hidden embedding), doing about one
# multiply-add per weight element per row: a GPU needs a hundred-odd rows to stay compute-bound
# (128 MiB: 128 rows at Gemma's vocabulary), a CPU far fewer (32 MiB: 32 rows), and fewer rows
# keep less alive, since MLX runs several chunks ahead of the computation (see `_loss_and_dlogits`).
CHUNK_BYTES = {"gpu": 128 << 20, "cpu": 32 << 20}


def default_chunk_bytes() -> int:
    return CHUNK_BYTES["gpu" if mx.default_device() == mx.gpu else "cpu"]


def output_head(model: nn.Module) -> nn.Module:
    """The module holding the output projection (the tied embedding or lm_head)."""
    if "lm_head" in model:
        return model.lm_head
    return model.decoder.embed_tokens  # tied: the text stack's embedding (PaliGemma nests its stack)


def token_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:  # [..., V], [...] -> [...] float32
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return mx.logsumexp(logits, axis=-1) - picked


def _chunks(shape: tuple[int, ...], vocab: int, chunk_size: int | None) -> list[slice]:
    """Slices of the sequence axis of a [B, T, ...] array; chunk_size None: by `default_chunk_bytes()`."""
    B, T = shape[:2]
    if chunk_size is None:
        chunk_size = max(1, default_chunk_bytes() // (4 * B * vocab))
    if chunk_size < 1:
        raise TrainingError(f"loss chunk size must be positive, got {chunk_size}")
    return [slice(s, s + chunk_size) for s in range(0, T, chunk_size)]


def chunked_cross_entropy(model: nn.Module, hidden: mx.array, targets: mx.array, weights: mx.array,
                          chunk_size: int | None = None, differentiable: bool = True) -> mx.array:
    """sum_{b,t} weights * CE(logits(hidden), targets), holding a few chunks of logits, not all.

    hidden: [B, T, D] (after the final norm), targets: [B, T] int, weights: [B, T].

    MLX would run independent chunks side by side (all their logits alive at
    once), so each chunk is made to depend on the previous one's result
    (`mx.depends`); MLX still allocates a few chunks ahead of the computation
    (up to its memory limit, `mx.set_memory_limit`), so smaller chunks keep
    less.  The backward pass is a custom VJP: the forward pass computes each
    chunk's gradients while its logits exist, and the backward pass only scales
    them.  `differentiable=False` (evaluation) skips the gradients.
    """
    vocab = model.args.vocab_size
    if not differentiable:
        total = mx.array(0.0, dtype=mx.float32)
        for piece in _chunks(hidden.shape, vocab, chunk_size):
            h_i = mx.depends(hidden[:, piece], total)
            total = total + (token_cross_entropy(model.logits(h_i), targets[:, piece]) * weights[:, piece]).sum()
        return total
    head = output_head(model)
    trainable = dict(tree_flatten(head.trainable_parameters()))
    project = head if "lm_head" in model else head.as_linear
    cap = model.args.final_logit_softcapping
    pieces = _chunks(hidden.shape, vocab, chunk_size)
    if not trainable:
        return _frozen_head_loss(project, cap, pieces)(hidden, targets, weights)[0]
    if set(trainable) != {"weight"} or not isinstance(head, (nn.Linear, nn.Embedding)):
        raise TrainingError(f"a trainable output head must be a plain weight (a float nn.Linear or nn.Embedding); "
                            f"this one ({type(head).__name__}) trains {', '.join(sorted(trainable))}")
    # The CPU fast path (cpu_spread) spreads the head's products over the cores; its gradient's too.
    lanes = streams(len(pieces)) if isinstance(head, (SpreadEmbedding, SpreadLinear)) else (mx.default_stream(mx.default_device()),)
    return _trainable_head_loss(project, cap, pieces, lanes)(hidden, head.weight, targets, weights)[0]


def _chunked_forward(project, cap, pieces, h, t, w):
    """(weighted CE sum, d sum / d hidden [B, T, D], log-sum-exp of each row's logits [B, T]), chunk by chunk."""
    total, grads, lses = mx.array(0.0, dtype=mx.float32), [], []
    for piece in pieces:
        h_i = mx.depends(h[:, piece], [total] + grads[-1:])  # one chunk's logits at a time
        loss_i, dlogits, lse = _loss_and_dlogits(cap)(project(h_i), t[:, piece], w[:, piece])
        # The transposed product, through the head's own layer (spread over the cores on a CPU;
        # a quantized head's vjp dequantizes): x @ W.T's vjp with respect to x.
        grads.append(mx.vjp(project, [h_i], [dlogits])[1][0])
        total, lses = total + loss_i, lses + [lse]
    return total, mx.concatenate(grads, axis=1), mx.concatenate(lses, axis=1)


def _frozen_head_loss(project, cap, pieces):
    """(hidden, targets, weights) -> (weighted CE sum, d sum / d hidden), the head a constant."""

    @mx.custom_function
    def loss_and_grads(h, t, w):
        return _chunked_forward(project, cap, pieces, h, t, w)[:2]

    @loss_and_grads.vjp
    def _(primals, cotangents, outputs):
        h, t, w = primals
        # The cotangent is float32 (the loss is); the gradient must come back in h's dtype (bf16 models).
        grad_h = (cotangents[0] * outputs[1]).astype(h.dtype)
        return grad_h, mx.zeros_like(t), mx.zeros_like(w)  # targets/weights: constants

    return loss_and_grads


def _trainable_head_loss(project, cap, pieces, lanes):
    """(hidden, head weight [V, D], targets, weights) -> (weighted CE sum, d / d hidden, log-sum-exps).

    The forward pass is the frozen head's, keeping each row's log-sum-exp; the backward
    pass recomputes the logits by blocks of the vocabulary (`_head_weight_gradient`), so
    the head weight's gradient is made once, in its dtype, block after block: no
    accumulator.  That costs one more product with the head than autodiff makes, and
    `project` (the head's own product) must read the weight passed in as the second input.
    """

    @mx.custom_function
    def loss_and_grads(h, weight, t, w):
        return _chunked_forward(project, cap, pieces, h, t, w)

    @loss_and_grads.vjp
    def _(primals, cotangents, outputs):
        h, weight, t, w = primals
        scale = cotangents[0]
        grad_w = _head_weight_gradient(cap, h, weight, t, w * scale, outputs[2], len(pieces), lanes)
        return (scale * outputs[1]).astype(h.dtype), grad_w, mx.zeros_like(t), mx.zeros_like(w)

    return loss_and_grads


def _head_weight_gradient(cap, h, weight, t, w, lse, blocks: int, lanes) -> mx.array:
    """d (sum of w-weighted CE) / d weight = dlogits^T @ h, [V, D] in the weight's dtype.

    Block by block of `blocks` slices of the vocabulary (each holding as many logits as
    one forward chunk): the block's logits for every token, their gradient from the
    forward pass's log-sum-exps, and its rows of the weight gradient in one product over
    all tokens, summed in float32 and rounded once as the plain loss's product is.  The
    blocks take turns on `lanes` (streams: one product uses one core on a CPU), each
    after its lane's previous block, and are written into one array in place.
    """
    vocab, width = weight.shape
    rows = h.reshape(-1, width)
    t, w, lse = t.reshape(-1, 1), w.reshape(-1, 1), lse.reshape(-1, 1)
    size = -(-vocab // blocks)
    previous = [[] for _ in lanes]
    grad = mx.zeros(weight.shape, dtype=weight.dtype)
    for i, start in enumerate(range(0, vocab, size)):
        with mx.stream(lanes[i % len(lanes)]):
            x = mx.depends(rows, previous[i % len(lanes)])
            raw = x @ weight[start:start + size].T  # [N, b]: the forward pass's logits, recomputed
            part = _block_dlogits(cap)(raw, t - start, w, lse).T @ x  # [b, D]
        previous[i % len(lanes)] = [part]
        grad[start:start + size] = part
    return grad


@functools.cache
def _loss_and_dlogits(cap: float | None):
    """A compiled (raw head output, targets, weights) -> (weighted CE sum, d sum / d raw, log-sum-exp).

    Written out rather than left to `mx.vjp`: the gradient (softmax - one-hot)
    x weight (x the soft-cap's derivative) is one fused elementwise kernel
    that writes the model's dtype, so a chunk holds its raw logits, one
    float32 copy for the log-sum-exp and the gradient, not the half-dozen
    float32 [B, c, V] temporaries the generic vjp makes (MLX runs ahead of
    the computation, so several chunks' temporaries are alive at once).
    The loss itself is computed exactly as `token_cross_entropy` does.
    """

    def run(raw, t, w):  # [B, c, V], [B, c], [B, c]
        # Soft-capped in the model's dtype, as `model.logits` and transformers cap them.
        logits = softcap(raw, cap).astype(mx.float32)
        lse = mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logits, t[..., None], axis=-1)
        loss = ((lse - picked)[..., 0] * w).sum()
        return loss, _softmax_gradient(cap, logits, lse, t[..., None], w[..., None]).astype(raw.dtype), lse[..., 0]

    return mx.compile(run)


@functools.cache
def _block_dlogits(cap: float | None):
    """A compiled (raw logits of a vocabulary block [N, b], targets minus the block's first id [N, 1],
    weights [N, 1], log-sum-exps [N, 1]) -> d (weighted CE sum) / d raw, in raw's dtype."""

    def run(raw, t, w, lse):
        logits = softcap(raw, cap).astype(mx.float32)  # as the forward pass computed them
        return _softmax_gradient(cap, logits, lse, t, w).astype(raw.dtype)

    return mx.compile(run)


def _softmax_gradient(cap, logits, lse, t, w):
    """(softmax - one-hot(t)) x w (x the soft-cap's derivative): d CE / d raw head output, float32."""
    onehot = mx.arange(logits.shape[-1]) == t
    d = (mx.exp(logits - lse) - onehot) * w
    return d * (1 - mx.square(logits / cap)) if cap else d


def full_cross_entropy(model: nn.Module, inputs: mx.array, targets: mx.array, weights: mx.array):
    """The plain loss (all logits at once), as mlx-lm computes it: (mean CE over weighted tokens, tokens)."""
    ce = token_cross_entropy(model(inputs), targets)
    ntoks = weights.sum()
    return (ce * weights).sum() / ntoks, ntoks


def loss_fn(model: nn.Module, inputs: mx.array, targets: mx.array, weights: mx.array,
            pixel_values: mx.array | None = None, prefix_length: mx.array | None = None, *,
            chunk_size: int | None = None, differentiable: bool = True):
    """(mean next-token CE over the weighted targets, number of weighted targets).

    Right padding needs no attention mask: causal attention keeps padding out
    of every real position, and padding targets weigh 0.  PaliGemma batches
    add pixel values and each row's prefix length (its bidirectional part).
    """
    extra = {} if pixel_values is None else {"pixel_values": pixel_values}
    if prefix_length is not None:
        extra["prefix_length"] = prefix_length
    hidden = model.model(inputs, **extra)  # [B, T, D]
    ntoks = weights.sum()
    # A batch (or a rank's share of one) may hold no weighted target: its loss is 0, not NaN.
    total = chunked_cross_entropy(model, hidden, targets, weights, chunk_size, differentiable)
    return total / mx.maximum(ntoks, 1), ntoks
