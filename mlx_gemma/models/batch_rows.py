"""KV caches for a batch whose rows join and leave between decoding steps (continuous batching).

A row joins with the caches it was prefilled into alone (`KVCache`, `RotatingKVCache`, each
holding one sequence); `BatchKVCache.merge` copies its keys and values in, in time order, as
a new row.  Rows leave with `take`.  Every row keeps its own positions: `offset` is an array
[B] of each row's next position, which RoPE takes per row (mx.fast.rope accepts an offset per
batch row, as mlx-lm's BatchKVCache uses it), so a row's keys and queries are rotated exactly
as when it runs alone, whatever the other rows' lengths.

Layout: the rows share `used` slots along time.  A shorter row sits at the right, its first
`pad[b]` slots empty and masked.  Slot s of row b holds position `offset[b] - (used - s)`, so
slot distances are position distances and one window mask serves every row.  A windowed layer
keeps at most `max_size` past tokens (it drops the oldest slots when its buffer must grow,
so the copy is paid once per `step` tokens); slots every row leaves empty are trimmed when
rows leave or the buffer grows, so memory follows the rows that remain.

Under `max_kv_size` a capped global layer keeps each row's first `keep` tokens (attention sinks,
as RotatingKVCache) in a small buffer of their own, attended beside the recent slots.

Quantized storage (kv_bits): a `BatchKVCache` made with `bits` stores every row's keys and values
as mx.quantize's parts (w_q, scales, biases; each part laid out [B, heads, slots, ...], so every
slot operation acts part by part) and returns them as the quantized caches do, so attention takes
its quantized path for every row.  A row alone switches to quantized storage once it holds
`quantized_kv_start` tokens, and attends in float before; one batch cannot attend both ways, so
the scheduler keeps two batches (float rows, quantized rows) and `move_row` carries a row across
when it reaches the switch, quantizing its stored float keys as the single cache's switch does
(mx.quantize groups along head_dim, token by token, so the result is the same).

The prefix cache (mlx_gemma/prefix_cache.py) keeps single-row caches across requests:
`with_slack` gives a fresh set's rings room to go back, `copy_caches` copies a set (new arrays,
never shared with a live row), and `row_caches` takes one batch row out as single-row caches.
"""

from __future__ import annotations

import copy

import mlx.core as mx

from ..errors import GenerationError
from .kv_cache import KVCache, Parts, RotatingKVCache, SharedKVCache, time_slice
from .layers import build_mask


