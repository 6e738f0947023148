"""What the batching scheduler takes and gives: a `Job` (one generation request), its `Event`s,
and the checks a job passes before it is queued (bad fields raise GenerationError in the caller's
thread, never on the MLX thread); a job's state on the MLX thread (`Row`) and how one step
samples its next token (`sample_row`, as engine.SampleStep samples)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from .arguments import is_integer
from .engine import token_budget
from .errors import GenerationError, MlxGemmaError
from .samplers import SamplingSettings, apply_processors, greedy, logsumexp

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


@dataclass(frozen=True)
class Job:
    """One generation request."""

    prompt_ids: list[int]  # the whole prompt, <bos> included
    max_tokens: int  # tokens to generate at most (fewer at the context length)
    sampling: SamplingSettings = SamplingSettings()  # per request: temp/top_k/top_p/min_p/seed/penalties/logit_bias
    stop_ids: frozenset[int] = frozenset()  # ids that end the row (the tokenizer's eos ids + the caller's)
    top_logprobs: int = 0  # how many alternatives to report per token (0..20)
    media: Any = field(default=None, hash=False)  # engine.prefill's **inputs for the prompt; None for text
    # This job's own logits processors, run after the sampling ones (stateful ones, e.g. a grammar:
    # one instance per job); each is called with the row's history [1, n] and logits [1, V].
    processors: tuple = field(default=(), hash=False)
    # How it speculates when its row decodes alone (batch_speculation.SpeculationAsk; None: as the scheduler's policy says).
    speculation: Any = None


@dataclass(frozen=True)
class Event:
    """What one step gave one job; the last event of a job has a finish_reason."""

    job_id: int
    token: int | None  # None on the final event of a cancelled/failed job
    logprob: float | None  # the token's log-probability after processors, before temperature/top-p (OpenAI's)
    top_logprobs: list[tuple[int, float]]  # the job's top_logprobs alternatives, best first
    finish_reason: str | None  # None while running; "stop" (a stop id, emitted), "length", "cancelled", "error"
    error: str | None = None  # a message safe to show a client when finish_reason == "error"
    prompt_tokens: int = 0  # on the first event: the prompt's length
    cached_tokens: int = 0  # on the first event: prompt tokens reused from the prefix cache
    speculative: tuple[int, int] | None = None  # on the final event: (proposed, accepted) tokens if it speculated


def check_job(model, job: Job, on_event) -> int:
    """The job's token budget for `model`, if every field is usable (GenerationError otherwise)."""
    if not isinstance(job, Job):
        raise GenerationError(f"submit takes a Job, got {type(job).__name__}")
    if not callable(on_event):
        raise GenerationError("on_event must be callable")
    vocab = model.args.vocab_size
    ids = job.prompt_ids
    if not isinstance(ids, (list, tuple)) or not ids:
        raise GenerationError("Job.prompt_ids must be a non-empty list of token ids")
    bad = next((t for t in ids if not is_integer(t) or not 0 <= t < vocab), None)
    if bad is not None:
        raise GenerationError(f"Job.prompt_ids holds {bad!r:.40}, not a token id of this model (0..{vocab - 1})")
    if not is_integer(job.max_tokens) or job.max_tokens < 1:
        raise GenerationError(f"Job.max_tokens must be an integer >= 1, got {job.max_tokens!r:.80}")
    if not isinstance(job.sampling, SamplingSettings):
        raise GenerationError(f"Job.sampling must be a SamplingSettings, got {type(job.sampling).__name__}")
    outside = [t for t in (job.sampling.logit_bias or {}) if t >= vocab]
    if outside:
        raise GenerationError(f"Job.sampling.logit_bias names token id {outside[0]}, outside the vocabulary "
                              f"(0..{vocab - 1})")
    if not isinstance(job.stop_ids, (set, frozenset)) or not all(is_integer(t) for t in job.stop_ids):
        raise GenerationError("Job.stop_ids must be a set of token ids")
    if not is_integer(job.top_logprobs) or not 0 <= job.top_logprobs <= MAX_TOP_LOGPROBS:
        raise GenerationError(f"Job.top_logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}, "
                              f"got {job.top_logprobs!r:.80}")
    if job.media is not None and not isinstance(job.media, Mapping):
        raise GenerationError("Job.media must be the model's prompt inputs as a mapping (or None)")
    if job.media and model.image_input is None and model.audio_input is None:
        raise GenerationError("Job.media holds images or audio, but this model has no tower to take them")
    return token_budget(model, len(ids), int(job.max_tokens))


