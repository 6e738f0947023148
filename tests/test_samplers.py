"""Samplers and logits processors: each one's defining property, seeding, and bad settings."""

from __future__ import annotations

import math

import numpy as np
import pytest

import mlx.core as mx

from mlx_gemma.errors import GenerationError
from mlx_gemma.samplers import (
    LogitBias,
    PresenceFrequencyPenalty,
    CategoricalSampler,
    RepetitionPenalty,
    SamplingSettings,
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy,
    log_softmax,
    make_logits_processors,
    make_sampler,
)

DRAWS = 2000  # one batched call: the same row repeated DRAWS times


def random_logprobs(seed: int, V: int = 64, scale: float = 2.0) -> mx.array:
    return log_softmax(mx.array(np.random.default_rng(seed).normal(size=(1, V)).astype(np.float32) * scale))


def draws(sampler, logprobs: mx.array) -> np.ndarray:
    return np.array(sampler(mx.repeat(logprobs, DRAWS, axis=0)))


def test_temperature_zero_is_greedy_argmax():
    assert make_sampler(0.0) is greedy
    lp = log_softmax(mx.array(np.random.default_rng(0).normal(size=(8, 100)).astype(np.float32)))
    assert np.array(greedy(lp)).tolist() == np.argmax(np.array(lp), axis=-1).tolist()


def test_temperature_to_zero_equals_greedy():
    lp = log_softmax(mx.array(np.random.default_rng(1).normal(size=(64, 100)).astype(np.float32)))
    assert np.array(make_sampler(temp=1e-4, seed=0)(lp)).tolist() == np.array(greedy(lp)).tolist()


@pytest.mark.parametrize("k", [1, 5, 17])
def test_top_k_never_leaves_the_k_best(k):
    lp = random_logprobs(k)
    best = set(np.argsort(-np.array(lp[0]))[:k].tolist())
    seen = set(draws(make_sampler(temp=1.0, top_k=k, seed=3), lp).tolist())
    assert seen <= best
    assert len(seen) == k  # and every one of them can be drawn
    assert int(mx.isfinite(apply_top_k(lp, k)).sum()) == k


@pytest.mark.parametrize("top_p", [0.3, 0.75, 0.95])
def test_top_p_never_leaves_the_nucleus(top_p):
    lp = random_logprobs(int(top_p * 100), scale=1.5)
    probs = np.exp(np.array(lp[0], dtype=np.float64))
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]
    nucleus = set(order[mass_before < top_p].tolist())
    seen = set(draws(make_sampler(temp=1.0, top_p=top_p, seed=4), lp).tolist())
    assert seen <= nucleus and len(seen) >= min(2, len(nucleus))
    kept = set(np.nonzero(np.isfinite(np.array(apply_top_p(lp, top_p)[0])))[0].tolist())
    assert kept == nucleus


def test_top_p_keeps_the_best_token_even_alone():
    lp = log_softmax(mx.array([[5.0, 0.0, 0.0]]))
    assert set(draws(make_sampler(temp=1.0, top_p=0.01, seed=0), lp).tolist()) == {0}


