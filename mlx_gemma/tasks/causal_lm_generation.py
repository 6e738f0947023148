"""keras-hub's `generate` semantics on mlx_gemma's engine: packed ids in, packed ids out.

keras-hub (0.32, `CausalLM.generate_step` + `Sampler.__call__`) takes right-padded
`token_ids` [B, L] and a `padding_mask` marking each row's prompt, and fills
positions index = min(prompt lengths) .. L-1 in lock-step: a row keeps its prompt
token where the mask is set, else takes the sampled one.  The loop ends at L, or
as soon as every row holds a stop id after its prompt; ids generated after a row's
own stop stay in `token_ids` but the returned `padding_mask` is False from the
position after that stop on.  Without stop ids the mask is all True.

Here each row's prompt is decoded by `mlx_gemma.generate.generate_step`, left-padded
in one batch (causal attention makes this equal to keras-hub's right-padded,
position-aligned loop), and the ids land where keras-hub puts them: row b's n-th
new id at position len_b + n, for n up to the position where keras-hub's loop
ends.  Beam and contrastive search run per row through `mlx_gemma.search`.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..errors import GenerationError
from ..generate import generate_step
from ..proposers import Speculation, same_vocabulary
from ..samplers import greedy
from ..search import beam_search, contrastive_search
from .backbone import GemmaBackbone

_SPECULATIVE_KEYS = {"draft_model", "prompt_lookup", "num_draft_tokens"}


def check_packed(token_ids, padding_mask, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int32 [B, L], mask bool [B, L], prompt lengths [B]) after checking keras-hub's layout."""
    try:
        ids = np.asarray(token_ids)
        mask = np.asarray(padding_mask)
    except Exception as e:  # anything numpy cannot make an array of
        raise GenerationError(f"token_ids / padding_mask must be arrays: {e}") from None
    if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[1] == 0:
        raise GenerationError(f"token_ids {ids.shape} and padding_mask {mask.shape} must both be [batch, length]")
    if not np.issubdtype(ids.dtype, np.integer):
        raise GenerationError(f"token_ids must hold integers, got {ids.dtype}")
    mask = mask.astype(bool)
    lengths = mask.sum(axis=1)
    prefix = np.arange(ids.shape[1])[None] < lengths[:, None]
    if not np.array_equal(mask, prefix):
        raise GenerationError("padding_mask must mark each row's prompt at its start (keras-hub pads on the right)")
    if lengths.min() == 0:
        raise GenerationError(f"row {int(np.argmin(lengths))} has an empty prompt (padding_mask all False)")
    bad = (ids < 0) | (ids >= vocab_size)
    if (bad & mask).any():
        raise GenerationError(f"token_ids holds ids outside the vocabulary (0..{vocab_size - 1}) in a prompt")
    return ids.astype(np.int32), mask, lengths


def output_mask(ids: np.ndarray, prompt_mask: np.ndarray, stop_ids) -> np.ndarray:
    """keras-hub's returned padding_mask: True up to and including each row's first new stop id."""
    if stop_ids is None:
        return np.ones_like(prompt_mask)
    ends = np.isin(ids, list(stop_ids)) & ~prompt_mask
    after = np.cumsum(ends, axis=1) - ends  # stops strictly before each position
    return after == 0


def strip_prompt(out: dict, prompt_mask: np.ndarray) -> dict:
    """keras-hub's strip_prompt: roll each row left by its prompt length; keep only new ids' mask."""
    L = prompt_mask.shape[1]
    shift = prompt_mask.sum(axis=1)
    ix = (np.arange(L)[None] + shift[:, None]) % L

    def roll(a):
        return np.take_along_axis(a, ix, axis=1)

    return {"token_ids": roll(out["token_ids"]), "padding_mask": roll(prompt_mask) ^ roll(out["padding_mask"])}


def speculation_of(speculative, sampler, tokenizer=None) -> Speculation | None:
    """`compile(speculative=...)`'s dict as checked settings (None: off).  A draft may be a
    GemmaCausalLM (its vocabulary compared with `tokenizer`'s, piece by piece), a GemmaBackbone or an
    MLX model; the compiled sampler must be greedy or draw from a distribution (not beam / contrastive)."""
    if speculative is None:
        return None
    if not isinstance(speculative, dict) or not speculative or set(speculative) - _SPECULATIVE_KEYS:
        raise GenerationError(f"compile(speculative=...) takes a dict of {sorted(_SPECULATIVE_KEYS)}, e.g. "
                              f"{{'prompt_lookup': 3}} or {{'draft_model': lm, 'num_draft_tokens': 4}}; "
                              f"got {speculative!r:.80}")
    step = None if sampler.search is not None else sampler.step_sampler()
    if step is None or (step is not greedy and not callable(getattr(step, "filter", None))):
        raise GenerationError(f"speculative decoding needs greedy or a sampling sampler (random, top_k, top_p), "
                              f"not {type(sampler).__name__}: its rejection rule needs the distribution drawn from")
    draft = speculative.get("draft_model")
    if draft is not None and hasattr(draft, "backbone"):  # a GemmaCausalLM (or one of its task subclasses)
        theirs = getattr(draft.preprocessor, "tokenizer", None) if draft.preprocessor is not None else None
        if tokenizer is not None and theirs is not None:
            same_vocabulary(tokenizer, theirs)
        draft = draft.backbone
    if isinstance(draft, GemmaBackbone):
        draft = draft.model
    return Speculation.of(draft, speculative.get("num_draft_tokens"), speculative.get("prompt_lookup"))


