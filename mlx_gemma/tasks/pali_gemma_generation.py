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
keep the cache up to position m - 1, then step as keras-hub does.  The caches are
plain growing ones (Gemma 2's window is applied as a mask), so they can be cut back.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..cache import KVCache
from ..errors import GenerationError


def fill_pali(model, ids: np.ndarray, lengths: np.ndarray, pixels: mx.array, sampler, stop_ids) -> np.ndarray:
    """`ids` [B, L] with the generated ids written in, as keras-hub's loop leaves them."""
    B, L = ids.shape
    out = ids.copy()
    m = int(lengths.min())
    if m >= L:
        return out
    if sampler.search is not None:
        raise GenerationError(f"{sampler.search} search is not available for PaliGemma here; "
                              "compile(sampler=...) with greedy, top_k, top_p or random")
    N = model.args.num_image_tokens
    context = model.args.max_position_embeddings
    if N + L > context:
        raise GenerationError(f"{N} image tokens + max_length {L} exceed the model's context length {context}")
    step = sampler.step_sampler()
    width = int(lengths.max())
    image_slots = np.full((B, N), model.args.image_token_index, np.int32)
    prompt = mx.array(np.concatenate([image_slots, out[:, :width]], axis=1))
    cache = [KVCache() for _ in model.layers]
    # Right padding past a row's prompt is only seen causally, by pad queries: the
    # kept positions (< m - 1 <= every prompt's end) never look at it.
    model.model(prompt, cache=cache, pixel_values=pixels, prefix_length=mx.array(N + lengths, dtype=mx.int32))
    for c in cache:
        c.trim_to(N + m - 1)
    stops = list(stop_ids or ())
    stopped = np.zeros(B, bool)
    prompt_ids, past_prompt = mx.array(out), mx.array(lengths)[:, None] <= mx.arange(L)[None]  # [B, L]

    def feed(q: int, y: mx.array):
        """Feed the ids [B] at position q; the ids at q + 1: the sample past a row's prompt, else its prompt id."""
        hidden = model.model(y[:, None], cache=cache)
        logits = model.logits(hidden[:, -1, :]).astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = step(logprobs).astype(mx.int32)
        chosen = mx.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
        return mx.where(past_prompt[:, q + 1], token, prompt_ids[:, q + 1]), chosen

    pending = feed(m - 1, prompt_ids[:, m - 1])
    mx.async_eval(*pending)
    for q in range(m - 1, L - 1):
        ids_next, chosen = pending
        if q + 2 < L:  # queue the next step before reading this one
            pending = feed(q + 1, ids_next)
            mx.async_eval(*pending)
        ids_next, chosen = np.array(ids_next), np.array(chosen)
        if np.isnan(chosen).any():
            raise GenerationError(f"the model produced NaN logits at position {q + 1} (batch rows "
                                  f"{np.flatnonzero(np.isnan(chosen)).tolist()}); the weights or the dtype are at fault")
        out[:, q + 1] = ids_next
        stopped |= (q + 1 >= lengths) & np.isin(ids_next, stops)
        if stops and stopped.all():
            break
    return out
