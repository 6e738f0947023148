"""ChatSession and `python -m mlx_gemma.chat` with speculative decoding: each turn equals plain greedy.

Reference: a plain greedy ChatSession (no speculation) with the same settings, itself checked against a
fresh run without a cache in test_chat.  The tiny Gemma 2 / 3 windows (6 / 5 tokens) wrap in the first
turn, so later turns speculate on wrapped rings.
"""

from __future__ import annotations

import io
import sys

import pytest

from mlx_gemma.chat import ChatSession, main
from mlx_gemma.errors import GenerationError
from mlx_gemma import speculative
from mlx_gemma.speculative_control import FixedK
from mlx_gemma.loading import load

from conftest import FIXTURES

_loaded: dict = {}


@pytest.fixture(autouse=True)
def fixed_k(monkeypatch):
    """k proposals every step: the adaptive controller (test_speculative_adaptive) would rightly switch a
    draft as costly as the target off, and these tests are about what speculation does when it runs."""
    monkeypatch.setattr(speculative, "Adaptive", lambda k, **_: FixedK(k))
MESSAGES = ["Tell me a story", "And then what happened?", "Say it again, the same way"]


def tiny(name="gemma3"):
    if name not in _loaded:
        _loaded[name] = load(FIXTURES / f"tiny_{name}")
    return _loaded[name]


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_each_turn_equals_plain_greedy_and_reports_its_stats(name):
    model, tok = tiny(name)
    plain = ChatSession(model, tok, system="Be brief.", max_tokens=12)
    sessions = {"lookup": ChatSession(model, tok, system="Be brief.", max_tokens=12, prompt_lookup=2),
                "draft": ChatSession(model, tok, system="Be brief.", max_tokens=12, draft_model=(model, tok),
                                     num_draft_tokens=4)}
    for text in MESSAGES:
        expected = [r.token for r in plain.send(text)]
        for label, chat in sessions.items():
            responses = list(chat.send(text))
            assert [r.token for r in responses] == expected, (label, text)
            assert chat.history == plain.history
            last = responses[-1]
            assert last.draft_proposed is not None and 0 <= last.draft_accepted <= last.draft_proposed
            if label == "draft":  # the target as its own draft: every proposal kept
                assert last.draft_accepted == last.draft_proposed > 0
    assert sessions["draft"].cache.draft is not None  # its caches followed the conversation
    sessions["draft"].reset()
    assert sessions["draft"].cache.draft is None and sessions["draft"].cache.slack == 4


def test_bad_speculation_settings_are_typed_errors_at_construction():
    model, tok = tiny()
    with pytest.raises(GenerationError, match="not both"):
        ChatSession(model, tok, draft_model=(model, tok), prompt_lookup=2)
    with pytest.raises(GenerationError, match="num_draft_tokens"):
        ChatSession(model, tok, prompt_lookup=2, num_draft_tokens=0)


def test_cli_speculates_and_prints_accepted_over_proposed(monkeypatch, capsys):
    """In process (stdin a pipe): --draft-model prints each turn's count; --verbose the stats block."""
    model, tok = tiny()
    folder = str(FIXTURES / "tiny_gemma3")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nTell me more\n"))
    assert main(["--model", folder, "--max-tokens", "8", "--draft-model", folder, "--num-draft-tokens", "3"]) == 0
    done = capsys.readouterr()
    chat = ChatSession(model, tok, max_tokens=8)
    assert done.out == "".join(chat.reply(t) + "\n" for t in ["Hello", "Tell me more"])
    lines = [line for line in done.err.splitlines() if line.startswith("[speculation: ")]
    assert len(lines) == 2 and all(" proposed tokens accepted]" in line for line in lines)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    assert main(["--model", folder, "--max-tokens", "8", "--prompt-lookup", "2", "--verbose"]) == 0
    assert "Speculation: " in capsys.readouterr().err
