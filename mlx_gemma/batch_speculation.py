"""Speculative decoding in the continuous batch: a row that decodes alone speculates.

Batching rows together already reads the weights once per step for all of them, and verifying
proposals for a batch of rows of different acceptances is not worth its complexity; a row that
decodes alone is where speculation pays.  `SpeculativeBatchPolicy` is `batching.BatchPolicy` (the
engine's step policy for the batch, run by `engine.run`: no loop of its own) with one more kind of
step.  When exactly one row decodes, no prompt waits and the row's job asks for speculation:

1. the row leaves the batch caches as single-row caches (`batch_rows.row_caches`; sliding-window
   rings get k slots of slack, so that a rollback after the window wraps keeps what it needs);
2. each step is one `speculative.SpeculativeStep` verify step on them (propose up to k tokens, one
   target pass over 1 + k positions, keep the agreed prefix and one token of the target's, roll the
   caches back), whose tokens the batch's `read` emits one event at a time as it emits a plain row's;
3. when another job arrives (or the row ends), the row's caches -- rolled back after its last
   verify step, so they hold exactly what plain decoding would -- merge back into the batch and the
   row decodes as a plain row (`batch_rows.merge_rows`, as a newly prefilled row joins).

The row speculates again when it is alone again.  Prompt lookup needs nothing for that, and a draft
model catches up by itself: `DraftModel.propose` feeds the tokens past what its caches hold (those it
missed while batched) before it drafts, a prefill that costs far less than the decode steps it saves.
While the row's controller has speculation off (speculative_control.Adaptive), its plain steps
are pipelined as plain decoding's (`SpeculativeStep.pipelined`), and a job arriving then finds the row's
latest token still lazy, which it rejoins the batch with.  Each row keeps one `SpeculativeStep` for its life (its controller's measurements and its random key
go on across the bursts; the step's tokens, budget and history are set from the row at each burst).

Speculation stays off (the row decodes plainly) with a quantized KV cache (kv_bits: a row switches
storage mid-way and the batch keeps such rows apart), for prefix-LM models (PaliGemma: each batch step
passes `prefix_length`), and where a layer cannot be taken out of the batch (max_kv_size's attention
sinks).  The job's final event carries (proposed, accepted) when it speculated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx

from .arguments import is_integer
from .batching import BatchPolicy
from .engine import Pending
from .errors import GenerationError
from .jobs import Event, Row, RowOut, error_text
from .models.batch_rows import merge_rows, row_caches, take_rows, with_slack
from .proposers import Speculation
from .speculative import SpeculativeStats, SpeculativeStep

DEFAULT_LOOKUP = 3  # the n-gram length a request's `"prompt_lookup": true` gets when the server sets none


@dataclass(frozen=True)
class SpeculationAsk:
    """What one request says about speculating (`Job.speculation`); None fields take the server's settings.

    `num_draft_tokens`: the most tokens proposed per step (0: this request does not speculate), as
    mlx-lm's server reads it per request.  `prompt_lookup`: True or an n-gram length turns prompt lookup
    on for this request (in place of the server's draft model), False turns it off."""

    num_draft_tokens: int | None = None
    prompt_lookup: bool | int | None = None

    def __post_init__(self):
        k, n = self.num_draft_tokens, self.prompt_lookup
        if k is not None and (not is_integer(k) or k < 0):
            raise GenerationError(f"num_draft_tokens must be an integer >= 0, got {k!r:.40}")
        if n is not None and not isinstance(n, bool) and (not is_integer(n) or n < 1):
            raise GenerationError(f"prompt_lookup must be true, false or an n-gram length >= 1, got {n!r:.40}")


def resolve(default: Speculation | None, ask: SpeculationAsk | None) -> Speculation | None:
    """How a job speculates: the server's `default` (None: off) as the job's `ask` changes it."""
    if ask is not None and not isinstance(ask, SpeculationAsk):
        raise GenerationError(f"Job.speculation must be a SpeculationAsk or None, got {type(ask).__name__}")
    ask = ask or SpeculationAsk()
    if ask.num_draft_tokens == 0:
        return None
    k = ask.num_draft_tokens or (default.num_draft_tokens if default is not None else Speculation.num_draft_tokens)
    lookup = ask.prompt_lookup
    if lookup is True or (lookup is not None and lookup is not False):
        n = lookup if lookup is not True else (default.prompt_lookup if default and default.prompt_lookup else DEFAULT_LOOKUP)
        return Speculation(None, int(n), int(k))
    if default is None or (lookup is False and default.prompt_lookup is not None):
        return None
    return Speculation(default.draft_model, default.prompt_lookup, int(k))


@dataclass
class _Plan:
    """A row's speculation: its step policy (for all its bursts) and its most tokens proposed per step."""

    step: SpeculativeStep
    k: int


class _Alone:
    """The row speculating now, its single-row caches, and its step policy."""

    def __init__(self, row: Row, caches: list, step: SpeculativeStep):
        self.row, self.caches, self.step = row, caches, step


class SpeculativeBatchPolicy(BatchPolicy):
    """BatchPolicy whose row, when it decodes alone, speculates (see the module docstring)."""

    def __init__(self, *args, speculation: Speculation | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.speculation = speculation  # the server's default (None: only jobs that ask speculate)
        self.alone: _Alone | None = None
        self.steps: dict[int, _Plan | None] = {}  # per row id: its policy (None: it never speculates)
        self.synced = True  # the host has read every step queued so far (so a row's tokens are all known)
        self.queued: Pending | None = None  # the row alone's step queued last

    # ----- when to speculate -----------------------------------------------------------------

    @property
    def pipelined(self) -> bool:
        """A verify step needs the host's tokens of the step before: not pipelined when a row is about to
        be alone (its last plain token is read before it leaves the batch), nor while it speculates; while
        its controller has speculation off, its plain steps are pipelined as plain decoding's
        (SpeculativeStep.pipelined), so that leaving speculation on costs next to nothing."""
        if self.alone is not None:
            return self.alone.step.pipelined
        return self._candidate() is None

    @property
    def rows(self) -> list[Row]:
        return super().rows + ([self.alone.row] if self.alone is not None else [])

    def _candidate(self) -> Row | None:
        """The one row of the batch, when it may speculate now."""
        batched = super().rows
        if len(batched) != 1 or batched[0].done or self.waiting or self.closing:
            return None
        if self.quantize_from is not None or self.model.prefix_lm:
            return None
        row = batched[0]
        if row.id not in self.steps:
            try:
                self.steps[row.id] = self._step_for(row)
            except GenerationError as e:  # a job's speculation field that is not a SpeculationAsk
                self.steps[row.id] = None
                self.end(row, "error", error_text(e))
                return None
        return row if self.steps[row.id] is not None else None

    def _step_for(self, row: Row) -> _Plan | None:
        spec = resolve(self.speculation, getattr(row.job, "speculation", None))
        if spec is None:
            return None
        try:
            step = self.new_step(row, spec)
        except GenerationError:  # a sampler without a distribution to check against: plain decoding
            return None
        return _Plan(step, spec.num_draft_tokens)

    def new_step(self, row: Row, spec: Speculation) -> SpeculativeStep:
        """The row's step policy for all its bursts (across ranks, each rank's own: distributed/speculation.py)."""
        proposer = spec.proposer(None, row.sampler, self.model.args.vocab_size)
        return SpeculativeStep(self.model, [], proposer, [], 1, spec.num_draft_tokens, row.sampler,
                               row.processors, row.history, stats=SpeculativeStats())

    # ----- the engine's calls ------------------------------------------------------------------

    def first(self, hidden) -> Pending:
        self.synced = True
        return super().first(hidden)

    def advance(self, step: Pending, read) -> Pending:
        self.synced = read is not None
        return super().advance(step, read)

    def _drop_done(self) -> None:
        if self.alone is not None and self.alone.row.done:
            row = self.alone.row
            if self.prefix is not None and row.finish in ("stop", "length", "cancelled"):
                self._rejoin()  # so that the batch stores its prompt + tokens as it leaves
            else:
                self.alone = None
        super()._drop_done()

    def _decode(self) -> list[RowOut]:
        if self.alone is not None and (self.waiting or super().rows):
            self._rejoin()  # another job: decode together
        if self.alone is None and self.synced and self._candidate() is not None:
            self._leave_batch()
        if self.alone is None:
            return super()._decode()
        return self._verify()

    def fail_all(self, e: BaseException) -> None:
        super().fail_all(e)
        self.alone = None

    @property
    def cache_bytes(self) -> int:
        alone = self.alone  # (read from other threads: /stats)
        return super().cache_bytes + (sum(c.nbytes for c in alone.caches) if alone is not None else 0)

    # ----- leaving and rejoining the batch ----------------------------------------------------

    def _leave_batch(self) -> None:
        batch = self.batches[0]
        row, plan = batch.rows[0], self.steps[batch.rows[0].id]
        step = plan.step
        tokens = [*row.job.prompt_ids, *row.tokens]
        if batch.position(0) != len(tokens) - 1:
            return  # the caches are not at the row's last token (never expected): decode plainly
        # Rings with k slots of slack: a rollback after the window wraps needs the k it may forget.
        caches = row_caches(batch.caches, 0, with_slack(self.model.make_cache(None, self.kv_options), plan.k))
        if caches is None:  # a layer that cannot be taken out (attention sinks): never for this row
            self.steps[row.id] = None
            return
        take_rows(batch.caches, [])
        batch.rows = []
        step.cache, step.tokens, step.history = caches, tokens, row.history
        step.left = row.budget - row.produced
        self.alone = _Alone(row, caches, step)

    def _rejoin(self) -> None:
        """The row alone goes back into the batch as a plain row (its caches hold its tokens but the last)."""
        alone, self.alone = self.alone, None
        row = alone.row
        row.history = alone.step.history
        # Its latest token: read, or (a pipelined plain step not read yet) that step's token, still lazy.
        row.last = mx.array([alone.step.tokens[-1]], mx.int32) if self.synced else self.queued.queue[0]
        merge_rows(self.batches[0].caches, alone.caches)
        self.batches[0].rows.append(row)

    # ----- one verify step --------------------------------------------------------------------

    def _verify(self) -> list:
        alone = self.alone
        try:  # (not synced: a plain step after a plain step, fed the token of the step before, unread)
            pending = alone.step.advance(None, True) if self.synced else alone.step.advance(self.queued, None)
        except Exception as e:  # the row ends; the batch (and the server) go on
            if self.ranks is not None:  # across ranks it may have failed part way through collectives
                self.ranks.fatal(self, e)
            self.end(alone.row, "error", error_text(e))
            return []
        self.queued = pending
        return [_Verified(alone, pending)]

    def read(self, step: Pending, n: int) -> int:
        outs = []
        for out in step.rest:
            outs += self._tokens(out, n) if isinstance(out, _Verified) else [out]
        return super().read(Pending(step.queue + tuple(a for o in outs for a in o.arrays()), outs), n)

    def _tokens(self, out: _Verified, n: int) -> list[RowOut]:
        """A verify step's kept tokens as one-token outputs, which the batch's `read` emits in order."""
        row = out.alone.row
        if row.done:
            return []
        try:
            tokens, logprobs = out.alone.step.read(out.pending, n)
        except Exception as e:
            if self.ranks is not None:  # (rank 0's outcome is shared while reading: distributed/speculation.py)
                self.ranks.fatal(self, e)
            self.end(row, "error", error_text(e))
            return []
        outs = []
        for i, token in enumerate(tokens):
            lp = logprobs[i]
            top = None
            if row.job.top_logprobs:
                ids = mx.argpartition(-lp, kth=row.job.top_logprobs - 1)[: row.job.top_logprobs]
                top = (ids, lp[ids])
            outs.append(RowOut(row, mx.array([token], mx.int32), lp[token : token + 1], top))
        return outs

    def emit(self, row: Row, event: Event) -> None:
        if event.finish_reason is not None:  # (every row's entry goes, those that never speculate too)
            plan = self.steps.pop(row.id, None)
            if plan is not None and plan.step.stats.verify_steps:
                event = replace(event, speculative=(plan.step.stats.proposed, plan.step.stats.accepted))
        super().emit(row, event)


@dataclass
class _Verified:
    """A row's verify step, queued; the host reads how many proposals it kept."""

    alone: _Alone
    pending: Pending

    @property
    def row(self) -> Row:
        return self.alone.row

    def arrays(self) -> list[mx.array]:
        return list(self.pending.queue)
