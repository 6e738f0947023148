"""keras-hub's PaliGemma `generate` loop on mlx_gemma's model: packed ids + pixels in, ids out.

keras-hub 0.32 (`PaliGemmaCausalLM.generate_step`) does, for right-padded
`token_ids` [B, L] whose `padding_mask` marks each row's prompt:

1. one pass over image + all L text positions, where every query sees the image and
   its row's whole prompt (both ways) and the rest causally; this seeds the cache;
2. from index m = the shortest prompt's length on, in lock-step: feed the id at
   position index - 1 *causally* (rewriting its cache entry), sample, and keep the
   row's prompt id where the mask is set, else the sample; stop at L, or once every
   row holds a stop id after its prompt.

So a row as long as the shortest prompt is a plain prefix-LM (as transformers), but
a longer row's prompt tokens from position m - 1 on are re-read causally over cache
entries that saw its whole prompt: a batch's longer prompts can answer differently
than alone.  We reproduce that exactly: prefill each row's whole prompt as prefix,
keep the cache up to position m - 1, then step as keras-hub does (a step policy on
the engine's loop).  The caches are plain growing ones (Gemma 2's window is applied as
a mask), so they can be cut back.

With `speculation` (compile(speculative=...)), `fill_pali` gives the same ids row by row, each row
speculating on its own: a row's keras-hub loop depends on the batch only through m (where its
prompt tail starts being re-read causally) and through where the loop ends, so each row is
prefilled as its prefix, cut back to m - 1, fed its prompt tail causally, and decoded with a
proposer; rows that stop early go on to the batch's last stop, as in the lock-step loop.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..models.kv_cache import KVCache
from ..engine import Pending, prefill, run
from ..errors import GenerationError
from ..generate import generate_step
from ..proposers import Speculation
from ..samplers import log_softmax


def _check(model, L: int, sampler) -> None:
    if sampler.search is not None:
        raise GenerationError(f"{sampler.search} search is not available for PaliGemma here; "
                              "compile(sampler=...) with greedy, top_k, top_p or random")
    N, context = model.args.num_image_tokens, model.args.max_position_embeddings
    if N + L > context:
        raise GenerationError(f"{N} image tokens + max_length {L} exceed the model's context length {context}")


def fill_pali(model, ids: np.ndarray, lengths: np.ndarray, pixels: mx.array, sampler, stop_ids,
              speculation: Speculation | None = None) -> np.ndarray:
    """`ids` [B, L] with the generated ids written in, as keras-hub's loop leaves them; with
    `speculation`, row by row through its proposer (greedy: the same ids)."""
    B, L = ids.shape
    out = ids.copy()
    m = int(lengths.min())
    if m >= L:
        return out
    _check(model, L, sampler)
    if speculation is not None:
        return _fill_speculative(model, out, lengths, m, pixels, sampler, stop_ids, speculation)
    N = model.args.num_image_tokens
    width = int(lengths.max())
    image_slots = np.full((B, N), model.args.image_token_index, np.int32)
    prompt = mx.array(np.concatenate([image_slots, out[:, :width]], axis=1))
    cache = [KVCache() for _ in model.layers]
    # Right padding past a row's prompt is only seen causally, by pad queries: the
    # kept positions (< m - 1 <= every prompt's end) never look at it.
    prefill(model, prompt, cache, pixel_values=pixels, prefix_length=mx.array(N + lengths, dtype=mx.int32))
    for c in cache:
        c.trim_to(N + m - 1)
    stops = list(stop_ids or ())
    stopped = np.zeros(B, bool)
    policy = _KerasPaliStep(model, cache, sampler.step_sampler(), out, lengths, m)
    for q, ids_next in enumerate(run(policy, None, L - m), start=m - 1):
        out[:, q + 1] = ids_next
        stopped |= (q + 1 >= lengths) & np.isin(ids_next, stops)
        if stops and stopped.all():
            break
    return out


class _KerasPaliStep:
    """keras-hub's lock-step: feed the id at position q, keep the row's prompt id at q + 1 where
    there is one, else the sample.  The next feed is the device's own choice: pipelined."""

    pipelined = True

    def __init__(self, model, cache, step_sampler, ids: np.ndarray, lengths: np.ndarray, m: int):
        self.model, self.cache, self.step, self.m = model, cache, step_sampler, m
        L = ids.shape[1]
        self.prompt_ids, self.past_prompt = mx.array(ids), mx.array(lengths)[:, None] <= mx.arange(L)[None]  # [B, L]

    def _feed(self, q: int, y: mx.array) -> Pending:
        hidden = self.model.model(y[:, None], cache=self.cache)
        logprobs = log_softmax(self.model.logits(hidden[:, -1, :]))
        token = self.step(logprobs).astype(mx.int32)
        chosen = mx.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
        ids_next = mx.where(self.past_prompt[:, q + 1], token, self.prompt_ids[:, q + 1])
        return Pending((ids_next, chosen), q)

    def first(self, hidden) -> Pending:
        return self._feed(self.m - 1, self.prompt_ids[:, self.m - 1])

    def advance(self, step: Pending, read) -> Pending:
        return self._feed(step.rest + 1, step.queue[0])

    def read(self, step: Pending, n: int) -> np.ndarray:
        ids_next, chosen = np.array(step.queue[0]), np.array(step.queue[1])
        if np.isnan(chosen).any():
            raise GenerationError(f"the model produced NaN logits at position {step.rest + 1} (batch rows "
                                  f"{np.flatnonzero(np.isnan(chosen)).tolist()}); the weights or the dtype are at fault")
        return ids_next


