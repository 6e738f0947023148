"""Speculative decoding continuing a PromptCache (prompt_cache.py, generate.py, chat.py): exact over turns.

Reference: plain greedy decoding of each turn's whole conversation from scratch (no cache, no
speculation; the plain path is checked against transformers in test_generate).  The tiny Gemma 2 / 3
fixtures have windows of 6 / 5 tokens, far shorter than the 3-turn conversations, so every turn after
the first speculates on rings that have wrapped; the cache must end each turn holding exactly the
conversation's tokens.  One case starts a turn on a cache short of its window, so that the ring
wraps while the turn speculates.

Sampling: the first tokens of seeded speculative runs continuing a saved cache (a wrapped window, the
speculation's slack kept in the file) or a ChatSession's second turn, against their exact
distribution under plain sampling continuing that cache (the target's shaped distributions after the
conversation, which a plain continuation of the same cache is checked to give): chi-square at
LEVEL, as test_speculative's end-to-end test, with cells expecting fewer than 5 draws pooled.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from scipy.stats import chisquare

from mlx_gemma.cache_prompt import main as cache_prompt_main
from mlx_gemma.generate import main as generate_main
from mlx_gemma.chat import ChatSession
from mlx_gemma.generate import generate, stream_generate
from mlx_gemma import speculative
from mlx_gemma.speculative_control import FixedK
from mlx_gemma.loading import load
from mlx_gemma.models.kv_cache import RotatingKVCache
from mlx_gemma.prompt_cache import PromptCache, continuation_ids, load_prompt_cache, save_prompt_cache
from mlx_gemma.samplers import make_sampler

from conftest import FIXTURES

_loaded: dict[str, tuple] = {}


@pytest.fixture(autouse=True)
def fixed_k(monkeypatch):
    """k proposals every step: the adaptive controller (test_speculative_adaptive) would rightly switch a
    draft as costly as the target off, and these tests are about what speculation does when it runs."""
    monkeypatch.setattr(speculative, "Adaptive", lambda k, **_: FixedK(k))


LEVEL = 1e-3  # chi-square tests fail below this p-value (test_speculative's level)
TURNS = [[2, 17, 17, 40, 41, 17, 17], [9, 17, 17, 40], [33, 34, 17, 17]]  # each turn's new ids
REPLY = 14  # tokens per reply


def tiny(name: str):
    if name not in _loaded:
        _loaded[name] = load(FIXTURES / f"tiny_{name}")
    return _loaded[name]


def plain_reply(model, tok, ids, **kwargs) -> list[int]:
    return [r.token for r in stream_generate(model, tok, ids, max_tokens=REPLY, **kwargs)]


def conversation(model, tok, cache, turns=TURNS, **speculation):
    """Each turn's (reply from the cache, the plain reference reply, last response), the history growing."""
    history, out = [], []
    for new in turns:
        ids = history + new
        last, reply = None, []
        for last in stream_generate(model, tok, ids, max_tokens=REPLY, prompt_cache=cache, **speculation):
            reply.append(last.token)
        out.append((reply, plain_reply(model, tok, ids), last))
        history = ids + reply
        assert cache.tokens == history[: cache.offset] and cache.offset >= len(history) - 1
        assert all(c.offset == cache.offset for c in cache.caches)
    return out


def _wrapped(cache) -> bool:
    return any(isinstance(c, RotatingKVCache) and c.offset > c.max_size for c in cache.caches)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