def error_text(e: BaseException) -> str:
    """A message a client may see: our own errors say what was wrong; others only their kind."""
    return str(e) if isinstance(e, MlxGemmaError) else f"internal error ({type(e).__name__})"


class Row:
    """A job on the MLX thread: waiting, prefilling into caches of its own, then a batch row."""

    def __init__(self, job_id: int, job: Job, on_event: Callable[[Event], None], budget: int):
        self.id, self.job, self.on_event, self.budget = job_id, job, on_event, budget
        self.sampler = self.processors = self.prompt = self.history = None  # made on the MLX thread
        self.caches: list | None = None  # its own caches while its prompt is prefilled
        self.fed = 0  # prompt positions prefilled
        self.cached = 0  # prompt positions taken from the prefix cache
        self.blocks: tuple = ()  # (start, end, digest) of its media blocks, when the prefix cache names them
        self.produced = 0  # tokens emitted
        self.tokens: list[int] = []  # tokens emitted (the prefix cache stores prompt + these)
        self.finish: str | None = None  # the final event's finish_reason
        self.last: mx.array | None = None  # its latest token [1] (lazy), fed at the next step
        self.done = False  # finished, failed or cancelled: no more events

    def begin(self) -> None:
        """Build what the MLX thread needs: sampler (its own key), processors, the prompt array."""
        self.sampler = self.job.sampling.sampler()
        self.processors = self.job.sampling.processors() + list(self.job.processors)
        self.prompt = mx.array(self.job.prompt_ids, dtype=mx.int32)[None]  # [1, L]
        self.history = self.prompt if self.processors else None


@dataclass
class RowOut:
    """One row's output of one step, lazy until the host reads it."""

    row: Row
    token: mx.array  # [1] the id, or -1 when the row's logits held a NaN or nothing finite
    logprob: mx.array  # [1]
    top: tuple | None  # (ids [k], logprobs [k]) when the job asks for alternatives

    def arrays(self) -> list[mx.array]:
        return [self.token, self.logprob, *(self.top or ())]


def sample_row(row: Row, logits: mx.array, fed: mx.array | None) -> RowOut:
    """The row's next token from its logits [1, V] (as engine.SampleStep samples it), lazy; `fed`:
    the token the row was fed at this step (its history grows by it).  Raises what the row's
    processors or sampler raise."""
    if row.processors:
        if fed is not None:
            row.history = mx.concatenate([row.history, fed], axis=1)
        logits = apply_processors(row.processors, row.history, logits)
    lse = logsumexp(logits)  # [1]
    # Greedy takes the argmax of the logits, and the chosen token's log-probability is one
    # logit minus lse: the vocabulary-sized log-softmax is made only when a sampler or
    # the alternatives need it (as engine.SampleStep).
    if row.sampler is greedy:
        token = mx.argmax(logits, axis=-1).astype(mx.int32)
    else:
        token = row.sampler(logits - lse[:, None]).astype(mx.int32)
    finite = mx.isfinite(lse)
    row.last = mx.where(finite, token, 0)  # a failed row still feeds a valid id until it leaves
    chosen = mx.take_along_axis(logits, row.last[:, None], axis=-1)[:, 0] - lse
    top = None
    k = row.job.top_logprobs
    if k:
        ids = mx.argpartition(-logits[0], kth=k - 1)[:k]
        top = (ids, logits[0][ids] - lse)
    return RowOut(row, mx.where(finite, token, -1), chosen, top)
