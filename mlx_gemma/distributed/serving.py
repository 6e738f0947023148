"""The server across ranks: rank 0 serves HTTP, the other ranks follow its batches (issue 23).

`mlx.launch -n 2 ... python -m mlx_gemma.server --model M --pipeline` (or `--tensor-parallel`).
Every rank runs the same `batching.Scheduler` (the one decode loop, `engine.run` with
`BatchPolicy`), each with its share of the model; the ranks make the same model calls in the
same order, so their collectives (pipeline send/recv, the shared logits' all_sum, tensor
parallel's all_sums) pair up.  What could differ is what each step takes from its inbox, so
rank 0's policy reads a `LeaderInbox` that shares every message it takes (a job with its prompt
ids, sampling and media (media_messages.py), a cancellation, close, or "nothing more this step") with the followers, whose
policy reads a `FollowerInbox` that gives back the same messages (messages.py; a job's payload:
job_messages.py).  Everything else a step decides (rows leaving on a stop id or their budget, the
kv_bits switch, prefix-cache lookups) follows from those messages and from the sampled tokens, which
are the same on every rank: the logits are shared, and a job's seed is drawn on rank 0 and travels
with it.  A grammar-constrained reply (response_format json_object / json_schema, forced tool calls)
masks them alike on every rank: each follower builds the job's constraint from the grammar rank 0
sends (processor_messages.py) with its own tokenizer (`follow`'s).

One step's graph may hold several forward passes (a decode batch and a prompt's chunk); each is
computed as soon as the policy makes it (`InOrder`), so the collectives run in the policy's order.

Shutdown: SIGINT or SIGTERM on rank 0 stops uvicorn, then its scheduler's close reaches the
followers as a message and every rank exits 0; the followers ignore both signals (mlx.launch and
a terminal's Ctrl-C signal every rank), since they end when rank 0 tells them to.

The prefix cache: an entry's bytes differ per rank (each holds its own layers), so the ranks
agree on each entry's bytes (the largest rank's) before the byte bound evicts anything; lookups
then see the same entries everywhere.  It is turned off when some ranks hold sliding-window
layers and others do not (whether a ring can go back would differ).

Speculative decoding: a row decoding alone speculates on every rank with rank 0's proposals
(speculation.py, the policy server/speculation.py gives each rank); its verify passes go through
`InOrder` as every other forward pass does.

What is not served across ranks: job_messages.py.
"""

from __future__ import annotations

import dataclasses
import secrets
import signal
import sys

import mlx.core as mx

from ..batching import Scheduler
from ..engine import generation_stream
from ..errors import GenerationError
from ..jobs import Job
from ..prefix_cache import PrefixCache
from .failures import SharedFailures
from .job_messages import refusal
from .messages import FollowerInbox, LeaderInbox
from .watchdog import watch


class SharedPrefixCache(PrefixCache):
    """The prefix cache with each entry's bytes agreed by the ranks (the largest rank's), so the
    byte bound keeps the same entries on every rank."""

    def __init__(self, max_bytes: int, media_ids: frozenset[int], group):
        super().__init__(max_bytes, media_ids)
        self.group = group

    def store(self, tokens: list[int], caches: list, blocks=()) -> None:
        if self.max_bytes <= 0 or not tokens:
            return
        bound, before = self.max_bytes, set(self.entries)
        self.max_bytes = sys.maxsize  # the bound is applied below, on the agreed bytes
        try:
            super().store(tokens, caches, blocks)
        finally:
            self.max_bytes = bound
        for key in [k for k in self.entries if k not in before]:  # the new entry, if one was made
            entry = self.entries[key]
            local = mx.array(entry.nbytes, mx.int64)
            agreed = int(mx.distributed.all_max(local, group=self.group, stream=generation_stream()).item())
            self.nbytes += agreed - entry.nbytes
            entry.nbytes = agreed
            if agreed > bound:
                self._drop(key)
        while self.nbytes > bound:
            self._drop(next(iter(self.entries)))


