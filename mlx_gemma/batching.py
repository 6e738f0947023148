"""Continuous batching: concurrent generation requests sharing one decode batch on one MLX thread.

The server submits `Job`s from any thread and gets `Event`s back (one per token, then a final
one).  All model work runs on the scheduler's own thread, inside the engine's one decode loop
(`engine.run`) driven by `BatchPolicy`.  Each step of that loop:

1. takes what arrived (new jobs queue for prefill; cancelled rows leave now, with a final
   "cancelled" event), and drops the rows that finished (`take`, which also trims the padding
   every remaining row shares, so memory follows the rows that remain);
2. queues one decoding step of every running row: one forward pass over the batch, then each
   row's own logits processors (its history: its prompt and its tokens) and its own sampler
   (its own seed), so a row's tokens are what it would get alone;
3. prefills one chunk (`prefill_chunk` positions) of the oldest waiting prompt into caches of
   its own, so a long prompt never freezes the other streams (then whole waiting prompts that
   fit what is left of the chunk; with no row decoding, the whole prompt); when its last chunk
   is in, its first token is sampled and its caches join the batch as a new row
   (models/batch_rows.py: rows of different lengths, each at its own RoPE positions, windows
   that have wrapped, max_kv_size's attention sinks, Gemma 4's shared KV layers).

With the prefix cache on (`prefix_cache_bytes`, mlx_gemma/prefix_cache.py), a prompt starts
from a copy of the cached caches sharing its longest prefix and prefills only the rest
(`Event.cached_tokens`); a prompt's caches are stored once it is prefilled, and a row's (prompt +
tokens) as it leaves.  Prompts are then prefilled into rings with slack, which can go back.

The loop is pipelined throughout: taking and merging rows are lazy array operations, so step
n + 1 can be queued before the host reads step n.  A row that finishes at step n is still
computed at step n + 1 (its output ignored) and leaves at step n + 2.  When nothing runs and
nothing waits, the thread sleeps on its inbox.

A failure in one job (NaN logits in its row, a processor that raises, media that does not fit)
ends that job with an "error" event; an exception in the loop itself fails every current job
and the thread serves on.

A quantized KV cache (kv_bits): a row alone stores float keys until it holds
`quantized_kv_start` tokens, then quantized ones, and attention takes another path for each;
so the scheduler decodes two batches per step, float rows and quantized rows (one forward pass
each while both hold rows), and a row moves to the quantized batch before the step whose update
would switch it alone (models/batch_rows.py: `move_row`).  A prompt switches at the first prefill
chunk that starts past the threshold, so a reused prefix (moving the chunks) may move its switch.

Prefix-LM models (PaliGemma): a prompt attends both ways, so it is prefilled alone in one call
(its own caches, as everywhere here), and only its decoding is batched, which is causal: each
decode step passes `prefix_length` 0 (every row is past its prompt).  The prefix cache is off for
them: a prompt's keys depend on all of it, so no shorter or longer prompt can reuse them.

A prompt with media is prefilled in one step (the engine's prefill keeps its image blocks whole),
not chunk by chunk; the prefix cache reuses a media block only where it held the same item there.
"""

from __future__ import annotations

import itertools
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from .arguments import is_integer
from .batch_media import media_blocks, media_past
from .cpu_spread import streams as cpu_streams
from .engine import Pending, default_prefill_step, generation_stream, prefill, run
from .errors import GenerationError
from .mlx_thread import MlxThread
from .jobs import MAX_TOP_LOGPROBS, Event, Job, Row, RowOut, check_job, error_text, sample_row  # noqa: F401 (re-exported)
from .models.batch_rows import BatchKVCache, batch_caches_like, merge_rows, move_row, row_caches, take_rows, with_slack
from .models.kv_cache import KVCacheOptions
from .prefix_cache import DEFAULT_BYTES, SLACK, PrefixCache


class _Batch:
    """Rows decoded together in one forward pass, and their batch caches (in row order)."""

    def __init__(self, caches: list):
        self.caches, self.rows = caches, []

    def position(self, b: int) -> int:
        """Row b's next position (every storing layer holds the same)."""
        return next(c.positions[b] for c in self.caches if isinstance(c, BatchKVCache))


