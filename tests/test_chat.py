"""Chat: the turn format, ChatSession (turn 2 equals a fresh run and prefills only itself), and
`python -m mlx_gemma.chat` driven through stdin.

References: the tokenizer's chat template (Gemma's official turn format, checked
in test_tokenizer) for the ids, and a fresh run without a cache for the tokens.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from mlx_gemma.chat import ChatSession, next_turn_ids
from mlx_gemma.errors import GenerationError
from mlx_gemma.generate import stream_generate
from mlx_gemma.loading import load

from conftest import FIXTURES
from test_prompt_cache import Counting

_loaded: dict = {}


def tiny(name="gemma3"):
    if name not in _loaded:
        _loaded[name] = load(FIXTURES / f"tiny_{name}")
    return _loaded[name]


def test_turn_ids_extend_the_conversation_as_the_template_renders_it():
    _, tok = tiny()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "model", "content": "Hello!"}, {"role": "user", "content": "How are you?"}]
    first = next_turn_ids(tok, [], "Hi there", "Be brief.")
    assert first == tok.apply_chat_template(messages[:2], tokenize=True)
    reply = tok.encode("Hello!", add_bos=False)
    whole = tok.apply_chat_template(messages, tokenize=True)
    # A reply ended by <end_of_turn>, by <eos>, or cut short: the turn is closed the same way.
    for ending in ([tok.end_of_turn_id], [tok.eos_id], []):
        assert next_turn_ids(tok, first + reply + ending, "How are you?") == whole


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_second_turn_equals_a_fresh_run_and_prefills_only_itself(name):
    model, tok = tiny(name)
    counting = Counting(model)
    chat = ChatSession(counting, tok, system="Be brief.", max_tokens=8)
    first = [r.token for r in chat.send("Tell me a story")]
    turn1 = next_turn_ids(tok, [], "Tell me a story", "Be brief.")
    assert first == [r.token for r in stream_generate(model, tok, turn1, max_tokens=8)]
    assert chat.history == turn1 + first
    cached = chat.cache.offset
    counting.fed = 0
    second = [r.token for r in chat.send("And then what happened?")]
    full = next_turn_ids(tok, turn1 + first, "And then what happened?")
    fresh = list(stream_generate(model, tok, full, max_tokens=8, stop_token_ids=[tok.end_of_turn_id]))
    assert second == [r.token for r in fresh]
    assert counting.fed == len(full) - cached + len(second) - 1  # the new turn, then the decode steps
    # The cache held turn 1 but perhaps its last token (the loop stops before feeding it at max_tokens).
    assert cached >= len(turn1) + len(first) - 1


def test_reset_starts_over_and_reply_returns_text():
    model, tok = tiny()
    chat = ChatSession(model, tok, max_tokens=5)
    text = chat.reply("Hello")
    chat.reply("Again")
    chat.reset()
    assert chat.history == [] and chat.cache.tokens == []
    assert chat.reply("Hello") == text


def test_sampling_settings_object_equals_the_sampler_it_makes():
    from mlx_gemma.samplers import SamplingSettings

    model, tok = tiny()
    settings = SamplingSettings(temp=0.8, top_k=20, seed=7)
    by_object = ChatSession(model, tok, max_tokens=6, sampling=settings)
    by_parts = ChatSession(model, tok, max_tokens=6, sampler=settings.sampler(), logits_processors=[])
    assert [by_object.reply(t) for t in ("Hello", "More")] == [by_parts.reply(t) for t in ("Hello", "More")]
    with pytest.raises(GenerationError, match="not both"):
        ChatSession(model, tok, sampling=settings, sampler=settings.sampler())


def test_a_reply_cut_short_keeps_the_session_consistent():
    model, tok = tiny()
    chat = ChatSession(model, tok, max_tokens=8)
    for n, _ in enumerate(chat.send("Hello")):
        if n == 2:
            break
    assert len(chat.history) == len(next_turn_ids(tok, [], "Hello")) + 3
    assert chat.cache.tokens == chat.history[:chat.cache.offset]
    full = next_turn_ids(tok, chat.history, "Go on")
    assert [r.token for r in chat.send("Go on")] == [
        r.token for r in stream_generate(model, tok, full, max_tokens=8, stop_token_ids=[tok.end_of_turn_id])]


def run_chat(stdin, *args):
    return subprocess.run([sys.executable, "-m", "mlx_gemma.chat", "--model", str(FIXTURES / "tiny_gemma3"), *args],
                          input=stdin, capture_output=True, text=True, timeout=120, cwd=FIXTURES.parents[1])


def test_cli_chats_resets_and_quits():
    model, tok = tiny()
    done = run_chat("Hello\nTell me more\n/reset\nHello\n/quit\nnever read\n", "--max-tokens", "6",
                    "--system", "Be brief.")
    assert done.returncode == 0, done.stderr
    chat = ChatSession(model, tok, system="Be brief.", max_tokens=6)
    expected = [chat.reply("Hello"), chat.reply("Tell me more")]
    assert done.stdout == "".join(t + "\n" for t in expected + expected[:1])
    assert "[new conversation]" in done.stderr and "Traceback" not in done.stderr


def test_cli_leaves_cleanly_at_eof_and_reports_bad_settings():
    done = run_chat("")
    assert done.returncode == 0 and done.stdout == "" and "Traceback" not in done.stderr
    done = run_chat("Hi\n", "--kv-bits", "7")
    assert done.returncode == 2 and done.stderr.splitlines()[-1].startswith("error: kv_bits")


def test_cli_leaves_cleanly_on_ctrl_c():
    chat = subprocess.Popen([sys.executable, "-m", "mlx_gemma.chat", "--model", str(FIXTURES / "tiny_gemma3"),
                             "--max-tokens", "3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=FIXTURES.parents[1])
    try:
        chat.stdin.write("Hello\n")
        chat.stdin.flush()
        chat.stdout.readline()  # the first reply: the loop is running
        chat.send_signal(signal.SIGINT)
        out, err = chat.communicate(timeout=60)
    finally:
        chat.kill()
    assert chat.returncode == 0 and "Traceback" not in err


def test_cli_reports_a_turn_that_does_not_fit_and_goes_on():
    model, tok = tiny()
    done = run_chat("word " * 300 + "\nHello\n", "--max-tokens", "4")  # the tiny model's context is 256
    assert done.returncode == 0, done.stderr
    assert "error: the prompt is" in done.stderr and "context length is 256" in done.stderr
    assert done.stdout == ChatSession(model, tok, max_tokens=4).reply("Hello") + "\n"


def test_cli_refuses_thinking_for_a_gemma3_vocabulary():
    done = run_chat("Hi\n", "--enable-thinking")
    assert done.returncode == 2 and done.stderr.splitlines()[-1].startswith("error: enable_thinking")
