"""The prefix cache across requests: KV caches of earlier prompts that later prompts start with.

The scheduler (batching.py) stores, for each job, the single-row caches of its prompt right
after prefill and of its prompt + generated tokens when it ends; a new job copies the entry
sharing the longest prefix with its prompt, trims the copy to that prefix and prefills only
the rest.  Entries are an LRU bounded in bytes.

Sliding windows: a wrapped ring cannot go back (mlx-lm's server reuses nothing on Gemma 2/3/4
for that reason, mlx-lm issues #980 and #1437), so the scheduler's single-row caches give
every ring `SLACK` more slots than its window (RotatingKVCache's `slack`, masked by position):
an entry can then be trimmed back up to `SLACK` tokens.  A prompt's own entry, stored before
any decoding, needs no trimming for the next chat turn, however the reply is re-rendered.

A quantized KV cache (kv_bits): entries hold what the caches held, quantized past the switch (a row
leaving the quantized batch is stored as mx.quantize's parts, not dequantized): the bytes saved are
what kv_bits is for, and a prompt alone would hold those same parts anyway.  Such an entry serves
only prefixes at or past the switch (`_can_trim`), where a prompt alone is quantized too.

Matching is a linear scan of the entries, one vectorised compare per entry (numpy), not a trie
or block hashes: the byte bound keeps entries to tens or hundreds, a compare of a few thousand
ids costs microseconds beside the prefill it saves, and trimming rules (a ring's slack, media)
decide per entry whether a common prefix is usable, which a trie's longest match alone cannot.

Media: a prefix takes a media block only if the entry holds the same item there (a digest of its
pixels or features, as PromptCache does), and never ends inside one; the caller names each block
when every item has a run of soft tokens of its own (Gemma 3's images; Gemma 4's images, video
frames and clips), and feeds the items past the prefix.  Media it cannot name stop a prefix at
their first soft token.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .models.batch_rows import copy_caches
from .models.kv_cache import KVCache, RotatingKVCache

DEFAULT_BYTES = 1 << 30  # the default bound: 1 GiB (a tiny fraction of a served model's KV at full context)
# Extra ring slots of a windowed layer: a batch row's window buffer grows by 256 slots
# (BatchKVCache.step), so a row leaving holds up to that much past its window anyway; 256
# covers re-sending a prompt (1 token back) and re-rendered reply endings.
SLACK = 256


@dataclass
class _Entry:
    tokens: np.ndarray  # [n] int64 the ids the caches hold
    caches: list  # single-row caches (compact copies), holding `tokens`
    nbytes: int
    blocks: frozenset  # (start, end, digest) of each named image block the entry holds
    clean: int  # ids before the entry's first media soft token outside a named block: a prefix stops there


def _common(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two id arrays."""
    k = min(len(a), len(b))
    diff = np.flatnonzero(a[:k] != b[:k])
    return int(diff[0]) if len(diff) else k


def _media(blocks, clean: int, n: int) -> tuple:
    """What the first n ids hold of media: the named blocks within them, where unnamed ones start."""
    return frozenset(blk for blk in blocks if blk[1] <= n), min(clean, n)


def _can_trim(caches: list, n: int) -> bool:
    """Whether the caches can go back to n ids as a prompt alone would hold them: a ring must still
    hold what a query at n sees, and a quantized cache (kv_bits) held float keys below its switch."""
    return all(c.can_trim_to(n) for c in caches if isinstance(c, RotatingKVCache)) and \
        all(n >= c.quantize_from for c in caches if getattr(c, "quantized", False))


def _reach(caches: list) -> int:
    """The shortest length the caches can go back to (0 without a wrapped ring)."""
    return max((c.reach for c in caches if isinstance(c, RotatingKVCache)), default=0)