@pytest.mark.parametrize("proposer", ["lookup", "draft"])
def test_three_turns_equal_plain_greedy(name, proposer):
    model, tok = tiny(name)
    speculation = {"prompt_lookup": 2} if proposer == "lookup" else {"draft_model": (model, tok)}
    cache = PromptCache(model)
    turns = conversation(model, tok, cache, num_draft_tokens=3, **speculation)
    for i, (reply, plain, last) in enumerate(turns):
        assert reply == plain, f"turn {i + 1}"
    assert _wrapped(cache)
    proposed = [last.draft_proposed for _, _, last in turns]
    assert all(p > 0 for p in proposed[1:]), proposed  # it speculated on the wrapped windows
    if proposer == "draft":  # the target agrees with itself as a draft
        assert all(last.draft_accepted == last.draft_proposed for _, _, last in turns)
        assert cache.draft is not None and cache.draft_tokens == cache.tokens[: cache.draft.fed]


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_a_cache_wrapped_without_slack_is_widened_in_place(name):
    """Turn 1 plain (no slack; the windows wrap), then speculation: the rings are laid out again."""
    model, tok = tiny(name)
    cache = PromptCache(model)
    first = plain_reply(model, tok, TURNS[0], prompt_cache=cache)
    assert _wrapped(cache) and cache.slack == 0
    history = TURNS[0] + first
    for new in TURNS[1:]:
        ids = history + new
        responses = list(stream_generate(model, tok, ids, max_tokens=REPLY, prompt_cache=cache,
                                         draft_model=(model, tok), num_draft_tokens=4))
        reply = [r.token for r in responses]
        assert reply == plain_reply(model, tok, ids)
        assert responses[-1].draft_accepted == responses[-1].draft_proposed > 0
        history = ids + reply
    assert cache.slack == 4


def test_a_stop_inside_an_accepted_run_leaves_the_cache_at_the_stop():
    """A stop id among a step's accepted proposals: the tokens fed past it go back out of the cache."""
    model, tok = tiny("gemma3")
    plain = plain_reply(model, tok, TURNS[0])
    stop = plain[6]
    cache = PromptCache(model)
    reply = [r.token for r in stream_generate(model, tok, TURNS[0], max_tokens=REPLY, prompt_cache=cache,
                                              draft_model=(model, tok), stop_token_ids=[stop])]
    assert reply == plain[: plain.index(stop) + 1]
    history = TURNS[0] + reply
    assert cache.tokens == history[: cache.offset] and cache.offset <= len(history)
    assert cache.draft_tokens == history[: cache.draft.fed]
    ids = history + TURNS[1]
    again = [r.token for r in stream_generate(model, tok, ids, max_tokens=REPLY, prompt_cache=cache,
                                              draft_model=(model, tok))]
    assert again == plain_reply(model, tok, ids)


def test_a_saved_speculative_cache_loads_and_goes_on(tmp_path):
    model, tok = tiny("gemma2")
    cache = PromptCache(model)
    (reply, plain, _), = conversation(model, tok, cache, TURNS[:1], prompt_lookup=2)
    assert reply == plain and cache.slack == 3
    save_prompt_cache(tmp_path / "c.safetensors", cache)
    loaded = load_prompt_cache(tmp_path / "c.safetensors", model)
    assert loaded.slack == 3 and loaded.tokens == cache.tokens
    assert [c.floor for c in loaded.caches if isinstance(c, RotatingKVCache)] == [
        c.floor for c in cache.caches if isinstance(c, RotatingKVCache)]
    ids = TURNS[0] + reply + TURNS[1]
    again = [r.token for r in stream_generate(model, tok, ids, max_tokens=REPLY, prompt_cache=loaded,
                                              draft_model=(model, tok))]
    assert again == plain_reply(model, tok, ids)
    assert loaded.draft is not None  # rebuilt from the token history: the file holds no draft


