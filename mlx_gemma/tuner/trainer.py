"""The fine-tuning loop: a chunked cross-entropy, per-block gradient
checkpointing, a compiled optimizer step with gradient accumulation, and
periodic reports, evaluations and (atomic) adapter saves.

Memory is what limits fine-tuning on a laptop.  Two things keep it down:

* the loss never holds the full [batch, tokens, vocab] logits: the output
  projection and cross-entropy run over chunks of the sequence, and each
  chunk's gradient is computed while its logits exist (a frozen head) or the
  chunk is recomputed in the backward pass (a trainable head), so only the
  few chunks MLX has queued ahead are alive at once;
* `grad_checkpoint=True` keeps only each block's input and recomputes the
  block in the backward pass.

Data parallel training across processes or machines uses `mx.distributed`
(see `train`).  The CLI is `mlx_gemma/lora.py` (`python -m mlx_gemma.lora`).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from ..errors import TrainingError
from ..models.layers import softcap
from .datasets import iterate_batches

# Default loss chunk: as many tokens as keep one chunk's float32 logits under this size.  Each
# chunk re-reads the output head's weight (Gemma's 262k x hidden embedding), doing about one
# multiply-add per weight element per row: a GPU needs a hundred-odd rows to stay compute-bound
# (128 MiB: 128 rows at Gemma's vocabulary), a CPU far fewer (32 MiB: 32 rows), and fewer rows
# keep less alive, since MLX runs several chunks ahead of the computation (see `_loss_and_dlogits`).
CHUNK_BYTES = {"gpu": 128 << 20, "cpu": 32 << 20}


def default_chunk_bytes() -> int:
    return CHUNK_BYTES["gpu" if mx.default_device() == mx.gpu else "cpu"]


def _output_head(model: nn.Module) -> nn.Module:
    """The module holding the output projection (the tied embedding or lm_head)."""
    if "lm_head" in model:
        return model.lm_head
    return model.decoder.embed_tokens  # tied: the text stack's embedding (PaliGemma nests its stack)


def _image_size(model: nn.Module) -> int | None:
    """PaliGemma's input resolution (None for text models)."""
    return None if model.image_input is None else model.image_input.image_size


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
    less.  For the backward pass, a custom VJP: the forward pass
    computes each chunk's gradient with respect to its hidden states while
    its logits exist ([B, c, D], small), and the backward pass only scales
    them.  That needs the head to be frozen (LoRA); a trainable head takes
    the slower path that recomputes each chunk (`mx.checkpoint`).
    `differentiable=False` (evaluation) skips the gradients.
    """
    vocab = model.args.vocab_size

    def chunk_loss(h, t, w):
        return (token_cross_entropy(model.logits(h), t) * w).sum()

    if not differentiable:
        total = mx.array(0.0, dtype=mx.float32)
        for piece in _chunks(hidden.shape, vocab, chunk_size):
            total = total + chunk_loss(mx.depends(hidden[:, piece], total), targets[:, piece], weights[:, piece])
        return total
    head = _output_head(model)
    if tree_flatten(head.trainable_parameters()):
        return _checkpointed_chunks(model, head, hidden, targets, weights, chunk_size)
    project = head if "lm_head" in model else head.as_linear
    cap = model.args.final_logit_softcapping

    @mx.custom_function
    def loss_and_grads(h, t, w):
        total, grads = mx.array(0.0, dtype=mx.float32), []
        for piece in _chunks(h.shape, vocab, chunk_size):
            h_i = mx.depends(h[:, piece], [total] + grads[-1:])
            raw = project(h_i)  # [B, c, V] in the model's dtype
            loss_i, dlogits = _loss_and_dlogits(cap)(raw, t[:, piece], w[:, piece])
            # The head is frozen: its vjp is the transposed product (of the quantized weight too).
            grads.append(mx.vjp(project, [h_i], [dlogits])[1][0])
            total = total + loss_i
        return total, mx.concatenate(grads, axis=1)

    @loss_and_grads.vjp
    def _(primals, cotangents, outputs):
        h, t, w = primals
        # The cotangent is float32 (the loss is); the gradient must come back in h's dtype (bf16 models).
        grad_h = (cotangents[0] * outputs[1]).astype(h.dtype)
        return grad_h, mx.zeros_like(t), mx.zeros_like(w)  # targets/weights: constants

    return loss_and_grads(hidden, targets, weights)[0]


@functools.cache
def _loss_and_dlogits(cap: float | None):
    """A compiled (raw head output, targets, weights) -> (weighted CE sum, d sum / d raw).

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
        onehot = mx.arange(raw.shape[-1]) == t[..., None]
        d = (mx.exp(logits - lse) - onehot) * w[..., None]
        if cap:
            d = d * (1 - mx.square(logits / cap))
        return loss, d.astype(raw.dtype)

    return mx.compile(run)


