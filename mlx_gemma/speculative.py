"""Speculative decoding: a step policy for the engine that checks several proposed tokens per forward pass.

Decoding reads every weight once per token.  `SpeculativeStep` asks a proposer
(proposers.py: a smaller draft model, or n-gram lookup in the text so far) for up
to k tokens, runs the target once over [last token + k proposed], keeps the
longest prefix the target agrees with plus one token of the target's own, and
rolls every KV cache back to what it kept (`trim_to`; a Gemma 4 KV-shared layer
follows its source).  The output is the target's exactly:

- greedy: a proposal is kept while it equals the target's argmax, then the
  target's own argmax follows: token for token what plain greedy decoding gives;
- sampling: speculative sampling with rejection (Leviathan et al. 2023, Chen et
  al. 2023; `accept_proposals`), with p the target's distribution after the
  logits processors and the sampler's temperature / top-k / top-p / min-p.
  History-dependent processors (penalties) run position by position over the
  k + 1 rows, each seeing the history extended by the proposals before it.

`Adaptive` (speculative_control.py) sizes k from the measured acceptance and step costs and
turns speculation off where it would be slower than plain decoding, probing again ever more rarely.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx

from .engine import Pending
from .errors import GenerationError
from .models.kv_cache import RotatingKVCache, SharedKVCache
from .samplers import apply_processors, greedy, logsumexp
from .speculative_control import Adaptive, FixedK


class Proposer(Protocol):
    """What proposes tokens for the target to check."""

    def propose(self, history: list[int], k: int) -> tuple[mx.array, mx.array | None]:
        """Up to k tokens [n] (n may be 0) to follow `history` (prompt + text so far), and the
        log-probabilities [n, V] they were drawn from, or None when drawn deterministically."""

    def accept(self, n: int) -> None:
        """The target kept the first n tokens of the last proposal (a proposer with caches rolls back)."""


class TargetReader(Proposer, Protocol):
    """A proposer that also reads the target's states (the Gemma 4 assistant drafter, assistant_proposer.py):
    `SpeculativeStep` calls `observe` after every target pass, before `accept`."""

    def observe(self, model, cache: Sequence, hidden: mx.array) -> None:
        """`hidden` [T, D]: the target's final normed hidden states at the positions just fed (the prompt's
        last, or a step's 1 + k); `model` and `cache`: the target and its caches after that pass."""


# ----- rolling caches back -------------------------------------------------------------


def can_roll_back(caches: Sequence, fed: int, back: int) -> bool:
    """Whether, after `fed` more tokens, every cache can forget the last `back` of them, and a
    quantizing cache would store them as plain one-token steps store them."""
    for c in caches:
        if isinstance(c, SharedKVCache):
            continue  # its source is in the list too
        if back and isinstance(c, RotatingKVCache) and c.offset + fed > c.max_size:
            if back > getattr(c, "slack", 0):  # a ring that wrapped keeps only its slack to go back on
                return False
        bits = getattr(c, "bits", None)
        if bits is not None and not c.quantized and c.offset < c.quantize_from < c.offset + fed:
            return False  # plain steps would switch to quantized storage part way through these tokens
    return True


def roll_back(caches: Sequence, length: int) -> None:
    """Make every cache forget positions `length` on; a typed error when one cannot."""
    for c in caches:
        if not c.trim_to(length):
            raise GenerationError(f"a KV cache holding {c.offset} tokens cannot go back to {length}: its sliding "
                                  "window has wrapped past the slots a rollback needs")


# ----- the acceptance rule -------------------------------------------------------------


def accept_proposals(p_logprobs: mx.array, q_logprobs: mx.array | None, proposals: mx.array,
                     key: mx.array) -> tuple[mx.array, mx.array]:
    """Speculative sampling (Leviathan et al. 2023, alg. 1; Chen et al. 2023): (accepted [..., k] bool,
    fallback [..., k + 1] ids); the step emits the proposals up to the first rejection i, then fallback[i].

    `p_logprobs` [..., k + 1, V]: the target's distribution at each position (shaped as the sampler
    draws); `q_logprobs` [..., k, V]: the proposer's, or None for a deterministic proposer (q one-hot).
    Proposal i is kept with probability min(1, p(x) / q(x)); on rejection the token comes from
    norm(max(0, p - q)); after k acceptances, from p at position k.  Every leading dimension is a batch.
    """
    k = proposals.shape[-1]
    p = mx.exp(p_logprobs.astype(mx.float32))
    x = proposals.astype(mx.int32)[..., None]
    px = mx.take_along_axis(p[..., :k, :], x, axis=-1)[..., 0]
    if q_logprobs is None:
        q = mx.put_along_axis(mx.zeros(p[..., :k, :].shape, mx.float32), x, mx.array(1.0), axis=-1)
    else:
        q = mx.exp(q_logprobs.astype(mx.float32))
    qx = mx.take_along_axis(q, x, axis=-1)[..., 0]
    k_accept, k_draw = mx.random.split(key)
    u = mx.random.uniform(shape=px.shape, key=k_accept)
    accepted = u * qx < px  # u < p/q without dividing by a zero q
    residual = mx.maximum(p[..., :k, :] - q, 0.0)
    # Where p <= q everywhere the residual is empty; a rejection is then impossible, and p is drawn.
    empty = residual.sum(axis=-1, keepdims=True) <= 0
    residual = mx.where(empty, p[..., :k, :], residual)
    weights = mx.concatenate([residual, p[..., k:, :]], axis=-2)
    fallback = mx.random.categorical(mx.log(weights), axis=-1, key=k_draw)
    return accepted, fallback.astype(mx.int32)


