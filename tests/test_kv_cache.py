"""KV caches: max_kv_size, quantized storage (growing and rotating), trimming, rows, settings.

References: mlx-lm's QuantizedKVCache and RotatingKVCache(keep=4) on Gemma 1
(the same weights, the same activation), transformers' logits in the fixtures
for the exact cases, and -- for what mlx-lm cannot do (quantized rotating
layers) -- a growing quantized cache holding every token under the layer's
window mask, which quantizes each token the same way and must agree exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from mlx_gemma.models.kv_cache import KVCache, KVCacheOptions, RotatingKVCache, make_layer_caches
from mlx_gemma.errors import GenerationError
from mlx_gemma.loading import build_model, load_model

from conftest import FIXTURES

_fixtures: dict = {}


def fixture(name):
    """(model, transformers reference) of tests/fixtures/tiny_<name>."""
    if name not in _fixtures:
        folder = FIXTURES / f"tiny_{name}"
        _fixtures[name] = (load_model(folder), dict(np.load(folder / "reference.npz")))
    return _fixtures[name]


def twin(name, head_dim=32, **config):
    """A fixture's architecture with head_dim 32 (quantization groups are >= 32 wide), seeded random weights."""
    cfg = json.loads((FIXTURES / f"tiny_{name}" / "config.json").read_text())
    cfg.update(head_dim=head_dim, **config)
    model = build_model(cfg)
    mx.random.seed(0)
    model.update(tree_map(lambda p: 0.05 * mx.random.normal(p.shape), model.parameters()))
    mx.eval(model.parameters())
    return model, cfg


def feed(model, ids, cache, chunks):
    """Logits [B, T, V] from feeding `ids` through `cache` in chunks of these sizes (then one at a time)."""
    out, start = [], 0
    for size in chunks + [1] * (ids.shape[1] - sum(chunks)):
        out.append(model(ids[:, start:start + size], cache=cache))
        start += size
    return mx.concatenate(out, axis=1)


def ids_of(T, B=1, seed=1):
    mx.random.seed(seed)
    return mx.random.randint(3, 500, (B, T))


def assert_close(a, b, tol=1e-5):
    a, b = np.array(a), np.array(b)
    scale = max(1.0, np.abs(b).max())
    assert np.abs(a - b).max() <= tol * scale, np.abs(a - b).max()


Q = dict(kv_group_size=32, quantized_kv_start=0)


# ----- against mlx-lm ------------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_matches_mlx_lm(bits):
    lm_gemma = pytest.importorskip("mlx_lm.models.gemma")
    from mlx_lm.models.cache import QuantizedKVCache

    model, cfg = twin("gemma", hidden_activation="gelu")  # mlx-lm's Gemma 1 uses the exact GELU
    theirs = lm_gemma.Model(lm_gemma.ModelArgs.from_dict(cfg))
    theirs.load_weights(list(tree_flatten(model.parameters())))
    ids = ids_of(40)
    ours = feed(model, ids, model.make_cache(kv_bits=bits, **Q), [10, 7])
    ref = feed(theirs, ids, [QuantizedKVCache(group_size=32, bits=bits) for _ in theirs.layers], [10, 7])
    assert_close(ours, ref)
    assert np.abs(np.array(ours - model(ids))).max() > 1e-3  # quantization really happened


@pytest.mark.oracle
def test_max_kv_size_matches_mlx_lm_rotating_cache():
    lm_gemma = pytest.importorskip("mlx_lm.models.gemma")
    from mlx_lm.models.cache import RotatingKVCache as TheirRotating

    model, cfg = twin("gemma", hidden_activation="gelu")
    theirs = lm_gemma.Model(lm_gemma.ModelArgs.from_dict(cfg))
    theirs.load_weights(list(tree_flatten(model.parameters())))
    ids = ids_of(30)
    ours = feed(model, ids, model.make_cache(max_kv_size=9), [])
    # mlx-lm's make_prompt_cache(model, max_kv_size) for a model without make_cache: keep=4.
    ref = feed(theirs, ids, [TheirRotating(max_size=9, keep=4) for _ in theirs.layers], [])
    assert_close(ours, ref)
    assert np.abs(np.array(ours - model(ids))).max() > 1e-3  # beyond the cap it is approximate


