"""Speculative decoding continuing a PromptCache (prompt_cache.py, generate.py): exact over turns.

Reference: plain greedy decoding of each turn's whole conversation from scratch (no cache, no
speculation; the plain path is checked against transformers in test_generate).  The tiny Gemma 2 / 3
fixtures have windows of 6 / 5 tokens, far shorter than the 3-turn conversations, so every turn after
the first speculates on rings that have wrapped; the cache must end each turn holding exactly the
conversation's tokens.
"""

from __future__ import annotations

import pytest

from mlx_gemma.cache_prompt import main as cache_prompt_main
from mlx_gemma.generate import main as generate_main
from mlx_gemma.generate import generate, stream_generate
from mlx_gemma import speculative
from mlx_gemma.speculative_control import FixedK
from mlx_gemma.loading import load
from mlx_gemma.models.kv_cache import RotatingKVCache
from mlx_gemma.prompt_cache import PromptCache, continuation_ids, load_prompt_cache, save_prompt_cache

from conftest import FIXTURES

_loaded: dict[str, tuple] = {}


@pytest.fixture(autouse=True)
def fixed_k(monkeypatch):
    """k proposals every step: the adaptive controller (test_speculative_adaptive) would rightly switch a
    draft as costly as the target off, and these tests are about what speculation does when it runs."""
    monkeypatch.setattr(speculative, "Adaptive", lambda k, **_: FixedK(k))
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
