"""The server across ranks: rank 0 serves HTTP, the other ranks follow its batches (issue 23).

`mlx.launch -n 2 ... python -m mlx_gemma.server --model M --pipeline` (or `--tensor-parallel`).
Every rank runs the same `batching.Scheduler` (the one decode loop, `engine.run` with
`BatchPolicy`), each with its share of the model; the ranks make the same model calls in the
same order, so their collectives (pipeline send/recv, the shared logits' all_sum, tensor
parallel's all_sums) pair up.  What could differ is what each step takes from its inbox, so
rank 0's policy reads a `LeaderInbox` that shares every message it takes (a job with its prompt
ids and sampling, a cancellation, close, or "nothing more this step") with the followers, whose
policy reads a `FollowerInbox` that gives back the same messages.  Everything else a step
decides (rows leaving on a stop id or their budget, the kv_bits switch, prefix-cache lookups)
follows from those messages and from the sampled tokens, which are the same on every rank: the
logits are shared, and a job's seed is drawn on rank 0 and travels with it.

One step's graph may hold several forward passes (a decode batch and a prompt's chunk); each is
computed as soon as the policy makes it (`InOrder`), so the collectives run in the policy's order.

A message is a fixed int32 header and, for a job, a JSON payload, both sent by an `all_sum` in
which the followers add zeros (exact), on the generation stream: queued behind the step in
flight, so every rank runs its collectives in one order.  When the server is idle rank 0 waits on
its own queue and shares an "idle" message every `IDLE_POLL` seconds (growing to `IDLE_POLL_MAX`),
between which the followers sleep (a rank waiting inside a collective polls its socket): little CPU, and the watchdog
(watchdog.py) sees progress on every rank.

Shutdown: SIGINT or SIGTERM on rank 0 stops uvicorn, then its scheduler's close reaches the
followers as a message and every rank exits 0; the followers ignore both signals (mlx.launch and
a terminal's Ctrl-C signal every rank), since they end when rank 0 tells them to.

The prefix cache: an entry's bytes differ per rank (each holds its own layers), so the ranks
agree on each entry's bytes (the largest rank's) before the byte bound evicts anything; lookups
then see the same entries everywhere.  It is turned off when some ranks hold sliding-window
layers and others do not (whether a ring can go back would differ).

Not served across ranks (a 400 naming it): images and audio, requests whose reply is constrained
by a grammar (response_format json_schema / json_object, forced tool calls), since a job's own
logits processors live on rank 0 only, and a request's prompt_lookup (the ranks decode without
speculating).  An embedding model, several --model and the speculation flags are refused at start.  A lost peer ends every rank with an error line (exit status 3).
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import secrets
import signal
import sys
import time

import mlx.core as mx
import numpy as np

from ..batching import Scheduler
from ..engine import generation_stream
from ..errors import DistributedError, GenerationError
from ..jobs import Job, Row, check_job
from ..prefix_cache import PrefixCache
from ..samplers import SamplingSettings
from .watchdog import EXIT_STATUS, beat, watch

EMPTY, IDLE, JOB, CANCEL, CLOSE = 1, 2, 3, 4, 5  # a message's kind (0 is what the followers add)
KINDS = (EMPTY, IDLE, JOB, CANCEL, CLOSE)
# While idle the ranks meet every IDLE_POLL seconds, doubling up to IDLE_POLL_MAX as the pause goes on:
# a rank waiting inside a collective polls its socket (MLX 0.32's ring backend: non-blocking recv in a
# loop), so the followers sleep between meetings instead; the first request after a pause waits for
# them up to the interval then reached.
IDLE_POLL, IDLE_POLL_MAX = 0.05, 0.4
NOT_ACROSS = "is not served across ranks (--pipeline / --tensor-parallel)"


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


def _job_payload(row: Row) -> bytes:
    job = row.job
    sampling = {f.name: getattr(job.sampling, f.name) for f in dataclasses.fields(SamplingSettings)}
    if sampling["logit_bias"] is not None:
        sampling["logit_bias"] = [[int(k), float(v)] for k, v in sampling["logit_bias"].items()]
    return json.dumps({"id": row.id, "prompt_ids": [int(t) for t in job.prompt_ids], "max_tokens": job.max_tokens,
                       "sampling": sampling, "stop_ids": sorted(int(t) for t in job.stop_ids),
                       "top_logprobs": job.top_logprobs}).encode()


def _row_from(model, payload: bytes) -> Row:
    """A follower's copy of rank 0's job (its events go nowhere)."""
    d = json.loads(payload)
    sampling = d["sampling"]
    if sampling["logit_bias"] is not None:
        sampling["logit_bias"] = {int(k): v for k, v in sampling["logit_bias"]}
    job = Job(prompt_ids=d["prompt_ids"], max_tokens=d["max_tokens"], sampling=SamplingSettings(**sampling),
              stop_ids=frozenset(d["stop_ids"]), top_logprobs=d["top_logprobs"])
    return Row(d["id"], job, _ignore, check_job(model, job, _ignore))


def _ignore(event) -> None:
    """A follower's jobs report nothing: rank 0 answers the clients."""


