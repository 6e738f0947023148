"""The decode engine: one chunked prefill and one pipelined decode loop under every way of generating.

Streaming and batched generation, beam and contrastive search, the keras-style loops, prompt
caches and chat all run through the two functions here:

- `prefill(model, ids, cache)` feeds a prompt into the KV cache in chunks sized for the device
  (`default_prefill_step`) and returns the hidden states of its last chunk, still lazy.
- `run(policy, hidden, budget)` is the decode loop.  A *step policy* says what one step
  computes (`first` from the prompt's hidden states, `advance` from the step before) and what
  the host reads of it (`read`, the loop's one synchronisation per step).  When the next step
  does not depend on what the host reads (`policy.pipelined`), the loop queues step n + 1 on
  the device before it waits for step n, so the device never idles while the host
  detokenizes.  `SampleStep` is ordinary generation's policy; beam and contrastive search
  (search.py) and keras-hub's PaliGemma loop bring their own.

New decoding schemes are policies, not loops: a batch whose rows join and leave is a policy
whose `advance` takes or merges cache rows (batching.BatchPolicy: lazily, so it stays pipelined);
speculative decoding is a policy whose `advance` feeds several proposed tokens in one forward
pass and whose `read` returns the accepted ones, rolling the caches back with `trim_to`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn

from .arguments import integer_arg
from .errors import GenerationError
from .models.image_blocks import chunk_ends
from .samplers import apply_processors, greedy, logsumexp

# Prompt rows (positions x batch) per forward call during prefill.  Each chunk's activations
# are what prefill memory scales with, and only the last position goes through the head.
PREFILL_STEP_SIZE = 2048  # a GPU: long chunks keep it busy (mlx-lm's default)
# Soft-capped attention (Gemma 2) cannot use the fused kernel and spells out float32 scores.
SOFTCAP_PREFILL_STEP_SIZE = 512
# A CPU gains nothing from long chunks, and short ones keep each product's activations in
# cache (benchmarks/RESULTS.md, "Measurements behind the defaults", has the figures).
CPU_PREFILL_STEP_SIZE = 32
# Quantized weights are dequantized once per chunk on the CPU (cpu_spread), so longer pay off.
CPU_QUANTIZED_PREFILL_STEP_SIZE = 256
_CLEAR_CACHE_EVERY = 256  # decode steps between returns of freed buffers to the allocator

# MLX streams belong to the thread that made them (MLX 0.32 refuses another thread's), so each
# thread makes its own: the batch scheduler's MLX thread and the caller's may both generate.
_streams = threading.local()


def generation_stream() -> mx.Stream:
    """A stream of its own for generation on the current default device (made once per device and thread)."""
    device = mx.default_device()
    made = _streams.__dict__.setdefault("by_device", {})
    if repr(device) not in made:
        made[repr(device)] = mx.new_stream(device)
    return made[repr(device)]


def token_budget(model, prompt_length: int, max_tokens: int) -> int:
    """How many tokens may follow a prompt: max_tokens, or fewer at the context length.

    The whole sequence (prompt + generated) must fit the model's
    `max_position_embeddings`, so that it can be fed back in a later turn.
    """
    integer_arg("max_tokens", max_tokens, 0, error=GenerationError)
    context = model.args.max_position_embeddings
    if prompt_length >= context:
        raise GenerationError(
            f"the prompt is {prompt_length} tokens, but the model's context length is {context}: "
            "shorten the prompt")
    return min(max_tokens, context - prompt_length)


def default_prefill_step(model, rows: int = 1) -> int:
    """Prompt positions per forward call for a batch of `rows` when the caller does not say."""
    if mx.default_device() == mx.cpu:
        # A rank of a distributed model decides from the whole model (share.quantized, agreed by the
        # ranks), not its own layers: every rank must feed the same chunks.
        quantized = isinstance(model, nn.Module) and (
            model.share.quantized if model.share is not None
            else any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()))
        return max(1, (CPU_QUANTIZED_PREFILL_STEP_SIZE if quantized else CPU_PREFILL_STEP_SIZE) // rows)
    softcapped = model.args.attn_logit_softcapping is not None
    return max(1, (SOFTCAP_PREFILL_STEP_SIZE if softcapped else PREFILL_STEP_SIZE) // rows)


def prefill(model, ids: mx.array, cache: Sequence, step_size: int | None = None, *,
            keep_hidden: bool = False, **inputs) -> mx.array:
    """Feed `ids` [B, T] into `cache`, `step_size` positions per call; the last chunk's hidden states.

    Every chunk but the last is computed before the next is queued, so the graph (and the
    activations alive at once) stay one chunk deep.  Returns [B, t, D] for the last chunk,
    lazy, or all T positions with `keep_hidden`.  A prefix-LM prompt (PaliGemma's image and
    prompt attend both ways) goes in one call, and `inputs` (pixels, prefix lengths) with it.
    A causal model with images (Gemma 3) attends each image's tokens both ways: no chunk
    ends inside an image, and the image features are merged into the prompt's embeddings
    once, which the chunks then take slice by slice.
    """
    if step_size is None:
        step_size = default_prefill_step(model, ids.shape[0])
    integer_arg("prefill_step_size", step_size, 1, error=GenerationError)
    if model.prefix_lm:
        step_size = max(step_size, ids.shape[1])
    blocks = model.image_input is not None and not model.prefix_lm  # image blocks in a causal prompt
    ends = chunk_ends(ids, step_size, model.image_input.token_id if blocks else None)
    embeddings = model.model.embed(ids, **inputs) if blocks and inputs else None
    kept, start = [], 0
    with mx.stream(generation_stream()):
        for end in ends:
            chunk = inputs if start == 0 else {}
            if embeddings is not None:
                chunk = {"input_embeddings": embeddings[:, start:end]}
            hidden = model.model(ids[:, start:end], cache=cache, **chunk)
            if end < ids.shape[1]:
                mx.eval([c.state for c in cache] + ([hidden] if keep_hidden else []))
                if keep_hidden:
                    kept.append(hidden)
            start = end
    return mx.concatenate(kept + [hidden], axis=1) if kept else hidden


# ----- the decode loop ------------------------------------------------------------------


@dataclass
class Pending:
    """One queued step: `queue`, the arrays the device computes now; `rest`, what the policy keeps."""

    queue: tuple
    rest: Any = None


class StepPolicy(Protocol):
    """What one decode step computes and what the host reads of it."""

    pipelined: bool  # whether `advance` can be queued before the host reads the step before

    def first(self, hidden: mx.array | None) -> Pending:
        """Step 1, from the prompt's last hidden states (lazy)."""

    def advance(self, step: Pending, read: Any) -> Pending:
        """The step after `step` (lazy); `read` is what `read(step)` returned, None when pipelined."""

    def read(self, step: Pending, n: int) -> Any:
        """The host's values of step n (synchronises); raises GenerationError on NaN."""