class PrefixCache:
    """An LRU of single-row caches keyed by the token ids they hold, bounded to `max_bytes`."""

    def __init__(self, max_bytes: int, media_ids: frozenset[int] = frozenset()):
        self.max_bytes = max_bytes
        self.media_ids = np.array(sorted(media_ids), dtype=np.int64)  # soft-token ids of images / audio
        self.entries: OrderedDict[int, _Entry] = OrderedDict()  # oldest use first
        self.nbytes = 0
        self.unsettled: list[mx.array] = []  # new entries' arrays, still lazy: computed with the next step
        self._keys = iter(range(1 << 62))

    def _clean(self, ids: np.ndarray, blocks=()) -> int:
        """Ids before the first media soft token outside the named `blocks`."""
        media = np.isin(ids, self.media_ids) if len(self.media_ids) else np.zeros(len(ids), bool)
        for a, b, _ in blocks:
            media[a:b] = False
        hits = np.flatnonzero(media)
        return int(hits[0]) if len(hits) else len(ids)

    def lookup(self, prompt_ids: list[int], blocks=()) -> tuple[int, list | None]:
        """(n, caches holding the prompt's first n ids) for the longest reusable prefix; (0, None) if none.

        `blocks`: (start, end, digest) of the prompt's named image blocks.  n leaves at least the
        last id to prefill (its hidden states give the first token)."""
        if not self.entries:
            return 0, None
        ids = np.asarray(prompt_ids, dtype=np.int64)
        limit = min(len(ids) - 1, self._clean(ids, blocks))
        best, best_n = None, 0
        for key, e in self.entries.items():  # the latest use wins a tie
            n = min(_common(e.tokens, ids), limit, e.clean)
            n = min([n] + [a for a, b, d in blocks if a < n and (b > n or (a, b, d) not in e.blocks)])
            if n >= best_n and n > 0 and _can_trim(e.caches, n):
                best, best_n = key, n
        if best is None:
            return 0, None
        self.entries.move_to_end(best)
        caches = copy_caches(self.entries[best].caches)
        for c in caches:
            c.trim_to(best_n)  # checked by _can_trim; KV-shared entries trim nothing
        return best_n, caches

    def store(self, tokens: list[int], caches: list, blocks=()) -> None:
        """Keep a compact copy of `caches` (holding `tokens`, with the named image `blocks`) unless
        an entry already serves it."""
        if self.max_bytes <= 0 or not tokens:
            return
        ids, reach = np.asarray(tokens, dtype=np.int64), _reach(caches)
        blocks = frozenset(blk for blk in blocks if blk[1] <= len(ids))
        clean = self._clean(ids, blocks)

        def holds(long: _Entry | None, short: _Entry | None) -> bool:  # (None: the new one)
            lt, lb, lc = (ids, blocks, clean) if long is None else (long.tokens, long.blocks, long.clean)
            st, sb, sc = (ids, blocks, clean) if short is None else (short.tokens, short.blocks, short.clean)
            m = len(st)
            return len(lt) >= m and _common(lt, st) == m and _media(lb, lc, m) == _media(sb, sc, m)

        # An entry serves any prefix down to its reach: one holding these ids (and media) that goes
        # back as far makes this one redundant, and this one makes such shorter entries redundant.
        for key, e in self.entries.items():
            if holds(e, None) and _reach(e.caches) <= reach:
                self.entries.move_to_end(key)
                return
        copies = copy_caches(caches, compact=True)
        nbytes = sum(c.nbytes for c in copies if isinstance(c, (KVCache, RotatingKVCache)))
        if nbytes > self.max_bytes:
            return
        for key in [k for k, e in self.entries.items() if holds(None, e) and reach <= _reach(e.caches)]:
            self._drop(key)
        self.unsettled += [a for c in copies for a in c.state]
        self.entries[next(self._keys)] = _Entry(ids, copies, nbytes, blocks, clean)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

    def settle(self) -> list[mx.array]:
        """The new entries' lazy arrays, for the caller to compute with its step (no graph is kept)."""
        arrays, self.unsettled = self.unsettled, []
        return arrays

    def _drop(self, key: int) -> None:
        self.nbytes -= self.entries.pop(key).nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0