class BatchKVCache:
    """One layer's keys and values for rows of different lengths; decoding and merging only."""

    step = 256  # slots a buffer grows by, so decoding writes in place

    def __init__(self, max_size: int | None = None, keep: int = 0, bits: int | None = None, group_size: int = 64):
        self.bits, self.group_size = bits, group_size  # bits: stored quantized (None: float)
        self.max_size = max_size  # None: keep every token (global layer); else the tokens kept, sinks included
        self.keep = keep  # each row's first tokens kept for good (attention sinks: max_kv_size on global layers)
        self.recent = None if max_size is None else max_size - keep  # recent tokens kept (the ring, as RotatingKVCache's)
        self.sinks: tuple[Parts, Parts] | None = None  # keys, values [B, kv_heads, keep, ...] per part
        self.keys: Parts | None = None  # [B, kv_heads, capacity, head_dim] (float: one part; quantized: three)
        self.values: Parts | None = None
        self.used = 0  # slots holding tokens (or padding), the same for every row
        self.pad: list[int] = []  # per row: leading empty slots
        self.positions: list[int] = []  # per row: position of its next token
        self._offset: mx.array | None = None  # `positions` as an array, made once per change

    # ----- what the model reads ---------------------------------------------------------

    @property
    def rows(self) -> int:
        return len(self.positions)

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def _encode(self, x: mx.array) -> Parts:
        """Float keys or values [B, H, T, D] in this cache's storage form."""
        return (x,) if self.bits is None else tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    @staticmethod
    def _fetched(parts: Parts):
        return parts[0] if len(parts) == 1 else parts  # as the single caches return them (attention's two paths)

    @property
    def offset(self) -> mx.array:
        """Each row's next position [B] (RoPE's per-row offset)."""
        if self._offset is None:
            self._offset = mx.array(self.positions, dtype=mx.int32)
        return self._offset

    @property
    def left_padding(self) -> mx.array:
        return mx.array(self.pad, dtype=mx.int32)

    def make_mask(self, T: int, window: int | None = None, prefix_length: mx.array | None = None):
        """Mask for the next `update_and_fetch` of T tokens over the `used + T` slots it returns.

        `prefix_length` is taken and ignored: a prefix-LM's prompt is prefilled alone, and a batch
        only decodes past it, where a prefix changes nothing (the scheduler passes zeros)."""
        self._reserve(T)  # before the mask: making room may drop old slots
        S = self.used + T
        if self.recent is not None:  # what the cache keeps narrows the window (RotatingKVCache.make_mask)
            window = self.recent if window is None else min(window, self.recent)
        if not self.keep and not any(self.pad) and (window is None or window >= S):
            return None if T == 1 else "causal"
        slots = mx.arange(S)
        valid = slots[None, :] >= self.left_padding[:, None]  # [B, S]
        mask = build_mask(mx.arange(self.used, S), slots, window=window, key_valid=valid)  # [B, 1, T, S]
        if not self.keep:
            return mask
        # Sink j (position j) is seen through the sinks only once it has left the window: inside
        # the window the recent slots hold it too, and attending to it twice would weigh it double.
        q = self.offset[:, None] + mx.arange(T)[None]  # [B, T] query positions
        j = mx.arange(self.keep)[None, None]
        seen = (j <= q[..., None]) & (q[..., None] - j >= window)  # [B, T, keep]
        return mx.concatenate([seen[:, None], mask], axis=-1)  # keys: the sinks, then the slots

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        T = keys.shape[2]  # keys: [B, kv_heads, T, head_dim]
        self._reserve(T)  # done already if this cache made the layer's mask
        new_k, new_v = self._encode(keys), self._encode(values)
        for stored, new in zip(self.keys + self.values, new_k + new_v):
            stored[..., self.used : self.used + T, :] = new
        self.used += T
        if self.keep:
            self._write_sinks(new_k, new_v)
        self.positions = [p + T for p in self.positions]
        self._offset = None
        keys, values = time_slice(self.keys, None, self.used), time_slice(self.values, None, self.used)
        if self.keep:
            keys, values = _joined(self.sinks[0], keys), _joined(self.sinks[1], values)
        return self._fetched(keys), self._fetched(values)

    def _write_sinks(self, keys: Parts, values: Parts) -> None:
        """Rows still within their first `keep` tokens also keep the new one as a sink."""
        young = [b for b, p in enumerate(self.positions) if p < self.keep]
        if young and keys[0].shape[2] != 1:
            raise GenerationError("a batch with attention sinks takes one token per row at a time")
        for b in young:
            p = self.positions[b]
            for stored, new in zip(self.sinks[0] + self.sinks[1], keys + values):
                stored[b : b + 1, :, p : p + 1, :] = new[b : b + 1]

    # ----- rows ---------------------------------------------------------------------------

    def _reserve(self, T: int) -> None:
        """Room for T more slots: new buffers, without the slots no row needs, when full.

        Layers with the same window evolve alike, so one that only updates (its mask made by
        another layer's cache) drops the same slots as the one that made the mask."""
        if self.keys is not None and self.used + T <= self.keys[0].shape[2]:
            return
        drop = min(self.pad, default=0)  # slots every row leaves empty
        if self.recent is not None:  # a window never looks further back than the recent tokens kept
            drop = max(drop, self.used - self.recent)
        kept = self.used - drop
        capacity = self._capacity(kept, T)
        self.keys, self.values = (tuple(_moved(p, drop, self.used, capacity) for p in parts)
                                  for parts in (self.keys, self.values))
        self.used = kept
        self.pad = [max(0, p - drop) for p in self.pad]

    def _capacity(self, kept: int, T: int) -> int:
        """Slots for `kept` tokens and T more, rounded up to `step` (a window's: at most T or `step` past it)."""
        capacity = -(-(kept + T) // self.step) * self.step
        return capacity if self.recent is None else min(capacity, self.recent + max(T, self.step))

    def take(self, rows: list[int]) -> None:
        """Keep rows `rows` (in that order) and trim the slots all of them leave empty."""
        self.positions = [self.positions[r] for r in rows]
        self.pad = [self.pad[r] for r in rows]
        self._offset = None
        if not rows:
            self.keys = self.values = self.sinks = None
            self.used = 0
            return
        drop = min(self.pad)
        if rows == list(range(self.keys[0].shape[0])) and not drop:
            return  # every row stays, nothing to trim: no copy
        index = mx.array(rows, dtype=mx.int32)
        if self.sinks is not None:
            self.sinks = tuple(tuple(p[index] for p in parts) for parts in self.sinks)
        self.keys, self.values = (tuple(p[index][..., drop:, :] for p in parts) for parts in (self.keys, self.values))
        self.used -= drop
        self.pad = [p - drop for p in self.pad]

    def merge(self, single: KVCache | RotatingKVCache) -> None:
        """Add the one sequence `single` holds (prefilled alone, no padding) as the last row; float
        keys joining a quantized batch are quantized (as the single cache's own switch would)."""
        if single.keys is None or single.keys[0].shape[0] != 1 or (single.quantized and not self.quantized):
            raise GenerationError("only a cache holding one prefilled sequence, quantized only if this batch is, "
                                  "can join a batch")
        if isinstance(single, RotatingKVCache):
            if single.keep != self.keep:
                raise GenerationError(f"a cache keeping {single.keep} first tokens cannot join rows keeping {self.keep}")
            keys, values = single._in_time_order(single.keys), single._in_time_order(single.values)
        else:
            keys, values = time_slice(single.keys, None, single.offset), time_slice(single.values, None, single.offset)
        if not single.quantized:
            keys, values = self._encode(keys[0]), self._encode(values[0])
        sinks = None
        if self.keep:  # time order starts at position 0: the first `keep` are the row's sinks
            sinks = time_slice(keys, None, self.keep), time_slice(values, None, self.keep)
            if single.offset > single.max_size:  # wrapped: past the sinks come only the recent tokens
                keys, values = time_slice(keys, self.keep, None), time_slice(values, self.keep, None)
        self._append(keys, values, single.offset, sinks)

    def _append(self, keys: Parts, values: Parts, position: int, sinks: tuple[Parts, Parts] | None) -> None:
        """Add a row: its keys and values in time order [1, H, n, ...] ending at `position`, its sinks."""
        if self.keep:
            self._merge_sinks(*sinks)
        if self.recent is not None and keys[0].shape[2] > self.recent:
            keys, values = time_slice(keys, -self.recent, None), time_slice(values, -self.recent, None)
        n = keys[0].shape[2]
        if self.keys is None:
            self.keys, self.values, self.used, self.pad = keys, values, n, [0]
        else:
            width = max(self.used, n)  # rows right-aligned at slot `width`; room for the next token
            capacity = self._capacity(width, 1)
            self.keys, self.values = (tuple(_stacked(p[..., : self.used, :], q, width, capacity) for p, q in zip(old, new))
                                      for old, new in ((self.keys, keys), (self.values, values)))
            self.pad = [p + width - self.used for p in self.pad] + [width - n]
            self.used = width
        self.positions = self.positions + [position]
        self._offset = None

    def move_row(self, b: int, to: BatchKVCache) -> None:
        """Append row b to `to` (quantizing it when `to` is quantized and this is not); the caller
        then takes it out of this cache with `take`."""
        if self.quantized and not to.quantized:
            raise GenerationError("a quantized row cannot go back to float storage")
        if (to.max_size, to.keep) != (self.max_size, self.keep):
            raise GenerationError("a row moves only between caches of the same window and sinks")

        def row(parts: Parts, start: int, stop: int | None) -> Parts:
            parts = tuple(p[b : b + 1, :, start:stop, :] for p in parts)
            return to._encode(parts[0]) if to.quantized and not self.quantized else parts

        keys, values = row(self.keys, self.pad[b], self.used), row(self.values, self.pad[b], self.used)
        sinks = None if not self.keep else (row(self.sinks[0], 0, None), row(self.sinks[1], 0, None))
        to._append(keys, values, self.positions[b], sinks)

    def _merge_sinks(self, keys: Parts, values: Parts) -> None:
        """Add a row's first tokens [1, H, <= keep, ...] as its sinks (empty slots, if fewer, filled as it decodes)."""
        missing = [(0, 0), (0, 0), (0, self.keep - keys[0].shape[2]), (0, 0)]
        keys, values = tuple(mx.pad(p, missing) for p in keys), tuple(mx.pad(p, missing) for p in values)
        if self.sinks is not None:
            keys = tuple(mx.concatenate([old, new], axis=0) for old, new in zip(self.sinks[0], keys))
            values = tuple(mx.concatenate([old, new], axis=0) for old, new in zip(self.sinks[1], values))
        self.sinks = (keys, values)

    @property
    def state(self) -> list[mx.array]:
        return ([] if self.keys is None else [*self.keys, *self.values]) + [p for parts in self.sinks or () for p in parts]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


def _joined(first: Parts, then: Parts) -> Parts:
    """Two runs of slots, part by part, one after the other along time."""
    return tuple(mx.concatenate([a, b], axis=2) for a, b in zip(first, then))


def _moved(old: mx.array, start: int, stop: int, capacity: int) -> mx.array:
    """Slots start:stop of `old` [B, H, S, D] at the front of a buffer of `capacity` slots (the rest zero)."""
    B, H, _, D = old.shape
    buffer = mx.zeros((B, H, capacity, D), old.dtype)
    buffer[..., : stop - start, :] = old[..., start:stop, :]
    return buffer


def _stacked(rows: mx.array, row: mx.array, width: int, capacity: int) -> mx.array:
    """`rows` [B, H, u, D] and one more `row` [1, H, n, D], each ending at slot `width`, in a buffer
    of `capacity` slots (empty slots zero; a quantized part's zero words, scales and biases read as 0)."""
    B, H, u, D = rows.shape
    buffer = mx.zeros((B + 1, H, capacity, D), rows.dtype)
    buffer[:B, :, width - u : width, :] = rows
    buffer[B:, :, width - row.shape[2] : width, :] = row
    return buffer


def batch_caches_like(caches: list, quantized: bool = False) -> list:
    """Empty batch caches shaped as a model's fresh single-sequence caches (`model.make_cache()`):
    a `BatchKVCache` per storing layer, KV-shared layers pointing at their source's; `quantized`:
    storing as the caches' kv_bits (those made with kv_bits) say, for rows past their switch."""
    out = []
    for i, c in enumerate(caches):
        if isinstance(c, SharedKVCache):
            out.append(SharedKVCache(out[c.source_index], c.source_index))
            continue
        if quantized and c.bits is None:
            raise GenerationError("a quantized batch needs caches made with kv_bits")
        quant = dict(bits=c.bits, group_size=c.group_size) if quantized else {}
        if isinstance(c, RotatingKVCache):
            out.append(BatchKVCache(c.max_size, c.keep, **quant))
        elif isinstance(c, KVCache):
            out.append(BatchKVCache(None, **quant))
        else:
            raise GenerationError(f"layer {i}'s cache ({type(c).__name__}) cannot be batched")
    return out


def merge_rows(batch: list, caches: list) -> None:
    """Add the sequence held by one set of per-layer caches as a new row of `batch`."""
    for b, c in zip(batch, caches):
        if isinstance(b, BatchKVCache):
            b.merge(c)


def move_row(batch: list, b: int, to: list) -> None:
    """Append row b of `batch` to the batch caches `to` (float rows reaching their kv_bits switch
    go to the quantized batch); the caller then drops it from `batch` with `take_rows`."""
    for src, dst in zip(batch, to):
        if isinstance(src, BatchKVCache):
            src.move_row(b, dst)


def take_rows(batch: list, rows: list[int]) -> None:
    """Keep only rows `rows` of every layer's batch cache."""
    for b in batch:
        if isinstance(b, BatchKVCache):
            b.take(rows)


# ----- single-row caches for the prefix cache ---------------------------------------------


def with_slack(caches: list, slack: int) -> list:
    """Fresh single-row caches as `caches` (empty, as `model.make_cache()` gives them), each
    rotating one with `slack` extra slots (RotatingKVCache: it can then go back `slack` tokens)."""
    out = []
    for c in caches:
        if c.keys is not None or getattr(c, "offset", 0):
            raise GenerationError("with_slack takes fresh caches")
        if isinstance(c, SharedKVCache):
            out.append(SharedKVCache(out[c.source_index], c.source_index))
            continue
        if isinstance(c, RotatingKVCache):
            new = RotatingKVCache(c.visible + c.keep, c.left_padding, c.keep, c.bits, c.group_size,
                                  c.quantize_from, slack=slack)
            new.kv_shape = c.kv_shape
            c = new
        out.append(c)
    return out


def copy_caches(caches: list, compact: bool = False) -> list:
    """A copy of single-row caches: new cache objects over new arrays (MLX writes a shared buffer
    by copying it, so a copy and its source never see each other's writes).  `compact` copies
    the data too, without the spare capacity (what an entry holds: its real bytes only)."""
    out = []
    for c in caches:
        if isinstance(c, SharedKVCache):
            out.append(SharedKVCache(out[c.source_index], c.source_index))
            continue
        new = copy.copy(c)
        if c.keys is not None:
            held = c._stored if isinstance(c, RotatingKVCache) else c.offset
            new.keys, new.values = (tuple(mx.contiguous(p) if compact else p for p in time_slice(parts, None, held))
                                    for parts in (c.keys, c.values))
        out.append(new)
    return out


def row_caches(batch: list, b: int, fresh: list) -> list | None:
    """Row b of `batch` as the single-row caches `fresh` (empty, as `with_slack` makes them),
    filled with compact copies; None where a layer cannot give it back (attention sinks).

    A windowed layer gets the row's last slots in its ring, up to the ring's size; slots of a ring
    the row never held read as positions below the cache's `floor` (zero, masked)."""
    for layer, c in zip(batch, fresh):
        if isinstance(layer, SharedKVCache):
            continue
        if layer.keep or layer.keys is None or c.quantized:
            return None
        if layer.quantized and (c.bits, c.group_size) != (layer.bits, layer.group_size):
            return None
        # A quantized row (kv_bits, past its switch) stays quantized: its single caches hold mx.quantize's
        # parts as a cache alone holds them after its switch (the prefix cache checks what it can serve).
        c.quantized = layer.quantized
        pad, offset = layer.pad[b], layer.positions[b]
        keys, values = (tuple(mx.contiguous(p[b : b + 1, :, pad : layer.used, :]) for p in a)
                        for a in (layer.keys, layer.values))
        held = layer.used - pad
        if isinstance(c, KVCache):
            if held != offset:
                return None
            c.keys, c.values, c.offset = keys, values, offset
            continue
        held = min(held, c.max_size)
        keys, values = time_slice(keys, -held, None), time_slice(values, -held, None)
        slots = min(offset, c.max_size)  # what the ring holds at this offset
        missing = [(0, 0), (0, 0), (slots - held, 0), (0, 0)]  # (zero parts read as 0, as `_stacked`'s)
        c.offset, c.floor = offset, offset - held
        c.keys, c.values = (c._kept(tuple(mx.pad(p, missing) for p in parts)) for parts in (keys, values))
    return fresh