class BatchPolicy:
    """The engine's step policy for a batch whose rows join and leave (see the module docstring)."""

    pipelined = True  # a step never needs the host's values of the step before

    def __init__(self, model, inbox: queue.Queue, chunk: int, kv_options: KVCacheOptions, finished,
                 max_batch: int = 8, prefix: PrefixCache | None = None):
        self.model, self.inbox, self.chunk, self.kv_options = model, inbox, chunk, kv_options
        self.prefix = prefix  # earlier prompts' caches (None: off)
        self.max_batch = max_batch  # rows decoding at once; a prompt waits for room before its prefill
        self.finished = finished  # called once per job when its final event is out
        # kv_bits: where a row switches to quantized storage (None: never)
        self.quantize_from = kv_options.quantized_kv_start if kv_options.kv_bits is not None else None
        self.batches = self._empty_batches()  # float rows, then (kv_bits) quantized rows
        self.waiting: deque[Row] = deque()  # prompts to prefill, oldest first
        self.closing = False
        # Serving across ranks: distributed/failures.py's SharedFailures, so that a row failing on one rank
        # ends on every rank at the same step (None in one process: a failing row ends where it fails).
        self.ranks = None

    def _empty_batches(self) -> list[_Batch]:
        fresh = self.model.make_cache(None, self.kv_options)
        quantized = [_Batch(batch_caches_like(fresh, quantized=True))] if self.quantize_from is not None else []
        return [_Batch(batch_caches_like(fresh)), *quantized]

    @property
    def rows(self) -> list[Row]:
        """Every decoding row (float rows first)."""
        return [r for batch in self.batches for r in batch.rows]

    @property
    def caches(self) -> list:
        """The float rows' batch caches."""
        return self.batches[0].caches

    # ----- events ---------------------------------------------------------------------------

    def emit(self, row: Row, event: Event) -> None:
        if event.finish_reason is not None:  # counted out first: whoever sees the last event sees it gone
            row.done, row.finish = True, event.finish_reason
            self.finished()
        try:
            row.on_event(event)
        except Exception:  # a broken callback ends its own job, never the loop
            if not row.done:
                row.done = True
                self.finished()
                if self.ranks is not None:  # (the other ranks still hold the row)
                    self.ranks.report(row, "the job's event callback failed")

    def end(self, row: Row, reason: str, error: str | None = None) -> None:
        """The final event of a job that ends without a token."""
        if not row.done:
            self.emit(row, Event(row.id, None, None, [], reason, error,
                                 prompt_tokens=0 if row.produced else len(row.job.prompt_ids)))

    def fail_all(self, e: BaseException) -> None:
        """An exception in the loop: every current job ends with an error; the batch starts afresh."""
        if self.ranks is not None:  # the other ranks fail the same jobs, or this rank ends (failures.py)
            self.ranks.report_all(self, e)
        for row in [*self.rows, *self.waiting]:
            self.end(row, "error", error_text(e))
        self.batches, self.waiting = self._empty_batches(), deque()

    # ----- the inbox ------------------------------------------------------------------------

    def _take_inbox(self) -> None:
        """Handle what arrived; sleep until something does when nothing runs or waits."""
        while True:
            idle = not any(not r.done for r in self.rows) and not self.waiting and not self.closing
            if idle:
                mx.clear_cache()  # nothing runs: give the freed buffers back before sleeping
            try:
                kind, value = self.inbox.get(block=idle)
            except queue.Empty:
                return
            if kind == "job":
                self.waiting.append(value)
            elif kind == "cancel":
                for row in [r for r in [*self.rows, *self.waiting] if r.id == value]:
                    self.end(row, "cancelled")
                self.waiting = deque(r for r in self.waiting if not r.done)
            elif kind == "close":
                self.closing = True
                for row in [*self.rows, *self.waiting]:
                    self.end(row, "cancelled")
                self.waiting = deque()

    def _drop_done(self) -> None:
        for batch in self.batches:
            keep = [b for b, r in enumerate(batch.rows) if not r.done]
            for b, row in enumerate(batch.rows):
                if row.done and self.prefix is not None and row.finish in ("stop", "length", "cancelled"):
                    self._store_row(batch, b, row)
            if len(keep) < len(batch.rows):
                take_rows(batch.caches, keep)
                batch.rows = [batch.rows[b] for b in keep]

    def _switch_rows(self) -> None:
        """Float rows whose next update would switch them to quantized storage alone move to the
        quantized batch (kv_bits), their keys quantized as the switch quantizes them."""
        if self.quantize_from is None:
            return
        floats, quantized = self.batches
        moving = [b for b, r in enumerate(floats.rows) if not r.done and floats.position(b) >= self.quantize_from]
        if not moving:
            return
        for b in moving:
            move_row(floats.caches, b, quantized.caches)
            quantized.rows.append(floats.rows[b])
        keep = [b for b in range(len(floats.rows)) if b not in moving]
        take_rows(floats.caches, keep)
        floats.rows = [floats.rows[b] for b in keep]

    def _fresh_caches(self) -> list:
        caches = self.model.make_cache(None, self.kv_options)
        return caches if self.prefix is None else with_slack(caches, SLACK)

    def _store_row(self, batch: _Batch, b: int, row: Row) -> None:
        """Store a leaving row's prompt + tokens (as many as its caches hold) in the prefix cache."""
        held = batch.position(b)
        tokens = [*row.job.prompt_ids, *row.tokens]
        caches = row_caches(batch.caches, b, self._fresh_caches()) if held <= len(tokens) else None
        if caches is not None:
            self.prefix.store(tokens[:held], caches, row.blocks)

    # ----- one step -------------------------------------------------------------------------

    def first(self, hidden) -> Pending:
        return self._step()

    def advance(self, step: Pending, read) -> Pending:
        return self._step()

    def _step(self) -> Pending:
        if self.ranks is not None:  # first: what failed on one rank ends on every rank (failures.py)
            self.ranks.meet(self)
        self._drop_done()  # before the inbox, which may sleep: an idle batch holds no rows
        self._take_inbox()
        self._drop_done()
        outs = self._decode() if self.rows and not self.closing else []
        if not self.closing:
            outs += self._prefill_some()
        settle = self.prefix.settle() if self.prefix is not None else []  # new entries, computed with the step
        if self.ranks is not None:
            self.ranks.built()
        return Pending(tuple(a for o in outs for a in o.arrays()) + tuple(settle), outs)

    def _prefill_some(self) -> list[RowOut]:
        """A chunk of the oldest waiting prompt, then whole prompts while the step's `chunk` positions last.

        A prompt that fits what is left goes in one call, as it would alone, so short prompts
        arriving together join in one step (on a GPU, whose chunks are long, most prompts do)."""
        outs, budget = [], self.chunk
        while self.waiting and len(self.rows) < self.max_batch and budget > 0:
            row = self.waiting[0]
            if budget < self.chunk and (row.fed or len(row.job.prompt_ids) > budget):
                break  # not begun and not whole: it waits for the next step's chunk
            fed = row.fed
            joined = self._prefill_next()
            if joined is not None:
                outs.append(joined)
            if self.waiting and self.waiting[0] is row:
                break  # still prefilling: its chunk was this step's
            budget -= max(1, row.fed - fed)
        return outs

    def _decode(self) -> list[RowOut]:
        """One forward pass over each batch holding rows, and each row's own sampling (lazy)."""
        self._switch_rows()
        return [out for batch in self.batches if batch.rows for out in self._decode_batch(batch)]

    def _decode_batch(self, batch: _Batch) -> list[RowOut]:
        y = mx.concatenate([r.last for r in batch.rows])[:, None]  # [B, 1]
        # A prefix-LM's decode steps are past every row's prompt: no prefix (PaliGemma would
        # otherwise take a call at offset 0 for a prompt).
        suffix = {"prefix_length": mx.zeros((y.shape[0],), mx.int32)} if self.model.prefix_lm else {}
        hidden = self.model.model(y, cache=batch.caches, **suffix)  # [B, 1, D]
        logits = self.model.logits(hidden[:, -1, :]).astype(mx.float32)  # [B, V]
        outs = []
        for b, row in enumerate(batch.rows):
            if row.done:  # finished at the step being read: computed, ignored, dropped next step
                continue
            out = self._sample(row, logits[b : b + 1], y[b : b + 1])
            if out is not None:
                outs.append(out)
        return outs

    def _sample(self, row: Row, logits: mx.array, fed: mx.array | None) -> RowOut | None:
        """The row's next token (jobs.sample_row); a row whose settings fail ends here, the batch goes on."""
        try:
            return sample_row(row, logits, fed)
        except Exception as e:
            row.last = mx.zeros((1,), mx.int32)  # a failed row still feeds a valid id until it leaves
            if self.ranks is None:
                self.end(row, "error", error_text(e))
            else:  # it ends at the next step on every rank; until then it stays, so this step's calls are theirs
                self.ranks.report(row, error_text(e))
            return None

    def _prefill_next(self) -> RowOut | None:
        """One chunk of the oldest waiting prompt; its first token once all of it is in."""
        row = self.waiting[0]
        try:
            hidden = self._prefill_chunk(row)
        except Exception as e:  # a prompt the model cannot take (its media, say) ends that job only
            if self.ranks is not None:  # across ranks it may have failed part way through its collectives
                raise
            self.waiting.popleft()
            row.caches = None
            self.end(row, "error", error_text(e))
            return None
        if hidden is None:
            return None
        self.waiting.popleft()
        if self.prefix is not None:  # the prompt alone, before any decoding (a next chat turn starts with it)
            self.prefix.store(row.job.prompt_ids, row.caches, row.blocks)
        logits = self.model.logits(hidden[:, -1, :]).astype(mx.float32)  # [1, V]
        out = self._sample(row, logits, None)
        if out is None:
            row.caches = None
            return None
        # A row at its kv_bits switch joins the quantized rows (merge quantizes its float keys).
        batch = self.batches[-1] if self.quantize_from is not None and len(row.job.prompt_ids) >= self.quantize_from else self.batches[0]
        merge_rows(batch.caches, row.caches)
        row.caches = None
        batch.rows.append(row)
        return out

    def _prefill_chunk(self, row: Row) -> mx.array | None:
        """Feed the next chunk of the row's prompt; its last hidden states when the prompt is in."""
        if row.caches is None:
            row.begin()
            if self.prefix is not None:  # a prefix holds only the same media (named blocks), else stops before
                row.blocks = media_blocks(self.model, row.job)
                row.cached, row.caches = self.prefix.lookup(row.job.prompt_ids, row.blocks)
                row.fed = row.cached
            if row.caches is None:
                row.caches = self._fresh_caches()
        L = row.prompt.shape[1]
        media = dict(row.job.media or {})
        if media:  # media go whole: the engine's prefill keeps image blocks in one chunk, audio in one call
            if row.fed and row.blocks:  # the items past the reused prefix (those before it are cached)
                media = media_past(self.model, row)
            step = L if self.model.image_input is None else self.chunk
            hidden, row.fed = prefill(self.model, row.prompt[:, row.fed :], row.caches, step, **media), L
        else:  # a chunk per step between decoding steps; the rest at once (in chunks) when none run
            decoding = any(not r.done for r in self.rows)
            # (a prefix-LM prompt goes whole: its tokens attend both ways)
            end = min(L, row.fed + self.chunk) if decoding and not self.model.prefix_lm else L
            hidden, row.fed = prefill(self.model, row.prompt[:, row.fed : end], row.caches, self.chunk), end
        if row.fed < L:
            mx.eval([c.state for c in row.caches])
            return None
        return hidden

    # ----- reading a step -------------------------------------------------------------------

    def read(self, step: Pending, n: int) -> int:
        """Emit the step's events; the number of rows it held."""
        outs: list[RowOut] = step.rest
        if step.queue:
            mx.eval(*step.queue)
        for out in outs:
            row = out.row
            if row.done:
                continue
            token = out.token.item()
            if token < 0:
                self.end(row, "error", "the logits held a NaN or no finite value (the weights, the dtype or a "
                                       "logits processor are at fault)")
                continue
            row.produced += 1
            row.tokens.append(token)
            finish = "stop" if token in row.job.stop_ids else ("length" if row.produced >= row.budget else None)
            top = []
            if out.top is not None:
                top = sorted(zip(out.top[0].tolist(), out.top[1].tolist()), key=lambda t: -t[1])
            first = row.produced == 1
            self.emit(row, Event(row.id, token, out.logprob.item(), top, finish,
                                 prompt_tokens=len(row.job.prompt_ids) if first else 0,
                                 cached_tokens=row.cached if first else 0))
        return len(outs)

    @property
    def cache_bytes(self) -> int:
        own = [c for r in self.waiting if r.caches is not None for c in r.caches]
        return sum(c.nbytes for c in [*(c for batch in self.batches for c in batch.caches), *own])


