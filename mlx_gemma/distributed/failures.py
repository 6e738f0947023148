"""What fails on one rank only, decided by every rank at the same step, while serving across ranks
(issue 23; distributed/serving.py gives each rank's batch policy a `SharedFailures` as its `ranks`).

The ranks stay in step by making the same model calls in the same order; a row that ends on one rank
only (its processor or sampler raising there, rank 0's event callback failing) would leave the batches
different, and the next forward pass's collectives would mismatch.  So such a row does not end where it
failed: the rank reports it, and it ends at the start of the next step on every rank.

When: each step (`BatchPolicy._step`) begins with a meeting (`meet`), before anything else the step
does (dropping finished rows, which may store them in the shared prefix cache: a collective; the
inbox).  A row's own work (sampling its token from the shared logits) comes after the step's forward
pass, so a failure there, while step n is built, is reported at step n + 1's meeting; a failure while
the host reads step n (an event callback) is reported at the meeting of the next step built after that
read (n + 2 when steps are pipelined, since the engine then queues n + 1 before reading n; n + 1
otherwise; whether they are is decided by the batch, the same on every rank).  Either way every rank
ends the row at the same meeting, before the step's first model call; in between, the failing rank keeps the row (fed a valid
id, no token drawn) so the rest of its step makes the calls the others make.  The client of that row
gets an error event (finish_reason "error"; a follower's failure is named "rank R: ...").

The meeting is one `all_sum` of [CHECK, bytes reported by rank 0, by rank 1, ...] (each rank writes
its own slot; CHECK from every rank, so a sum that is not CHECK x ranks means this collective was
paired with another: a DistributedError, never a silent mix), then, only when something was reported,
one `all_sum` of the reports (each rank's JSON at its offset): [[row id, error text], ...], id 0 for
every job.

The loop itself raising on one rank (`BatchPolicy.fail_all`): while the host reads a step (outside any
collective) the rank fails every job, reports "every job", and starts its loop again, whose first call
is the next meeting; the others meet it there (their next collective is also the meeting) and fail
the same jobs, and the server goes on.  While a step is built, the rank may be part way through the
step's collectives, which no later call can pair: it ends every job with an error (on rank 0 its
clients are answered), prints one error line and exits with status 3; the other ranks then find their
peer lost (messages.py, or this module's own check) and end too, with their own error line.  A
prompt's forward pass that raises on one rank is such a failure (batching.py re-raises it across ranks),
and so is a speculating row's verify step failing (batch_speculation.py: its forward pass and rank 0's
proposals, distributed/speculation.py, are collectives, built and read).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from typing import NoReturn

import mlx.core as mx
import numpy as np

from ..engine import generation_stream
from ..errors import DistributedError, GenerationError
from ..jobs import error_text
from .messages import _lost
from .watchdog import EXIT_STATUS

EVERY_JOB = 0  # a report's row id meaning "every job" (job ids start at 1)
CHECK = 0x5EED  # each rank's first word at a meeting
ANSWER_GRACE = 1.0  # s: rank 0 ending for good gives the HTTP server this long to answer its clients


def encode_report(entries: list[tuple[int, str]]) -> bytes:
    """One rank's report: [[row id, error text], ...] as JSON bytes (b"" for nothing)."""
    return json.dumps([[int(i), str(t)] for i, t in entries]).encode() if entries else b""


def decode_reports(lengths: list[int], data: bytes) -> list[tuple[int, int, str]]:
    """(rank, row id, error text) of every rank's report, rank by rank, from the reports' byte lengths
    (rank order) and their concatenation."""
    out, at = [], 0
    for rank, n in enumerate(lengths):
        if n < 0 or at + n > len(data):
            raise DistributedError(f"a failure report's length ({n} bytes from rank {rank}) does not fit the reports")
        if n:
            try:
                entries = json.loads(data[at : at + n])
            except ValueError as e:
                raise DistributedError(f"rank {rank}'s failure report does not decode: {e}") from None
            out += [(rank, int(i), str(t)) for i, t in entries]
        at += n
    return out