def _checkpointed_chunks(model, head, hidden, targets, weights, chunk_size):
    """The chunked loss for a trainable head: each chunk recomputed in the backward pass."""
    def chunk_loss(params, h, t, w):
        head.update(params, strict=False)  # checkpoint gives no gradient to captured arrays: pass them in
        t = mx.stop_gradient(t)  # integer ids: checkpoint's backward would ask for their gradient
        return (token_cross_entropy(model.logits(h), t) * w).sum()

    step = mx.checkpoint(chunk_loss)
    params, vocab = head.trainable_parameters(), model.args.vocab_size
    total = mx.array(0.0, dtype=mx.float32)
    for piece in _chunks(hidden.shape, vocab, chunk_size):
        total = total + step(params, mx.depends(hidden[:, piece], total), targets[:, piece], weights[:, piece])
    return total


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


@functools.cache
def _checkpointed(cls: type) -> type:
    """A subclass of a block class whose call is recomputed in the backward pass."""

    def __call__(self, x, mask, cache=None):
        def run(params, x):
            self.update(params, strict=False)  # bind the traced parameters: checkpoint ignores captures
            return cls.__call__(self, x, mask, cache)

        return mx.checkpoint(run)(self.trainable_parameters(), x)

    return type(cls.__name__, (cls,), {"__call__": __call__, "_checkpointed_from": cls})


def grad_checkpoint(model: nn.Module, enable: bool = True) -> None:
    """Recompute each block in the backward pass (keeping only its input), or stop doing so.

    Only these block instances change class; other models are untouched.
    """
    for layer in model.layers:
        base = getattr(type(layer), "_checkpointed_from", type(layer))
        layer.__class__ = _checkpointed(base) if enable else base


def build_optimizer(name: str, learning_rate, weight_decay: float = 0.0) -> optim.Optimizer:
    """AdamW (default), Adam, SGD or Adafactor from `mlx.optimizers`."""
    name = name.lower()
    if name == "adamw":
        return optim.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)
    if name == "adam":
        return optim.Adam(learning_rate=learning_rate)
    if name == "sgd":
        return optim.SGD(learning_rate=learning_rate, weight_decay=weight_decay)
    if name == "adafactor":
        return optim.Adafactor(learning_rate=learning_rate, relative_step=False)
    raise TrainingError(f"unknown optimizer {name!r}; choose adamw, adam, sgd or adafactor")


def build_schedule(learning_rate: float, iters: int, schedule: str = "constant", warmup: int = 0,
                   min_lr: float = 0.0):
    """A learning rate or an `mlx.optimizers` schedule: optional linear warm-up, then constant or cosine decay."""
    if learning_rate <= 0:
        raise TrainingError(f"learning rate must be positive, got {learning_rate}")
    if schedule not in ("constant", "cosine"):
        raise TrainingError(f"unknown lr schedule {schedule!r}; choose constant or cosine")
    if warmup < 0 or warmup >= max(iters, 1) and warmup:
        raise TrainingError(f"warmup ({warmup}) must be in [0, iters={iters})")
    if schedule == "constant" and not warmup:
        return learning_rate
    main = (optim.cosine_decay(learning_rate, max(iters - warmup, 1), min_lr) if schedule == "cosine"
            else (lambda step: mx.array(learning_rate)))
    if not warmup:
        return main
    ramp = optim.linear_schedule(0.0, learning_rate, warmup)
    return optim.join_schedules([ramp, main], [warmup])