def accepted_count(accepted: Sequence[bool]) -> int:
    """How many proposals lead the list before the first rejection."""
    n = 0
    while n < len(accepted) and accepted[n]:
        n += 1
    return n


# ----- adaptivity ------------------------------------------------------------------------


@dataclass
class SpeculativeStats:
    """What speculation did over one generation."""

    proposed: int = 0  # tokens proposers offered
    accepted: int = 0  # of those, kept by the target
    verify_steps: int = 0  # forward passes over proposals
    plain_steps: int = 0  # one-token steps (speculation off, out of room, or nothing proposed)


# ----- the step policy -------------------------------------------------------------------


class SpeculativeStep:
    """engine.run's policy for one sequence: each `read` gives (tokens: list of ints, logprobs [n, V]).

    `tokens` holds the prompt's ids (what the cache holds), `history` [1, n] what the processors
    see (None without processors).  `budget` caps the tokens emitted in all, so that no step
    feeds past the context.  A sampler other than greedy must have a `filter` (CategoricalSampler):
    the rejection rule needs the distribution it draws from.
    """

    @property
    def pipelined(self) -> bool:
        """Whether the next step is queued before the host reads this one: a plain step after a plain one
        (speculation off) is, as plain decoding's are, so that being off costs what plain decoding costs;
        otherwise what the host reads (how many were accepted) decides the next step."""
        return (self._chain and not self.processors and getattr(self.proposer, "observe", None) is None
                and self.control.plan() == 0)

    def __init__(self, model, cache, proposer: Proposer, tokens: list[int], budget: int, num_draft_tokens: int,
                 sampler=None, processors=None, history: mx.array | None = None, controller: Adaptive | FixedK | None = None,
                 stats: SpeculativeStats | None = None, clock=time.perf_counter):
        self.model, self.cache, self.proposer = model, cache, proposer
        self.sampler = sampler or greedy
        if self.sampler is not greedy and not hasattr(self.sampler, "filter"):
            raise GenerationError("speculative sampling needs greedy or a CategoricalSampler (make_sampler): "
                                  "the rejection rule needs the distribution a sampler draws from")
        self.key = mx.random.key(getattr(self.sampler, "seed", 0))
        self.processors, self.history = list(processors or []), history
        self.tokens, self.left = list(tokens), budget
        # A proposer that can time its own step (DraftModel) lets Adaptive skip it before it reads the prompt.
        self.control = controller or Adaptive(num_draft_tokens, proposer_seconds=getattr(proposer, "step_seconds", None))
        self.stats = stats if stats is not None else SpeculativeStats()
        self.clock, self.started = clock, 0.0
        self._chain, self.last_read = False, float("-inf")  # the last step queued was plain; when a read ended
        # Processors with state of their own (grammar.py's parser) must see only kept tokens: they
        # take back the proposals they were fed beyond what the step kept (`rollback(n)`).
        self.rolling = [p for p in self.processors if callable(getattr(p, "rollback", None))]
        self.fed_to_processors = 0  # proposals the processors saw in the last step
        self.observe = getattr(proposer, "observe", None)  # a TargetReader's

    def _next_key(self) -> mx.array:
        self.key, key = mx.random.split(self.key)
        return key

    def _shaped(self, logits: mx.array, proposals: mx.array | None) -> tuple[mx.array, mx.array]:
        """(processed log-probabilities [T, V], whether every row is finite) of logits [T, V];
        row i's processors see the history extended by proposals[:i].  With stateful processors, the
        rows stop after the first proposal its own row rules out (a grammar parser cannot take it): the
        target rejects it there, so the rows after it are never read and are copies."""
        logits = logits.astype(mx.float32)
        self.fed_to_processors = 0
        if self.processors:
            rows = []
            for i in range(logits.shape[0]):
                if i and self.rolling and not bool(mx.isfinite(rows[-1][0, proposals[i - 1]])):
                    rows += [rows[-1]] * (logits.shape[0] - i)
                    break
                seen = self.history if i == 0 else mx.concatenate([self.history, proposals[None, :i]], axis=1)
                rows.append(apply_processors(self.processors, seen, logits[i : i + 1]))
                self.fed_to_processors = i
            logits = mx.concatenate(rows, axis=0)
        lse = logsumexp(logits)
        # A NaN anywhere in a row, or a row with no finite logit, leaves its logsumexp non-finite.
        return logits - lse[:, None], mx.all(mx.isfinite(lse))

    def _draw(self, logprobs: mx.array) -> mx.array:
        if self.sampler is greedy:
            return mx.argmax(logprobs, axis=-1).astype(mx.int32)
        return mx.random.categorical(self.sampler.filter(logprobs), axis=-1, key=self._next_key()).astype(mx.int32)

    def first(self, hidden: mx.array) -> Pending:
        started, self._chain = self.clock(), True
        if self.observe is not None:
            self.observe(self.model, self.cache, hidden[0, -1:])
        logprobs, finite = self._shaped(self.model.logits(hidden[:, -1, :]), None)
        return Pending((self._draw(logprobs), finite), ("first", 0, logprobs, started))

    def advance(self, step: Pending, read) -> Pending:
        started = self.clock()
        if read is None:  # pipelined: a plain step fed the plain step before's token, not read yet
            hidden = self.model.model(step.queue[0].astype(mx.int32)[None], cache=self.cache)
            logprobs, finite = self._shaped(self.model.logits(hidden[0]), None)
            return Pending((self._draw(logprobs), finite), ("plain", 0, logprobs, started))
        last = self.tokens[-1]
        proposals, q = self.next_proposals()
        k = proposals.shape[0]
        proposals = proposals.astype(mx.int32)
        fed = mx.concatenate([mx.array([last], mx.int32), proposals])
        if self.processors:
            self.history = mx.concatenate([self.history, fed[None, :1]], axis=1)
        hidden = self.model.model(fed[None], cache=self.cache)  # [1, k + 1, D]
        if self.observe is not None:
            self.observe(self.model, self.cache, hidden[0])
        logprobs, finite = self._shaped(self.model.logits(hidden[0]), proposals)
        self._chain = k == 0
        if k == 0:
            return Pending((self._draw(logprobs), finite), ("plain", 0, logprobs, started))
        if self.sampler is greedy:  # keep a proposal while it is the target's argmax; then the argmax
            fallback = mx.argmax(logprobs, axis=-1).astype(mx.int32)
            accepted = proposals == fallback[:k]
        else:  # p: the distribution the sampler would draw from, row by row
            accepted, fallback = accept_proposals(self.sampler.filter(logprobs), q, proposals, self._next_key())
        return Pending((fallback, proposals, accepted, finite), ("verify", k, logprobs, started))

    def next_proposals(self) -> tuple[mx.array, mx.array | None]:
        """The proposals a verify step checks next and their q: up to the controller's k, within the budget
        and what the caches can go back on; none for a plain step.  (Across ranks rank 0's are every rank's:
        distributed/speculation.py.)"""
        k = min(self.control.plan(), self.left - 1)
        while k > 0 and not can_roll_back(self.cache, k + 1, k):
            k -= 1
        return self.proposer.propose(self.tokens, k) if k > 0 else (mx.zeros((0,), mx.int32), None)

    def read(self, step: Pending, n: int):
        kind, k, logprobs, started = step.rest
        values = [a.tolist() for a in step.queue]
        if not values[-1]:
            raise GenerationError(f"the logits at generated token {n} hold a NaN or no finite value; the weights, "
                                  "the dtype (try float32 or bfloat16) or a logits processor are at fault")
        kept = 0
        if kind != "verify":
            emitted = [values[0][0]]
        else:
            fallback, drafts, accepted = values[:3]
            kept = accepted_count(accepted)
            emitted = drafts[:kept] + [fallback[kept]]
            roll_back(self.cache, self.cache_offset() - (k - kept))
            self.proposer.accept(kept)
            for p in self.rolling:  # they saw proposals up to the last row they masked
                p.rollback(self.fed_to_processors - kept)
            if self.processors:
                self.history = mx.concatenate([self.history, mx.array([drafts[:kept]], mx.int32)], axis=1)
        self._account(kind, k, kept, len(emitted), started)
        self.last_read = self.clock()
        self.tokens += emitted
        self.left -= len(emitted)
        return emitted, logprobs[: len(emitted)]

    def cache_offset(self) -> int:
        return self.cache[0].offset

    def _account(self, kind: str, k: int, kept: int, emitted: int, started: float) -> None:
        if kind == "first":
            return
        if kind == "verify":
            self.stats.verify_steps += 1
            self.stats.proposed += k
            self.stats.accepted += kept
        else:
            self.stats.plain_steps += 1
        # A pipelined step was queued before the step ahead of it was read: it is timed from that read.
        self.control.record(k, emitted, self.clock() - max(started, self.last_read))


def one_token_at_a_time(steps: Iterator, budget: int) -> Iterator[tuple[list[int], mx.array]]:
    """engine.run's steps under a `SpeculativeStep` as `generate_step` yields tokens, (ids: [token],
    logprobs [1, V]), at most `budget` in all; closing it stops the loop."""
    produced = 0
    try:
        for tokens, logprobs in steps:
            for i, token in enumerate(tokens):
                yield [token], logprobs[i : i + 1]
                produced += 1
                if produced == budget:
                    return
    finally:
        steps.close()
