"""Speculative decoding (mlx_gemma.speculative, mlx_gemma.proposers): exact against plain decoding.

Greedy speculative decoding must give plain greedy decoding's tokens, token for token, with every
proposer (prompt lookup, a good draft, a bad draft) on the tiny Gemma 1/2/3/4 E2B fixtures.  The
rejection rule is checked on exact distributions (chi-square, level 1e-3) and end to end on a tiny
model; adaptivity with injected timings.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from scipy.stats import chisquare

from mlx_gemma.engine import prefill, run
from mlx_gemma.errors import GenerationError
from mlx_gemma.generate import generate_step, main, stream_generate
from mlx_gemma.loading import load
from mlx_gemma.models.batch_rows import with_slack
from mlx_gemma.models.kv_cache import KVCache, RotatingKVCache
from mlx_gemma.proposers import DraftModel, PromptLookup, Speculation, same_vocabulary
from mlx_gemma.samplers import make_logits_processors, make_sampler
from mlx_gemma.speculative import (Adaptive, FixedK, SpeculativeStep, accept_proposals, can_roll_back,
                                   one_token_at_a_time, roll_back)
from mlx_gemma.tokenizer import GemmaTokenizer

from conftest import FIXTURES

NAMES = ["gemma", "gemma2", "gemma3", "gemma4_e2b"]
PROMPT = [17, 17]  # a repeat for prompt lookup; short, so windows of 5-6 have room to speculate
LEVEL = 1e-3  # chi-square tests fail below this p-value
_loaded: dict[str, tuple] = {}


def tiny(name: str):
    if name not in _loaded:
        _loaded[name] = load(FIXTURES / f"tiny_{name}")
    return _loaded[name]


def speculative_tokens(model, proposer, max_tokens, k=3, sampler=None, cache=None, processors=None):
    """(tokens, stats) of speculative decoding with k proposals every step (no adaptivity)."""
    cache = cache if cache is not None else model.make_cache()
    ids = mx.array([PROMPT], mx.int32)
    hidden = prefill(model, ids, cache)
    policy = SpeculativeStep(model, cache, proposer, PROMPT, max_tokens, k, sampler, processors,
                             ids if processors else None, controller=FixedK(k))
    return [t[0] for t, _ in one_token_at_a_time(run(policy, hidden, max_tokens), max_tokens)], policy.stats


def plain_tokens(model, max_tokens, **kwargs):
    return [t[0] for t, _ in generate_step(model, mx.array(PROMPT), max_tokens=max_tokens, **kwargs)]


def proposers(name):
    model, tok = tiny(name)
    bad = tiny("gemma3" if name == "gemma" else "gemma")  # another random model: proposes badly
    return {"lookup": PromptLookup(2), "self draft": DraftModel(model, tok, tok),
            "bad draft": DraftModel(bad[0], bad[1], tok)}


@pytest.mark.parametrize("name", NAMES)
def test_greedy_speculative_equals_greedy_plain(name):
    model, _ = tiny(name)
    plain = plain_tokens(model, 24)
    for label, proposer in proposers(name).items():
        tokens, stats = speculative_tokens(model, proposer, 24)
        assert tokens == plain, label
        if label != "lookup" or name == "gemma":  # (lookup needs a repeat before a window of 5-6 wraps)
            assert stats.proposed > 0, label  # speculation ran
        if label == "self draft":
            assert stats.accepted == stats.proposed  # the target agrees with itself


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "gemma4_e2b"])
def test_greedy_speculation_far_past_the_window_wrap(name):
    model, tok = tiny(name)
    plain = plain_tokens(model, 48)
    for label, proposer in {"lookup": PromptLookup(2), "self draft": DraftModel(*tiny(name))}.items():
        tokens, stats = speculative_tokens(model, proposer, 48, k=3, cache=with_slack(model.make_cache(), 3))
        assert tokens == plain, label
        assert stats.verify_steps >= 5, label  # it kept speculating after the windows (5-6) wrapped


@pytest.mark.parametrize("name", ["gemma", "gemma3"])
def test_history_processors_see_each_proposed_position(name):
    """Penalties over prompt + text so far: each of the k + 1 rows sees the proposals before it."""
    model, tok = tiny(name)
    processors = make_logits_processors(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.3)
    plain = plain_tokens(model, 30, logits_processors=processors)
    for label, proposer in {"lookup": PromptLookup(2), "self draft": DraftModel(model, tok, tok)}.items():
        tokens, stats = speculative_tokens(model, proposer, 30, cache=with_slack(model.make_cache(), 3),
                                           processors=processors)
        assert tokens == plain, label
        assert stats.accepted > 0 or label == "lookup", label


def test_a_wrapped_window_without_room_is_a_typed_refusal():
    cache = RotatingKVCache(4)
    for _ in range(6):
        cache.update_and_fetch(mx.zeros((1, 1, 1, 8)), mx.zeros((1, 1, 1, 8)))
    assert not can_roll_back([cache], 3, 2)
    assert can_roll_back([KVCache()], 3, 2)
    with pytest.raises(GenerationError, match="cannot go back"):
        roll_back([cache], 4)


def test_speculation_stops_short_of_a_quantization_switch():
    cache = KVCache(bits=8, quantize_from=5)
    cache.offset = 3
    assert can_roll_back([cache], 2, 1) and not can_roll_back([cache], 3, 2)


# ----- the rejection rule on exact distributions ---------------------------------------------


def _draws(p, q, proposals, n, seed=0):
    """First and second emitted tokens of n batched applications of accept_proposals."""
    keys = mx.random.split(mx.random.key(seed), n)
    out = []
    for i in range(0, n, 5000):  # accept_proposals takes one key: batch rows of 5000 per key
        m = min(5000, n - i)
        accepted, fallback = accept_proposals(mx.broadcast_to(p, (m, *p.shape)), None if q is None else
                                              mx.broadcast_to(q, (m, *q.shape)), proposals[i : i + m], keys[i])
        out.append((np.array(accepted), np.array(fallback)))
    accepted = np.concatenate([a for a, _ in out])
    fallback = np.concatenate([f for _, f in out])
    first = np.where(accepted[:, 0], np.array(proposals[:, 0]), fallback[:, 0])
    second = np.where(accepted[:, 1], np.array(proposals[:, 1]), fallback[:, 1])[accepted[:, 0]]
    return first, second


def _fits(samples, probs):
    counts = np.bincount(samples, minlength=len(probs))
    keep = probs > 0
    assert counts[~keep].sum() == 0  # nothing drawn where p is 0
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    return chisquare(counts[keep], expected).pvalue > LEVEL


@pytest.mark.parametrize("q_kind", ["draft", "bad draft", "one-hot"])
def test_rejection_sampling_gives_the_target_distribution(q_kind):
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6), size=3).astype(np.float32)
    p[0, 5] = 0.0  # a token the target never picks (as after top-k)
    p /= p.sum(axis=-1, keepdims=True)
    n = 20000
    if q_kind == "one-hot":
        q, proposals = None, np.tile([5, 2], (n, 1))  # deterministic, and the first one impossible for p
    else:
        q = rng.dirichlet(np.ones(6) * (0.2 if q_kind == "bad draft" else 5.0), size=2).astype(np.float32)
        proposals = np.stack([rng.choice(6, n, p=q[i] / q[i].sum()) for i in range(2)], axis=1)
    q_log = None if q is None else mx.log(mx.array(q))
    first, second = _draws(mx.log(mx.array(p)), q_log, mx.array(proposals, mx.int32), n)
    assert _fits(first, p[0].astype(np.float64) / p[0].sum())
    if q_kind != "one-hot":  # (a one-hot first proposal p never picks is never accepted)
        assert _fits(second, p[1].astype(np.float64) / p[1].sum())


# ----- sampling end to end -------------------------------------------------------------------


def _exact_joint(model, sampler, depth, prefix=()):
    """{first `depth` tokens: probability} under plain sampling, from the target's shaped distributions."""
    hidden = model.model(mx.array([PROMPT + list(prefix)], mx.int32))
    logprobs = model.logits(hidden[:, -1, :]).astype(mx.float32)
    probs = np.array(mx.softmax(sampler.filter(logprobs - mx.logsumexp(logprobs)), axis=-1))[0].astype(np.float64)
    out = {}
    for token in np.flatnonzero(probs > 0):
        if depth == 1:
            out[(int(token),)] = probs[token]
            continue
        for rest, p in _exact_joint(model, sampler, depth - 1, (*prefix, int(token))).items():
            out[(int(token), *rest)] = probs[token] * p
    return out