def run(policy: StepPolicy, hidden: mx.array | None, budget: int) -> Iterator[Any]:
    """Yield `policy.read` of up to `budget` steps; closing the generator stops the loop."""
    if budget <= 0:
        return
    stream = generation_stream()
    with mx.stream(stream):
        pending = policy.first(hidden)
    mx.async_eval(*pending.queue)
    for n in range(1, budget + 1):
        queued = None
        if policy.pipelined and n < budget:  # queue step n + 1 before waiting for step n
            with mx.stream(stream):
                queued = policy.advance(pending, None)
            mx.async_eval(*queued.queue)
        values = policy.read(pending, n)
        yield values
        if n == budget:
            return
        if queued is None:
            with mx.stream(stream):
                queued = policy.advance(pending, values)
            mx.async_eval(*queued.queue)
        pending = queued
        if n % _CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()


class SampleStep:
    """Ordinary generation: head on the last position, logits processors, sampler; fed back.

    `read` gives (ids: list of B ints, logprobs [B, V]).  `history` [B, n] is what the
    processors see (prompt then generated ids, pads as -1); None when there are none.
    """

    pipelined = True

    def __init__(self, model, cache, sampler=None, processors=None, history: mx.array | None = None):
        self.model, self.cache = model, cache
        self.sampler = sampler or greedy
        self.processors = list(processors or [])
        self.history = history

    def _sample(self, hidden: mx.array, fed: mx.array | None) -> Pending:
        logits = self.model.logits(hidden[:, -1, :]).astype(mx.float32)  # the head on the last position only
        if self.processors:
            if fed is not None:
                self.history = mx.concatenate([self.history, fed], axis=1)
            logits = apply_processors(self.processors, self.history, logits)
        lse = logsumexp(logits)  # [B]
        logprobs = logits - lse[:, None]
        # Greedy needs only the argmax, which subtracting lse does not move; the log-softmax
        # then stays lazy and is made only if the caller reads it (a vocabulary-sized
        # float32 array less per step).
        token = (mx.argmax(logits, axis=-1) if self.sampler is greedy else self.sampler(logprobs)).astype(mx.int32)
        # A NaN anywhere in a row, or a row with no finite logit, leaves its logsumexp
        # non-finite; the check rides along in the one array the host reads (-1 marks the row).
        return Pending((token, mx.where(mx.isfinite(lse), token, -1)), logprobs)

    def first(self, hidden: mx.array) -> Pending:
        return self._sample(hidden, None)

    def advance(self, step: Pending, read) -> Pending:
        y = step.queue[0][:, None]
        return self._sample(self.model.model(y, cache=self.cache), y)

    def read(self, step: Pending, n: int):
        values = step.queue[1].tolist()
        if min(values) < 0:
            rows = [b for b, v in enumerate(values) if v < 0]
            raise GenerationError(f"the logits at generated token {n} (batch rows {rows}) hold a NaN or no finite "
                                  "value; the weights, the dtype (try float32 or bfloat16) or a logits processor "
                                  "are at fault")
        return values, step.rest
