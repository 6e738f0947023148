"""The fine-tuning loop: per-block gradient checkpointing, a compiled optimizer
step with gradient accumulation, and periodic reports, evaluations and (atomic) saves.

Memory is what limits fine-tuning on a laptop.  Two things keep it down:

* the loss never holds the full [batch, tokens, vocab] logits: the output
  projection and cross-entropy run over chunks of the sequence, each chunk's
  gradients computed while its logits exist (losses.py);
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
from mlx.utils import tree_flatten, tree_map

from ..errors import TrainingError
from .datasets import iterate_batches, training_images
# The loss lives in losses.py; these names stay importable from here (tasks, score, tests use them).
from .losses import (  # noqa: F401
    CHUNK_BYTES,
    _chunks,
    chunked_cross_entropy,
    default_chunk_bytes,
    full_cross_entropy,
    loss_fn,
    output_head,
    token_cross_entropy,
)
from .optimizers import build_optimizer, build_schedule  # noqa: F401  (the tasks and the CLI use them from here)


def _image_size(model: nn.Module) -> int | None:
    """PaliGemma's input resolution; None for text models and for layouts the tuner refuses
    (datasets.training_images): Gemma 3's images in the text, Gemma 4's of any size (image_size 0)."""
    spec = model.image_input
    paligemma = spec is not None and spec.start_id is None and not spec.variable
    return spec.image_size if paligemma else None


@functools.cache
def _checkpointed(cls: type) -> type:
    """A subclass of a block class whose call is recomputed in the backward pass.

    Any call signature passes through: mx.checkpoint takes the arguments as trees, so every array in
    them (the hidden state, Gemma 4's per-layer input and shared keys/values, a mask) is an input of
    the recomputed function and gets its gradient; other leaves (a cache, an offset, None) pass as they are.
    """

    def __call__(self, *args, **kwargs):
        def run(params, args, kwargs):
            self.update(params, strict=False)  # bind the traced parameters: checkpoint ignores captures
            return cls.__call__(self, *args, **kwargs)

        return mx.checkpoint(run)(self.trainable_parameters(), args, kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "_checkpointed_from": cls})


def grad_checkpoint(model: nn.Module, enable: bool = True) -> None:
    """Recompute each block in the backward pass (keeping only its input), or stop doing so.

    Only these block instances change class; other models are untouched.
    """
    for layer in model.layers:
        base = getattr(type(layer), "_checkpointed_from", type(layer))
        layer.__class__ = _checkpointed(base) if enable else base


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
    the step reads and writes (the model, the optimizer, the random state)."""
    accum, world = args.grad_accumulation_steps, group.size()
    loss_and_grad = nn.value_and_grad(model, functools.partial(loss_fn, chunk_size=args.loss_chunk_size))
    state = [model.state, optimizer.state, mx.random.state]

    def gradients(batch: tuple, grads):
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
        return loss, real, g

    def update(g):
        # The mean of the micro-batch means, as mlx-lm accumulates.
        optimizer.update(model, tree_map(lambda x: x / accum, g) if accum > 1 else g)

    if _image_size(model) is None:  # PaliGemma checks its <image> slots on the host: not compilable
        gradients = mx.compile(gradients, inputs=state, outputs=state)
        # A lean optimizer (optimizers.py) compiles its own in-place kernels: inside this
        # compile they would fuse into kernels that write new buffers.
        if not getattr(optimizer, "lean_update", False):
            update = mx.compile(update, inputs=state, outputs=state)

    def micro_step(batch: tuple, grads, do_update: bool):
        loss, real, g = gradients(batch, grads)
        if do_update:
            update(g)
            g = None
        return loss, real, g

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
    training_images(model)  # a model the tuner would train wrongly (Gemma 3 with images, ...) is refused
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
