"""The messages rank 0 shares with the followers while serving across ranks (issue 23;
distributed/serving.py runs the schedulers that read them).

A message is a fixed int32 header [kind, value, payload bytes, 0] and, for a job, a payload
(job_messages.py), both sent by an `all_sum` in which the followers add zeros (exact), on the
generation stream: queued behind the step in flight, so every rank runs its collectives in one order.
Rank 0's scheduler reads a `LeaderInbox` that shares every message it takes (a job, a cancellation,
close, or "nothing more this step"); a follower's reads a `FollowerInbox` that gives back the same
messages.  When the server is idle rank 0 waits on its own queue and shares an "idle" message every
`IDLE_POLL` seconds (growing to `IDLE_POLL_MAX`), between which the followers sleep (a rank waiting
inside a collective polls its socket): little CPU, and the watchdog (watchdog.py) sees progress on
every rank.  A lost peer ends every rank with an error line (exit status 3).  What fails on one
rank only is shared at each step's start, not in these messages (failures.py).
"""

from __future__ import annotations

import os
import queue
import sys
import time

import mlx.core as mx
import numpy as np

from ..engine import generation_stream
from ..errors import DistributedError, MlxGemmaError
from .job_messages import job_payload, row_from
from .watchdog import EXIT_STATUS, beat

EMPTY, IDLE, JOB, CANCEL, CLOSE = 1, 2, 3, 4, 5  # a message's kind (0 is what the followers add)
KINDS = (EMPTY, IDLE, JOB, CANCEL, CLOSE)
# While idle the ranks meet every IDLE_POLL seconds, doubling up to IDLE_POLL_MAX as the pause goes on:
# a rank waiting inside a collective polls its socket (MLX 0.32's ring backend: non-blocking recv in a
# loop), so the followers sleep between meetings instead; the first request after a pause waits for
# them up to the interval then reached.
IDLE_POLL, IDLE_POLL_MAX = 0.05, 0.4


def _lost(group, e: BaseException) -> None:
    """A collective failed: a peer died.  One error line, then this rank ends (its MLX thread may be
    blocked in another collective, which no exception reaches)."""
    print(f"error: distributed: rank {group.rank()}: another rank was lost while serving: {e}",
          file=sys.stderr, flush=True)
    os._exit(EXIT_STATUS)



def _share(group, header: list[int], payload: bytes = b"") -> tuple[list[int], bytes]:
    """Rank 0's header (and payload) on every rank; the others pass zeros and an empty payload.
    A failed collective raises, or (the ring backend, once a peer's socket closed) gives zeros:
    either is a DistributedError."""
    stream = generation_stream()  # behind the step in flight: one order of collectives on every rank
    try:
        got = np.array(mx.distributed.all_sum(mx.array(header, mx.int32), group=group, stream=stream)).tolist()
    except RuntimeError as e:  # MLX's backends: "[ring] connection to a peer was lost", ...
        raise DistributedError(str(e)) from None
    if got[0] not in KINDS or (group.rank() == 0 and got != header):
        raise DistributedError(f"rank 0's message came back as {got}, not {header if group.rank() == 0 else 'a message'}")
    beat()  # a message from rank 0 is progress (watchdog.py)
    n = got[2]
    if n == 0:
        return got, b""
    words = np.zeros((n + 3) // 4, np.int32)
    words.view(np.uint8)[: len(payload)] = np.frombuffer(payload, np.uint8)
    try:
        data = np.array(mx.distributed.all_sum(mx.array(words), group=group, stream=stream))
    except RuntimeError as e:
        raise DistributedError(str(e)) from None
    return got, data.view(np.uint8)[:n].tobytes()



class LeaderInbox:
    """Rank 0's inbox: the scheduler's own queue, each message taken shared with the followers."""

    def __init__(self, local: queue.Queue, group, model=None):
        self.local, self.group = local, group
        self.model = model  # (which of a job's media the followers read: media_messages.py)

    def get(self, block: bool = True):
        wait = IDLE_POLL
        while True:
            try:
                item = self.local.get(block=block, timeout=wait if block else None)
            except queue.Empty:
                if not block:
                    self._send([EMPTY, 0, 0, 0])
                    raise
                wait = min(2 * wait, IDLE_POLL_MAX)
                self._send([IDLE, round(wait * 1000), 0, 0])  # the followers sleep until the next meeting
                continue
            kind, value = item
            if kind == "job":
                payload = job_payload(value, self.model)
                self._send([JOB, 0, len(payload), 0], payload)
            else:
                self._send([CANCEL if kind == "cancel" else CLOSE, value or 0, 0, 0])
            return item

    def _send(self, header: list[int], payload: bytes = b"") -> None:
        try:
            _share(self.group, header, payload)
        except DistributedError as e:
            _lost(self.group, e)


class FollowerInbox:
    """A follower's inbox: the messages rank 0 took, in its order (the caller's `block` is rank 0's)."""

    def __init__(self, model, group, tokenizer=None):
        self.model, self.group, self.tokenizer = model, group, tokenizer  # (the tokenizer builds grammar constraints)

    def get(self, block: bool = True):
        while True:
            try:
                header, payload = _share(self.group, [0, 0, 0, 0])
            except DistributedError as e:
                _lost(self.group, e)
            kind = header[0]
            if kind == IDLE:  # rank 0 waits header[1] ms on its queue before the next: sleep, not poll
                time.sleep(header[1] / 1000)
                continue
            if kind == EMPTY:
                raise queue.Empty
            if kind == JOB:
                try:
                    return "job", row_from(self.model, payload, self.tokenizer)
                except MlxGemmaError as e:  # rank 0 runs the job: without it this rank would fall out of step
                    print(f"error: distributed: rank {self.group.rank()}: cannot follow rank 0's job: {e}",
                          file=sys.stderr, flush=True)
                    os._exit(EXIT_STATUS)
            if kind == CANCEL:
                return "cancel", header[1]
            return "close", None