class Scheduler:
    """Runs submitted jobs in one continuously batched decode loop on its own MLX thread.

    `submit`, `cancel` and `close` may be called from any thread; `on_event` callbacks run on
    the MLX thread and must return quickly (hand the event to the caller's own queue).
    """

    def __init__(self, model, *, max_batch: int = 8, prefill_chunk: int | None = None,
                 kv_options: KVCacheOptions | None = None, prefix_cache_bytes: int = DEFAULT_BYTES, policy=None):
        if not is_integer(max_batch) or max_batch < 1:
            raise GenerationError(f"max_batch must be an integer >= 1, got {max_batch!r:.80}")
        if prefill_chunk is not None and (not is_integer(prefill_chunk) or prefill_chunk < 1):
            raise GenerationError(f"prefill_chunk must be an integer >= 1 (or None), got {prefill_chunk!r:.80}")
        if not is_integer(prefix_cache_bytes) or prefix_cache_bytes < 0:
            raise GenerationError(f"prefix_cache_bytes must be an integer >= 0 (0: off), got {prefix_cache_bytes!r:.80}")
        self.model, self.max_batch = model, int(max_batch)
        self.kv_options = KVCacheOptions.of(kv_options)
        batch_caches_like(model.make_cache(None, self.kv_options))  # refuses what cannot be batched, now
        # Arrays still lazy (constants such as Gemma 4's RoPE frequencies) name the stream of the
        # thread that made them, which MLX 0.32 will not run from another thread: settle them here.
        mx.eval([v for _, v in tree_flatten(model) if isinstance(v, mx.array)])
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._active = 0
        self._closed = False
        self._served: threading.Event | None = None  # set when the serving loop has ended
        media_ids = frozenset(spec.token_id for spec in (model.image_input, model.audio_input) if spec is not None)
        # (off for a prefix-LM: a prompt's keys depend on the whole prompt, see the module docstring)
        reuse = prefix_cache_bytes and not model.prefix_lm
        self._prefix = PrefixCache(int(prefix_cache_bytes), media_ids) if reuse else None
        # (`policy`: BatchPolicy or a subclass's maker, batch_speculation.py's for a row alone that speculates)
        self._policy = (policy or BatchPolicy)(model, self._inbox, int(prefill_chunk or default_prefill_step(model)),
                                   self.kv_options, self._finished, self.max_batch, self._prefix)

    @property
    def active(self) -> int:
        """Rows decoding plus prompts waiting or prefilling."""
        with self._lock:
            return self._active

    @property
    def cache_bytes(self) -> int:
        """Bytes the batch's KV caches and the prompts being prefilled hold now."""
        return self._policy.cache_bytes

    @property
    def prefix_cache_bytes(self) -> int:
        """Bytes the prefix cache's entries hold now (bounded by `prefix_cache_bytes`)."""
        return 0 if self._prefix is None else self._prefix.nbytes

    def _finished(self) -> None:
        with self._lock:
            self._active -= 1

    def start(self) -> None:
        """Start the MLX thread (a daemon); every model call happens on it from now on."""
        with self._lock:
            if self._closed:
                raise GenerationError("the scheduler is closed")
            if self._served is None:
                self._served = MlxThread.serve(self._serve)

    def submit(self, job: Job, on_event: Callable[[Event], None]) -> int:
        """Queue `job`; its events go to `on_event`.  Bad jobs raise GenerationError here."""
        budget = check_job(self.model, job, on_event)
        if job.media:  # lazy arrays made on this thread cannot be run from the MLX thread (see __init__)
            mx.eval([v for _, v in tree_flatten(dict(job.media)) if isinstance(v, mx.array)])
        with self._lock:
            if self._closed:
                raise GenerationError("the scheduler is closed")
            job_id = next(self._ids)
            self._active += 1
            self._inbox.put(("job", Row(job_id, job, on_event, budget)))
        return job_id

    def cancel(self, job_id: int) -> None:
        """End a job at the next step with a final "cancelled" event (nothing if it has ended)."""
        self._inbox.put(("cancel", job_id))

    def close(self) -> None:
        """Stop the thread; jobs still running or waiting get a final "cancelled" event."""
        with self._lock:
            self._closed = True
            served = self._served
        self._inbox.put(("close", None))
        if served is None:  # never started: end the queued jobs here
            self._policy._take_inbox()
        elif threading.current_thread().name != MlxThread.NAME:  # (from a callback it cannot wait)
            served.wait()

    def _serve(self) -> None:
        policy = self._policy
        while not policy.closing:
            try:
                for _ in run(policy, None, sys.maxsize):
                    if policy.closing:
                        break
            except Exception as e:  # the loop itself failed: every current job ends, the thread serves on
                policy.fail_all(e)
        # Nothing queued may outlive the thread that queued it: MLX 0.32 aborts the process at exit
        # when a finished thread's streams still hold work (cpu_spread's helpers included).
        for stream in (generation_stream(), *cpu_streams(sys.maxsize)):
            mx.synchronize(stream)