@dataclass
class TrainingArgs:
    batch_size: int = 4
    iters: int = 100
    val_batches: int = 25  # -1: the whole validation set
    steps_per_report: int = 10
    steps_per_eval: int = 200
    save_every: int = 100
    adapter_path: str = "adapters"
    grad_accumulation_steps: int = 1
    grad_checkpoint: bool = False
    loss_chunk_size: int | None = None  # None: by default_chunk_bytes()
    seed: int = 0


def evaluate(model, examples, batch_size: int, num_batches: int = -1, pad_id: int = 0,
             chunk_size: int | None = None) -> float:
    """Token-weighted mean loss over `num_batches` batches (-1: all), in eval mode."""
    was_training = model.training
    model.eval()
    total, ntoks = mx.array(0.0), mx.array(0.0)
    batches = iterate_batches(examples, min(batch_size, len(examples)), shuffle=False, pad_id=pad_id,
                              image_size=_image_size(model))
    for i, batch in enumerate(batches):
        if i == num_batches:
            break
        loss, n = loss_fn(model, *batch, chunk_size=chunk_size, differentiable=False)
        total, ntoks = total + loss * n, ntoks + n
        mx.eval(total, ntoks)
    model.train(was_training)
    return (total / ntoks).item()


def _step_function(model, optimizer, args: TrainingArgs, group):
    """(micro_step, state): `micro_step(batch, grads, do_update)` runs one micro-batch forward and
    backward, combines its gradients across the ranks of `group` and with `grads` (those of the step's
    earlier micro-batches), and updates the weights on a step's last micro-batch; it returns
    (mean loss, real target tokens, the summed gradients or None after an update).  `state` is what
    the compiled step reads and writes (the model, the optimizer, the random state)."""
    accum, world = args.grad_accumulation_steps, group.size()
    loss_and_grad = nn.value_and_grad(model, functools.partial(loss_fn, chunk_size=args.loss_chunk_size))
    state = [model.state, optimizer.state, mx.random.state]

    def micro_step(batch: tuple, grads, do_update: bool):
        (loss, ntoks), g = loss_and_grad(model, *batch)
        # Throughput counts the real target tokens (weighted at all), whatever their weights.
        real = (batch[2] != 0).sum()
        if world > 1:
            real = mx.distributed.all_sum(real, group=group)
            # Data parallel: weigh each rank's mean by its tokens, so the result is the
            # whole batch's mean and gradient exactly (not a mean of unequal shares).
            total = mx.distributed.all_sum(ntoks, group=group)
            g = tree_map(lambda x: mx.distributed.all_sum(x * ntoks, group=group) / total, g)
            loss, ntoks = mx.distributed.all_sum(loss * ntoks, group=group) / total, total
        if grads is not None:
            g = tree_map(mx.add, g, grads)
        if do_update:
            # The mean of the micro-batch means, as mlx-lm accumulates.
            optimizer.update(model, tree_map(lambda x: x / accum, g) if accum > 1 else g)
            g = None
        return loss, real, g

    if _image_size(model) is None:  # PaliGemma checks its <image> slots on the host: not compilable
        micro_step = mx.compile(micro_step, inputs=state, outputs=state)
    return micro_step, state


def _due(step: int, every: int, iters: int) -> bool:
    """Periodic work (a report, an evaluation, a save) falls every `every` steps and on the last one."""
    return step % every == 0 or step == iters


def _finite_loss(loss: mx.array, step: int) -> float:
    value = loss.item()
    if not math.isfinite(value):  # stop before a save could store broken adapters
        raise TrainingError(f"the training loss became {value} at step {step}; lower the learning rate "
                            "(adapters saved before are intact)")
    return value