def test_generate_cli_speculates_from_a_cache_file(tmp_path, capsys):
    """cache_prompt's file (no slack: made without speculation), then generate --prompt-cache-file with
    --prompt-lookup: the plain greedy text of the whole prompt, and the counts printed."""
    model, tok = tiny("gemma3")
    folder, path = str(FIXTURES / "tiny_gemma3"), str(tmp_path / "doc.safetensors")
    document = "cats and dogs and cats and dogs and cats"
    assert cache_prompt_main(["--model", folder, "--prompt", document, "--prompt-cache-file", path,
                              "--no-chat"]) == 0
    capsys.readouterr()
    assert generate_main(["--prompt-cache-file", path, "--prompt", " and", "--max-tokens", "12",
                          "--prompt-lookup", "2"]) == 0
    done = capsys.readouterr()
    full = tok.encode(document) + continuation_ids(tok, " and", False)
    assert done.out == generate(model, tok, full, max_tokens=12) + "\n"
    assert "Speculation: " in done.err


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
@pytest.mark.parametrize("proposer", ["lookup", "draft"])
def test_a_window_that_wraps_during_the_continuation(name, proposer):
    """Turn 1 leaves the cache short of its window; turn 2 speculates across the wrap: plain greedy's tokens."""
    model, tok = tiny(name)
    window = min(w for w in model.windows if w is not None)
    speculation = {"prompt_lookup": 2} if proposer == "lookup" else {"draft_model": (model, tok)}
    cache = PromptCache(model)
    first = [17, 17]
    reply = [r.token for r in stream_generate(model, tok, first, max_tokens=1, prompt_cache=cache, **speculation)]
    assert reply == plain_reply(model, tok, first)[:1]
    assert cache.offset < window and not _wrapped(cache)
    ids = first + reply + [17, 17]
    responses = list(stream_generate(model, tok, ids, max_tokens=REPLY, prompt_cache=cache, num_draft_tokens=3,
                                     **speculation))
    assert [r.token for r in responses] == plain_reply(model, tok, ids)
    assert _wrapped(cache) and responses[-1].draft_proposed > 0


# ----- sampling continuing a cache -----------------------------------------------------------------


def _shaped(model, ids: list[int], sampler) -> np.ndarray:
    """The probabilities plain sampling draws the token after `ids` from (the sampler's filter applied)."""
    logits = model.logits(model.model(mx.array([ids], mx.int32))[:, -1, :]).astype(mx.float32)
    return np.array(mx.softmax(sampler.filter(logits - mx.logsumexp(logits)), axis=-1))[0].astype(np.float64)


def _exact_joint(model, ids: list[int], sampler, depth: int) -> dict[tuple, float]:
    """{first `depth` tokens after `ids`: probability} under plain sampling."""
    probs = _shaped(model, ids, sampler)
    out = {}
    for token in np.flatnonzero(probs > 0):
        tails = {(): 1.0} if depth == 1 else _exact_joint(model, ids + [int(token)], sampler, depth - 1)
        out.update({(int(token), *rest): probs[token] * p for rest, p in tails.items()})
    return out


def _fits(seen: dict[tuple, int], exact: dict[tuple, float]) -> float:
    """The chi-square p-value of the drawn sequences against `exact`, cells expecting < 5 draws pooled."""
    assert set(seen) <= set(exact)  # never a sequence the truncation rules out
    runs = sum(seen.values())
    keys = sorted(exact, key=exact.get, reverse=True)
    expected = np.array([exact[k] for k in keys]) * runs
    counts = np.array([seen.get(k, 0) for k in keys], float)
    small = expected < 5
    if small.any():
        expected = np.append(expected[~small], expected[small].sum())
        counts = np.append(counts[~small], counts[small].sum())
    assert len(expected) >= 2
    return chisquare(counts, expected * counts.sum() / expected.sum()).pvalue


SAMPLING = {"top_k": dict(temp=1.0, top_k=2), "top_k_top_p": dict(temp=0.7, top_k=3, top_p=0.6)}
RUNS = 100  # seeded runs per case: 0.1-0.3 s each on the 2-core CPU