class SharedFailures:
    """A rank's side of the meetings (see the module docstring); runs on the scheduler's MLX thread."""

    def __init__(self, group):
        self.group = group
        self.pending: list[tuple[int, str]] = []  # (row id, error text) reported since the last meeting
        self.rows: dict = {}  # the rows reported, by id: one that failed before joining the batch is nowhere else
        self.building = False  # inside a step's collectives (between `meet` and `built`)
        self.agreeing = False  # ending what a meeting agreed: nothing is reported again

    # ----- reported by the batch policy ------------------------------------------------------

    def report(self, row, text: str) -> None:
        """`row` failed on this rank: it ends at the next meeting, on every rank."""
        if not self.agreeing and row.id not in self.rows:
            self.rows[row.id] = row
            self.pending.append((row.id, text))

    def report_all(self, policy, e: BaseException) -> None:
        """The loop raised `e` on this rank (the policy then fails every job here).  Between steps the
        others fail the same jobs at the next meeting; inside a step this rank cannot pair their
        collectives any more, so it ends."""
        if self.agreeing:
            return
        if not self.building:
            self.pending.append((EVERY_JOB, error_text(e)))
            return
        self.fatal(policy, e)

    def fatal(self, policy, e: BaseException) -> NoReturn:
        """`e` was raised where this rank may be part way through collectives that no later call can pair:
        every job ends with an error here (rank 0's clients are answered), then the process, with one
        error line; the other ranks find it lost."""
        rank = self.group.rank()
        for row in [*policy.rows, *policy.waiting, *self.rows.values()]:
            policy.end(row, "error", f"the server across ranks failed on rank {rank}: {error_text(e)}")
        print(f"error: distributed: rank {rank}: the serving loop failed inside a step ({type(e).__name__}: {e}); "
              f"the ranks can no longer make the same calls: exiting", file=sys.stderr, flush=True)
        if rank == 0:
            time.sleep(ANSWER_GRACE)  # (the clients' error events are on their way out)
        os._exit(EXIT_STATUS)

    def built(self) -> None:
        """The step's collectives are made: until the next meeting the host only reads."""
        self.building = False

    # ----- the meeting -----------------------------------------------------------------------

    def meet(self, policy) -> None:
        """At the start of every step, on every rank: share what failed, and end it here."""
        self.building = True
        mine = encode_report(self.pending)
        self.pending = []
        try:
            agreed = self._share(mine)
        except DistributedError as e:
            _lost(self.group, e)
        if not agreed:
            return
        self.agreeing = True
        try:
            self._end(policy, agreed)
        finally:
            self.agreeing = False
            self.rows = {}

    def _share(self, mine: bytes) -> list[tuple[int, int, str]]:
        size, rank, stream = self.group.size(), self.group.rank(), generation_stream()
        words = [CHECK] + [0] * size
        words[1 + rank] = len(mine)
        try:
            got = np.array(mx.distributed.all_sum(mx.array(words, mx.int32), group=self.group, stream=stream)).tolist()
        except RuntimeError as e:  # MLX's backends: "[ring] connection to a peer was lost", ...
            raise DistributedError(str(e)) from None
        if got[0] != CHECK * size or got[1 + rank] != len(mine):
            raise DistributedError(f"the ranks' failure meeting came back as {got}: the ranks are out of step")
        lengths = got[1:]
        total = sum(lengths)
        if total == 0:
            return []
        buf = np.zeros((total + 3) // 4, np.int32)
        start = sum(lengths[:rank])
        buf.view(np.uint8)[start : start + len(mine)] = np.frombuffer(mine, np.uint8)
        try:
            data = np.array(mx.distributed.all_sum(mx.array(buf), group=self.group, stream=stream))
        except RuntimeError as e:
            raise DistributedError(str(e)) from None
        return decode_reports(lengths, data.view(np.uint8)[:total].tobytes())

    def _end(self, policy, agreed: list[tuple[int, int, str]]) -> None:
        """End what every rank now knows failed (the same rows on every rank, in the same order)."""
        named = [(i, t if r == 0 else f"rank {r}: {t}") for r, i, t in agreed]
        every = next((t for i, t in named if i == EVERY_JOB), None)
        if every is not None:
            for row in self.rows.values():
                policy.end(row, "error", every)
            policy.fail_all(GenerationError(every))
            return
        for job_id, text in named:
            for row in [r for r in [*policy.rows, *policy.waiting] if r.id == job_id]:
                policy.end(row, "error", text)
            if job_id in self.rows:
                policy.end(self.rows[job_id], "error", text)
        policy.waiting = deque(r for r in policy.waiting if not r.done)