def test_min_p_drops_tokens_below_the_scaled_best():
    lp = mx.log(mx.array([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    assert set(draws(make_sampler(temp=1.0, min_p=0.15, seed=5), lp).tolist()) == {0, 1, 2}
    assert np.isfinite(np.array(apply_min_p(lp, 0.15)[0])).tolist() == [True, True, True, False, False]


def test_filters_compose_in_hf_order():
    """Top-k then top-p renormalised over the k survivors (Hugging Face's order)."""
    lp = mx.log(mx.array([[0.4, 0.3, 0.2, 0.1]]))
    # Over the top 2 (renormalised 4/7, 3/7) a 0.5 nucleus is the first token alone.
    sampler = CategoricalSampler(temp=1.0, top_k=2, top_p=0.5, seed=0)
    assert np.isfinite(np.array(sampler.filter(lp)[0])).tolist() == [True, False, False, False]


def test_temperature_sharpens_and_flattens():
    lp = mx.log(mx.array([[0.6, 0.3, 0.1]]))
    cold = np.bincount(draws(make_sampler(temp=0.5, seed=1), lp), minlength=3) / DRAWS
    hot = np.bincount(draws(make_sampler(temp=2.0, seed=1), lp), minlength=3) / DRAWS
    assert cold[0] > 0.7 and hot[0] < 0.55 and hot[2] > 0.15


def test_seeded_sampling_repeats_and_seeds_differ():
    lp = random_logprobs(7, scale=0.5)

    def run(seed):
        sampler = make_sampler(temp=1.0, seed=seed)
        return [int(sampler(lp)[0]) for _ in range(30)]

    first = run(42)
    mx.random.seed(1234)  # global state must not matter
    mx.random.uniform(shape=(3,))
    assert run(42) == first
    assert run(43) != first


def test_unseeded_samplers_differ():
    lp = random_logprobs(8, scale=0.5)
    a, b = make_sampler(temp=1.0), make_sampler(temp=1.0)
    assert [int(a(lp)[0]) for _ in range(30)] != [int(b(lp)[0]) for _ in range(30)]


# ----- logits processors ----------------------------------------------------------------


def test_repetition_penalty_divides_positive_multiplies_negative_seen_logits():
    logits = mx.array([[2.0, -2.0, 1.0, 3.0, 0.0]])
    out = RepetitionPenalty(2.0)(mx.array([[0, 1, 1, 4]]), logits)
    assert np.array(out).tolist() == [[1.0, -4.0, 1.0, 3.0, 0.0]]


def test_repetition_penalty_context_size_and_padding():
    logits = mx.array([[2.0, 2.0, 2.0, 2.0]])
    # Only the last 2 history ids count; -1 is a padding slot, not token 3.
    out = RepetitionPenalty(2.0, context_size=2)(mx.array([[0, -1, 1]]), logits)
    assert np.array(out).tolist() == [[2.0, 1.0, 2.0, 2.0]]


def test_presence_and_frequency_penalties_subtract_per_row_counts():
    tokens = mx.array([[0, 2, 2, -1], [3, 3, 3, 3]])
    out = PresenceFrequencyPenalty(presence=0.5, frequency=0.25)(tokens, mx.zeros((2, 4)))
    assert np.array(out).tolist() == [[-0.75, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, -1.5]]


def test_logit_bias_adds_and_checks_the_vocabulary():
    bias = LogitBias({1: 5.0, 3: -math.inf})
    out = np.array(bias(mx.zeros((1, 0), mx.int32), mx.zeros((2, 4))))
    assert out.tolist() == [[0.0, 5.0, 0.0, -math.inf]] * 2
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        bias(mx.zeros((1, 0), mx.int32), mx.zeros((1, 3)))


def test_make_logits_processors():
    assert make_logits_processors() == []
    assert make_logits_processors(repetition_penalty=1.0, presence_penalty=0.0) == []
    kinds = [type(p) for p in make_logits_processors({0: 1.0}, 1.1, 8, 0.5, 0.1)]
    assert kinds == [LogitBias, RepetitionPenalty, PresenceFrequencyPenalty]


# ----- invalid settings -----------------------------------------------------------------


@pytest.mark.parametrize("settings, message", [
    (dict(temp=-0.5), "temperature"),
    (dict(temp=float("nan")), "temperature"),
    (dict(temp=float("inf")), "temperature"),
    (dict(temp=1.0, top_p=0.0), "top_p"),
    (dict(temp=1.0, top_p=1.5), "top_p"),
    (dict(temp=1.0, top_k=-1), "top_k"),
    (dict(temp=1.0, top_k=2.5), "top_k"),
    (dict(temp=1.0, min_p=1.0), "min_p"),
    (dict(temp=1.0, min_p=-0.1), "min_p"),
    (dict(temp=1.0, seed=-3), "seed"),
    (dict(temp=0.0, top_p=2.0), "top_p"),  # checked even when greedy ignores it
])
def test_invalid_sampler_settings_raise(settings, message):
    with pytest.raises(GenerationError, match=message):
        make_sampler(**settings)
    with pytest.raises(GenerationError, match=message):  # the settings object checks when made
        SamplingSettings(**settings)


@pytest.mark.parametrize("settings, message", [
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(repetition_penalty=1.2, repetition_context_size=0), "repetition_context_size"),
    (dict(presence_penalty=float("inf")), "presence_penalty"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={2: "x"}), "logit_bias"),
])
def test_invalid_processor_settings_raise(settings, message):
    with pytest.raises(GenerationError, match=message):
        make_logits_processors(**settings)
    with pytest.raises(GenerationError, match=message):
        SamplingSettings(**settings)


def test_sampling_settings_build_what_the_functions_build():
    s = SamplingSettings(temp=0.7, top_k=5, seed=3, repetition_penalty=1.3, logit_bias={1: 2.0})
    lp = random_logprobs(4)
    assert np.array_equal(draws(s.sampler(), lp), draws(make_sampler(0.7, 5, seed=3), lp))
    tokens, logits = mx.array([[1, 2, 2]]), lp
    ours = logits
    for p in s.processors():
        ours = p(tokens, ours)
    theirs = logits
    for p in make_logits_processors({1: 2.0}, 1.3):
        theirs = p(tokens, theirs)
    assert mx.array_equal(ours, theirs)
    assert SamplingSettings().sampler() is greedy and SamplingSettings().processors() == []
