"""KV caches: what a model remembers between calls while it generates.

`KVCache` keeps every key and value (global-attention layers).  `RotatingKVCache`
keeps only the last `max_size` of them (sliding-window layers of Gemma 2 and 3):
memory stays bounded however long the text grows, and results stay exact,
because a windowed layer never looks further back than its window.

Each cache also builds the attention mask for the keys it is about to return,
since only it knows their order (a ring buffer is not in time order).  Batched
generation pads prompts on the left; `left_padding[b]` says how many leading
positions of row b are padding, and the masks hide them.
"""

from __future__ import annotations

import mlx.core as mx

from .models.layers import build_mask


def _key_valid(left_padding: mx.array | None, key_positions: mx.array) -> mx.array | None:
    if left_padding is None:
        return None
    return key_positions[None, :] >= left_padding[:, None]  # [B, S]


def _take_rows(cache, rows: mx.array) -> None:
    # Every row shares the offset and slot layout, so gathering rows is all it takes.
    if cache.keys is not None:
        cache.keys, cache.values = cache.keys[rows], cache.values[rows]
    if cache.left_padding is not None:
        cache.left_padding = cache.left_padding[rows]


class KVCache:
    """Keeps all keys and values, in time order, in buffers grown `step` at a time."""

    step = 256

    def __init__(self, left_padding: mx.array | None = None):
        self.keys: mx.array | None = None  # [B, n_kv_heads, capacity, head_dim]
        self.values: mx.array | None = None
        self.offset = 0  # tokens stored so far (= position of the next token)
        self.left_padding = left_padding

    def make_mask(self, T: int, window: int | None = None, prefix_length: mx.array | None = None):
        """Mask for the next `update_and_fetch` of T tokens (None or "causal" when trivial)."""
        S = self.offset + T
        if self.left_padding is None and prefix_length is None:
            if T == 1:
                return None
            if window is None or window >= S:
                return "causal"
        key_positions = mx.arange(S)
        return build_mask(
            mx.arange(self.offset, S),
            key_positions,
            window=window,
            key_valid=_key_valid(self.left_padding, key_positions),
            prefix_length=prefix_length,
        )

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, n_kv, T, _ = keys.shape
        end = self.offset + T
        if self.keys is None or end > self.keys.shape[2]:
            capacity = -(-end // self.step) * self.step
            grown_k = mx.zeros((B, n_kv, capacity, keys.shape[3]), keys.dtype)
            grown_v = mx.zeros((B, n_kv, capacity, values.shape[3]), values.dtype)
            if self.keys is not None:
                grown_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
                grown_v[..., : self.offset, :] = self.values[..., : self.offset, :]
            self.keys, self.values = grown_k, grown_v
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def take(self, rows: mx.array) -> None:
        """Keep, reorder or repeat batch rows: row i becomes old row `rows[i]` (beam search)."""
        _take_rows(self, rows)

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


class RotatingKVCache:
    """Keeps the last `max_size` keys and values (a sliding-window layer's memory).

    Invariant once full: the token at position p sits in slot p % max_size, so a
    one-token decode step overwrites exactly the token that left the window.  A
    multi-token call (prefill) attends over the kept tokens plus the new ones,
    then keeps the last `max_size` of them.
    """

    def __init__(self, max_size: int, left_padding: mx.array | None = None):
        self.max_size = max_size
        self.keys: mx.array | None = None  # [B, n_kv_heads, <= max_size, head_dim]
        self.values: mx.array | None = None
        self.offset = 0
        self.left_padding = left_padding

    @property
    def _stored(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _ring_step(self, T: int) -> bool:
        """Whether the next update of T tokens writes in place into a full ring."""
        return T == 1 and self._stored == self.max_size

    def _key_positions(self, T: int) -> mx.array:
        """Positions of the keys the next update of T tokens will return, in slot order."""
        if self._ring_step(T):
            slots = mx.arange(self.max_size)
            return self.offset - (self.offset - slots) % self.max_size
        kept = min(self.offset, self.max_size) if self._stored else 0
        return mx.arange(self.offset - kept, self.offset + T)

    def make_mask(self, T: int, window: int | None = None, prefix_length: mx.array | None = None):
        window = self.max_size if window is None else window
        if T == 1 and self.left_padding is None and prefix_length is None:
            return None  # everything kept is inside the window
        key_positions = self._key_positions(T)
        return build_mask(
            mx.arange(self.offset, self.offset + T),
            key_positions,
            window=window,
            key_valid=_key_valid(self.left_padding, key_positions),
            prefix_length=prefix_length,
        )

    def _in_time_order(self) -> tuple[mx.array, mx.array]:
        if self._stored < self.max_size:
            return self.keys, self.values  # not wrapped yet: slot order is time order
        start = self.offset % self.max_size  # slot of the oldest token
        return (
            mx.concatenate([self.keys[..., start:, :], self.keys[..., :start, :]], axis=2),
            mx.concatenate([self.values[..., start:, :], self.values[..., :start, :]], axis=2),
        )

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        T = keys.shape[2]
        if self._ring_step(T):
            slot = self.offset % self.max_size
            self.keys[..., slot : slot + 1, :] = keys
            self.values[..., slot : slot + 1, :] = values
            self.offset += 1
            return self.keys, self.values

        if self.keys is not None:
            old_k, old_v = self._in_time_order()
            keys = mx.concatenate([old_k, keys], axis=2)
            values = mx.concatenate([old_v, values], axis=2)
        self.offset += T
        kept_k, kept_v = keys[..., -self.max_size :, :], values[..., -self.max_size :, :]
        if kept_k.shape[2] == self.max_size:
            # Place position p at slot p % max_size (see the class invariant).
            shift = (self.offset - self.max_size) % self.max_size
            kept_k = mx.roll(kept_k, shift, axis=2)
            kept_v = mx.roll(kept_v, shift, axis=2)
        self.keys, self.values = kept_k, kept_v
        return keys, values

    def take(self, rows: mx.array) -> None:
        """Keep, reorder or repeat batch rows: row i becomes old row `rows[i]` (beam search)."""
        _take_rows(self, rows)

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


def make_layer_caches(
    windows: list[int | None], left_padding: mx.array | None = None
) -> list[KVCache | RotatingKVCache]:
    """One cache per layer: rotating where the layer has a window, growing elsewhere."""
    return [
        KVCache(left_padding) if w is None else RotatingKVCache(w, left_padding) for w in windows
    ]