def _fill_speculative(model, out: np.ndarray, lengths: np.ndarray, m: int, pixels: mx.array, sampler, stop_ids,
                      speculation: Speculation) -> np.ndarray:
    """`fill_pali`'s ids (`out`: the ids given, filled in place), each row decoded alone with
    `speculation`'s proposer (greedy: the same tokens; a sampler: its distribution, row by row)."""
    ids = out.copy()
    B, L = out.shape
    N = model.args.num_image_tokens
    step_sampler, stops = sampler.step_sampler(), frozenset(stop_ids or ())
    streams: list = [None] * B
    written = [int(n) for n in lengths]  # row b's next position to fill
    stop_at: list[int | None] = [None] * B

    def advance(b: int, last: int, at_stop: bool) -> None:
        """Fill row b up to position `last`, or (at_stop) to its first stop id."""
        for tokens, _ in streams[b]:
            out[b, written[b]] = tokens[0]
            if stop_at[b] is None and tokens[0] in stops:
                stop_at[b] = written[b]
            written[b] += 1
            if written[b] > last or (at_stop and stop_at[b] is not None):
                return

    try:
        for b in range(B):
            n = written[b]
            if n >= L:
                continue  # a prompt as long as max_length: nothing to fill, and the loop runs to L
            image = [model.args.image_token_index] * N
            cache = [KVCache() for _ in model.layers]
            prefill(model, mx.array([image + out[b, :n].tolist()]), cache, pixel_values=pixels[b : b + 1],
                    prefix_length=mx.array([N + n], dtype=mx.int32))
            for c in cache:
                c.trim_to(N + m - 1)  # keras-hub re-reads the prompt from m - 1 on causally
            proposer = speculation.proposer(None, step_sampler, model.args.vocab_size)
            streams[b] = generate_step(model, out[b : b + 1, m - 1 : n], cache=cache, sampler=step_sampler,
                                       max_tokens=L - n, cached_ids=[image + out[b, : m - 1].tolist()],
                                       proposer=proposer, num_draft_tokens=speculation.num_draft_tokens)
            advance(b, L - 1, at_stop=bool(stops))
        # The lock-step loop ends at the last row's stop once every row has one, else at L.
        done = bool(stops) and all(p is not None for p in stop_at)
        end = max(stop_at) if done else L - 1
        for b in range(B):
            if streams[b] is not None and written[b] <= end:
                advance(b, end, at_stop=False)
        if done:
            out[:, end + 1 :] = ids[:, end + 1 :]
    finally:
        for s in streams:
            if s is not None:
                s.close()
    return out
