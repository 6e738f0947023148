"""The prefix cache across requests (mlx_gemma/prefix_cache.py in the batching scheduler).

The reference is each prompt generated alone from scratch (`generate_step`, itself checked
against transformers in test_generate.py / test_gemma4.py): a prompt that reuses an earlier
one's caches gives the same greedy tokens and log-probabilities within 1e-5 relative, on the
tiny Gemma 1, Gemma 2, Gemma 3 and Gemma 4 E2B fixtures, whose windows (6, 5, 6) are far
shorter than the conversations, so every ring has wrapped before it is reused or trimmed.
"""

from __future__ import annotations

import resource
import time

import numpy as np
import pytest

import mlx.core as mx

from mlx_gemma.batching import Job, Scheduler
from mlx_gemma.errors import GenerationError
from mlx_gemma.generate import generate_step
from mlx_gemma.image_chat import image_spans
from mlx_gemma.loading import load_model
from mlx_gemma.models.batch_rows import copy_caches, with_slack
from mlx_gemma.models.kv_cache import KVCache, RotatingKVCache
from mlx_gemma.prefix_cache import SLACK, PrefixCache

from conftest import FIXTURES
from test_batching import CHUNK, LOGPROB_RTOL, WAIT, Collector, alone, prompt, tiny
import test_batching

NAMES = ["gemma", "gemma2", "gemma3", "gemma4_e2b"]
scheduler = test_batching.scheduler  # the fixture: schedulers started for a test, closed after it


def run_one(s: Scheduler, ids: list[int], n: int, **job):
    """(tokens, events) of one job run to its end."""
    got = Collector()
    job_id = s.submit(Job(ids, n, **job), got)
    got.wait_done([job_id])
    return got.tokens(job_id), got.events[job_id]


def assert_alone(model, ids, n, tokens, events):
    """Greedy tokens and their log-probabilities equal the prompt generated alone from scratch."""
    ref_tokens, ref_lp = alone(model, ids, n)
    assert tokens == ref_tokens
    np.testing.assert_allclose([e.logprob for e in events], [lp[t] for lp, t in zip(ref_lp, ref_tokens)],
                               rtol=LOGPROB_RTOL, atol=1e-6)


# ----- the ring's slack ------------------------------------------------------------------


def last_logits(model, ids, caches):
    return model.logits(model.model(mx.array([ids]), cache=caches)[:, -1, :]).astype(mx.float32)


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "gemma4_e2b"])
def test_a_wrapped_ring_with_slack_goes_back_and_continues_as_from_scratch(name):
    model = tiny(name)
    slack = 7
    ids = prompt(40, 3)
    caches = with_slack(model.make_cache(), slack)
    last_logits(model, ids[:30], caches)
    for t in ids[30:36]:  # decoding steps: T == 1 over a ring holding more than the window
        last_logits(model, [t], caches)
    rings = [c for c in caches if isinstance(c, RotatingKVCache)]
    assert rings and all(c.offset > c.max_size for c in rings)  # wrapped
    assert not any(c.can_trim_to(36 - slack - 1) for c in rings)  # past the slack: refused, nothing changed
    assert not rings[0].trim_to(36 - slack - 1) and rings[0].offset == 36
    assert all(c.trim_to(36 - slack) for c in caches)
    other = prompt(12, 9)[1:]
    got = last_logits(model, other[:5], caches)  # a chunk after going back
    for t in other[5:]:
        got = last_logits(model, [t], caches)
    expected = last_logits(model, ids[: 36 - slack] + other, model.make_cache())
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-5, atol=1e-5)


def test_slack_decoding_equals_no_slack():
    """The T == 1 mask over a ring with slack hides the slack's tokens (mask None would not)."""
    model = tiny("gemma2")
    ids = prompt(30, 4)
    plain, slacked = model.make_cache(), with_slack(model.make_cache(), 5)
    a = last_logits(model, ids[:3], plain)
    b = last_logits(model, ids[:3], slacked)
    for t in ids[3:]:
        a, b = last_logits(model, [t], plain), last_logits(model, [t], slacked)
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)


# ----- the scheduler ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_four_turn_chat_reuses_each_earlier_turn_and_equals_from_scratch(name, scheduler):
    model = tiny(name)
    s, n = scheduler(model), 8
    ids, previous, echoed = prompt(11, 0), 0, 0
    for turn in range(4):
        tokens, events = run_one(s, ids, n, top_logprobs=2)
        assert_alone(model, ids, n, tokens, events)
        assert events[0].prompt_tokens == len(ids)
        assert max(previous, echoed) <= events[0].cached_tokens < len(ids)
        previous, echoed = len(ids), len(ids) + n - 1  # a reply echoed verbatim: the row's entry holds it
        if turn == 1:  # the client re-renders the reply: only the prompt's own entry fits
            tokens, echoed = tokens[::-1], 0
        ids = ids + tokens + prompt(6, 10 + turn)[1:]
    assert s.prefix_cache_bytes > 0


