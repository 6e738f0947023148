"""KV caches: what a model remembers between calls while it generates.

`KVCache` keeps every key and value (global-attention layers).  `RotatingKVCache`
keeps only the last `max_size` of them (sliding-window layers of Gemma 2 and 3):
memory stays bounded however long the text grows, and results stay exact,
because a windowed layer never looks further back than its window.

Two options bound memory further (`KVCacheOptions`, given to `make_layer_caches`):
- `max_kv_size` caps every layer.  Global layers become rotating caches that
  keep the first `SINK_TOKENS` tokens (attention sinks, as mlx-lm's
  `keep=4`) and the last `max_kv_size - SINK_TOKENS`; windowed layers keep
  min(window, max_kv_size) and no sinks.  Beyond the cap attention is an
  approximation of the model's; below it, results are exact.
- `kv_bits` stores keys and values quantized with `mx.quantize` (affine,
  `kv_group_size` values per scale/bias along head_dim), once the cache holds
  `quantized_kv_start` tokens (5000 by default, as mlx-lm).  The caches then
  return the quantized parts, and attention multiplies by them as they are
  (`models.layers.attention`, with mx.quantized_matmul as mlx-lm), under the
  same masks: left padding, Gemma 2's soft-cap and rotating layers included.
- Windowed layers under `max_kv_size` keep no sinks: they were trained never
  to see the first tokens once past their window.  In a left-padded batch the
  kept first positions are the batch's, so a padded row keeps fewer of its own
  (pads stay masked).

KV sharing (Gemma 4): a layer that attends with an earlier layer's keys and values gets a
`SharedKVCache`, which stores nothing and answers for its source (offset, padding, mask,
rollback); the model hands the source's keys and values along in its forward pass.  So a
shared layer's tokens are held once, and every walk over a model's caches (prefill's
evaluation, `trim_to`, `take`, `nbytes`, prompt-cache files) counts them once.

Each cache also builds the attention mask for the keys it is about to return,
since only it knows their order (a ring buffer is not in time order).  Batched
generation pads prompts on the left; `left_padding[b]` says how many leading
positions of row b are padding, and the masks hide them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import mlx.core as mx

from ..errors import GenerationError
from .layers import build_mask

# Tokens at the start a capped global layer never drops (mlx-lm's RotatingKVCache keep=4):
# models park attention mass on the first tokens, and losing them derails the text.
SINK_TOKENS = 4
KV_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize's affine mode accepts
KV_GROUP_SIZES = (32, 64, 128)
DEFAULT_QUANTIZED_KV_START = 5000  # mlx-lm's default: short texts stay in float

# Keys or values as stored: (array,) in float, or mx.quantize's (w_q, scales, biases).
# Every part keeps the layout [B, n_kv_heads, time, ...], so time slicing is per part.
Parts = tuple


def _key_valid(left_padding: mx.array | None, key_positions: mx.array) -> mx.array | None:
    if left_padding is None:
        return None
    return key_positions[None, :] >= left_padding[:, None]  # [B, S]


def time_slice(parts: Parts, start: int | None, stop: int | None) -> Parts:
    """Time steps start:stop of every part."""
    return tuple(p[..., start:stop, :] for p in parts)


def _concat(*pieces: Parts) -> Parts:
    return tuple(mx.concatenate(list(ps), axis=2) for ps in zip(*pieces))


class _Cache:
    """What both caches share: storage (float or quantized), batch rows, state."""

    step = 256  # buffers grow this many slots at a time, so decoding writes in place

    def __init__(self, left_padding, bits, group_size, quantize_from):
        self.keys: Parts | None = None
        self.values: Parts | None = None
        self.offset = 0  # tokens seen so far (= position of the next token)
        self.left_padding = left_padding
        self.bits, self.group_size, self.quantize_from = bits, group_size, quantize_from
        self.quantized = False
        self.kv_shape: tuple[int, int] | None = None  # (KV heads, head dim) when the model's layers differ

    def _encode(self, x: mx.array) -> Parts:
        if not self.quantized:
            return (x,)
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    @staticmethod
    def _fetched(parts: Parts):
        """What attention gets: the array, or the quantized parts (see `models.layers.attention`)."""
        return parts[0] if len(parts) == 1 else parts

    def _store_form(self, keys: mx.array, values: mx.array) -> tuple[Parts, Parts]:
        """New keys and values in storage form, switching storage to quantized when due.

        mlx-lm converts after the call that brought the cache to
        `quantized_kv_start` tokens; converting before the next one quantizes the same tokens.
        """
        if self.bits is not None and not self.quantized and self.offset >= self.quantize_from:
            self.quantized = True
            if self.keys is not None:
                self.keys, self.values = self._encode(self.keys[0]), self._encode(self.values[0])
        return self._encode(keys), self._encode(values)

    def take(self, rows: mx.array) -> None:
        """Keep, reorder or repeat batch rows: row i becomes old row `rows[i]` (beam search)."""
        # Every row shares the offset and slot layout, so gathering rows is all it takes.
        if self.keys is not None:
            self.keys = tuple(p[rows] for p in self.keys)
            self.values = tuple(p[rows] for p in self.values)
        if self.left_padding is not None:
            self.left_padding = self.left_padding[rows]

    def _grown(self, parts: Parts | None, like: Parts, capacity: int) -> Parts:
        """Buffers of `capacity` slots shaped like `like`, holding the first `offset` of `parts`."""
        grown = []
        for i, new in enumerate(like):
            buffer = mx.zeros((*new.shape[:2], capacity, new.shape[3]), new.dtype)
            if parts is not None and self.offset:
                buffer[..., : self.offset, :] = parts[i][..., : self.offset, :]
            grown.append(buffer)
        return tuple(grown)

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [*self.keys, *self.values]

    @property
    def nbytes(self) -> int:
        """Bytes allocated (buffers grow ahead of the tokens they hold)."""
        return sum(a.nbytes for a in self.state)


class KVCache(_Cache):
    """Keeps all keys and values, in time order, in buffers grown `step` at a time."""

    def __init__(self, left_padding: mx.array | None = None, bits: int | None = None,
                 group_size: int = 64, quantize_from: int = 0):
        super().__init__(left_padding, bits, group_size, quantize_from)

    def make_mask(self, T: int, window: int | None = None, prefix_length: mx.array | None = None):
        """Mask for the next `update_and_fetch` of T tokens (None or "causal" when trivial)."""
        S = self.offset + T
        if self.left_padding is None and prefix_length is None and (window is None or window >= S):
            return None if T == 1 else "causal"
        key_positions = mx.arange(S)
        return build_mask(
            mx.arange(self.offset, S),
            key_positions,
            window=window,
            key_valid=_key_valid(self.left_padding, key_positions),
            prefix_length=prefix_length,
        )

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple:  # (keys, values) to attend to
        new_k, new_v = self._store_form(keys, values)  # keys: [B, n_kv_heads, T, head_dim]
        end = self.offset + keys.shape[2]
        if self.keys is None or end > self.keys[0].shape[2]:
            capacity = -(-end // self.step) * self.step
            self.keys = self._grown(self.keys, new_k, capacity)
            self.values = self._grown(self.values, new_v, capacity)
        for stored, new in zip(self.keys + self.values, new_k + new_v):
            stored[..., self.offset : end, :] = new
        self.offset = end
        return self._fetched(time_slice(self.keys, None, end)), self._fetched(time_slice(self.values, None, end))

    def trim_to(self, length: int) -> bool:
        """Forget every token from position `length` on (always possible here)."""
        self.offset = min(self.offset, length)
        return True


class RotatingKVCache(_Cache):
    """Keeps the first `keep` keys and values and the last `max_size - keep` (a ring).

    With keep=0 this is a sliding-window layer's memory.  Invariant once full:
    slots [0, keep) hold positions 0..keep-1 for good, and position p >= keep
    sits in slot keep + (p - keep) % (max_size - keep), so a one-token decode
    step overwrites exactly the token that left the window.  A multi-token call
    (prefill) attends over the kept tokens plus the new ones, then keeps the
    first `keep` and the last `max_size - keep` of them.  With `slack` (the prefix cache's) the
    ring is `slack` slots longer than the window it shows, so it can go back after wrapping.
    """

    def __init__(self, max_size: int, left_padding: mx.array | None = None, keep: int = 0,
                 bits: int | None = None, group_size: int = 64, quantize_from: int = 0, slack: int = 0):
        if not 0 <= keep < max_size:
            raise GenerationError(f"a rotating cache of {max_size} tokens cannot keep {keep} first tokens")
        if not isinstance(slack, int) or slack < 0:
            raise GenerationError(f"a rotating cache's slack must be an integer >= 0, got {slack!r:.40}")
        super().__init__(left_padding, bits, group_size, quantize_from)
        # With `slack`, the ring holds `slack` more old tokens than attention sees (masked by
        # position), so `trim_to` can go back up to `slack` tokens after the ring has wrapped.
        self.slack = slack
        self.visible = max_size - keep  # recent tokens a query may see (the ring without its slack)
        self.max_size, self.keep = max_size + slack, keep  # max_size: slots stored
        self.ring = self.max_size - keep  # slots that rotate
        self.floor = 0  # below this position (past the sinks) the ring's slots hold nothing valid

    @property
    def _stored(self) -> int:
        """Slots holding tokens (the buffers may be longer until the ring is full)."""
        return min(self.offset, self.max_size)

    def _ring_step(self, T: int) -> bool:
        """Whether the next update of T tokens writes in place into a full ring."""
        return T == 1 and self.keys is not None and self.offset >= self.max_size

    def _filling_step(self, T: int) -> bool:
        """Whether the next update of T tokens appends in place to a ring not yet full."""
        return T == 1 and self.keys is not None and self.offset < self.max_size

    def _key_positions(self, T: int) -> mx.array:
        """Positions of the keys the next update of T tokens will return, in slot order."""
        if self._ring_step(T):
            slots = mx.arange(self.max_size)
            in_ring = self.offset - (self.offset - self.keep - (slots - self.keep)) % self.ring
            return mx.where(slots < self.keep, slots, in_ring)
        if self.offset <= self.max_size:
            return mx.arange(self.offset + T)  # nothing dropped yet
        return mx.concatenate([mx.arange(self.keep), mx.arange(self.offset - self.ring, self.offset + T)])

    def make_mask(self, T: int, window: int | None = None, prefix_length: mx.array | None = None):
        # Recent keys seen: the layer's window, narrowed to what the ring holds (max_kv_size).
        window = self.visible if window is None else min(window, self.visible)
        if self.left_padding is None and prefix_length is None:
            if T == 1 and (not self.slack or self.offset < window):
                return None  # everything kept is visible to the next token (the slack's old ones are not)
            if self.offset + T <= min(window, self.max_size):
                return "causal"  # nothing dropped, nothing out of the window: the fused kernel's fast path
        key_positions = self._key_positions(T)
        query_positions = mx.arange(self.offset, self.offset + T)
        key_valid = _key_valid(self.left_padding, key_positions)
        mask = build_mask(query_positions, key_positions, window=window, key_valid=key_valid,
                          prefix_length=prefix_length)
        if self.keep:  # the kept first tokens stay visible to every later query
            sinks = (key_positions[None, :] < self.keep) & (key_positions[None, :] <= query_positions[:, None])
            sinks = sinks[None, None]  # [1, 1, T, S]
            if key_valid is not None:
                sinks = sinks & key_valid[:, None, None, :]
            mask = mask | sinks
        return mask

    def _in_time_order(self, parts: Parts) -> Parts:
        parts = time_slice(parts, None, self._stored)  # drop the spare capacity
        if self._stored < self.max_size or self.offset == self.max_size:
            return parts  # not wrapped yet: slot order is time order
        oldest = self.keep + (self.offset - self.keep) % self.ring  # slot of the oldest ring token
        sinks, older, newer = (time_slice(parts, None, self.keep), time_slice(parts, oldest, None),
                               time_slice(parts, self.keep, oldest))
        return _concat(sinks, older, newer)

    def _kept(self, parts: Parts) -> Parts:
        """What to store of `parts` (time order, ending at `offset`), laid out as the invariant says."""
        if self.offset <= self.max_size:
            return parts
        recent = time_slice(parts, -self.ring, None)
        shift = (self.offset - self.ring - self.keep) % self.ring  # oldest kept position's ring slot
        recent = tuple(mx.roll(p, shift, axis=2) for p in recent)
        return _concat(time_slice(parts, None, self.keep), recent) if self.keep else recent

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple:  # (keys, values) to attend to
        new_k, new_v = self._store_form(keys, values)
        T = keys.shape[2]
        if self._ring_step(T):
            slot = self.keep + (self.offset - self.keep) % self.ring
            for stored, new in zip(self.keys + self.values, new_k + new_v):
                stored[..., slot : slot + 1, :] = new
            self.offset += 1
            return self._fetched(self.keys), self._fetched(self.values)
        if self._filling_step(T):
            # Before the ring is full, slot order is time order: append in place, growing the
            # buffers `step` slots at a time (up to max_size), as KVCache does; concatenating
            # instead would copy the whole window at every decoding step.
            if self.offset >= self.keys[0].shape[2]:
                capacity = min(self.max_size, self.offset + self.step)
                self.keys = self._grown(self.keys, new_k, capacity)
                self.values = self._grown(self.values, new_v, capacity)
            for stored, new in zip(self.keys + self.values, new_k + new_v):
                stored[..., self.offset : self.offset + 1, :] = new
            self.offset += 1
            return (self._fetched(time_slice(self.keys, None, self.offset)),
                    self._fetched(time_slice(self.values, None, self.offset)))

        if self.keys is not None:
            new_k = _concat(self._in_time_order(self.keys), new_k)
            new_v = _concat(self._in_time_order(self.values), new_v)
        self.offset += T
        self.keys, self.values = self._kept(new_k), self._kept(new_v)
        return self._fetched(new_k), self._fetched(new_v)

    @property
    def reach(self) -> int:
        """The shortest length `trim_to` can go back to: a query there must see only the sinks and
        tokens the ring holds (not dropped, not below `floor`), the last `visible` before it."""
        held_from = max(self.floor, self.offset - self.ring, self.keep)  # oldest ring position held
        return 0 if held_from <= self.keep else min(self.offset, held_from + self.visible)

    def can_trim_to(self, length: int) -> bool:
        """Whether `trim_to(length)` can go back there (see `reach`)."""
        return length >= self.reach or length <= self.keep

    def trim_to(self, length: int) -> bool:
        """Forget every token from position `length` on; False (nothing changed) when that
        needs tokens the ring has already dropped: then the caller must recompute.

        A wrapped ring goes back in place: position p sits in slot keep + (p - keep) % ring,
        so the slots of the forgotten positions read as positions a ring earlier, which lie
        below `floor`, out of every later query's window (masked), and are overwritten as the
        text goes on.  Below `max_size` the slots before `length` are already in time order."""
        if length >= self.offset:
            return True
        if not self.can_trim_to(length):
            return False
        if length <= self.keep:
            self.floor = 0  # nothing past the sinks is held any more: the ring starts over from `length`
        elif self.offset > self.max_size:
            self.floor = max(self.floor, self.offset - self.ring)
        if length <= self.max_size and self.keys is not None:
            self.keys, self.values = time_slice(self.keys, None, length), time_slice(self.values, None, length)
        self.offset = length
        return True


class SharedKVCache:
    """A KV-shared layer's entry: no storage of its own; `source` (the cache of layer
    `source_index`) holds the keys and values it attends with.

    Its mask is the source's, made before the source's update (the model builds each mask
    once per window, from a storing layer first); `trim_to` and `take` leave the source to
    its own entry, so walking every entry acts on each store once.
    """

    keys = values = None  # nothing stored here
    quantized = False
    kv_shape = None

    def __init__(self, source: KVCache | RotatingKVCache, source_index: int):
        self.source, self.source_index = source, source_index

    @property
    def offset(self) -> int:
        return self.source.offset

    @property
    def left_padding(self) -> mx.array | None:
        return self.source.left_padding

    def make_mask(self, T: int, window: int | None = None, prefix_length: mx.array | None = None):
        return self.source.make_mask(T, window=window, prefix_length=prefix_length)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        raise GenerationError(f"a KV-shared layer stores nothing: it reads layer {self.source_index}'s keys and "
                              "values, handed along in the forward pass")

    def trim_to(self, length: int) -> bool:
        """Whether the source can go back to `length` (trimming it again changes nothing)."""
        return self.source.trim_to(length)

    def take(self, rows: mx.array) -> None:
        """Nothing to gather: the source's own entry takes its rows."""

    @property
    def state(self) -> list[mx.array]:
        return []

    @property
    def nbytes(self) -> int:
        return 0