# ----- max_kv_size ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3"])
def test_cap_above_the_length_is_exact(name):
    model, ref = fixture(name)
    ids = mx.array(ref["input_ids"])
    logits = feed(model, ids, model.make_cache(max_kv_size=ids.shape[1] + 1), [5, 3])
    assert_close(logits, ref["logits"], 1e-4)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_capped_prefill_in_chunks_equals_token_by_token(name):
    """The prefill mask says what the ring holds: sinks + recent for global layers, a narrower window for local ones."""
    model, ref = fixture(name)
    ids = ids_of(30)
    cache = model.make_cache(max_kv_size=5)  # below both fixtures' windows (6 and 5)
    assert [c.max_size for c in cache] == [5] * len(cache)
    assert [c.keep for c in cache] == [4 if w is None else 0 for w in model.windows]
    stepped = feed(model, ids, cache, [])
    for chunks in ([30], [13, 3, 9], [4, 4, 4]):
        assert_close(feed(model, ids, model.make_cache(max_kv_size=5), chunks), stepped)


# ----- quantized ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_rotating_equals_quantized_growing_across_the_wrap(name, bits):
    """A windowed layer's quantized ring must hold exactly what a full quantized cache would show it."""
    model, _ = twin(name)
    ids = ids_of(32)
    full = [KVCache(bits=bits, group_size=32) for _ in model.layers]  # window masks come from the layers
    reference = feed(model, ids, full, [9, 4])
    for chunks in ([9, 4], [32], [2, 2, 2]):
        cache = model.make_cache(kv_bits=bits, **Q)
        assert any(isinstance(c, RotatingKVCache) for c in cache)
        # Exact but for this: attention summed in another key order differs by ~1e-7, which can
        # round a key to the neighbouring quantization level (seen: one level in one layer, moving
        # logits by 5e-4 of their scale; quantization itself moves them by ~1e-2).
        assert_close(feed(model, ids, cache, chunks), reference, 2e-3)
        assert all(c.quantized and len(c.keys) == 3 for c in cache)


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3"])
def test_quantized_logits_stay_close_to_float(name):
    """Measured on these random-weight twins (mean |error| / mean |logit|): 0.14% / 0.8% / 1.7% at
    8 bits (Gemma / 2 / 3; greedy choices all equal), 3.4% / 11% / 28% at 4 bits."""
    model, _ = twin(name)
    ids = ids_of(40)
    exact = np.array(model(ids))
    err, agree = {}, {}
    for bits in (8, 4):
        got = np.array(feed(model, ids, model.make_cache(kv_bits=bits, **Q), [7]))
        err[bits] = np.abs(got - exact).mean() / np.abs(exact).mean()
        agree[bits] = (got.argmax(-1) == exact.argmax(-1)).mean()
    assert err[8] < 0.025 and agree[8] == 1.0
    assert err[8] < err[4] < 0.35


def test_quantized_left_padded_batch_rows_equal_each_alone():
    model, _ = twin("gemma2")
    long, short = ids_of(20, seed=2)[0], ids_of(11, seed=3)[0]
    pad = 9
    batch = mx.stack([long, mx.concatenate([mx.zeros((pad,), long.dtype), short])])
    cache = model.make_cache(left_padding=mx.array([0, pad]), kv_bits=8, **Q)
    logits = feed(model, batch, cache, [12])
    assert_close(logits[0], feed(model, long[None], model.make_cache(kv_bits=8, **Q), [12])[0], 1e-4)
    # Alone, but at the same positions (RoPE turns keys differently elsewhere, and they quantize differently).
    alone = feed(model, batch[1:], model.make_cache(left_padding=mx.array([pad]), kv_bits=8, **Q), [12])[0]
    assert_close(logits[1, pad:], alone[pad:], 1e-4)


def test_quantization_starts_at_quantized_kv_start():
    model, _ = twin("gemma3")
    ids = ids_of(20)
    cache = model.make_cache(kv_bits=4, kv_group_size=32, quantized_kv_start=8)
    first = model(ids[:, :8], cache=cache)
    assert not any(c.quantized for c in cache)
    assert_close(first, model(ids[:, :8]))  # float until then
    model(ids[:, 8:9], cache=cache)
    assert all(c.quantized for c in cache)
    # The same tokens end up quantized whatever the chunking.
    cache2 = model.make_cache(kv_bits=4, kv_group_size=32, quantized_kv_start=8)
    assert_close(feed(model, ids, cache2, [5, 3, 7]), feed(model, ids, model.make_cache(
        kv_bits=4, kv_group_size=32, quantized_kv_start=8), [8]))