@pytest.mark.parametrize("settings", [dict(temp=1.0, top_k=2), dict(temp=0.7, top_k=3, top_p=0.6, min_p=0.05)])
def test_sampled_tokens_follow_the_target_distribution(settings):
    """The first 3 tokens of seeded speculative runs with a bad draft (k = 2) against their exact
    distribution under plain sampling (few sequences survive the truncation): chi-square at LEVEL."""
    model, tok = tiny("gemma")
    exact = _exact_joint(model, make_sampler(**settings), 3)
    assert 2 <= len(exact) <= 16 and abs(sum(exact.values()) - 1) < 1e-5
    runs, seen = 100, {}
    for seed in range(runs):
        draft = DraftModel(*tiny("gemma3"), tok).bind(make_sampler(seed=10_000 + seed, **settings), 512)
        drawn = tuple(speculative_tokens(model, draft, 3, k=2, sampler=make_sampler(seed=seed, **settings))[0])
        assert drawn in exact  # never a sequence the truncation rules out
        seen[drawn] = seen.get(drawn, 0) + 1
    keys = sorted(exact)
    counts = np.array([seen.get(k, 0) for k in keys], float)
    probs = np.array([exact[k] for k in keys])
    assert chisquare(counts, probs / probs.sum() * runs).pvalue > LEVEL


