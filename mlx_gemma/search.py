"""Beam search and contrastive search: decoding that looks past the single likeliest token.

`beam_search` keeps the `num_beams` likeliest partial sequences, run as one batch
of rows through the KV cache; after each step the caches gather the surviving
rows (`cache.take`).  Its bookkeeping follows transformers 5's `_beam_search`
(`generation/utils.py`), so both return the same beams and scores.

`contrastive_search` (Su et al. 2022, "A Contrastive Framework for Neural Text
Generation") picks, among the `top_k` likeliest next tokens, the one whose
hidden state is least like any earlier one, which curbs repetition.  The k
candidates are evaluated as a batch of k rows with the cache copied k times.

Both are step policies on the engine (engine.py): its prefill, its loop.  Beam search's
host keeps the books between steps (not pipelined); contrastive search runs on the device
alone, so its next step is queued while the host reads the current token.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import mlx.core as mx

from .arguments import integer_arg, is_integer, real_arg
from .engine import Pending, prefill, run, token_budget
from .errors import DistributedError, GenerationError
from .generate import generate_step
from .prompts import prompt_ids
from .samplers import apply_processors, greedy, log_softmax


@dataclass
class Beam:
    """One finished hypothesis of `beam_search`."""

    tokens: list[int]  # generated ids only (prompt excluded), stop id included if it ended on one
    logprob: float  # sum of the tokens' log-probabilities (after the logits processors)
    score: float  # the ranking score: logprob / len(tokens) ** length_penalty, as transformers
    finished: bool  # ended on a stop id (else ran out of max_tokens or the context)


# ----- shared checks ----------------------------------------------------------------------


def _check_prompt(model, prompt) -> mx.array:
    if isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping)):
        raise GenerationError("prompt: beam and contrastive search take token ids; encode the text first "
                              "(mlx_gemma.prompts.prompt_ids)")
    ids = prompt_ids(None, prompt, vocab_size=model.args.vocab_size)  # ids are used as given
    return mx.array(ids, mx.int32)[None]  # [1, T]


def _check_stops(model, stop_token_ids) -> frozenset[int]:
    if is_integer(stop_token_ids):
        stop_token_ids = [stop_token_ids]
    stops = list(stop_token_ids or ())
    V = model.args.vocab_size
    bad = next((i for i in stops if not is_integer(i) or not 0 <= i < V), None)
    if bad is not None:
        raise GenerationError(f"stop_token_ids: {bad!r} is not an id in the model's vocabulary (0..{V - 1})")
    return frozenset(int(i) for i in stops)


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
    integer_arg("num_beams", num_beams, 1, error=GenerationError)
    integer_arg("num_return", num_return, 1, error=GenerationError)
    if num_return > num_beams:
        raise GenerationError(f"num_return ({num_return}) cannot exceed num_beams ({num_beams})")
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise GenerationError(f'early_stopping must be True, False or "never", got {early_stopping!r}')
    real_arg("length_penalty", length_penalty, error=GenerationError)
    integer_arg("prefill_step_size", prefill_step_size, 1, error=GenerationError)
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
        logprob += log_softmax(logprobs[0], blocked=True)[token].item()  # renormalised: the loop's logsumexp is coarser
        if token in stops:
            break
    return Beam(tokens, logprob, logprob / len(tokens) ** length_penalty, tokens[-1] in stops)


def _beam_loop(model, ids, budget, K, length_penalty, stops, early_stopping, processors, step_size) -> list[Beam]:
    cache = model.make_cache()
    # One row until the beams split.  transformers runs K copies, all but the first scored
    # -1e9, which selects the same candidates whenever the vocabulary holds `keep` tokens.
    policy = _BeamStep(model, cache, ids, budget, K, length_penalty, stops, early_stopping, processors)
    for decision in run(policy, prefill(model, ids, cache, step_size), budget):
        if decision is None:
            break
    return policy.pool


class _BeamStep:
    """transformers' beam bookkeeping as a step policy: the device ranks the candidates of every
    running beam, the host picks the finished hypotheses and the next beams."""

    pipelined = False

    def __init__(self, model, cache, ids, budget, K, length_penalty, stops, early_stopping, processors):
        self.model, self.cache, self.budget, self.K = model, cache, budget, K
        self.length_penalty, self.stops, self.early_stopping = length_penalty, stops, early_stopping
        self.processors = processors
        # Enough candidates that K survive even when every beam's stop ids rank first (transformers' beams_to_keep).
        self.keep = max(2, 1 + len(stops)) * K
        self.history = ids  # [R, n]: what the processors see, prompt then generated ids
        self.running: list[list[int]] = [[]]  # each row's generated ids
        self.scores = mx.zeros((1,), mx.float32)  # each row's summed log-probability, float32 as transformers
        self.pool: list[Beam] = []  # the best finished hypotheses, at most K, best first

    def _rank(self, logits: mx.array) -> Pending:
        logprobs = apply_processors(self.processors, self.history, log_softmax(logits, blocked=True))
        total = (logprobs + self.scores[:, None]).reshape(-1)  # [R * V], row-major: index = row * V + token
        top = mx.argpartition(-total, kth=min(self.keep, total.size) - 1)[:self.keep]
        return Pending((top, total[top]), logprobs.shape[-1])

    def first(self, hidden: mx.array) -> Pending:
        return self._rank(self.model.logits(hidden[:, -1]))

    def read(self, step: Pending, n: int):
        """The next beams (rows, tokens, scores, their ids), or None when the search is done."""
        flat, values = step.queue[0].tolist(), step.queue[1].tolist()
        if any(math.isnan(v) for v in values):
            raise GenerationError(f"the model produced NaN logits at generated token {n}; "
                                  "the weights or the dtype (try float32 or bfloat16) are at fault")
        V, K = step.rest, self.K
        pool_open = not (self.early_stopping is True and len(self.pool) == K)
        rows, tokens, scores, running = [], [], [], []
        for rank, i in enumerate(sorted(range(len(flat)), key=lambda i: -values[i])):
            row, token = divmod(flat[i], V)
            if token in self.stops or n == self.budget:
                if rank < K and pool_open:  # only the K best may finish (transformers' top_num_beam_mask)
                    self.pool.append(Beam(self.running[row] + [token], values[i],
                                          values[i] / n**self.length_penalty, token in self.stops))
            elif len(rows) < K:
                rows.append(row)
                tokens.append(token)
                scores.append(values[i])
                running.append(self.running[row] + [token])
        self.pool = sorted(self.pool, key=lambda b: -b.score)[:K]
        if not rows or _search_done(self.pool, scores[0], n, self.budget, K, self.length_penalty,
                                    self.early_stopping):
            return None
        return rows, tokens, scores, running

    def advance(self, step: Pending, chosen) -> Pending:
        rows, tokens, scores, self.running = chosen
        rows = mx.array(rows)
        _take_rows(self.cache, rows)
        y = mx.array(tokens, mx.int32)[:, None]  # [K, 1]
        self.history = mx.concatenate([self.history[rows], y], axis=1)
        self.scores = mx.array(scores, mx.float32)
        return self._rank(self.model.logits(self.model.model(y, cache=self.cache)[:, -1]))  # [K, V]


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
    if model.share is not None and not model.share.hidden_states:  # refused on every rank, so none waits
        raise DistributedError(f"rank {model.share.rank}: contrastive search compares final hidden states, which "
                               "a pipeline rank does not hold (only the last has them); run it in one process "
                               "or with strategy=\"tensor\"")
    ids = _check_prompt(model, prompt)
    integer_arg("top_k", top_k, 1, error=GenerationError)
    if top_k > model.args.vocab_size:
        raise GenerationError(f"top_k ({top_k}) exceeds the vocabulary size ({model.args.vocab_size})")
    real_arg("alpha", alpha, 0, 1, error=GenerationError)
    integer_arg("prefill_step_size", prefill_step_size, 1, error=GenerationError)
    stops = _check_stops(model, stop_token_ids)
    budget = token_budget(model, ids.shape[1], max_tokens)
    return _contrastive_loop(model, ids, budget, top_k, float(alpha), stops, prefill_step_size)


def _unit(h: mx.array) -> mx.array:
    return h / mx.linalg.norm(h, axis=-1, keepdims=True)  # no epsilon, as transformers' _ranking_fast


def _contrastive_loop(model, ids, budget, k, alpha, stops, step_size) -> Iterator[int]:
    if budget == 0:
        return
    cache = model.make_cache()
    hidden = prefill(model, ids, cache, step_size, keep_hidden=True)  # [1, T, H]
    for token in run(_ContrastiveStep(model, cache, k, alpha), hidden, budget):
        yield token
        if token in stops:
            return


class _ContrastiveStep:
    """One contrastive pick as a step policy, all on the device: the k candidates go through
    the model as k rows of a copied cache, and the chosen row's cache is kept."""

    pipelined = True

    def __init__(self, model, cache, k: int, alpha: float):
        self.model, self.cache, self.k, self.alpha = model, cache, k, alpha

    def _pick(self, logits: mx.array, chosen: mx.array) -> Pending:
        _take_rows(self.cache, chosen)  # every candidate continues the chosen row
        probs = mx.exp(log_softmax(logits[0], blocked=True))  # [V]
        candidates = mx.argpartition(-probs, kth=self.k - 1)[:self.k]
        # Likeliest first, so a tie in score goes to the likelier token (as transformers' topk order).
        candidates = candidates[mx.argsort(-probs[candidates])]
        hidden = self.model.model(candidates[:, None], cache=self.cache)[:, -1]  # [k, H]
        unit = _unit(hidden.astype(mx.float32))
        degeneration = (unit @ self.context.T).max(axis=-1)  # [k]: max cosine similarity to the past
        score = (1.0 - self.alpha) * probs[candidates] - self.alpha * degeneration
        best = mx.argmax(score)
        # NaN logits reach every prob of the row: -1 flags them in the one value the host reads.
        token = mx.where(mx.isnan(score).any(), -1, candidates[best].astype(mx.int32))
        return Pending((token,), (best, unit, hidden))

    def first(self, hidden: mx.array) -> Pending:
        self.context = _unit(hidden[0].astype(mx.float32))  # [S, H]: every earlier position, unit length
        return self._pick(self.model.logits(hidden[:, -1]), mx.zeros((self.k,), mx.int32))

    def advance(self, step: Pending, read) -> Pending:
        best, unit, hidden = step.rest
        self.context = mx.concatenate([self.context, unit[best][None]], axis=0)
        return self._pick(self.model.logits(hidden[best][None]), mx.broadcast_to(best, (self.k,)))

    def read(self, step: Pending, n: int) -> int:
        token = step.queue[0].item()
        if token < 0:
            raise GenerationError("the model produced NaN logits during contrastive search; "
                                  "the weights or the dtype (try float32 or bfloat16) are at fault")
        return token