@dataclass(frozen=True)
class KVCacheOptions:
    """How a model's KV caches are made; checked once, when made.  The default is exact and unbounded."""

    max_kv_size: int | None = None  # cap every layer at this many tokens (None: no cap)
    kv_bits: int | None = None  # store keys and values in this many bits (None: the model's dtype)
    kv_group_size: int = 64  # values per scale and bias along head_dim, when quantized
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START  # quantize once the cache holds this many tokens

    def __post_init__(self):
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if self.max_kv_size is not None and (not is_int(self.max_kv_size) or self.max_kv_size <= SINK_TOKENS):
            raise GenerationError(f"max_kv_size must be an integer > {SINK_TOKENS} (the first {SINK_TOKENS} "
                                  f"tokens are always kept), got {self.max_kv_size!r}")
        if self.kv_bits is not None and self.kv_bits not in KV_BITS:
            raise GenerationError(f"kv_bits must be one of {KV_BITS} (or None: no quantization), got {self.kv_bits!r}")
        if self.kv_group_size not in KV_GROUP_SIZES:
            raise GenerationError(f"kv_group_size must be one of {KV_GROUP_SIZES}, got {self.kv_group_size!r}")
        if not is_int(self.quantized_kv_start) or self.quantized_kv_start < 0:
            raise GenerationError(f"quantized_kv_start must be an integer >= 0, got {self.quantized_kv_start!r}")

    @classmethod
    def of(cls, options: KVCacheOptions | None = None, **kwargs) -> KVCacheOptions:
        """`options`, or options made from keyword arguments (max_kv_size=..., ...); not both."""
        if options is not None and kwargs:
            raise GenerationError("give the KV-cache options as one KVCacheOptions or as keywords, not both")
        if options is not None:
            if not isinstance(options, cls):
                raise GenerationError(f"kv options must be a KVCacheOptions, got {type(options).__name__}")
            return options
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            raise GenerationError(f"unknown KV-cache options {', '.join(unknown)}; known: "
                                  f"{', '.join(f.name for f in fields(cls))}")
        return cls(**kwargs)

    def check_head_dim(self, head_dim: int | None) -> KVCacheOptions:
        """Self, if quantized keys can be grouped along a model's head_dim."""
        if self.kv_bits is not None and head_dim is not None and head_dim % self.kv_group_size:
            raise GenerationError(f"kv_group_size {self.kv_group_size} does not divide the model's head_dim "
                                  f"{head_dim}: keys are quantized in groups along head_dim")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def make_layer_caches(windows: list[int | None], left_padding: mx.array | None = None,
                      options: KVCacheOptions | None = None, head_dim: int | None = None,
                      shared_from: list[int | None] | None = None,
                      kv_shapes: list[tuple[int, int]] | None = None,
                      ) -> list[KVCache | RotatingKVCache | SharedKVCache]:
    """One cache per layer: rotating where the layer has a window (or under `max_kv_size`), growing elsewhere.

    `head_dim`, when given, is checked against the options' `kv_group_size`.  `shared_from[i]`,
    when not None, makes layer i a `SharedKVCache` of that earlier layer's cache (Gemma 4);
    `kv_shapes[i]` records layer i's (KV heads, head dim) where they differ between layers.
    """
    o = (options or KVCacheOptions()).check_head_dim(head_dim)
    for _, dim in kv_shapes or ():  # quantized keys are grouped along every layer's head dim
        o.check_head_dim(dim)
    quant = dict(bits=o.kv_bits, group_size=o.kv_group_size, quantize_from=o.quantized_kv_start)
    caches = []
    for i, w in enumerate(windows):
        source = None if shared_from is None else shared_from[i]
        if source is not None:
            if not 0 <= source < i or isinstance(caches[source], SharedKVCache):
                raise GenerationError(f"layer {i} cannot share the KV cache of layer {source}")
            caches.append(SharedKVCache(caches[source], source))
            continue
        if w is None and o.max_kv_size is None:
            caches.append(KVCache(left_padding, **quant))
        elif w is None:
            caches.append(RotatingKVCache(o.max_kv_size, left_padding, keep=SINK_TOKENS, **quant))
        else:
            caches.append(RotatingKVCache(min(w, o.max_kv_size or w), left_padding, **quant))
        if kv_shapes is not None:
            caches[-1].kv_shape = tuple(kv_shapes[i])
    return caches


def cache_layout(caches: list) -> dict:
    """What a list of caches says beyond the layers' windows: {} when every layer stores its
    own keys and values of the model's one shape; else `kv_sources` (per layer: None, or the
    layer whose cache it reads) and `kv_shapes` (per layer: KV heads, head dim), as
    `make_layer_caches` takes them back."""
    sources = [c.source_index if isinstance(c, SharedKVCache) else None for c in caches]
    shapes = [(c.source if isinstance(c, SharedKVCache) else c).kv_shape for c in caches]
    layout = {}
    if any(s is not None for s in sources):
        layout["kv_sources"] = sources
    if any(s is not None for s in shapes):
        layout["kv_shapes"] = [list(s) for s in shapes]
    return layout
