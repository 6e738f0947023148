"""The fine-tuning optimizers and learning-rate schedules: `build_optimizer`, `build_schedule`,
and Adam / AdamW whose update writes each weight and its moments in place.

mlx's Adam, compiled into a training step, computes a parameter's new first moment
`m` in a kernel where `m` is both an output and an input of the new weight.  MLX
0.32 donates no buffer in that kernel, so each parameter's update holds its new
weight and both new moments beside the old ones: three extra copies of the largest
trainable weight, 1 GB for Gemma 3 270M's tied 262,144 x 640 embedding in a full
fine-tune.  `LeanAdam` / `LeanAdamW` compute the same values (bit for bit) in
three kernels compiled one by one, called outside the compiled step (`lean_update`
tells the training loop), each of which writes into its input's buffer.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.optimizers as optim

from ..errors import TrainingError

OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor")
# What the moments of Adam / AdamW are kept in: the parameter's dtype, as mlx (and so mlx-lm)
# and torch keep them, or float32.
STATE_DTYPES = {"param": None, "float32": mx.float32}


@functools.cache
def _first_moment(b1: float):
    return mx.compile(lambda m, g: b1 * m + (1 - b1) * g)


@functools.cache
def _second_moment(b2: float):
    return mx.compile(lambda v, g: b2 * v + (1 - b2) * mx.square(g))


@functools.cache
def _adam_step(eps: float, weight_decay: float):
    def step(w, m, v, lr, c1, c2):  # c1, c2: bias corrections (1 without), in the update's dtype
        dtype = w.dtype
        if weight_decay:  # as mlx's AdamW: the weight decays before Adam's step
            w = w * (1 - lr * weight_decay)
        return (w - c1 * m / (mx.sqrt(v) * c2 + eps)).astype(dtype)

    return mx.compile(step)


class LeanAdamW(optim.AdamW):
    """mlx's AdamW with an in-place update (see the module docstring); `state_dtype=mx.float32`
    keeps the moments in float32 (the update is then computed in float32 and rounded once)."""

    lean_update = True  # the training loop calls `update` outside its compiled step

    def __init__(self, learning_rate, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 bias_correction: bool = False, state_dtype: mx.Dtype | None = None):
        super().__init__(learning_rate, list(betas), eps, weight_decay, bias_correction)
        self.state_dtype = state_dtype

    def init_single(self, parameter: mx.array, state: dict):
        dtype = self.state_dtype or parameter.dtype
        state["m"] = mx.zeros(parameter.shape, dtype=dtype)
        state["v"] = mx.zeros(parameter.shape, dtype=dtype)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        b1, b2 = self.betas
        m = state["m"] = _first_moment(b1)(state["m"], gradient)
        v = state["v"] = _second_moment(b2)(state["v"], gradient)
        dtype = m.dtype  # the gradient's unless the moments are float32
        lr = self.learning_rate.astype(dtype)
        if self.bias_correction:  # mlx's Adam: lr / (1 - b1^t) and 1 / sqrt(1 - b2^t)
            c1 = (lr / (1 - b1 ** self.step)).astype(dtype)
            c2 = mx.rsqrt(1 - b2 ** self.step).astype(dtype)
        else:
            c1, c2 = lr, mx.array(1, dtype=dtype)
        return _adam_step(self.eps, self.weight_decay)(parameter, m, v, lr, c1, c2)


class LeanAdam(LeanAdamW):
    """mlx's Adam (AdamW without weight decay) with an in-place update."""

    def __init__(self, learning_rate, betas=(0.9, 0.999), eps: float = 1e-8, bias_correction: bool = False,
                 state_dtype: mx.Dtype | None = None):
        super().__init__(learning_rate, betas, eps, 0.0, bias_correction, state_dtype)


def build_optimizer(name: str, learning_rate, weight_decay: float = 0.0, state_dtype: str = "param") -> optim.Optimizer:
    """AdamW (default), Adam, SGD or Adafactor; Adam and AdamW keep their moments in the
    parameters' dtype ("param") or in "float32"."""
    name = name.lower()
    if state_dtype not in STATE_DTYPES:
        raise TrainingError(f"unknown optimizer state dtype {state_dtype!r}; choose {' or '.join(STATE_DTYPES)}")
    if state_dtype != "param" and name not in ("adam", "adamw"):
        raise TrainingError(f"{name} keeps no Adam moments: its state dtype cannot be set")
    if name == "adamw":
        return LeanAdamW(learning_rate, weight_decay=weight_decay, state_dtype=STATE_DTYPES[state_dtype])
    if name == "adam":
        return LeanAdam(learning_rate, state_dtype=STATE_DTYPES[state_dtype])
    if name == "sgd":
        return optim.SGD(learning_rate=learning_rate, weight_decay=weight_decay)
    if name == "adafactor":
        return optim.Adafactor(learning_rate=learning_rate, relative_step=False)
    raise TrainingError(f"unknown optimizer {name!r}; choose {', '.join(OPTIMIZERS)}")


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
