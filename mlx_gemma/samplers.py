"""Choosing the next token: samplers and logits processors.

A *sampler* maps log-probabilities `[B, V]` to token ids `[B]`.  A *logits
processor* maps `(tokens, logits)` to new logits `[B, V]` before the
log-softmax; `tokens` is the history `[B, n]` (prompt then generated ids), where
a negative id marks a left-padding slot that is not a token.  Both follow
mlx-lm's calling conventions, so either library's processors plug into the
other's loop.

Everything is lazy mlx graph work (no host synchronisation), so the decode loop
can queue the next step while the host handles the current token.  Math is done
in float32 whatever the model's dtype.

Filter order follows Hugging Face: temperature, then top-k, then top-p, then
min-p, each on the distribution the previous one left (renormalised).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from .errors import GenerationError

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

_NEG_INF = -float("inf")


# ----- pure filters over log-probabilities [B, V] --------------------------------------


def greedy(logprobs: mx.array) -> mx.array:
    """The most likely token of each row: one argmax, no sort over the vocabulary."""
    return mx.argmax(logprobs, axis=-1)


_SUM_BLOCK = 1024


def _blocked_sum(x: mx.array) -> tuple[mx.array, mx.array]:
    """(row max, log of sum(exp(x - max))) over the last axis, the sum taken in 1024-wide blocks.

    MLX's CPU backend sums a row in one sequential pass: over Gemma 3's 262,144 logits the
    float32 normaliser is then off by ~1e-3, an offset that differs per row and would reorder
    beams; blocks bring it to ~4e-6 (torch's log_softmax, the reference, ~1e-6).  Sampling
    does not need it (a row's tokens share the offset), so it is asked for with `blocked`.
    """
    peak = mx.max(x, axis=-1, keepdims=True)
    e = mx.exp(x - peak)
    pad = -x.shape[-1] % _SUM_BLOCK
    if pad:
        e = mx.pad(e, [(0, 0)] * (e.ndim - 1) + [(0, pad)])
    return peak, mx.log(e.reshape(*e.shape[:-1], -1, _SUM_BLOCK).sum(axis=-1).sum(axis=-1, keepdims=True))


def logsumexp(logits: mx.array, blocked: bool = False) -> mx.array:
    """The log-softmax's normaliser over the last axis, in float32 ([..., V] -> [...])."""
    x = logits.astype(mx.float32)
    if not blocked:
        return mx.logsumexp(x, axis=-1)
    peak, log_total = _blocked_sum(x)
    return (peak + log_total)[..., 0]


def log_softmax(logits: mx.array, blocked: bool = False) -> mx.array:
    """log-softmax over the last axis in float32; `blocked` for a precise normaliser (beam scores)."""
    x = logits.astype(mx.float32)
    if not blocked:
        return x - mx.logsumexp(x, axis=-1, keepdims=True)
    peak, log_total = _blocked_sum(x)
    return x - peak - log_total


def apply_temperature(logprobs: mx.array, temp: float) -> mx.array:
    """log-softmax(logprobs / temp): sharper below 1, flatter above."""
    return log_softmax(logprobs.astype(mx.float32) * (1.0 / temp))


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the k most likely tokens of each row (-inf elsewhere); k = 0 keeps all."""
    if k <= 0 or k >= logprobs.shape[-1]:
        return logprobs
    # A partition, not a sort: only which tokens fall outside the k best matters.
    dropped = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(logprobs, dropped, mx.array(_NEG_INF, logprobs.dtype), axis=-1)


def apply_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """Keep the nucleus: the most likely tokens whose probability mass first reaches top_p.

    A token is kept when the mass of the tokens strictly more likely than it is
    below top_p, so the most likely token always survives.
    """
    if top_p >= 1.0:
        return logprobs
    order = mx.argsort(-logprobs, axis=-1)
    sorted_probs = mx.softmax(mx.take_along_axis(logprobs, order, axis=-1), axis=-1)
    mass_before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
    drop_sorted = mass_before >= top_p
    drop = mx.put_along_axis(mx.zeros(logprobs.shape, mx.bool_), order, drop_sorted, axis=-1)
    return mx.where(drop, _NEG_INF, logprobs)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Keep tokens at least min_p times as likely as the row's most likely token."""
    if min_p <= 0.0:
        return logprobs
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs < threshold, _NEG_INF, logprobs)


# ----- samplers -------------------------------------------------------------------------


def _check_sampling(temp, top_k, top_p, min_p) -> None:
    def number(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise GenerationError(f"{name} must be a number, got {value!r}")

    for name, value in (("temperature", temp), ("top_p", top_p), ("min_p", min_p)):
        number(name, value)
    if temp < 0 or math.isinf(temp):
        raise GenerationError(f"temperature must be a finite number >= 0 (0 = greedy), got {temp}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if not 0.0 <= min_p < 1.0:
        raise GenerationError(f"min_p must be in [0, 1) (0 = off), got {min_p}")


class CategoricalSampler:
    """Temperature / top-k / top-p / min-p sampling with its own PRNG key.

    The key lives in the sampler, not in mlx's global state, and is split once
    per call: two samplers made with the same seed draw the same tokens from the
    same inputs, whatever else the program samples meanwhile.
    """

    def __init__(self, temp: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: int | None = None):
        _check_sampling(temp, top_k, top_p, min_p)
        if temp == 0:
            raise GenerationError("CategoricalSampler needs temperature > 0; use greedy for 0")
        self.temp, self.top_k, self.top_p, self.min_p = float(temp), top_k, float(top_p), float(min_p)
        if seed is None:
            seed = random.SystemRandom().getrandbits(63)
        elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise GenerationError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = seed
        self._key = mx.random.key(seed)

    def filter(self, logprobs: mx.array) -> mx.array:
        """The log-weights the draw uses: temperature, then the truncations (HF order)."""
        out = logprobs.astype(mx.float32)
        if self.temp != 1.0:
            out = apply_temperature(out, self.temp)
        out = apply_top_k(out, self.top_k)
        out = apply_top_p(out, self.top_p)  # renormalises what top-k left
        return apply_min_p(out, self.min_p)  # relative to the max: needs no renormalising

    def __call__(self, logprobs: mx.array) -> mx.array:
        keys = mx.random.split(self._key)
        self._key = keys[0]
        return mx.random.categorical(self.filter(logprobs), axis=-1, key=keys[1])


def make_sampler(temp: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: int | None = None) -> Sampler:
    """A sampler for these settings: `greedy` at temperature 0, else a `CategoricalSampler`.

    temp >= 0; top_k >= 0 (0 = off); top_p in (0, 1] (1 = off); min_p in [0, 1)
    (0 = off).  The truncations are ignored at temperature 0 (greedy keeps the
    best token, which every one of them keeps too).  `seed` makes the draws
    reproducible; None draws a fresh seed from the OS.
    """
    _check_sampling(temp, top_k, top_p, min_p)
    if temp == 0:
        return greedy
    return CategoricalSampler(temp, top_k, top_p, min_p, seed)


# ----- logits processors ----------------------------------------------------------------


def token_counts(tokens: mx.array, vocab_size: int, context_size: int | None = None) -> mx.array:
    """How often each id occurs in each row's last `context_size` history slots: float32 [B, V].

    Negative ids (padding slots) count for nothing.
    """
    if tokens.ndim == 1:
        tokens = tokens[None]
    if context_size is not None:
        tokens = tokens[:, -context_size:]
    B = tokens.shape[0]
    weights = (tokens >= 0).astype(mx.float32)
    ids = mx.maximum(tokens, 0)  # padding slots point at id 0 with weight 0
    return mx.zeros((B, vocab_size), mx.float32).at[mx.arange(B)[:, None], ids].add(weights)


def _check_context_size(name: str, size) -> None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise GenerationError(f"{name} must be a positive integer or None (whole history), got {size!r}")


def _check_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GenerationError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class RepetitionPenalty:
    """Hugging Face's repetition penalty (CTRL, Keskar et al. 2019).

    Each id seen in the history has its logit divided by `penalty` if positive,
    multiplied by it if negative: penalty > 1 discourages repeats.  The history
    is the prompt plus generated ids (as HF), or its last `context_size` ids.
    """

    def __init__(self, penalty: float, context_size: int | None = None):
        self.penalty = _check_finite("repetition_penalty", penalty)
        if self.penalty <= 0:
            raise GenerationError(f"repetition_penalty must be > 0 (1 = off), got {penalty}")
        _check_context_size("repetition_context_size", context_size)
        self.context_size = context_size

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        seen = token_counts(tokens, logits.shape[-1], self.context_size) > 0
        penalised = mx.where(logits < 0, logits * self.penalty, logits / self.penalty)
        return mx.where(seen, penalised, logits)


class PresenceFrequencyPenalty:
    """OpenAI-style additive penalties: logit -= presence * [count > 0] + frequency * count.

    Counts are over the history (prompt plus generated ids) or its last
    `context_size` ids.  Negative values encourage repeats.
    """

    def __init__(self, presence: float = 0.0, frequency: float = 0.0, context_size: int | None = None):
        self.presence = _check_finite("presence_penalty", presence)
        self.frequency = _check_finite("frequency_penalty", frequency)
        _check_context_size("penalty context size", context_size)
        self.context_size = context_size

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        counts = token_counts(tokens, logits.shape[-1], self.context_size)
        penalty = self.frequency * counts + self.presence * (counts > 0).astype(mx.float32)
        return logits - penalty.astype(logits.dtype)


class LogitBias:
    """Adds a fixed bias to chosen ids' logits (-inf bans a token)."""

    def __init__(self, bias: Mapping[int, float]):
        if not isinstance(bias, Mapping):
            raise GenerationError(f"logit_bias must be a mapping {{token_id: bias}}, got {type(bias).__name__}")
        for token, value in bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise GenerationError(f"logit_bias keys must be token ids (ints >= 0), got {token!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise GenerationError(f"logit_bias[{token}] must be a number, got {value!r}")
        self.bias = {int(k): float(v) for k, v in bias.items()}
        self._dense: dict[int, mx.array] = {}  # vocabulary size -> bias vector, built once

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        V = logits.shape[-1]
        if V not in self._dense:
            too_big = [t for t in self.bias if t >= V]
            if too_big:
                raise GenerationError(f"logit_bias names token id {too_big[0]}, outside the vocabulary (0..{V - 1})")
            dense = [0.0] * V
            for token, value in self.bias.items():
                dense[token] = value
            self._dense[V] = mx.array(dense, mx.float32)
        return logits + self._dense[V].astype(logits.dtype)


def make_logits_processors(
    logit_bias: Mapping[int, float] | None = None,
    repetition_penalty: float | None = None,
    repetition_context_size: int | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    penalty_context_size: int | None = None,
) -> list[LogitsProcessor]:
    """The processors for these settings (an empty list when all are off).

    Context sizes limit a penalty to the last N history ids; None uses the whole
    history (prompt and generated ids, as Hugging Face does; mlx-lm uses 20).
    """
    processors: list[LogitsProcessor] = []
    if logit_bias:
        processors.append(LogitBias(logit_bias))
    if repetition_penalty is not None:
        rp = RepetitionPenalty(repetition_penalty, repetition_context_size)
        if rp.penalty != 1.0:
            processors.append(rp)
    if presence_penalty is not None or frequency_penalty is not None:
        pf = PresenceFrequencyPenalty(presence_penalty or 0.0, frequency_penalty or 0.0, penalty_context_size)
        if pf.presence or pf.frequency:
            processors.append(pf)
    return processors


def apply_processors(processors: Sequence[LogitsProcessor] | None, tokens: mx.array, logits: mx.array) -> mx.array:
    for processor in processors or ():
        logits = processor(tokens, logits)
    return logits


# ----- all the settings as one object ----------------------------------------------------


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen: one object the command lines, `ChatSession` and the engine
    share.  Checked when made; `sampler()` and `processors()` build what the engine runs."""

    temp: float = 0.0  # 0: greedy
    top_k: int = 0  # keep the k likeliest tokens (0: off)
    top_p: float = 1.0  # nucleus mass (1: off)
    min_p: float = 0.0  # drop tokens below min_p x the likeliest one's probability (0: off)
    seed: int | None = None  # reproducible draws (None: a fresh seed from the OS)
    repetition_penalty: float | None = None  # Hugging Face's (1 or None: off)
    repetition_context_size: int | None = None  # the last N ids it looks at (None: all)
    presence_penalty: float | None = None  # OpenAI's: subtracted once per token seen
    frequency_penalty: float | None = None  # OpenAI's: subtracted per occurrence
    penalty_context_size: int | None = None  # the last N ids those two look at (None: all)
    logit_bias: Mapping[int, float] | None = field(default=None, hash=False)  # token id -> added logit

    def __post_init__(self):
        self.sampler()
        self.processors()

    def sampler(self) -> Sampler:
        """A new sampler (its own random key, seeded by `seed`)."""
        return make_sampler(self.temp, self.top_k, self.top_p, self.min_p, self.seed)

    def processors(self) -> list[LogitsProcessor]:
        return make_logits_processors(self.logit_bias, self.repetition_penalty, self.repetition_context_size,
                                      self.presence_penalty, self.frequency_penalty, self.penalty_context_size)
