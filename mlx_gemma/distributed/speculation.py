"""Speculative decoding on the server across ranks (issue 23, with issue 22's batch_speculation.py).

A row that decodes alone speculates on every rank as it would in one process: each rank verifies the
same proposals in the same forward pass over its share of the model, so the ranks' collectives still
pair up, and keeps what the shared logits keep.  What a rank could decide differently, rank 0 decides
and shares (`Channel`: an all_sum of a few int32s in which the followers add zeros, on the generation
stream):

- each step's proposals (one message per step of a row alone): rank 0's controller sizes k from its
  own step times (speculative_control.Adaptive, which would read different clocks on each rank) and
  rank 0's proposer drafts them; the draft model is loaded on rank 0 only, since a draft run on each
  rank could propose differently where kernels differ (Metal's, by chip), and the verify passes would
  then differ in length.  A step where rank 0 proposed nothing is a plain step everywhere.
- what a sampled verify step kept, when its proposals came with a draft's distribution q: the
  rejection rule (speculative.accept_proposals) reads q, which only rank 0 has, so rank 0's accepted
  flags and fallback tokens are every rank's (a second message).  Greedy steps and prompt lookup's
  (q one-hot) need none: every rank computes the same outcome from the shared logits, the same
  proposals and the same random key (the job's seed, drawn on rank 0).

So a row alone is not pipelined across ranks (each step follows the host's read of the one before,
where rank 0 decides); the forward passes are computed as they are made anyway (serving.InOrder).
The Gemma 4 assistant drafter, which reads the target's states, stays refused (server/speculation.py).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..batch_speculation import SpeculativeBatchPolicy
from ..engine import Pending, generation_stream
from ..errors import DistributedError
from ..jobs import Row
from ..proposers import Speculation
from ..speculative import SpeculativeStats, SpeculativeStep
from ..speculative_control import FixedK

# A follower's stand-in for the server's draft model (Speculation.draft_model), which rank 0 alone loads.
ON_RANK_ZERO = "the draft model on rank 0"


class Channel:
    """Rank 0's ints on every rank of `group`: rank 0 passes its values, the others None."""

    def __init__(self, group):
        self.group = group

    @property
    def leader(self) -> bool:
        return self.group.rank() == 0

    def share(self, values: list[int] | None, size: int) -> list[int]:
        """`size` ints: rank 0's `values`, zero-padded.  A mark leads them, since the ring backend gives
        zeros once a peer's socket has closed."""
        words = np.zeros(size + 1, np.int32)
        if values is not None:
            words[0] = 1
            words[1 : 1 + len(values)] = values
        try:
            got = mx.distributed.all_sum(mx.array(words), group=self.group, stream=generation_stream())
            got = np.array(got).tolist()
        except RuntimeError as e:  # MLX's backends: "[ring] connection to a peer was lost", ...
            raise DistributedError(f"rank {self.group.rank()}: speculation: {e}") from None
        if got[0] != 1:
            raise DistributedError(f"rank {self.group.rank()}: rank 0's speculation message came back as {got}")
        return got[1:]


class LeaderStep(SpeculativeStep):
    """Rank 0's step policy for a row alone: SpeculativeStep, its decisions shared (see the module docstring)."""

    pipelined = False  # what the host reads decides the next step's message

    def __init__(self, channel: Channel, k_max: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.channel, self.k_max = channel, k_max
        self.drafted = False  # the last proposals came with q

    def next_proposals(self):
        proposals, q = super().next_proposals()
        ids = np.array(proposals).tolist()
        self.drafted = q is not None and bool(ids)
        self.channel.share([len(ids), int(self.drafted), *ids], self.k_max + 2)
        return proposals, q

    def read(self, step: Pending, n: int):
        if step.rest[0] == "verify" and self.drafted:
            fallback, _, accepted, _ = step.queue
            self.channel.share([*np.array(accepted).tolist(), *np.array(fallback).tolist()], 2 * self.k_max + 1)
        return super().read(step, n)


class FollowerStep(SpeculativeStep):
    """A follower's step policy for a row alone: rank 0's proposals, and rank 0's outcome where it drew them
    from a draft's q; all else as SpeculativeStep computes it."""

    pipelined = False

    def __init__(self, channel: Channel, k_max: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.channel, self.k_max = channel, k_max
        self.drafted = False

    def next_proposals(self):
        got = self.channel.share(None, self.k_max + 2)
        n, self.drafted = got[0], bool(got[1])
        if not 0 <= n <= self.k_max:
            raise DistributedError(f"rank 0's speculation message proposes {n} tokens, more than {self.k_max}")
        return mx.array(got[2 : 2 + n], mx.int32), None

    def read(self, step: Pending, n: int):
        kind, k = step.rest[:2]
        if kind == "verify" and self.drafted:
            got = self.channel.share(None, 2 * self.k_max + 1)
            _, proposals, _, finite = step.queue
            step = Pending((mx.array(got[k : 2 * k + 1], mx.int32), proposals, mx.array(got[:k], mx.bool_), finite),
                           step.rest)
        return super().read(step, n)


class _RankZeroProposes:
    """A follower's proposer: FollowerStep takes rank 0's proposals; nothing here to roll back."""

    def propose(self, history: list[int], k: int):
        raise DistributedError("a follower rank proposes nothing: its proposals are rank 0's")

    def accept(self, n: int) -> None:
        """Nothing held."""


class RankSpeculation(SpeculativeBatchPolicy):
    """A rank's batch policy when serving across ranks: a row alone speculates with rank 0's decisions
    (LeaderStep on rank 0, FollowerStep elsewhere); the batch as batch_speculation.py runs it."""

    def __init__(self, *args, channel: Channel, **kwargs):
        super().__init__(*args, **kwargs)
        self.channel = channel

    def new_step(self, row: Row, spec: Speculation) -> SpeculativeStep:
        k = spec.num_draft_tokens
        if self.channel.leader:
            step, proposer, control = LeaderStep, spec.proposer(None, row.sampler, self.model.args.vocab_size), None
        else:  # (its controller is never asked: rank 0's plans)
            step, proposer, control = FollowerStep, _RankZeroProposes(), FixedK(k)
        return step(self.channel, k, self.model, [], proposer, [], 1, k, row.sampler, row.processors, row.history,
                    controller=control, stats=SpeculativeStats())
