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

Quantized storage (kv_bits) and capped global layers (max_kv_size with attention sinks) are
not batched here: `batch_caches_like` refuses them with a GenerationError.
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import GenerationError
from .kv_cache import KVCache, RotatingKVCache, SharedKVCache
from .layers import build_mask


class BatchKVCache:
    """One layer's keys and values for rows of different lengths; decoding and merging only."""

    step = 256  # slots a buffer grows by, so decoding writes in place

    def __init__(self, max_size: int | None = None):
        self.max_size = max_size  # None: keep every token (global layer); else the window kept
        self.keys: mx.array | None = None  # [B, kv_heads, capacity, head_dim]
        self.values: mx.array | None = None
        self.used = 0  # slots holding tokens (or padding), the same for every row
        self.pad: list[int] = []  # per row: leading empty slots
        self.positions: list[int] = []  # per row: position of its next token
        self._offset: mx.array | None = None  # `positions` as an array, made once per change

    # ----- what the model reads ---------------------------------------------------------

    @property
    def rows(self) -> int:
        return len(self.positions)

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
        """Mask for the next `update_and_fetch` of T tokens over the `used + T` slots it returns."""
        if prefix_length is not None:
            raise GenerationError("a prefix-LM prompt is prefilled alone, not in a running batch")
        self._reserve(T)  # before the mask: making room may drop old slots
        S = self.used + T
        if not any(self.pad) and (window is None or window >= S):
            return None if T == 1 else "causal"
        slots = mx.arange(S)
        valid = slots[None, :] >= self.left_padding[:, None]  # [B, S]
        return build_mask(mx.arange(self.used, S), slots, window=window, key_valid=valid)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        T = keys.shape[2]  # keys: [B, kv_heads, T, head_dim]
        self._reserve(T)  # done already if this cache made the layer's mask
        self.keys[..., self.used : self.used + T, :] = keys
        self.values[..., self.used : self.used + T, :] = values
        self.used += T
        self.positions = [p + T for p in self.positions]
        self._offset = None
        return self.keys[..., : self.used, :], self.values[..., : self.used, :]

    # ----- rows ---------------------------------------------------------------------------

    def _reserve(self, T: int) -> None:
        """Room for T more slots: new buffers, without the slots no row needs, when full.

        Layers with the same window evolve alike, so one that only updates (its mask made by
        another layer's cache) drops the same slots as the one that made the mask."""
        if self.keys is not None and self.used + T <= self.keys.shape[2]:
            return
        drop = min(self.pad, default=0)  # slots every row leaves empty
        if self.max_size is not None:  # a window never looks further back than max_size tokens
            drop = max(drop, self.used - self.max_size)
        kept = self.used - drop
        capacity = -(-(kept + T) // self.step) * self.step
        if self.max_size is not None:
            capacity = min(capacity, self.max_size + max(T, self.step))
        grown = []
        for old in (self.keys, self.values):
            B, H, _, D = old.shape
            buffer = mx.zeros((B, H, capacity, D), old.dtype)
            buffer[..., :kept, :] = old[..., drop : self.used, :]
            grown.append(buffer)
        self.keys, self.values = grown
        self.used = kept
        self.pad = [max(0, p - drop) for p in self.pad]

    def take(self, rows: list[int]) -> None:
        """Keep rows `rows` (in that order) and trim the slots all of them leave empty."""
        self.positions = [self.positions[r] for r in rows]
        self.pad = [self.pad[r] for r in rows]
        self._offset = None
        if not rows:
            self.keys = self.values = None
            self.used = 0
            return
        drop = min(self.pad)
        if rows == list(range(self.keys.shape[0])) and not drop:
            return  # every row stays, nothing to trim: no copy
        index = mx.array(rows, dtype=mx.int32)
        self.keys = self.keys[index][..., drop:, :]
        self.values = self.values[index][..., drop:, :]
        self.used -= drop
        self.pad = [p - drop for p in self.pad]

    def merge(self, single: KVCache | RotatingKVCache) -> None:
        """Add the one sequence `single` holds (prefilled alone, no padding) as the last row."""
        if single.keys is None or single.quantized or single.keys[0].shape[0] != 1:
            raise GenerationError("only a float cache holding one prefilled sequence can join a batch")
        if isinstance(single, RotatingKVCache):
            if single.keep:
                raise GenerationError("a cache that keeps attention sinks (max_kv_size) cannot join a batch")
            keys, values = single._in_time_order(single.keys)[0], single._in_time_order(single.values)[0]
        else:
            keys, values = single.keys[0][..., : single.offset, :], single.values[0][..., : single.offset, :]
        if self.max_size is not None and keys.shape[2] > self.max_size:
            keys, values = keys[..., -self.max_size :, :], values[..., -self.max_size :, :]
        n = keys.shape[2]
        if self.keys is None:
            self.keys, self.values, self.used, self.pad = keys, values, n, [0]
        else:
            width = max(self.used, n)
            self.keys = mx.concatenate([_left_pad(self.keys[..., : self.used, :], width),
                                        _left_pad(keys, width)], axis=0)
            self.values = mx.concatenate([_left_pad(self.values[..., : self.used, :], width),
                                          _left_pad(values, width)], axis=0)
            self.pad = [p + width - self.used for p in self.pad] + [width - n]
            self.used = width
        self.positions = self.positions + [single.offset]
        self._offset = None

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


def _left_pad(x: mx.array, width: int) -> mx.array:
    """x [B, H, n, D] with width - n empty slots in front."""
    missing = width - x.shape[2]
    return x if missing == 0 else mx.pad(x, [(0, 0), (0, 0), (missing, 0), (0, 0)])


def batch_caches_like(caches: list) -> list:
    """Empty batch caches shaped as a model's fresh single-sequence caches (`model.make_cache()`):
    a `BatchKVCache` per storing layer, KV-shared layers pointing at their source's."""
    out = []
    for i, c in enumerate(caches):
        if isinstance(c, SharedKVCache):
            out.append(SharedKVCache(out[c.source_index], c.source_index))
        elif c.bits is not None:
            raise GenerationError("a quantized KV cache (kv_bits) is not batched yet: serve without kv_bits")
        elif isinstance(c, RotatingKVCache) and c.keep:
            raise GenerationError("max_kv_size caps global layers with attention sinks, which are not "
                                  "batched yet: serve without max_kv_size")
        elif isinstance(c, RotatingKVCache):
            out.append(BatchKVCache(c.max_size))
        elif isinstance(c, KVCache):
            out.append(BatchKVCache(None))
        else:
            raise GenerationError(f"layer {i}'s cache ({type(c).__name__}) cannot be batched")
    return out


def merge_rows(batch: list, caches: list) -> None:
    """Add the sequence held by one set of per-layer caches as a new row of `batch`."""
    for b, c in zip(batch, caches):
        if isinstance(b, BatchKVCache):
            b.merge(c)


def take_rows(batch: list, rows: list[int]) -> None:
    """Keep only rows `rows` of every layer's batch cache."""
    for b in batch:
        if isinstance(b, BatchKVCache):
            b.take(rows)