def _check_finite_weights(model: nn.Module, step: int) -> None:
    if not all(mx.isfinite(v).all().item() for _, v in tree_flatten(model.trainable_parameters())):
        raise TrainingError(f"the weights became NaN/inf at step {step}; lower the learning rate "
                            "(adapters saved before are intact)")


def _train_report(step: int, mean_loss: float, tokens: int, since: float, optimizer) -> dict:
    """The report of a training interval that began at perf_counter() time `since`."""
    elapsed = time.perf_counter() - since
    return {"step": step, "train_loss": mean_loss, "learning_rate": optimizer.learning_rate.item(),
            "tokens_per_second": tokens / elapsed, "peak_memory_gb": mx.get_peak_memory() / 2**30}


def train(model, optimizer, train_set, val_set=None, args: TrainingArgs | None = None,
          save: Callable[[int], None] | None = None, report: Callable[[dict], None] | None = None,
          pad_id: int = 0, batches: Iterator[tuple[mx.array, ...]] | None = None) -> list[dict]:
    """Train the model's trainable parameters (the adapters) for `args.iters` optimizer steps.

    `train_set` is a list of (ids, offset) examples (see datasets.py), or
    None when `batches` yields the (inputs, targets, weights) batches itself.
    `save(step)` is called every `args.save_every` steps and at the end;
    `report(info)` gets dicts with step, train_loss or val_loss, learning_rate,
    tokens_per_second and peak_memory_gb.  Returns every report.

    Launched on several processes (`mlx.launch -n 2 python -m mlx_gemma.lora ...`),
    each rank takes its share of every batch, gradients are combined across
    ranks (`mx.distributed.all_sum`) and rank 0 alone calls `save`.
    """
    args = args or TrainingArgs()
    if args.iters < 1 or args.grad_accumulation_steps < 1:
        raise TrainingError("iters and grad_accumulation_steps must be positive")
    mx.random.seed(args.seed)
    if args.grad_checkpoint:
        grad_checkpoint(model)
    model.train()
    accum = args.grad_accumulation_steps
    group = mx.distributed.init()  # a group of one unless launched with mlx.launch
    micro_step, state = _step_function(model, optimizer, args, group)
    history: list[dict] = []

    def emit(info):
        history.append(info)
        if report:
            report(info)

    if batches is None:  # every rank shuffles alike (same seed) and takes its share of each batch
        batches = iterate_batches(train_set, args.batch_size, loop=True, seed=args.seed, pad_id=pad_id,
                                  rank=group.rank(), world=group.size(), image_size=_image_size(model))
    losses, count, tokens, grads = 0.0, 0, 0, None
    mx.reset_peak_memory()
    tic = time.perf_counter()
    try:
        for it in range(1, args.iters * accum + 1):
            step, do_update = (it - 1) // accum + 1, it % accum == 0
            if val_set and do_update and (step == 1 or _due(step, args.steps_per_eval, args.iters)):
                v = evaluate(model, val_set, args.batch_size, args.val_batches, pad_id, args.loss_chunk_size)
                emit({"step": step, "val_loss": v})
                tic = time.perf_counter()  # evaluation time is not training time
            loss, real, grads = micro_step(tuple(next(batches)), grads, do_update)
            mx.eval(loss, real, grads, state)
            losses, count = losses + _finite_loss(loss, step), count + 1
            tokens += real.item()
            if do_update and _due(step, args.steps_per_report, args.iters):
                emit(_train_report(step, losses / count, tokens, tic, optimizer))
                losses, count, tokens, tic = 0.0, 0, 0, time.perf_counter()
            if do_update and save and group.rank() == 0 and _due(step, args.save_every, args.iters):
                _check_finite_weights(model, step)
                save(step)
    finally:
        if args.grad_checkpoint:
            grad_checkpoint(model, enable=False)
    return history