@pytest.mark.parametrize("settings, proposer", [("top_k", "bad draft"), ("top_k_top_p", "self draft")])
def test_sampled_speculation_from_a_saved_cache_follows_plain_sampling(tmp_path, settings, proposer):
    """Turn 1 greedy with speculation (the ring wraps; the file keeps its slack), saved; then per seed the
    file is loaded and turn 2's first 3 tokens are drawn speculatively, k = 2, the draft's caches rebuilt
    from the file's tokens (a bad draft: another random model, mostly rejected; the target itself: q = p).
    Prompt lookup is left out here: after a sampled token it finds nothing to propose on this model."""
    settings = SAMPLING[settings]
    model, tok = tiny("gemma3")
    cache = PromptCache(model)
    (reply, plain, _), = conversation(model, tok, cache, TURNS[:1], prompt_lookup=2)
    assert reply == plain and _wrapped(cache) and cache.slack == 3
    save_prompt_cache(tmp_path / "turn1.safetensors", cache)
    ids = TURNS[0] + reply + TURNS[1]
    exact = _exact_joint(model, ids, make_sampler(**settings), 3)
    assert 4 <= len(exact) <= 27 and abs(sum(exact.values()) - 1) < 1e-5
    # plain sampling continuing the loaded cache draws its first token from that same distribution
    (first,) = stream_generate(model, tok, ids, max_tokens=1, prompt_cache=load_prompt_cache(
        tmp_path / "turn1.safetensors", model), sampler=make_sampler(seed=0, **settings))
    scratch = model.logits(model.model(mx.array([ids], mx.int32))[:, -1, :]).astype(mx.float32)
    np.testing.assert_allclose(np.array(mx.softmax(first.logprobs.astype(mx.float32), axis=-1)),
                               np.array(mx.softmax(scratch, axis=-1))[0], atol=1e-5)
    draft = tiny("gemma") if proposer == "bad draft" else (model, tok)
    seen, proposed = {}, 0
    for seed in range(RUNS):
        loaded = load_prompt_cache(tmp_path / "turn1.safetensors", model)
        responses = list(stream_generate(model, tok, ids, max_tokens=3, prompt_cache=loaded, num_draft_tokens=2,
                                         sampler=make_sampler(seed=seed, **settings), draft_model=draft))
        drawn = tuple(r.token for r in responses)
        seen[drawn] = seen.get(drawn, 0) + 1
        proposed += responses[-1].draft_proposed
    assert proposed > 0
    assert _fits(seen, exact) > LEVEL


def test_sampled_second_chat_turn_follows_plain_sampling(tmp_path):
    """ChatSession with the target as its own draft: turn 1 greedy, its cache saved; then per seed a
    session resumes from it (history and the loaded cache) and turn 2 is sampled (top-k); its first 3
    tokens (the second and third checked as proposals) against plain sampling's exact distribution after the conversation the session rendered."""
    model, tok = tiny("gemma3")
    settings = SAMPLING["top_k"]
    chat = ChatSession(model, tok, max_tokens=6, draft_model=(model, tok), num_draft_tokens=2)
    chat.reply("a b a b a b")
    save_prompt_cache(tmp_path / "turn1.safetensors", chat.cache)
    turn1 = list(chat.history)
    seen, proposed, ids = {}, 0, None
    for seed in range(RUNS):
        chat = ChatSession(model, tok, max_tokens=3, sampler=make_sampler(seed=seed, **settings),
                           draft_model=(model, tok), num_draft_tokens=2)
        chat.history, chat.cache = list(turn1), load_prompt_cache(tmp_path / "turn1.safetensors", model)
        responses = list(chat.send("a b a b"))
        prompt = chat.history[: len(chat.history) - len(responses)]
        assert ids in (None, prompt) and prompt[: len(turn1)] == turn1
        ids = prompt
        drawn = tuple(r.token for r in responses)
        seen[drawn] = seen.get(drawn, 0) + 1
        proposed += responses[-1].draft_proposed
    assert _wrapped(chat.cache)
    exact = _exact_joint(model, ids, make_sampler(**settings), 3)
    assert proposed > 0
    assert _fits(seen, exact) > LEVEL