class LeaderInbox:
    """Rank 0's inbox: the scheduler's own queue, each message taken shared with the followers."""

    def __init__(self, local: queue.Queue, group):
        self.local, self.group = local, group

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
                payload = _job_payload(value)
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

    def __init__(self, model, group):
        self.model, self.group = model, group

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
                return "job", _row_from(self.model, payload)
            if kind == CANCEL:
                return "cancel", header[1]
            return "close", None


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
        self._policy.inbox = LeaderInbox(self._inbox, group)

    def submit(self, job: Job, on_event) -> int:
        if isinstance(job, Job):
            if job.media:
                raise GenerationError(f"images and audio: a prompt with media {NOT_ACROSS}")
            if job.processors:
                raise GenerationError(f"a reply constrained by a grammar (response_format, forced tool calls) "
                                      f"{NOT_ACROSS}")
            ask = job.speculation  # (batch_speculation.SpeculationAsk; ranks decode without speculating)
            if ask is not None and ask.prompt_lookup not in (None, False):
                raise GenerationError(f"speculative decoding (prompt_lookup) {NOT_ACROSS}")
            if job.sampling.seed is None:  # drawn here, so every rank draws the same tokens
                job = dataclasses.replace(job, sampling=dataclasses.replace(job.sampling, seed=secrets.randbits(63)))
        return super().submit(job, on_event)


class FollowerScheduler(RankScheduler):
    """A rank > 0's scheduler: its jobs are rank 0's, read from the shared messages."""

    def __init__(self, model, group, **options):
        super().__init__(model, group, **options)
        self._policy.inbox = FollowerInbox(model, group)


def check_served(args) -> None:
    """What the server cannot serve across ranks, refused before anything is loaded."""
    if len(args.model) != 1:
        raise DistributedError(f"serving several models {NOT_ACROSS}: give one --model")
    flags = [f for f, v in (("--draft-model", args.draft_model), ("--num-draft-tokens", args.num_draft_tokens),
                            ("--prompt-lookup", args.prompt_lookup)) if v is not None]
    if flags:
        raise DistributedError(f"speculative decoding ({flags[0]}) {NOT_ACROSS}")


def ignore_signals() -> None:
    """SIGINT and SIGTERM do nothing from now on: on rank 0 once uvicorn (which handles them while it
    serves, then raises them again, so SIGTERM would kill the process) has returned, so its scheduler's
    close still reaches the followers; on a follower always (rank 0 ends it)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _ignore_signal)


def _ignore_signal(signum, frame) -> None:
    """(a Python handler, not SIG_IGN: uvicorn puts it back and calls it when it raises the signal again)"""


def follow(model, options: dict, group) -> int:
    """Run a follower rank until rank 0 closes: 0."""
    ignore_signals()
    scheduler = FollowerScheduler(model, group, **options)
    with watch("serving"):  # rank 0's idle messages keep it quiet while the server is idle
        scheduler.start()
        scheduler.served()
    return 0