@pytest.mark.parametrize("name", ["gemma2", "gemma4_e2b"])
def test_the_same_prompt_again_reuses_all_but_its_last_token(name, scheduler):
    model = tiny(name)
    s, ids = scheduler(model), prompt(23, 5)
    first = run_one(s, ids, 6)
    again = run_one(s, ids, 6)
    assert (first[1][0].cached_tokens, again[1][0].cached_tokens) == (0, len(ids) - 1)
    assert again[0] == first[0]
    assert_alone(model, ids, 6, *again)
    shorter = ids[:15]  # a prefix of a held entry: trimmed back (within the slack)
    assert_alone(model, shorter, 6, *run_one(s, shorter, 6))


def test_prefix_cache_off_reuses_nothing(scheduler):
    model = tiny("gemma3")
    s, ids = scheduler(model, prefix_cache_bytes=0), prompt(15, 2)
    run_one(s, ids, 4)
    tokens, events = run_one(s, ids, 4)
    assert events[0].cached_tokens == 0 and s.prefix_cache_bytes == 0
    assert_alone(model, ids, 4, tokens, events)
    with pytest.raises(GenerationError, match="prefix_cache_bytes"):
        Scheduler(model, prefix_cache_bytes=-1)


def test_rows_running_beside_a_reused_prefix_are_unchanged(scheduler):
    model = tiny("gemma2")
    s, got = scheduler(model), Collector()
    base = prompt(20, 7)
    run_one(s, base, 3)
    a = s.submit(Job(prompt(9, 8), 10), got)
    got.wait(lambda: len(got.events[a]) >= 2)
    b = s.submit(Job(base + [40, 41, 42], 10), got)
    got.wait_done([a, b])
    assert got.events[b][0].cached_tokens >= len(base)
    assert_alone(model, prompt(9, 8), 10, got.tokens(a), got.events[a])
    assert_alone(model, base + [40, 41, 42], 10, got.tokens(b), got.events[b])


# ----- media -----------------------------------------------------------------------------