# ----- proposers, settings, adaptivity -------------------------------------------------------


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup(3)
    tokens, q = lookup.propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2)
    assert q is None and tokens.tolist() == [7, 8]  # the latest "1 2 3" was followed by 7 8
    assert lookup.propose([5, 6], 4)[0].tolist() == []  # a new text: no match


def test_a_draft_with_another_vocabulary_is_a_typed_error():
    model, tok = tiny("gemma")
    other = GemmaTokenizer.from_folder(FIXTURES / "gemma4_tokenizer")
    with pytest.raises(GenerationError, match="vocabulary"):
        same_vocabulary(tok, other)
    with pytest.raises(GenerationError, match="vocabulary"):
        DraftModel(model, other, tok)


def test_bad_settings_are_typed_errors():
    model, tok = tiny("gemma")
    for kwargs in (dict(prompt_lookup=0), dict(prompt_lookup=2, num_draft_tokens=0), dict(num_draft_tokens=2),
                   dict(prompt_lookup=2, draft_model=model)):
        with pytest.raises(GenerationError):
            Speculation.of(**kwargs)
    with pytest.raises(GenerationError, match="one prompt"):
        list(generate_step(model, mx.array([PROMPT, PROMPT]), proposer=PromptLookup(2), max_tokens=2))


@pytest.mark.parametrize("name, kv", [("gemma", {}), ("gemma3", {}), ("gemma4_e2b", dict(kv_bits=8, quantized_kv_start=0,
                                                                                     kv_group_size=32)),
                                      ("gemma2", {}), ("gemma4_e2b", dict(kv_bits=8, quantized_kv_start=9,
                                                                          kv_group_size=32))])
def test_stream_generate_speculates_and_counts(name, kv):
    """Through the public API (adaptive k, rings with slack), past the windows' wrap, float and 8-bit KV."""
    model, tok = tiny(name)
    plain = [r.token for r in stream_generate(model, tok, PROMPT, max_tokens=30, **kv)]
    for kwargs in (dict(prompt_lookup=2), dict(draft_model=tiny(name), num_draft_tokens=2)):
        responses = list(stream_generate(model, tok, PROMPT, max_tokens=30, **kwargs, **kv))
        assert [r.token for r in responses] == plain
        assert 0 <= responses[-1].draft_accepted <= responses[-1].draft_proposed
        assert len(responses) == 30 and responses[-1].finish_reason == "length"


def test_cli_prints_accepted_over_proposed(capsys):
    folder = str(FIXTURES / "tiny_gemma")
    assert main(["--model", folder, "--prompt", "a b a b a b a b", "--prompt-lookup", "2", "-m", "12",
                 "--no-chat"]) == 0
    assert "proposed tokens accepted" in capsys.readouterr().err


def test_adaptive_k_and_switching_off_with_injected_timings():
    control = Adaptive(4, probe_every=5, plain_probe=2, settle=2)
    assert [control.plan(), control.plan()] == [0, 0]
    control.record(0, 1, 0.010)
    control.record(0, 1, 0.010)  # plain: 10 ms per token
    assert control.plan() == 4
    control.record(4, 5, 0.020)  # all kept: 4 ms per token, k stays at its cap
    assert control.plan() == 4 and control.speculating
    for _ in range(4):  # nothing accepted: 25 ms per token, k shrinks, then speculation stops
        control.record(control.plan(), 1, 0.025)
    assert control.plan() == 0 and not control.speculating
    for _ in range(5):
        control.record(0, 1, 0.010)
    assert control.plan() > 0  # probing again after probe_every plain steps


@pytest.mark.parametrize("name", ["gemma3_vlm", "paligemma"])
def test_image_prompts_keep_their_prefix(name):
    """Rollbacks never reach below the prompt: an image prompt (Gemma 3's causal image block,
    PaliGemma's two-way prefix) speculates to plain greedy's tokens."""
    model, tok = tiny(name)
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    plain = [r.token for r in stream_generate(model, tok, "a b a b", image=image, max_tokens=20)]
    responses = list(stream_generate(model, tok, "a b a b", image=image, max_tokens=20, prompt_lookup=2))
    assert [r.token for r in responses] == plain
    assert responses[-1].draft_proposed is not None