def test_quantized_cache_is_smaller():
    model, _ = twin("gemma")
    ids = ids_of(64)
    sizes = {}
    for bits in (None, 8, 4):
        cache = model.make_cache(kv_bits=bits, **Q)
        model(ids, cache=cache)
        sizes[bits] = sum(c.nbytes for c in cache)
    # float32 head_dim 32: 128 bytes a vector; 8 bits: 32 + 2 x 4 (scale, bias); 4 bits: 16 + 8.
    assert sizes[8] / sizes[None] == pytest.approx(40 / 128)
    assert sizes[4] / sizes[None] == pytest.approx(24 / 128)


# ----- trimming and rows ---------------------------------------------------------------


@pytest.mark.parametrize("bits", [None, 8])
def test_trim_then_continue_equals_a_fresh_run(bits):
    model, _ = twin("gemma3")
    ids, other = ids_of(12), ids_of(12, seed=7)
    cache = model.make_cache(kv_bits=bits, **Q)
    model(ids[:, :4], cache=cache)  # 4 tokens: within every window (5): trimmable
    model(ids[:, 4:5], cache=cache)
    assert all(c.trim_to(3) for c in cache) and cache[0].offset == 3
    tail = mx.concatenate([ids[:, :3], other[:, 3:8]], axis=1)
    fresh = model.make_cache(kv_bits=bits, **Q)
    assert_close(feed(model, tail[:, 3:], cache, [2]), feed(model, tail, fresh, [3, 2])[:, 3:])


def test_wrapped_ring_refuses_to_trim():
    model, _ = fixture("gemma3")
    cache = model.make_cache()
    model(ids_of(9), cache=cache)
    ring = next(c for c in cache if isinstance(c, RotatingKVCache))
    keys = ring.keys
    assert not ring.trim_to(8) and ring.offset == 9 and ring.keys is keys
    assert ring.trim_to(9)  # nothing to drop


@pytest.mark.parametrize("bits", [None, 8])
def test_take_gathers_rows_of_every_part(bits):
    """Rows gathered after a wrapped prefill continue as if those rows had been fed."""
    model, _ = twin("gemma2")
    ids, nxt, rows = ids_of(10, B=2), mx.array([[5], [6], [7]]), mx.array([1, 1, 0])
    cache = model.make_cache(kv_bits=bits, **Q)
    model(ids, cache=cache)
    for c in cache:
        c.take(rows)
    fresh = model.make_cache(kv_bits=bits, **Q)
    model(ids[rows], cache=fresh)
    assert_close(model(nxt, cache=cache), model(nxt, cache=fresh))


# ----- settings -----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_bits=7), "kv_bits"),
    (dict(kv_bits=True), "kv_bits"),
    (dict(kv_group_size=16), "kv_group_size"),
    (dict(kv_bits=4, kv_group_size=128), "does not divide the model's head_dim 64"),
    (dict(max_kv_size=4), "max_kv_size"),
    (dict(max_kv_size=10.5), "max_kv_size"),
    (dict(quantized_kv_start=-1), "quantized_kv_start"),
])
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(GenerationError, match=message):
        KVCacheOptions(**kwargs).check_head_dim(64)


def test_layer_caches_follow_windows_and_the_cap():
    caches = make_layer_caches([6, None, 6, None], options=KVCacheOptions(max_kv_size=8))
    assert [(type(c).__name__, c.max_size, c.keep) for c in caches] == [
        ("RotatingKVCache", 6, 0), ("RotatingKVCache", 8, 4)] * 2
    caches = make_layer_caches([6, None], options=KVCacheOptions(max_kv_size=5))
    assert [(c.max_size, c.keep) for c in caches] == [(5, 0), (5, 4)]
    assert [type(c) for c in make_layer_caches([6, None])] == [RotatingKVCache, KVCache]


def test_options_come_as_one_object_or_as_keywords_never_both():
    model, _ = fixture("gemma3")
    options = KVCacheOptions(max_kv_size=9)
    assert [c.max_size for c in model.make_cache(options=options)] == [c.max_size for c in model.make_cache(max_kv_size=9)]
    with pytest.raises(GenerationError, match="not both"):
        model.make_cache(options=options, kv_bits=8)
    with pytest.raises(GenerationError, match="unknown KV-cache options kv_bitz"):
        model.make_cache(kv_bitz=8)
    with pytest.raises(GenerationError, match="must be a KVCacheOptions"):
        model.make_cache(options={"max_kv_size": 9})


def test_make_cache_checks_the_group_size_against_head_dim():
    model, _ = fixture("gemma3")  # head_dim 16: no quantization group fits
    with pytest.raises(GenerationError, match="kv_group_size 64 does not divide the model's head_dim 16"):
        model.make_cache(kv_bits=8)