class _AtOnce:
    """A callable (the decoder, the head) whose every result is computed when it is made."""

    def __init__(self, call):
        self._call = call

    def __call__(self, *args, **kwargs):
        out = self._call(*args, **kwargs)
        mx.eval(out)
        return out

    def __getattr__(self, name):
        return getattr(self._call, name)


class InOrder:
    """The model as a rank's batch policy sees it: each forward pass and each head call is computed
    as soon as it is made, so its collectives run in the order the policy makes the calls, which is
    the same on every rank.  (One step's graph holds several forward passes, a decode batch and a
    prompt's prefill, say; evaluated together, their collectives would run in an order MLX picks from
    each rank's own graph, which differs between ranks and mismatches them.)  The step loses little:
    its message from rank 0 already waits for the step before."""

    def __init__(self, model):
        self._model = model
        self.model = _AtOnce(model.model)
        self.logits = _AtOnce(model.logits)

    def __getattr__(self, name):
        return getattr(self._model, name)


class RankScheduler(Scheduler):
    """A Scheduler on one rank of a group: its calls queued in order, its prefix cache agreed across
    ranks, its inbox shared."""

    def __init__(self, model, group, **options):
        super().__init__(model, **options)
        self.group = group
        self._policy.model = InOrder(model)
        self._policy.ranks = SharedFailures(group)  # a row failing on one rank ends on all at one step
        if self._prefix is not None:
            rings = any(w is not None for w in model.windows)
            holding = mx.distributed.all_sum(mx.array(int(rings)), group=group, stream=mx.cpu).item()
            agreed = holding in (0, group.size())  # every rank holds a ring, or none does
            self._prefix = SharedPrefixCache(self._prefix.max_bytes, self._prefix.media_ids, group) if agreed else None
            self._policy.prefix = self._prefix

    def served(self) -> None:
        """Wait until the serving loop has ended (a follower: until rank 0 closes)."""
        if self._served is not None:
            self._served.wait()


class LeaderScheduler(RankScheduler):
    """Rank 0's scheduler: what the followers cannot run is refused, and every job gets a seed."""

    def __init__(self, model, group, **options):
        super().__init__(model, group, **options)
        self._policy.inbox = LeaderInbox(self._inbox, group, model)

    def submit(self, job: Job, on_event) -> int:
        if isinstance(job, Job):
            why = refusal(job)
            if why is not None:
                raise GenerationError(why)
            if job.sampling.seed is None:  # drawn here, so every rank draws the same tokens
                job = dataclasses.replace(job, sampling=dataclasses.replace(job.sampling, seed=secrets.randbits(63)))
        return super().submit(job, on_event)


class FollowerScheduler(RankScheduler):
    """A rank > 0's scheduler: its jobs are rank 0's, read from the shared messages."""

    def __init__(self, model, group, tokenizer=None, **options):
        super().__init__(model, group, **options)
        self._policy.inbox = FollowerInbox(model, group, tokenizer)  # (its tokenizer builds rank 0's grammars)


def ignore_signals() -> None:
    """SIGINT and SIGTERM do nothing from now on: on rank 0 once uvicorn (which handles them while it
    serves, then raises them again, so SIGTERM would kill the process) has returned, so its scheduler's
    close still reaches the followers; on a follower always (rank 0 ends it)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _ignore_signal)


def _ignore_signal(signum, frame) -> None:
    """(a Python handler, not SIG_IGN: uvicorn puts it back and calls it when it raises the signal again)"""


def follow(model, options: dict, group, tokenizer=None) -> int:
    """Run a follower rank until rank 0 closes: 0.  `tokenizer` (this rank's) builds the grammar
    constraints of rank 0's jobs."""
    ignore_signals()
    scheduler = FollowerScheduler(model, group, tokenizer, **options)
    with watch("serving"):  # rank 0's idle messages keep it quiet while the server is idle
        scheduler.start()
        scheduler.served()
    return 0
