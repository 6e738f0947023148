"""Beam search and contrastive search: decoding that looks past the single likeliest token.

`beam_search` keeps the `num_beams` likeliest partial sequences, run as one batch
of rows through the KV cache; after each step the caches gather the surviving
rows (`cache.take`).  Its bookkeeping follows transformers 5's `_beam_search`
(`generation/utils.py`), so both return the same beams and scores.

`contrastive_search` (Su et al. 2022, "A Contrastive Framework for Neural Text
Generation") picks, among the `top_k` likeliest next tokens, the one whose
hidden state is least like any earlier one, which curbs repetition.  The k
candidates are evaluated as a batch of k rows with the cache copied k times.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import mlx.core as mx

from .errors import GenerationError
from .generate import _positive_int, generate_step, generation_stream, token_budget
from .prompts import _is_id, prompt_ids
from .samplers import apply_processors, greedy


@dataclass
class Beam:
    """One finished hypothesis of `beam_search`."""

    tokens: list[int]  # generated ids only (prompt excluded), stop id included if it ended on one
    logprob: float  # sum of the tokens' log-probabilities (after the logits processors)
    score: float  # the ranking score: logprob / len(tokens) ** length_penalty, as transformers
    finished: bool  # ended on a stop id (else ran out of max_tokens or the context)


# ----- shared checks and the prefill ----------------------------------------------------


def _check_prompt(model, prompt) -> mx.array:
    if isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping)):
        raise GenerationError("prompt: beam and contrastive search take token ids; encode the text first "
                              "(mlx_gemma.prompts.prompt_ids)")
    ids = prompt_ids(None, prompt, vocab_size=model.args.vocab_size)  # ids are used as given
    return mx.array(ids, mx.int32)[None]  # [1, T]


def _check_stops(model, stop_token_ids) -> frozenset[int]:
    if _is_id(stop_token_ids):
        stop_token_ids = [stop_token_ids]
    stops = list(stop_token_ids or ())
    V = model.args.vocab_size
    bad = next((i for i in stops if not _is_id(i) or not 0 <= i < V), None)
    if bad is not None:
        raise GenerationError(f"stop_token_ids: {bad!r} is not an id in the model's vocabulary (0..{V - 1})")
    return frozenset(int(i) for i in stops)


def _prefill(model, ids: mx.array, cache, step_size: int) -> mx.array:
    """Run the prompt [1, T] through the model in chunks; returns its hidden states [1, T, hidden]."""
    chunks = []
    for start in range(0, ids.shape[1], step_size):
        hidden = model.model(ids[:, start : start + step_size], cache=cache)
        mx.eval(hidden, [c.state for c in cache])  # bound the graph: one chunk at a time
        chunks.append(hidden)
    return mx.concatenate(chunks, axis=1)


_SUM_BLOCK = 1024


def _log_softmax(logits: mx.array) -> mx.array:
    """log-softmax over the last axis in float32, its normaliser summed in blocks.

    MLX's CPU backend sums a row in one sequential pass: over Gemma 3's 262,144
    logits the float32 logsumexp is then off by ~1e-3, an offset that differs
    per row and would reorder beams.  Summing 1024-wide blocks first brings it
    to ~4e-6 (torch's log_softmax, the reference, gets ~1e-6).
    """
    x = logits.astype(mx.float32)
    peak = mx.max(x, axis=-1, keepdims=True)
    e = mx.exp(x - peak)
    pad = -x.shape[-1] % _SUM_BLOCK
    if pad:
        e = mx.pad(e, [(0, 0)] * (e.ndim - 1) + [(0, pad)])
    total = e.reshape(*e.shape[:-1], -1, _SUM_BLOCK).sum(axis=-1).sum(axis=-1, keepdims=True)
    return x - peak - mx.log(total)


def _take_rows(cache, rows: mx.array) -> None:
    for layer_cache in cache:
        layer_cache.take(rows)


# ----- beam search ----------------------------------------------------------------------


def beam_search(model, prompt: list[int], max_tokens: int, num_beams: int = 4, length_penalty: float = 1.0,
                stop_token_ids=(), early_stopping: bool | str = True, num_return: int = 1,
                logits_processors=None, prefill_step_size: int = 512) -> list[Beam]:
    """The `num_return` best beams for `prompt` (token ids), best first.

    Semantics are transformers' (`generate(num_beams=..., do_sample=False)`):
    - Each step keeps the best `max(2, 1 + len(stop_token_ids)) * num_beams`
      continuations by summed log-probability.  Of these, the first `num_beams`
      that end on a stop id become finished hypotheses; the best `num_beams`
      that do not are the next step's beams.  At the last step (`max_tokens`, or
      the model's context length) every continuation counts as finished.
    - A hypothesis is ranked by `score = logprob / len(tokens) ** length_penalty`
      (its length counts the stop id); only the `num_beams` best are kept.
      `length_penalty` > 0 favours longer sequences, < 0 shorter ones.
    - `early_stopping=True` stops as soon as `num_beams` hypotheses are finished.
      `False` stops once, in addition, the best running beam, scored at its
      current length, cannot beat the worst finished one.  `"never"` does the
      same but scores the running beam at the longest length it could reach
      when `length_penalty` > 0 (the exact, "canonical" test).
    - `logits_processors` act on the log-probabilities (the log-softmax of the
      logits), which are not renormalised afterwards, as in transformers' beam
      search; `Beam.logprob` sums the processed values.
    - `num_beams=1` is greedy decoding (transformers dispatches it to greedy
      search too): its processors then act on the logits, before the log-softmax.
    Returns [] when no token may be generated (`max_tokens=0`).
    """
    ids = _check_prompt(model, prompt)
    _positive_int("num_beams", num_beams, 1)
    _positive_int("num_return", num_return, 1)
    if num_return > num_beams:
        raise GenerationError(f"num_return ({num_return}) cannot exceed num_beams ({num_beams})")
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise GenerationError(f'early_stopping must be True, False or "never", got {early_stopping!r}')
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) \
            or not math.isfinite(length_penalty):
        raise GenerationError(f"length_penalty must be a finite number, got {length_penalty!r}")
    _positive_int("prefill_step_size", prefill_step_size, 1)
    stops = _check_stops(model, stop_token_ids)
    budget = token_budget(model, ids.shape[1], max_tokens)
    processors = list(logits_processors or [])
    if budget == 0:
        return []
    if num_beams == 1:
        return [_greedy_beam(model, ids, budget, length_penalty, stops, processors, prefill_step_size)]
    beams = _beam_loop(model, ids, budget, num_beams, float(length_penalty), stops, early_stopping,
                       processors, prefill_step_size)
    return beams[:num_return]


def _greedy_beam(model, ids, budget, length_penalty, stops, processors, step_size) -> Beam:
    tokens, logprob = [], 0.0
    for (token,), logprobs in generate_step(model, ids, sampler=greedy, logits_processors=processors,
                                            prefill_step_size=step_size, max_tokens=budget):
        tokens.append(token)
        logprob += _log_softmax(logprobs[0])[token].item()  # renormalised: the loop's logsumexp is coarser
        if token in stops:
            break
    return Beam(tokens, logprob, logprob / len(tokens) ** length_penalty, tokens[-1] in stops)


def _beam_loop(model, ids, budget, K, length_penalty, stops, early_stopping, processors, step_size) -> list[Beam]:
    # Enough candidates that K survive even when every beam's stop ids rank first (transformers' beams_to_keep).
    keep = max(2, 1 + len(stops)) * K
    cache = model.make_cache()
    stream = generation_stream()
    with mx.stream(stream):
        # One row until the beams split.  transformers runs K copies, all but the first scored
        # -1e9, which selects the same candidates whenever the vocabulary holds `keep` tokens.
        logits = model.logits(_prefill(model, ids, cache, step_size)[:, -1])  # [1, V]
    history = ids  # [R, n]: what the processors see, prompt then generated ids
    running: list[list[int]] = [[]]  # each row's generated ids
    scores = mx.zeros((1,), mx.float32)  # each row's summed log-probability, float32 as transformers
    pool: list[Beam] = []  # the best finished hypotheses, at most K, best first

    for n in range(1, budget + 1):  # n = length of the sequences this step makes
        with mx.stream(stream):
            logprobs = apply_processors(processors, history, _log_softmax(logits))
            total = (logprobs + scores[:, None]).reshape(-1)  # [R * V], row-major: index = row * V + token
            k = min(keep, total.size)
            top = mx.argpartition(-total, kth=k - 1)[:k]
            top_values = total[top]
        values, flat = top_values.tolist(), top.tolist()
        if any(math.isnan(v) for v in values):
            raise GenerationError(f"the model produced NaN logits at generated token {n}; "
                                  "the weights or the dtype (try float32 or bfloat16) are at fault")
        V = logprobs.shape[-1]
        pool_open = not (early_stopping is True and len(pool) == K)
        rows, next_tokens, next_scores, next_running = [], [], [], []
        for rank, i in enumerate(sorted(range(k), key=lambda i: -values[i])):
            row, token = divmod(flat[i], V)
            if token in stops or n == budget:
                if rank < K and pool_open:  # only the K best may finish (transformers' top_num_beam_mask)
                    pool.append(Beam(running[row] + [token], values[i], values[i] / n**length_penalty,
                                     token in stops))
            elif len(rows) < K:
                rows.append(row)
                next_tokens.append(token)
                next_scores.append(values[i])
                next_running.append(running[row] + [token])
        pool = sorted(pool, key=lambda b: -b.score)[:K]
        if not rows or _search_done(pool, next_scores[0], n, budget, K, length_penalty, early_stopping):
            break

        running = next_running
        with mx.stream(stream):
            rows = mx.array(rows)
            _take_rows(cache, rows)
            y = mx.array(next_tokens, mx.int32)[:, None]  # [K, 1]
            history = mx.concatenate([history[rows], y], axis=1)
            scores = mx.array(next_scores, mx.float32)
            logits = model.logits(model.model(y, cache=cache)[:, -1])  # [K, V]
    return pool


def _search_done(pool, best_running, n, budget, K, length_penalty, early_stopping) -> bool:
    """Whether the running beams can stop (transformers' `_check_early_stop_heuristic`)."""
    if len(pool) < K:
        return False
    if early_stopping is True:
        return True
    # "never" with a positive penalty: the best running beam might still grow to the full budget.
    length = budget if early_stopping == "never" and length_penalty > 0 else n
    return not best_running / length**length_penalty > pool[-1].score


# ----- contrastive search ---------------------------------------------------------------


def contrastive_search(model, prompt: list[int], max_tokens: int, top_k: int = 4, alpha: float = 0.6,
                       stop_token_ids=(), prefill_step_size: int = 512) -> Iterator[int]:
    """Yield the ids contrastive search picks for `prompt` (token ids), one at a time.

    Each step takes the `top_k` likeliest next tokens v and picks the one maximising
    `(1 - alpha) * p(v) - alpha * max_j cos(h_v, h_j)`, where h_v is the decoder's
    final (normed) hidden state at v and h_j those of every earlier position,
    prompt included: transformers 4's `_contrastive_search` used
    `hidden_states[-1]`, which for Gemma equals the normed `last_hidden_state`.
    `alpha=0` or `top_k=1` is greedy decoding.  A stop id is yielded, then
    the search ends; so does reaching `max_tokens` or the context length.
    Settings are checked when called, not on the first `next`.
    """
    ids = _check_prompt(model, prompt)
    _positive_int("top_k", top_k, 1)
    if top_k > model.args.vocab_size:
        raise GenerationError(f"top_k ({top_k}) exceeds the vocabulary size ({model.args.vocab_size})")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise GenerationError(f"alpha must be a number in [0, 1], got {alpha!r}")
    _positive_int("prefill_step_size", prefill_step_size, 1)
    stops = _check_stops(model, stop_token_ids)
    budget = token_budget(model, ids.shape[1], max_tokens)
    return _contrastive_loop(model, ids, budget, top_k, float(alpha), stops, prefill_step_size)


def _unit(h: mx.array) -> mx.array:
    return h / mx.linalg.norm(h, axis=-1, keepdims=True)  # no epsilon, as transformers' _ranking_fast


def _contrastive_loop(model, ids, budget, k, alpha, stops, step_size) -> Iterator[int]:
    if budget == 0:
        return
    cache = model.make_cache()
    stream = generation_stream()
    with mx.stream(stream):
        hidden = _prefill(model, ids, cache, step_size)  # [1, T, H]
        logits = model.logits(hidden[:, -1])  # [1, V]
        context = _unit(hidden[0].astype(mx.float32))  # [S, H]: every earlier position, unit length
    chosen = mx.zeros((k,), mx.int32)  # the cache row every candidate continues (one row after prefill)
    for _ in range(budget):
        with mx.stream(stream):
            _take_rows(cache, chosen)
            probs = mx.exp(_log_softmax(logits[0]))  # [V]
            candidates = mx.argpartition(-probs, kth=k - 1)[:k]
            # Likeliest first, so a tie in score goes to the likelier token (as transformers' topk order).
            candidates = candidates[mx.argsort(-probs[candidates])]
            hidden = model.model(candidates[:, None], cache=cache)[:, -1]  # [k, H]
            unit = _unit(hidden.astype(mx.float32))
            degeneration = (unit @ context.T).max(axis=-1)  # [k]: max cosine similarity to the past
            score = (1.0 - alpha) * probs[candidates] - alpha * degeneration
            best = mx.argmax(score)
            # NaN logits reach every prob of the row: -1 flags them in the one value the host reads.
            token = mx.where(mx.isnan(score).any(), -1, candidates[best].astype(mx.int32))
        token = token.item()
        if token < 0:
            raise GenerationError("the model produced NaN logits during contrastive search; "
                                  "the weights or the dtype (try float32 or bfloat16) are at fault")
        yield token
        if token in stops:
            return
        with mx.stream(stream):
            context = mx.concatenate([context, unit[best][None]], axis=0)
            logits = model.logits(hidden[best][None])
            chosen = mx.broadcast_to(best, (k,))