def test_same_images_are_reused_and_different_ones_never(scheduler):
    """Gemma 3 with images: a cached image block is reused only if the same image fills it."""
    folder = FIXTURES / "tiny_gemma3_vlm"
    model, ref = load_model(folder), dict(np.load(folder / "reference.npz"))
    ids = ref["two_input_ids"][0].tolist()
    pixels = mx.array(ref["two_pixel_values"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    (first, _), (second_start, second) = image_spans(ids, model.image_input.token_id)  # the two blocks
    s = scheduler(model)
    expected = ref["two_greedy"][0].tolist()  # transformers' greedy tokens
    n = len(expected)
    assert run_one(s, ids, n, media={"pixel_values": pixels})[0] == expected
    tokens, events = run_one(s, ids, n, media={"pixel_values": pixels})  # the same images: both blocks reused
    assert tokens == expected and events[0].cached_tokens >= second
    other = mx.concatenate([pixels[:1], pixels[1:] * 0.5])  # the same first image, another second
    tokens, events = run_one(s, ids, n, media={"pixel_values": other})
    assert first < events[0].cached_tokens <= second_start
    assert tokens == [t for t, _ in alone_media(model, ids, n, other)]
    swapped = pixels[::-1]  # both images the other way round: no block reused
    tokens, events = run_one(s, ids, n, media={"pixel_values": swapped})
    assert 0 < events[0].cached_tokens <= first
    assert tokens == [t for t, _ in alone_media(model, ids, n, swapped)]


def alone_media(model, ids, n, pixels):
    """(token, log-softmax) of `ids` with its images generated alone (the reference, as `alone`)."""
    return [(step[0], lp) for step, lp in generate_step(model, ids, max_tokens=n, prefill_step_size=CHUNK,
                                                       pixel_values=pixels)]


def test_gemma4_image_and_clip_blocks_are_reused_by_the_next_turn(scheduler):
    """Gemma 4 with both towers (test_gemma4_mm's "both" case): a second turn reuses the first turn's
    prompt with its image and clip blocks (named by a digest of each item's pixels / features) and
    equals the whole prompt generated alone; another image with the same ids reuses nothing past
    the text before its block."""
    folder = FIXTURES / "tiny_gemma4_mm"
    model, ref = load_model(folder), dict(np.load(folder / "reference.npz"))
    inputs = {"pixel_values": mx.array(ref["one_pixel_values"].astype(np.float32) / 255.0),
              "image_positions": mx.array(ref["one_image_position_ids"]),
              "audio_features": mx.array(ref["audio_input_features"]),
              "audio_mask": mx.array(ref["audio_input_features_mask"])}
    ids = ref["both_input_ids"][0].tolist()
    (image_start, _), = image_spans(ids, model.image_input.token_id)
    s, n = scheduler(model), 6
    first, _ = run_one(s, ids, n, media=inputs)
    assert first == ref["both_greedy"].tolist()[:n]  # transformers' greedy tokens
    turn = ids + first + prompt(5, 3)[1:]
    tokens, events = run_one(s, turn, n, media=inputs)
    assert events[0].cached_tokens >= len(ids)
    assert tokens == [step[0] for step, _ in generate_step(model, turn, max_tokens=n, prefill_step_size=CHUNK,
                                                            media=inputs)]
    other = {**inputs, "pixel_values": inputs["pixel_values"] * 0.5}
    tokens, events = run_one(s, turn, n, media=other)
    assert 0 < events[0].cached_tokens <= image_start
    assert tokens == [step[0] for step, _ in generate_step(model, turn, max_tokens=n, prefill_step_size=CHUNK,
                                                            media=other)]


# ----- the store -------------------------------------------------------------------------


def filled(model, ids, slack=SLACK):
    caches = with_slack(model.make_cache(), slack)
    last_logits(model, ids, caches)
    return caches


def test_an_entry_held_by_another_is_not_stored_twice_and_the_bound_holds():
    model = tiny("gemma")  # global layers only: any prefix of an entry can be trimmed back to
    ids = prompt(30, 1)
    cache = PrefixCache(1 << 30)
    cache.store(ids[:10], filled(model, ids[:10]))
    cache.store(ids[:20], filled(model, ids[:20]))  # holds the first: replaces it
    cache.store(ids[:15], filled(model, ids[:15]))  # held by the second: not stored
    cache.store(ids[:20], filled(model, ids[:20]))  # the same: not stored
    assert [len(e.tokens) for e in cache.entries.values()] == [20]
    one = cache.nbytes
    assert one == sum(c.nbytes for c in cache.entries[next(iter(cache.entries))].caches)
    small = PrefixCache(2 * one)
    for seed in range(5):
        small.store(prompt(20, 100 + seed), filled(model, prompt(20, 100 + seed)))
        assert small.nbytes <= 2 * one
    assert len(small.entries) == 2  # the two latest
    n, caches = small.lookup(prompt(20, 104) + [50])
    assert n == 20 and all(c.offset == 20 for c in caches)
    assert small.lookup(prompt(20, 100))[0] <= 1  # evicted (only <bos> may match)


def test_entries_with_other_images_in_the_same_ids_are_kept_apart():
    model = tiny("gemma")
    ids = prompt(12, 3)
    ids[3:6] = [7, 7, 7]  # an "image block" of soft token 7
    cache = PrefixCache(1 << 30, frozenset({7}))
    cache.store(ids, filled(model, ids), [(3, 6, "x")])
    cache.store(ids, filled(model, ids), [(3, 6, "y")])  # other pixels: not the same entry
    cache.store(ids, filled(model, ids), [(3, 6, "y")])  # the same: not stored twice
    assert len(cache.entries) == 2
    longer = ids + [50, 51]
    assert cache.lookup(longer, [(3, 6, "y")])[0] == len(ids)
    assert cache.lookup(longer, [(3, 6, "z")])[0] == 3  # stops before a block it does not hold
    assert cache.lookup(longer)[0] == 3  # an unnamed block is never reused
    assert cache.lookup(ids[:5] + [50], [(3, 5, "y")])[0] == 3  # a block cut short is not the same block


def test_a_copy_never_sees_the_entrys_writes():
    model = tiny("gemma2")
    ids = prompt(20, 2)
    caches = filled(model, ids)
    copy = copy_caches(caches)
    before = [np.array(a) for c in caches for a in c.state]
    last_logits(model, [60, 61, 62], copy)
    last_logits(model, [63], copy)
    assert all(np.array_equal(b, np.array(a)) for b, a in zip(before, [a for c in caches for a in c.state]))
    assert [type(c) for c in copy] == [type(c) for c in caches]
    assert all(isinstance(c, (KVCache, RotatingKVCache)) for c in caches)


# ----- memory ----------------------------------------------------------------------------


def rss_mib() -> float:
    """This process's resident set now (Linux /proc; ru_maxrss elsewhere, a peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_300_mixed_requests_keep_memory_flat():
    """The prefix cache stays under its bound and the process's resident memory stops growing."""
    model = tiny("gemma3")
    bound = 256 * 1024
    s, got = Scheduler(model, prefill_chunk=64, prefix_cache_bytes=bound), Collector()
    s.start()
    rng = np.random.default_rng(0)
    chats = [prompt(int(rng.integers(3, 40)), 1000 + i) for i in range(20)]
    rss = []
    for wave in range(6):
        ids = []
        for i in range(50):
            base = chats[int(rng.integers(len(chats)))]
            extra = prompt(int(rng.integers(2, 30)), 5000 + 50 * wave + i)[1:]
            ids.append(s.submit(Job(base + extra, int(rng.integers(1, 12))), got))
        got.wait_done(ids)
        assert s.prefix_cache_bytes <= bound
        mx.clear_cache()
        rss.append(rss_mib())
    deadline = time.monotonic() + WAIT
    while (s.active or s.cache_bytes) and time.monotonic() < deadline:
        time.sleep(0.01)
    s.close()
    assert s.active == 0 and s.cache_bytes == 0
    assert sum(e[0].cached_tokens for e in got.events.values()) > 0
    # Measured: 0.3 MiB of growth from the first wave to the sixth (99.2 -> 99.5 MiB).
    assert rss[-1] - rss[0] < 32, rss