def fill(model, ids: np.ndarray, lengths: np.ndarray, sampler, stop_ids, images: list | None = None,
         speculation: Speculation | None = None) -> np.ndarray:
    """`ids` with the generated ids written in, as keras-hub's loop leaves them.

    `images` (Gemma 3): per row, the pixels [k, S, S, 3] of its k image blocks, or None; Gemma 4:
    per row, a dict of its media's model inputs (pixel_values, image_positions, audio_features,
    audio_mask; a row's items in its blocks' order), or None.  With `speculation` each row is decoded
    on its own, speculatively (the same tokens under greedy; the sampler's distribution otherwise).
    """
    B, L = ids.shape
    out = ids.copy()
    if lengths.min() >= L:
        return out
    context = model.args.max_position_embeddings
    if L > context:
        raise GenerationError(f"max_length {L} is longer than the model's context length {context}")
    if sampler.search is not None:
        if images is not None and any(im is not None for im in images):
            raise GenerationError("beam and contrastive search take no images here; use greedy or a sampler")
        return _fill_search(model, out, lengths, sampler, stop_ids)
    stops = frozenset(stop_ids or ())
    width = int(lengths.max())
    steps_needed = L - int(lengths.min())
    # Left-padded rows need width + steps positions; if that overflows the context,
    # decode the rows one by one (each within L <= context).
    together = width + steps_needed <= context and speculation is None  # speculation: one prompt at a time
    groups = [list(range(B))] if together else [[b] for b in range(B)]
    stop_at: list[int | None] = [None] * B
    for rows in groups:
        given = [images[b] for b in rows if images[b] is not None] if images is not None else []
        _decode_rows(model, out, lengths, rows, sampler.step_sampler(), stops, stop_at, early=len(groups) == 1,
                     pixels=mx.concatenate(given) if given and not isinstance(given[0], dict) else None,
                     media=_joined(given) if given and isinstance(given[0], dict) else None,
                     speculation=speculation)
    if stops and all(p is not None for p in stop_at):
        end = max(stop_at)  # keras-hub's loop ends here: later positions keep their input ids
        out[:, end + 1:] = ids[:, end + 1:]
    return out


def _joined(media: list[dict]) -> dict:
    """Gemma 4 rows' media inputs, key by key in row order (the model takes a batch's items in order)."""
    keys = dict.fromkeys(k for m in media for k in m)
    return {k: mx.concatenate([m[k] for m in media if k in m]) for k in keys}


def _decode_rows(model, out, lengths, rows, step_sampler, stops, stop_at, early: bool, pixels=None,
                 media=None, speculation: Speculation | None = None) -> None:
    L = out.shape[1]
    row_len = [int(lengths[b]) for b in rows]
    width = max(row_len)
    batch = np.zeros((len(rows), width), np.int32)  # filler under the left padding; masked out
    for i, (b, n) in enumerate(zip(rows, row_len)):
        batch[i, width - n:] = out[b, :n]
    pads = [width - n for n in row_len]
    speculative = {}
    if speculation is not None:  # a fresh proposer per prompt (the draft's vocabulary checked at compile)
        speculative = dict(proposer=speculation.proposer(None, step_sampler, model.args.vocab_size),
                           num_draft_tokens=speculation.num_draft_tokens)
    steps = generate_step(model, batch, sampler=step_sampler, max_tokens=L - min(row_len),
                          left_padding=pads if any(pads) else None, pixel_values=pixels, media=media, **speculative)
    try:
        for n, (tokens, _) in enumerate(steps):
            for i, b in enumerate(rows):
                q = row_len[i] + n
                if q < L:
                    out[b, q] = tokens[i]
                    if stop_at[b] is None and tokens[i] in stops:
                        stop_at[b] = q
            # Every row must reach keras-hub's last index: the last stop once all rows
            # have stopped (with early=True), else L - 1.
            last = L - 1
            if early and stops and all(stop_at[b] is not None for b in rows):
                last = max(stop_at[b] for b in rows)
            if all(n + m >= last for m in row_len):
                return
    finally:
        steps.close()


def _fill_search(model, out, lengths, sampler, stop_ids) -> np.ndarray:
    L = out.shape[1]
    stops = tuple(stop_ids or ())
    for b, n in enumerate(int(x) for x in lengths):
        if n >= L:
            continue
        prompt = out[b, :n].tolist()
        if sampler.search == "beam":
            (best,) = beam_search(model, prompt, L - n, num_beams=sampler.num_beams, stop_token_ids=stops)
            new = best.tokens
        else:
            new = list(contrastive_search(model, prompt, L - n, top_k=sampler.k, alpha=sampler.alpha,
                                          stop_token_ids=stops))
        out[b, n:n + len(new)] = new
    return out
